"""The requests and answers of the reranking APIs RAG stacks call: Cohere's /v1/rerank and /v2/rerank (which Jina's
and vLLM's rerank endpoints share), vLLM's /score, and /v1/models. Plain functions over parsed JSON: what is wrong
with a request is a BadRequest naming the field, as those APIs answer it ({"message": ...}, status 4xx).

The score served: `relevance_score` = exp(s), s the paper's score (the mean log-probability of the query tokens
after "Document: <d> Query:"): the geometric-mean probability of the query tokens, in (0, 1], ordered as s is, and
what training's softmax reads as exp(s) / tau. s itself is returned beside it as `mean_logprob`.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any


class BadRequest(Exception):
    """A request the server refuses, with the HTTP status and the message its body carries."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool
    max_tokens_per_doc: int | None
    model: str | None


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{name}: must be an integer of at least 1, got {value!r}")
    return value


def _query(body: dict[str, Any], name: str) -> str:
    if name not in body:
        raise BadRequest(f"{name}: required")
    value = body[name]
    if not isinstance(value, str):
        raise BadRequest(f"{name}: must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRequest(f"{name}: must not be empty")
    return value


def _documents(body: dict[str, Any], name: str, max_documents: int, objects: bool) -> list[str]:
    """A non-empty list of strings (and, where `objects`, of {"text": string} objects, as Cohere's v1 takes)."""
    if name not in body:
        raise BadRequest(f"{name}: required")
    value = body[name]
    if isinstance(value, str) and name == "text_2":  # vLLM's /score takes one document as a string
        value = [value]
    if not isinstance(value, list):
        raise BadRequest(f"{name}: must be a list of strings, got {type(value).__name__}")
    if not value:
        raise BadRequest(f"{name}: must not be empty")
    if len(value) > max_documents:
        raise BadRequest(f"{name}: {len(value)} documents, more than this server takes in one request "
                         f"(--max-documents {max_documents})", status=413)
    texts = []
    for i, doc in enumerate(value):
        if objects and isinstance(doc, dict) and isinstance(doc.get("text"), str):
            doc = doc["text"]
        if not isinstance(doc, str):
            kind = "a string or an object with a string 'text'" if objects else "a string"
            raise BadRequest(f"{name}[{i}]: must be {kind}, got {type(doc).__name__}")
        texts.append(doc)
    return texts


def parse_rerank(body: Any, version: int, max_documents: int) -> RerankRequest:
    """A /v1/rerank (version 1) or /v2/rerank (version 2) request; unknown fields are ignored, as those APIs do."""
    body = _object(body)
    return_documents = body.get("return_documents", False)
    if not isinstance(return_documents, bool):
        raise BadRequest(f"return_documents: must be true or false, got {return_documents!r}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"model: must be a string, got {type(model).__name__}")
    return RerankRequest(
        query=_query(body, "query"),
        documents=_documents(body, "documents", max_documents, objects=version == 1),
        top_n=_positive_int(body, "top_n"),
        return_documents=return_documents,
        max_tokens_per_doc=_positive_int(body, "max_tokens_per_doc"),
        model=model,
    )


def parse_score(body: Any, max_documents: int) -> RerankRequest:
    """A vLLM /score request: text_1 the query, text_2 a document or a list of them."""
    body = _object(body)
    model = body.get("model")
    return RerankRequest(_query(body, "text_1"), _documents(body, "text_2", max_documents, objects=False), None,
                         False, None, model if isinstance(model, str) else None)


def relevance(score: float) -> float:
    return math.exp(score)


def ranked(scores: list[float], top_n: int | None) -> list[int]:
    """Document indices best first (ties by index), the first top_n (all when top_n is above their number)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order if top_n is None else order[:top_n]


def rerank_answer(request: RerankRequest, scores: list[float], tokens: int, model_name: str) -> dict[str, Any]:
    results = []
    for i in ranked(scores, request.top_n):
        result: dict[str, Any] = {"index": i, "relevance_score": relevance(scores[i]), "mean_logprob": scores[i]}
        if request.return_documents:
            result["document"] = {"text": request.documents[i]}
        results.append(result)
    return {"id": str(uuid.uuid4()), "model": model_name, "results": results,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
            "usage": {"total_tokens": tokens}}


def score_answer(scores: list[float], tokens: int, model_name: str) -> dict[str, Any]:
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model_name,
            "data": [{"index": i, "object": "score", "score": relevance(s), "mean_logprob": s}
                     for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def models_answer(model_name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "tsarank-engine"}]}
