"""The Python API for scoring: a trained ranker and the paper's query-likelihood score of (query, document) pairs.

    from tsarank_engine import Ranker
    ranker = Ranker.load("runs/sft/final")            # or "builtin:smollm2-135m-instruct"; device/dtype "auto"
    ranker.score("what is rope", ["RoPE rotates ...", "A rope is ..."])       # -> [s_0, s_1]
    ranker.rerank("what is rope", documents, top_k=10)                        # -> [(index, score), ...] best first
    for s in ranker.score_pairs(iterable_of_query_document_pairs): ...        # streamed, a chunk at a time

It is the `score` and `rerank` commands' code path: the paper's prompt and text truncation (PromptBuilder),
sequences packed by length into rows, the LM head at query positions only (scoring.score_pairs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from ..data.prompting import PromptBuilder, PromptedPair
from ..data.tokenization import Tokenizer
from ..devices import resolve_device, resolve_scoring_dtype
from ..model.builtin import resolve_model_path
from ..model.decoder import CausalLM
from ..model.loading import load_model
from .scoring import chunks, score_pairs


class Ranker:
    """A model and tokenizer with the paper's prompt. max_query_tokens / max_doc_tokens: None is the paper's
    evaluation (the query whole, the document cut to what is left of 512 tokens); 32 / 128 its training.
    batch_tokens: tokens per packed row (None: the device's default)."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, max_query_tokens: int | None = None,
                 max_doc_tokens: int | None = None, batch_tokens: int | None = None):
        self.model, self.tokenizer, self.batch_tokens = model.eval(), tokenizer, batch_tokens
        self.prompts = PromptBuilder(tokenizer, max_query_tokens, max_doc_tokens)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
             attention: str = "auto", max_query_tokens: int | None = None, max_doc_tokens: int | None = None,
             batch_tokens: int | None = None, progress: bool = False) -> "Ranker":
        """A Hugging Face checkpoint directory (or a builtin name) on `device` ("auto", "cpu", "cuda", "cuda:N" or
        a torch.device) in `dtype` ("auto": devices.resolve_scoring_dtype; "float32", "bfloat16", "float16" on
        CUDA, by name or as a torch.dtype). A half-precision dtype scores on the mixed path: the products in it (on
        the CPU all but attention's q/k/v and the head), the residual stream, norms and logits in float32
        (DESIGN.md, "Scoring precision")."""
        model_dir = resolve_model_path(str(path))
        torch_device = resolve_device(device)
        torch_dtype = resolve_scoring_dtype(dtype, torch_device)
        tokenizer = Tokenizer.from_dir(model_dir)  # before the weights: a missing tokenizer fails at once
        model = load_model(model_dir, dtype=torch_dtype, device=torch_device, attention=attention,
                           progress=progress, mixed=True)
        return cls(model, tokenizer, max_query_tokens, max_doc_tokens, batch_tokens)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the decoder's products (the mixed path keeps norms, embeddings and, on the CPU, the head in
        float32)."""
        return self.model.model.layers[0].mlp.down_proj.weight.dtype

    def prompt(self, query: str, document: str) -> PromptedPair:
        """One (query, document) as the paper's prompt, truncated as set."""
        return self.prompts.build(query, document)

    def score_prompts(self, prompted: list[PromptedPair]) -> list[float]:
        """The scores of prompted pairs, in their order."""
        return score_pairs(self.model, prompted, self.batch_tokens)

    def score(self, query: str, documents: Sequence[str]) -> list[float]:
        """The query's score with each document (mean log-probability of the query tokens), in their order."""
        return self.score_prompts(self.prompts.build_many(query, list(documents))) if documents else []

    def rerank(self, query: str, documents: Sequence[str], top_k: int | None = None) -> list[tuple[int, float]]:
        """(index into documents, score), best first, ties by index; the first top_k when given."""
        scores = self.score(query, documents)
        return sorted(enumerate(scores), key=lambda item: (-item[1], item[0]))[:top_k]

    def score_pairs(self, pairs: Iterable[tuple[str, str]]) -> Iterator[float]:
        """Scores of (query, document) pairs in their order, a chunk of scoring.CHUNK_PAIRS at a time: an iterable
        of any length is streamed."""
        for chunk in chunks(pairs):
            yield from self.score_prompts([self.prompt(query, document) for query, document in chunk])
