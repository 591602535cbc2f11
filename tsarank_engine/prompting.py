"""The paper's prompt: "Document: <d> Query:<q>", built exactly as RankingGPT's released code builds it.

Truncation is on text (encode without special tokens, keep the first n tokens, decode). The source is
the text up to and including "Query:"; its token count, from tokenizing the source alone with special
tokens, marks where the scored query tokens start in the full sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TsarankError
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


def truncate_text(tokenizer: Tokenizer, text: str, max_tokens: int) -> str:
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:max_tokens])


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
        tok = self.tokenizer
        if self.max_query_tokens is not None:
            query = truncate_text(tok, query, self.max_query_tokens)
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
        source = PROMPT_TEMPLATE.format(doc=truncate_text(tok, document, doc_budget)).replace(*_PAD_LITERAL)
        input_ids = tok.encode(source + query)
        pair = PromptedPair(input_ids, len(tok.encode(source)))
        if pair.num_query_tokens < 1 or pair.source_len < 1:
            raise TsarankError(f"the query {query!r} yields no query tokens after the prompt")
        return pair
