"""Packing sequences into rows for the decoder: whole sequences (stage 1) or whole query groups (stage 2)
laid end to end in rows of at most `max_tokens` tokens, with no padding.

A row carries what the decoder and the losses need: token ids, per-document position ids, cu_seqlens, each
position's target (the next token of its own sequence; -1 at a sequence's last token), the masks and the
loss weights: stage 1 `loss_mask` (positions predicting response tokens or the EOS) and `loss_weight`; stage 2
the group layout of the listwise loss (which positions predict which candidate's query tokens, which
candidates form each group, positives first, and their teacher scores when distilling), `gen_weight`
(positions inside positives that have a target) and `kl_weight` (every position, or with kl_last_position off
those with a target, as the paper's collator).
The weights make a loss a weighted mean: with loss_average "tokens" every counted position weighs 1 (a mean
over the step's tokens); with "paper" each micro-batch of paper_micro_batch sequences (stage 1, consecutive
in the order given) or each query group (stage 2) weighs 1 in all, as the paper's trainer averages.
Rows are filled first-fit decreasing over the units given (the caller decides the window, hence the order);
`pack_step` first deals a step's units to the ranks, balanced by tokens, then packs one rank's share only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tsarank_kernels.layout import GroupLayout, RankingBatch

from ..errors import TsarankError
from .sequences import CandidateGroup, TokenSequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedRow:
    input_ids: torch.Tensor  # int64 [T]
    position_ids: torch.Tensor  # int64 [T], restarting at 0 in each sequence
    cu_seqlens: torch.Tensor  # int32 [S + 1]
    targets: torch.Tensor  # int64 [T], -1 where a sequence ends
    loss_mask: torch.Tensor  # bool [T]: the position predicts a counted token (response / query token)
    loss_weight: torch.Tensor | None = None  # stage 1: float32 [T], the weight of each counted position, else 0
    group: GroupLayout | None = None  # stage 2
    gen_weight: torch.Tensor | None = None  # stage 2: float32 [T], L_gen's weights (positives' positions)
    kl_weight: torch.Tensor | None = None  # stage 2: float32 [T], L_dp's weights

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def ranking_batch(self) -> RankingBatch:
        """The stage-2 losses' view of this row."""
        if self.group is None:
            raise TsarankError("a stage-1 row has no ranking layout")
        return RankingBatch(self.targets, self.group, self.gen_weight, self.kl_weight)

    def to(self, device: torch.device | str) -> "PackedRow":
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        group = self.group and GroupLayout(move(self.group.token_candidate), move(self.group.group_offsets),
                                           move(self.group.positives), move(self.group.teacher))
        return PackedRow(move(self.input_ids), move(self.position_ids), move(self.cu_seqlens), move(self.targets),
                         move(self.loss_mask), move(self.loss_weight), group, move(self.gen_weight),
                         move(self.kl_weight))


def first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `sizes`, each summing to at most capacity; larger items placed first."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for b, room in enumerate(free):
            if sizes[i] <= room:
                bins[b].append(i)
                free[b] -= sizes[i]
                break
        else:
            bins.append([i])
            free.append(capacity - sizes[i])
    return [sorted(b) for b in bins]  # keep the given order inside a row


def deal(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices into `sizes` dealt into `parts` lists balanced by total size: largest first, each to the least
    loaded list (ties: the first); each list keeps the given order."""
    load, dealt = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        p = min(range(parts), key=lambda p: (load[p], p))
        load[p] += sizes[i]
        dealt[p].append(i)
    return [sorted(d) for d in dealt]


def _row(sequences: list[TokenSequence]) -> tuple[np.ndarray, ...]:
    """ids, positions, cu_seqlens, targets and 'predicts a counted token' for sequences laid end to end."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    cu = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    ids = np.fromiter((t for s in sequences for t in s.input_ids), dtype=np.int64, count=int(cu[-1]))
    starts = np.repeat(cu[:-1], lengths)
    positions = np.arange(int(cu[-1]), dtype=np.int64) - starts
    targets = np.full_like(ids, -1)
    targets[:-1] = ids[1:]
    targets[cu[1:] - 1] = -1  # a sequence's last token predicts nothing
    target_start = np.repeat(np.array([s.target_start for s in sequences], dtype=np.int64), lengths)
    counted = (positions + 1 >= target_start) & (targets >= 0)
    return ids, positions, cu, targets, counted, lengths


def _per_unit_weights(mask: np.ndarray, unit: np.ndarray, units: int, per_unit: bool) -> np.ndarray:
    """float32 weights of the positions in `mask`: 1 each, or with per_unit 1 / (the count of its unit's masked
    positions), so that every unit (`unit`: the unit of each position) weighs 1 in all."""
    if not per_unit:
        return mask.astype(np.float32)
    counts = np.bincount(unit[mask], minlength=units)
    return np.where(mask, 1.0 / np.maximum(counts[unit], 1), 0.0).astype(np.float32)


def _teacher_scores(groups: list[CandidateGroup]) -> torch.Tensor | None:
    """float32 teacher scores of the groups' candidates in row order, or None when the groups carry none."""
    carried = [g.teacher is not None for g in groups]
    if not any(carried):
        return None
    if not all(carried):
        raise TsarankError(f"query {groups[carried.index(False)].query_id} has no teacher scores, unlike the "
                           "groups packed with it")
    return torch.tensor([s for g in groups for s in g.teacher], dtype=torch.float32)


@dataclass(frozen=True)
class StepPart:
    """One rank's part of a training step (Packer.pack_step): its rows, packed from the units dealt to it; how
    many rows every rank runs (the most any rank has: FSDP's collectives need the same count on each); and the
    row a rank with fewer repeats, with a zero share of the loss, to keep in step: its own first, else the
    step's first unit packed alone."""
    rows: list[PackedRow]
    rows_each: int
    filler: PackedRow

    @property
    def copied_tokens(self) -> int:
        """Tokens computed in the filler rows."""
        return self.filler.num_tokens * (self.rows_each - len(self.rows))


LOSS_AVERAGES = ("tokens", "paper")


class Packer:
    """Rows of at most max_tokens; a longer stage-1 sequence is cut to max_tokens (warned once, counted).
    loss_average, paper_micro_batch and kl_last_position set the loss weights (see the module's doc)."""

    def __init__(self, max_tokens: int, loss_average: str = "tokens", paper_micro_batch: int = 16,
                 kl_last_position: bool = True):
        if max_tokens < 2:
            raise TsarankError(f"max_tokens must be at least 2, got {max_tokens}")
        if loss_average not in LOSS_AVERAGES:
            raise TsarankError(f"unknown loss_average {loss_average!r}; choose from {', '.join(LOSS_AVERAGES)}")
        self.max_tokens = max_tokens
        self.per_unit = loss_average == "paper"
        self.paper_micro_batch, self.kl_last_position = paper_micro_batch, kl_last_position
        self.truncated = 0

    def _fit(self, seq: TokenSequence) -> TokenSequence:
        if len(seq) <= self.max_tokens:
            return seq
        if self.truncated == 0:
            logger.warning("a sequence of %d tokens is cut to max_tokens=%d (further cuts are only counted)",
                           len(seq), self.max_tokens)
        self.truncated += 1
        return TokenSequence(seq.input_ids[: self.max_tokens], seq.target_start)  # past the end: no counted tokens

    def _sequence_weights(self, sequences: list[TokenSequence]) -> np.ndarray:
        """Each (fitted) sequence's per-token weight: 1, or with loss_average "paper" 1 / (the counted tokens of
        its micro-batch, paper_micro_batch consecutive sequences in the order given)."""
        if not self.per_unit:
            return np.ones(len(sequences))
        counted = np.array([max(len(s) - max(s.target_start, 1), 0) for s in sequences], dtype=np.float64)
        batch = np.arange(len(sequences)) // self.paper_micro_batch
        return 1.0 / np.maximum(np.bincount(batch, weights=counted)[batch], 1)

    def _bins(self, sizes: list[int], rows: int | None) -> list[list[int]]:
        """First-fit decreasing bins, or at least `rows` bins (as many as the items allow) balanced by size when
        that fits: every rank of a step runs the same number of rows."""
        bins = first_fit_decreasing(sizes, self.max_tokens)
        if rows is not None and len(bins) < rows:
            dealt = [d for d in deal(sizes, min(rows, len(sizes))) if d]
            if all(sum(sizes[i] for i in d) <= self.max_tokens for d in dealt):
                return dealt
        return bins

    def pack_sequences(self, sequences: list[TokenSequence], weights: np.ndarray | None = None,
                       rows: int | None = None) -> list[PackedRow]:
        """Stage-1 rows; with loss_average "paper" the sequences form micro-batches in the order given (or
        `weights`, the per-token weight of each sequence, come from the whole step). `rows`: see _bins."""
        sequences = [self._fit(s) for s in sequences]
        weights = self._sequence_weights(sequences) if weights is None else weights
        packed = []
        for members in self._bins([len(s) for s in sequences], rows):
            ids, positions, cu, targets, counted, lengths = _row([sequences[i] for i in members])
            weight = np.where(counted, np.repeat(weights[members], lengths), 0.0).astype(np.float32)
            packed.append(PackedRow(torch.from_numpy(ids), torch.from_numpy(positions),
                                    torch.from_numpy(cu).to(torch.int32), torch.from_numpy(targets),
                                    torch.from_numpy(counted), torch.from_numpy(weight)))
        return packed

    def pack_groups(self, groups: list[CandidateGroup], rows: int | None = None) -> list[PackedRow]:
        """Stage-2 rows, each holding whole groups (the listwise loss needs all of a group's scores)."""
        for g in groups:
            if g.num_tokens > self.max_tokens:
                raise TsarankError(f"query {g.query_id}: its {len(g.candidates)} candidates take {g.num_tokens} "
                                   f"tokens, more than max_tokens={self.max_tokens}; raise max_tokens")
        packed = []
        for members in self._bins([g.num_tokens for g in groups], rows):
            chosen = [groups[i] for i in members]
            sequences = [c for g in chosen for c in g.candidates]
            ids, positions, cu, targets, counted, lengths = _row(sequences)
            sizes = np.array([len(g.candidates) for g in chosen], dtype=np.int64)
            offsets = np.zeros(len(chosen) + 1, dtype=np.int64)
            np.cumsum(sizes, out=offsets[1:])
            candidate = np.repeat(np.arange(len(sequences), dtype=np.int64), lengths)
            positives = np.array([g.num_positives for g in chosen], dtype=np.int64)
            teacher = _teacher_scores(chosen)
            is_positive = (np.arange(len(sequences)) - np.repeat(offsets[:-1], sizes)) < np.repeat(positives, sizes)
            group_of = np.repeat(np.repeat(np.arange(len(chosen)), sizes), lengths)  # each position's group
            gen = np.repeat(is_positive, lengths) & (targets >= 0)
            kl = np.ones_like(gen) if self.kl_last_position else targets >= 0
            packed.append(PackedRow(
                torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(cu).to(torch.int32),
                torch.from_numpy(targets), torch.from_numpy(counted), None,
                GroupLayout(torch.from_numpy(np.where(counted, candidate, -1)), torch.from_numpy(offsets),
                            torch.from_numpy(positives), teacher),
                torch.from_numpy(_per_unit_weights(gen, group_of, len(chosen), self.per_unit)),
                torch.from_numpy(_per_unit_weights(kl, group_of, len(chosen), self.per_unit)),
            ))
        return packed

    def pack_step(self, units: list[TokenSequence] | list[CandidateGroup], world: int, rank: int) -> StepPart:
        """Rank `rank`'s part of a step of `world` ranks: the units (stage-1 sequences or stage-2 groups, never
        split) dealt to the ranks balanced by tokens, and this rank's share alone packed, into as many rows as the
        rank with the most, so that no rank computes a copy to keep in step with the others unless it has fewer
        units than that number. The loss weights are those of packing the whole step in one place. The dealing
        and the row counts are computed from the units' sizes, the same on every rank."""
        groups = bool(units) and isinstance(units[0], CandidateGroup)
        if groups:
            sizes = [g.num_tokens for g in units]
        else:
            units = [self._fit(s) for s in units]
            weights, sizes = self._sequence_weights(units), [len(s) for s in units]
        dealt = deal(sizes, world)
        shares = [[sizes[i] for i in share] for share in dealt]
        rows = max(len(first_fit_decreasing(share, self.max_tokens)) for share in shares)
        rows_each = max(len(self._bins(share, rows)) for share in shares if share)

        def pack(chosen: list[int]) -> list[PackedRow]:
            if groups:
                return self.pack_groups([units[i] for i in chosen], rows)
            return self.pack_sequences([units[i] for i in chosen], weights[chosen], rows)

        packed = pack(dealt[rank]) if dealt[rank] else []
        return StepPart(packed, rows_each, packed[0] if packed else pack([0])[0])
