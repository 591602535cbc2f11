"""The layouts the stage-2 losses read: which positions score which candidate, which candidates form each
query's group, and the per-position weights of the losses. Plain data, shared by the data pipeline that builds
them (tsarank_engine.data.packing) and the kernels that read them (rank_loss, ranking_head), so that neither imports
the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GroupLayout:
    """Which tokens score which candidate, and which candidates form each query's group.

    token_candidate: int64 [N], the candidate whose score token i counts towards, -1 for none.
    group_offsets: int64 [Q + 1], group q holds candidates group_offsets[q]:group_offsets[q+1], its positives first.
    positives: int64 [Q], how many of each group's first candidates are positives (None: one each, the paper's);
    at least one negative stays.
    teacher: float [num_candidates], a teacher's score of each candidate, in candidate order (None: no
    distillation); L_kd matches the model's group softmax to softmax(teacher / t_kd).
    Validated once at construction, which also fixes the sizes and scored positions that the losses need, so
    that computing a loss never waits on the device for them.
    """

    token_candidate: torch.Tensor
    group_offsets: torch.Tensor
    positives: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    num_candidates: int = field(init=False)
    max_group_size: int = field(init=False)
    scored_positions: torch.Tensor = field(init=False, repr=False)  # int64 indices of tokens with a candidate

    def __post_init__(self) -> None:
        sizes = self.group_offsets[1:] - self.group_offsets[:-1]
        if self.group_offsets.numel() < 2 or int(self.group_offsets[0]) != 0:
            raise ValueError("group_offsets must start at 0 and hold at least one group")
        if bool((sizes < 2).any()):
            q = int((sizes < 2).nonzero()[0])
            raise ValueError(f"group {q} has {int(sizes[q])} candidate(s); a listwise group needs a positive and a negative")
        if self.positives is None:
            object.__setattr__(self, "positives", torch.ones_like(sizes))
        elif self.positives.shape != sizes.shape or bool(((self.positives < 1) | (self.positives >= sizes)).any()):
            raise ValueError(f"positives must give 1 to size - 1 positives for each of the {sizes.numel()} groups, "
                             f"got {self.positives.tolist()[:8]}")
        object.__setattr__(self, "num_candidates", int(self.group_offsets[-1]))
        if self.teacher is not None:
            if not self.teacher.is_floating_point() or self.teacher.shape != (self.num_candidates,):
                raise ValueError(f"teacher must be a float tensor of {self.num_candidates} scores, one per candidate, "
                                 f"got {self.teacher.dtype} {tuple(self.teacher.shape)}")
            if not bool(torch.isfinite(self.teacher).all()):
                c = int((~torch.isfinite(self.teacher)).nonzero()[0])
                raise ValueError(f"candidate {c}'s teacher score is {float(self.teacher[c])}, not a finite number")
        object.__setattr__(self, "max_group_size", int(sizes.max()))
        object.__setattr__(self, "scored_positions", (self.token_candidate >= 0).nonzero().squeeze(1))
        scored = self.token_candidate[self.scored_positions]
        if scored.numel() and int(scored.max()) >= self.num_candidates:
            raise ValueError(f"token_candidate names candidate {int(scored.max())}, only {self.num_candidates} exist")
        counts = torch.bincount(scored, minlength=self.num_candidates)
        if bool((counts == 0).any()):
            raise ValueError(f"candidate {int((counts == 0).nonzero()[0])} has no query tokens")


@dataclass(frozen=True)
class RankingBatch:
    """Per-position layout of a packed stage-2 batch (N positions).

    targets: int64 [N], the next token (negative where none); group: which positions' targets are which
    candidate's query tokens, and the groups; gen_weight: bool or float [N], the weights of L_gen's positions (in
    the positive's sequences; L_gen is their weighted mean); kl_weight: bool or float [N], the weights of L_dp's
    positions. A bool tensor weighs its positions alike: a plain mean over them.
    """

    targets: torch.Tensor
    group: GroupLayout
    gen_weight: torch.Tensor
    kl_weight: torch.Tensor
