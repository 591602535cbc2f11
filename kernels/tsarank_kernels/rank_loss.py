"""The grouped listwise rank loss of RankingGPT's stage 2, and the distillation loss, on per-token log-probs.

Candidate c's score is the mean log-prob of its query tokens, s_c; each query's group of candidates
(positives first) is scored by softmax(exp(s) / tau) and L_rank is the mean over queries of the
cross-entropy with the positive as target; with several positives (GroupLayout.positives), of minus the log of
their summed probability (the multi-positive softmax cross-entropy; one positive: the same). exp(s) <= 1, so the softmax logits stay within [0, 1/tau]:
stable at tau = 0.001 once each group's maximum is subtracted. Given a teacher's score per candidate
(GroupLayout.teacher), L_kd is the mean over queries of KL(softmax(teacher / t_kd) || softmax(exp(s) / tau)),
whose gradient in the logit x_c = exp(s_c) / tau is p_model_c - p_teacher_c. It works on [N] floats, never on
the vocabulary: the vectorised torch path is already linear in memory, and the Triton path saves launches.
The backward gives the per-token coefficients d loss / d logp_i that the fused linear op turns into logits
gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .impl import resolve_impl
from .layout import GroupLayout
from .rank_loss_triton import triton_rank_loss


class ListwiseLosses(NamedTuple):
    rank: torch.Tensor
    kd: torch.Tensor  # 0 when the layout has no teacher scores


def reference_rank_loss(logp: torch.Tensor, layout: GroupLayout, tau: float, t_kd: float = 1.0) -> ListwiseLosses:
    """The spec, one query at a time, in logp's dtype."""
    ranks, kds = [], []
    for q in range(layout.group_offsets.numel() - 1):
        lo, hi = int(layout.group_offsets[q]), int(layout.group_offsets[q + 1])
        scores = torch.stack([logp[layout.token_candidate == c].mean() for c in range(lo, hi)])
        log_probs = torch.log_softmax(torch.exp(scores) / tau, dim=0)
        ranks.append(-torch.logsumexp(log_probs[:int(layout.positives[q])], dim=0))
        if layout.teacher is not None:
            log_teacher = torch.log_softmax(layout.teacher[lo:hi].to(log_probs.dtype) / t_kd, dim=0)
            kds.append((log_teacher.exp() * (log_teacher - log_probs)).sum())
    rank = torch.stack(ranks).mean()
    return ListwiseLosses(rank, torch.stack(kds).mean() if kds else torch.zeros_like(rank))


class _TritonRankLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, token_candidate, group_offsets, positives, teacher, num_candidates, max_group, tau, t_kd):
        rank, kd, coef_rank, coef_kd = triton_rank_loss(logp.float(), token_candidate, group_offsets, positives,
                                                        num_candidates, max_group, tau, teacher, t_kd)
        ctx.save_for_backward(token_candidate, coef_rank, coef_kd)
        ctx.dtype = logp.dtype
        return rank, kd

    @staticmethod
    def backward(ctx, g_rank, g_kd):
        token_candidate, coef_rank, coef_kd = ctx.saved_tensors
        # each loss's coefficients weighted by its own upstream gradient: any mix of the two stays exact
        coef = g_rank * coef_rank if coef_kd is None else g_rank * coef_rank + g_kd * coef_kd
        per_token = torch.where(token_candidate >= 0, coef[token_candidate.clamp(min=0)], torch.zeros_like(coef[:1]))
        return per_token.to(ctx.dtype), None, None, None, None, None, None, None, None


def rank_loss(logp: torch.Tensor, layout: GroupLayout, tau: float, impl: str = "torch",
              t_kd: float = 1.0) -> ListwiseLosses:
    """(L_rank, L_kd), vectorised over all candidates and groups ("torch") or by the Triton kernels ("triton");
    differentiable in logp. L_kd is 0 when the layout has no teacher scores."""
    resolve_impl(impl, logp.device, ("torch", "triton"))  # the reference is reference_rank_loss
    if impl == "triton":
        return ListwiseLosses(*_TritonRankLoss.apply(
            logp, layout.token_candidate, layout.group_offsets, layout.positives, layout.teacher,
            layout.num_candidates, layout.max_group_size, tau, t_kd))
    logp = logp.to(torch.promote_types(logp.dtype, torch.float32))  # exp(s) / tau needs fp32 at tau = 0.001
    candidate = layout.token_candidate[layout.scored_positions]
    zeros = torch.zeros(layout.num_candidates, dtype=logp.dtype, device=logp.device)
    counts = zeros.index_add(0, candidate, torch.ones_like(candidate, dtype=logp.dtype))
    sums = zeros.index_add(0, candidate, logp[layout.scored_positions])
    logits = torch.exp(sums / counts) / tau
    sizes = layout.group_offsets[1:] - layout.group_offsets[:-1]
    groups = sizes.numel()
    group = torch.repeat_interleave(torch.arange(groups, device=logp.device), sizes,
                                    output_size=layout.num_candidates)
    lse = _group_logsumexp(logits, group, groups)
    # the positives' log-sum-exp, shifted by their own maximum (far below the group's, theirs would vanish)
    rank_in_group = torch.arange(layout.num_candidates, device=logp.device) - layout.group_offsets[:-1][group]
    positive = rank_in_group < layout.positives[group]
    rank = (lse - _group_logsumexp(torch.where(positive, logits, float("-inf")), group, groups)).mean()
    if layout.teacher is None:
        return ListwiseLosses(rank, torch.zeros_like(rank))
    teacher = layout.teacher.to(logits.dtype)
    # shifted by the group's maximum before the scaling: teacher / t_kd may be large
    shifted = (teacher - _group_max(teacher, group, groups)[group]) / t_kd
    log_teacher = shifted - _group_logsumexp(shifted, group, groups)[group]
    kl = log_teacher.exp() * (log_teacher - (logits - lse[group]))
    return ListwiseLosses(rank, torch.zeros_like(lse).index_add(0, group, kl).mean())


def _group_max(values: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """Each group's maximum, detached (a shift that leaves the log-sum-exp's value and gradient unchanged)."""
    init = torch.full((groups,), float("-inf"), dtype=values.dtype, device=values.device)
    return init.scatter_reduce(0, group, values.detach(), reduce="amax")


def _group_logsumexp(values: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """Each group's log-sum-exp, shifted by its maximum (entries of -inf count as absent)."""
    top = _group_max(values, group, groups)
    return top + torch.log(torch.zeros_like(top).index_add(0, group, torch.exp(values - top[group])))
