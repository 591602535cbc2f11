"""Token sequences of both stages, built as the paper's released code builds them (DESIGN.md section 1).

Stage 1: the model reads source + response (+ EOS when the tokenizer has one); the loss covers the response
and the EOS. The boundary is the token count of the source tokenized alone, as for the query tokens of a
ranking prompt. Stage 2: each query gets one positive drawn at random and G - 1 negatives (without
replacement when there are enough, with replacement when not), each candidate a prompt "Document: <d>
Query:<q>" with the query cut to 32 and the document to 128 tokens by default (text-level truncation).
Sampling is a pure function of the seed and the group's position in the epoch. A passage's title is not
used (the paper's MS MARCO groups have none).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import TsarankError
from .prompting import PromptBuilder
from .readers import Passage, QueryGroup, TextPair
from .tokenization import Tokenizer

TRAIN_MAX_QUERY_TOKENS = 32
TRAIN_MAX_DOC_TOKENS = 128


@dataclass(frozen=True)
class Sequence:
    """Token ids; input_ids[target_start:] are the tokens whose prediction counts (the response of a stage-1
    pair, the query of a stage-2 candidate)."""

    input_ids: tuple[int, ...]
    target_start: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class CandidateGroup:
    """A query's candidates, the positive first."""

    query_id: str
    candidates: tuple[Sequence, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.candidates)


def cpt_sequence(tokenizer: Tokenizer, pair: TextPair, max_tokens: int | None = None) -> Sequence:
    """source + response (+ EOS); the targets that count are the response tokens and the EOS.

    A sequence over max_tokens keeps its response whole and loses the end of its source (the document): cutting
    its end instead, as a plain truncation would, leaves nothing to learn. A response alone over the limit is cut.
    """
    ids = tokenizer.encode(pair.source + pair.response)
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    source_len = len(tokenizer.encode(pair.source))
    if source_len >= len(ids):
        raise TsarankError(f"the response {pair.response!r} yields no tokens after its source")
    if max_tokens is not None and len(ids) > max_tokens:
        keep_source = max(1, max_tokens - (len(ids) - source_len))
        ids = (ids[:keep_source] + ids[source_len:])[:max_tokens]
        source_len = keep_source
    return Sequence(tuple(ids), source_len)


def sample_candidates(group: QueryGroup, group_size: int, rng: random.Random) -> list[Passage]:
    """One random positive, then group_size - 1 negatives: without replacement when there are enough."""
    if group_size < 2:
        raise TsarankError(f"a group needs at least 2 candidates, got group_size={group_size}")
    positive = rng.choice(group.positives)
    wanted = group_size - 1
    if len(group.negatives) >= wanted:
        negatives = rng.sample(group.negatives, wanted)
    else:
        negatives = rng.choices(group.negatives, k=wanted)
    return [positive, *negatives]


def group_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The sampler of the group at `index` of epoch `epoch`: a pure function of the three (resumable)."""
    return random.Random(f"{seed}/{epoch}/{index}")


class GroupBuilder:
    """Stage-2 candidate groups with the paper's construction."""

    def __init__(self, tokenizer: Tokenizer, group_size: int = 48, max_query_tokens: int = TRAIN_MAX_QUERY_TOKENS,
                 max_doc_tokens: int = TRAIN_MAX_DOC_TOKENS):
        self.prompts = PromptBuilder(tokenizer, max_query_tokens, max_doc_tokens)
        self.group_size = group_size

    def build(self, group: QueryGroup, rng: random.Random) -> CandidateGroup:
        passages = sample_candidates(group, self.group_size, rng)
        pairs = self.prompts.build_many(group.query, [p.text for p in passages])
        return CandidateGroup(group.query_id, tuple(Sequence(tuple(p.input_ids), p.source_len) for p in pairs))
