"""Token sequences of both stages, built as the paper's released code builds them (DESIGN.md, "The method").

Stage 1: the model reads source + response (+ EOS, see cpt_eos); the loss covers the response and the EOS.
The boundary is the token count of the source tokenized alone, as for the query tokens of a ranking prompt. Stage 2: each query gets one positive drawn at random and G - 1 negatives (without
replacement when there are enough, with replacement when not), each candidate a prompt "Document: <d>
Query:<q>" with the query cut to 32 and the document to 128 tokens by default (text-level truncation).
Sampling is a pure function of the seed and the group's position in the epoch. A passage's title is not
used (the paper's MS MARCO groups have none); its teacher score goes with it, for distillation.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from ..errors import TsarankError
from .prompting import PROMPT_TEMPLATE, PromptBuilder
from .readers import Passage, QueryGroup, TextPair
from .tokenization import Tokenizer

logger = logging.getLogger(__name__)

TRAIN_MAX_QUERY_TOKENS = 32
TRAIN_MAX_DOC_TOKENS = 128


@dataclass(frozen=True)
class TokenSequence:
    """Token ids; input_ids[target_start:] are the tokens whose prediction counts (the response of a stage-1
    pair, the query of a stage-2 candidate)."""

    input_ids: tuple[int, ...]
    target_start: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class CandidateGroup:
    """A query's candidates, its positives first (num_positives of them), with each one's teacher score when
    distilling."""

    query_id: str
    candidates: tuple[TokenSequence, ...]
    num_positives: int = 1
    teacher: tuple[float, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.candidates)


class CptBuilder:
    """Stage-1 sequences: source + response (+ EOS); the targets that count are the response tokens and the EOS.

    A pair over max_tokens: truncation "document" cuts the document text (on text, as stage 2 cuts documents:
    encode without special tokens, keep the first n, decode) so that "Document: ... Query:" + query + EOS stay
    whole, and when even an empty document leaves no room for them, cuts the end of query + EOS (said once,
    counted in queries_cut). A source not of the paper's form loses its end instead of a document. "right" is
    the paper's plain right truncation of the whole sequence, which can push the query out: a pair left
    without a response token stays in (as in the paper, it carries no loss) and is counted in queries_cut.
    """

    def __init__(self, tokenizer: Tokenizer, max_tokens: int | None = None, truncation: str = "document",
                 append_eos: bool = True):
        if truncation not in ("document", "right"):
            raise TsarankError(f"unknown truncation {truncation!r}; choose document or right")
        if append_eos and tokenizer.eos_id is None:
            raise TsarankError("append_eos is on but the tokenizer has no EOS token (tokenizer_config.json eos_token)")
        self.tokenizer, self.max_tokens, self.truncation, self.append_eos = tokenizer, max_tokens, truncation, append_eos
        self.documents_cut = self.queries_cut = 0

    def _encode(self, source: str, response: str) -> tuple[list[int], int]:
        ids = self.tokenizer.encode(source + response)
        if self.append_eos:
            ids.append(self.tokenizer.eos_id)
        return ids, len(self.tokenizer.encode(source))

    def build(self, pair: TextPair) -> TokenSequence:
        ids, source_len = self._encode(pair.source, pair.response)
        if source_len >= len(ids):
            raise TsarankError(f"the response {pair.response!r} yields no tokens after its source")
        limit = self.max_tokens
        if limit is None or len(ids) <= limit:
            return TokenSequence(tuple(ids), source_len)
        if self.truncation == "right":
            ids = ids[:limit]
            self._count_query_cut(len(ids) - source_len, pair)
            return TokenSequence(tuple(ids), min(source_len, limit))
        self.documents_cut += 1
        prefix, document, suffix = _split_source(pair.source)
        doc_ids = self.tokenizer.encode(document, add_special_tokens=False)
        keep = len(doc_ids) - (len(ids) - limit)
        while keep > 0:  # a cut can re-tokenize across its edge: shorten until the whole fits
            ids, source_len = self._encode(prefix + self.tokenizer.decode(doc_ids[:keep]) + suffix, pair.response)
            if len(ids) <= limit:
                return TokenSequence(tuple(ids), source_len)
            keep -= len(ids) - limit
        ids, source_len = self._encode(prefix + suffix, pair.response)
        if len(ids) > limit:
            ids = ids[:limit]
            self._count_query_cut(len(ids) - source_len, pair)
        return TokenSequence(tuple(ids), min(source_len, limit))

    def report(self) -> str | None:
        """One line on the pairs cut so far, or None."""
        if not (self.documents_cut or self.queries_cut):
            return None
        if self.truncation == "right":
            return (f"{self.queries_cut} stage-1 pairs over max_seq_tokens={self.max_tokens} lost query tokens to "
                    f"data.truncation = \"right\"")
        return (f"{self.documents_cut} stage-1 pairs over max_seq_tokens={self.max_tokens} had their document cut; "
                f"{self.queries_cut} of them their query's end too")

    def _count_query_cut(self, response_tokens_left: int, pair: TextPair) -> None:
        if self.queries_cut == 0:
            left = f"{response_tokens_left} of its tokens kept" if response_tokens_left > 0 else "none of it kept"
            logger.warning("a stage-1 pair's query does not fit max_seq_tokens=%d (%s): its end is cut (query %r; "
                           "further cuts are only counted)", self.max_tokens, left, pair.response[:80])
        self.queries_cut += 1


def _split_source(source: str) -> tuple[str, str, str]:
    """(prefix, document, suffix) of a stage-1 source: the paper's "Document: " and " Query:" around the document
    when present; otherwise the whole source is cut as the document."""
    prefix, _, suffix = PROMPT_TEMPLATE.partition("{doc}")
    head = prefix if source.startswith(prefix) else ""
    tail = suffix if source.endswith(suffix) and len(source) >= len(head) + len(suffix) else ""
    return head, source[len(head):len(source) - len(tail)], tail


def cpt_eos(model_family: str, append_eos: bool | str) -> bool:
    """Whether stage-1 sequences end with EOS: "auto" is the paper's rule (pretrain.py appends none when the model
    is a Qwen one, which it tells by "qwen" in the model's path; here by the checkpoint's family)."""
    return not model_family.startswith("qwen") if append_eos == "auto" else bool(append_eos)


POSITIVES = ("one", "all")


def sample_candidates(group: QueryGroup, group_size: int, rng: random.Random, positives: str = "one") -> list[Passage]:
    """The positives, then negatives up to group_size candidates (at least one), drawn without replacement when
    there are enough. positives "one": one drawn at random (the paper's); "all": every positive, in file order."""
    if group_size < 2:
        raise TsarankError(f"a group needs at least 2 candidates, got group_size={group_size}")
    if positives not in POSITIVES:
        raise TsarankError(f"unknown positives setting {positives!r}; choose one or all")
    chosen = [rng.choice(group.positives)] if positives == "one" else list(group.positives)
    wanted = max(group_size - len(chosen), 1)
    if len(group.negatives) >= wanted:
        negatives = rng.sample(group.negatives, wanted)
    else:
        negatives = rng.choices(group.negatives, k=wanted)
    return [*chosen, *negatives]


def group_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The sampler of the group at `index` of epoch `epoch`: a pure function of the three (resumable)."""
    return random.Random(f"{seed}/{epoch}/{index}")


class GroupBuilder:
    """Stage-2 candidate groups with the paper's construction; with teacher_scores, each candidate's teacher
    score too (the reader then requires one on every passage)."""

    def __init__(self, tokenizer: Tokenizer, group_size: int = 48, max_query_tokens: int = TRAIN_MAX_QUERY_TOKENS,
                 max_doc_tokens: int = TRAIN_MAX_DOC_TOKENS, positives: str = "one", teacher_scores: bool = False):
        self.prompts = PromptBuilder(tokenizer, max_query_tokens, max_doc_tokens)
        self.group_size, self.positives, self.teacher_scores = group_size, positives, teacher_scores

    def build(self, group: QueryGroup, rng: random.Random) -> CandidateGroup:
        passages = sample_candidates(group, self.group_size, rng, self.positives)
        pairs = self.prompts.build_many(group.query, [p.text for p in passages])
        sequences = tuple(TokenSequence(tuple(p.input_ids), p.source_len) for p in pairs)
        teacher = tuple(p.score for p in passages) if self.teacher_scores else None
        if teacher is not None and None in teacher:
            raise TsarankError(f"query {group.query_id}: a sampled passage has no teacher score")
        return CandidateGroup(group.query_id, sequences, 1 if self.positives == "one" else len(group.positives),
                              teacher)
