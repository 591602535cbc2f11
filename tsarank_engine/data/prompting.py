"""The paper's prompt: "Document: <d> Query:<q>", built exactly as RankingGPT's released code builds it.

Truncation is on text (encode without special tokens, keep the first n tokens, decode). The source is
the text up to and including "Query:"; its token count, from tokenizing the source alone with special
tokens, marks where the scored query tokens start in the full sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TsarankError
from .tokenization import Tokenizer

PROMPT_TEMPLATE = "Document: {doc} Query:"
# The official code adds "[PAD]" as a special token and so rewrites it in texts to keep it literal.
_PAD_LITERAL = ("[PAD]", "PAD")
# Reranking (official eval.py) gives the document what is left of a 512-token budget after the prompt,
# the query and a margin of 10; the prompt is measured with its "{doc}" placeholder in it.
PAPER_SEQUENCE_BUDGET = 512
PAPER_BUDGET_MARGIN = 10


@dataclass(frozen=True)
class PromptedPair:
    """Token ids of one (document, query) sequence; input_ids[source_len:] are the query tokens."""

    input_ids: list[int]
    source_len: int

    @property
    def num_query_tokens(self) -> int:
        return len(self.input_ids) - self.source_len


def truncate_texts(tokenizer: Tokenizer, texts: list[str], max_tokens: list[int]) -> list[str]:
    """Each text cut to its first max_tokens tokens, on text: encode without special tokens, keep, decode."""
    ids = tokenizer.encode_batch(texts, add_special_tokens=False)
    return tokenizer.decode_batch([t[:n] for t, n in zip(ids, max_tokens)])


class PromptBuilder:
    """Builds PromptedPairs with the paper's truncation rules.

    max_query_tokens: None keeps the whole query (the paper's reranking); a number truncates it
    (32 in the paper's training). max_doc_tokens: None gives the document the paper's reranking budget;
    a number truncates it to that many tokens (128 in training).

    Deviation: a query so long that it leaves the document no budget is an error here; the official code
    would pass a non-positive max_length to the tokenizer, with no defined result.
    """

    def __init__(self, tokenizer: Tokenizer, max_query_tokens: int | None = None, max_doc_tokens: int | None = None):
        for name, value in (("max_query_tokens", max_query_tokens), ("max_doc_tokens", max_doc_tokens)):
            if value is not None and value < 1:
                raise TsarankError(f"{name} must be at least 1, got {value}")
        self.tokenizer = tokenizer
        self.max_query_tokens, self.max_doc_tokens = max_query_tokens, max_doc_tokens
        self._template_len = len(tokenizer.encode(PROMPT_TEMPLATE))

    def build(self, query: str, document: str) -> PromptedPair:
        return self.build_many(query, [document])[0]

    def build_many(self, query: str, documents: list[str], doc_limit: int | None = None) -> list[PromptedPair]:
        """The sequences of one query with each document; the query is cut once, the documents in a batch, to
        at most `doc_limit` tokens when that is below the builder's own rule (a request's max_tokens_per_doc)."""
        tok = self.tokenizer
        if self.max_query_tokens is not None:
            query = truncate_texts(tok, [query], [self.max_query_tokens])[0]
        query = query.replace(*_PAD_LITERAL)
        doc_budget = self.max_doc_tokens
        if doc_budget is None:
            query_len = len(tok.encode(query))
            doc_budget = PAPER_SEQUENCE_BUDGET - self._template_len - query_len - PAPER_BUDGET_MARGIN
            if doc_budget < 1:
                raise TsarankError(
                    f"the query has {query_len} tokens, leaving no room for the document in the "
                    f"{PAPER_SEQUENCE_BUDGET}-token budget (set a query limit)"
                )
        if doc_limit is not None:
            doc_budget = min(doc_budget, doc_limit)
        cut = truncate_texts(tok, documents, [doc_budget] * len(documents))
        sources = [PROMPT_TEMPLATE.format(doc=d).replace(*_PAD_LITERAL) for d in cut]
        full = tok.encode_batch([source + query for source in sources])
        pairs = [PromptedPair(ids, len(src)) for ids, src in zip(full, tok.encode_batch(sources))]
        if any(p.num_query_tokens < 1 or p.source_len < 1 for p in pairs):
            raise TsarankError(f"the query {query!r} yields no query tokens after the prompt")
        return pairs
