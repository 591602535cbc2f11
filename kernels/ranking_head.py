"""The stage-2 "ranking head": L_rank, L_gen and L_dp from final hidden states in one fused op.

Every position of a packed batch predicts its next token, so one target log-prob per position serves both
the rank loss (positions whose target is a query token) and the generation loss (positions inside the
positive's sequence), and one KL per position serves the differential penalty. All three therefore come
from a single call of the fused linear op, whose backward is a single pass over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused_linear import linear_logprob_kl
from .rank_loss import GroupLayout, rank_loss, reference_rank_loss


@dataclass(frozen=True)
class RankingBatch:
    """Per-position layout of a packed stage-2 batch (N positions).

    targets: int64 [N], the next token (negative where none); group: which positions' targets are which
    candidate's query tokens, and the groups; gen_mask: bool [N], positions in the positive's sequences
    (L_gen averages over them); kl_mask: bool [N], positions counted in L_dp (every real position).
    """

    targets: torch.Tensor
    group: GroupLayout
    gen_mask: torch.Tensor
    kl_mask: torch.Tensor


@dataclass(frozen=True)
class RankingLosses:
    loss: torch.Tensor
    l_rank: torch.Tensor
    l_gen: torch.Tensor
    l_dp: torch.Tensor


def ranking_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: RankingBatch,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    tau: float = 0.001,
    w_gen: float = 1.0,
    w_dp: float = 1.0,
    impl: str | None = None,
) -> RankingLosses:
    """loss = L_rank + w_gen L_gen + w_dp L_dp (L_dp needs the reference states and head; 0 without them).

    impl "reference" builds full logits (the spec); otherwise the fused op runs with `impl` (see
    linear_logprob_kl). The head gets no gradient computed when it does not require one.
    """
    use_ref = ref_hidden is not None and w_dp != 0
    logp, _, kl = linear_logprob_kl(
        hidden, weight, batch.targets, ref_hidden if use_ref else None, ref_weight if use_ref else None, impl=impl
    )
    if impl == "reference":
        l_rank = reference_rank_loss(logp, batch.group, tau)
    else:
        l_rank = rank_loss(logp, batch.group, tau, impl="triton" if impl == "triton" else "torch")
    l_gen = -logp[batch.gen_mask].sum() / batch.gen_mask.sum()
    l_dp = kl[batch.kl_mask].sum() / batch.kl_mask.sum() if use_ref else torch.zeros_like(l_gen)
    return RankingLosses(l_rank + w_gen * l_gen + w_dp * l_dp, l_rank, l_gen, l_dp)
