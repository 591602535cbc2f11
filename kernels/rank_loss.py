"""The grouped listwise rank loss of RankingGPT's stage 2, on per-token log-probs.

Candidate c's score is the mean log-prob of its query tokens, s_c; each query's group of candidates
(positives first) is scored by softmax(exp(s) / tau) and the loss is the mean over queries of the
cross-entropy with the positive as target; with several positives (GroupLayout.positives), of minus the log of
their summed probability (the multi-positive softmax cross-entropy; one positive: the same). exp(s) <= 1, so the softmax logits stay within [0, 1/tau]:
stable at tau = 0.001 once each group's maximum is subtracted. It works on [N] floats, never on the
vocabulary: the vectorised torch path is already linear in memory, and the Triton path saves launches.
The backward gives the per-token coefficients d loss / d logp_i that the fused linear op turns into logits
gradients.
"""

from __future__ import annotations

import torch

from .layout import GroupLayout
from .rank_loss_triton import triton_rank_loss


def reference_rank_loss(logp: torch.Tensor, layout: GroupLayout, tau: float) -> torch.Tensor:
    """The spec, one query at a time, in logp's dtype."""
    losses = []
    for q in range(layout.group_offsets.numel() - 1):
        lo, hi = int(layout.group_offsets[q]), int(layout.group_offsets[q + 1])
        scores = torch.stack([logp[layout.token_candidate == c].mean() for c in range(lo, hi)])
        log_probs = torch.log_softmax(torch.exp(scores) / tau, dim=0)
        losses.append(-torch.logsumexp(log_probs[:int(layout.positives[q])], dim=0))
    return torch.stack(losses).mean()


class _TritonRankLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, token_candidate, group_offsets, positives, num_candidates, max_group, tau):
        loss, coef = triton_rank_loss(logp.float(), token_candidate, group_offsets, positives, num_candidates,
                                      max_group, tau)
        ctx.save_for_backward(token_candidate, coef)
        ctx.dtype = logp.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        token_candidate, coef = ctx.saved_tensors
        per_token = torch.where(token_candidate >= 0, coef[token_candidate.clamp(min=0)], torch.zeros_like(coef[:1]))
        return (grad * per_token).to(ctx.dtype), None, None, None, None, None, None


def rank_loss(logp: torch.Tensor, layout: GroupLayout, tau: float, impl: str = "torch") -> torch.Tensor:
    """The loss, vectorised over all candidates and groups ("torch") or by the Triton kernels ("triton");
    differentiable in logp."""
    if impl not in ("torch", "triton"):
        raise ValueError(f"unknown rank loss impl {impl!r}; choose torch or triton")
    if impl == "triton":
        return _TritonRankLoss.apply(logp, layout.token_candidate, layout.group_offsets, layout.positives,
                                     layout.num_candidates, layout.max_group_size, tau)
    logp = logp.to(torch.promote_types(logp.dtype, torch.float32))  # exp(s) / tau needs fp32 at tau = 0.001
    candidate = layout.token_candidate[layout.scored_positions]
    zeros = torch.zeros(layout.num_candidates, dtype=logp.dtype, device=logp.device)
    counts = zeros.index_add(0, candidate, torch.ones_like(candidate, dtype=logp.dtype))
    sums = zeros.index_add(0, candidate, logp[layout.scored_positions])
    logits = torch.exp(sums / counts) / tau
    sizes = layout.group_offsets[1:] - layout.group_offsets[:-1]
    group = torch.repeat_interleave(torch.arange(sizes.numel(), device=logp.device), sizes,
                                    output_size=layout.num_candidates)
    top = torch.full_like(sizes, float("-inf"), dtype=logits.dtype).scatter_reduce(
        0, group, logits.detach(), reduce="amax"
    )
    lse = top + torch.log(torch.zeros_like(top).index_add(0, group, torch.exp(logits - top[group])))
    # the positives' log-sum-exp, shifted by their own maximum (far below the group's, theirs would vanish)
    rank_in_group = torch.arange(layout.num_candidates, device=logp.device) - layout.group_offsets[:-1][group]
    positive = rank_in_group < layout.positives[group]
    masked = torch.where(positive, logits, float("-inf"))
    top_positive = torch.full_like(top, float("-inf")).scatter_reduce(0, group, masked.detach(), reduce="amax")
    lse_positive = top_positive + torch.log(
        torch.zeros_like(top).index_add(0, group, torch.exp(masked - top_positive[group])))
    return (lse - lse_positive).mean()
