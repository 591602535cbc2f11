"""The stage-2 "ranking head": L_rank, L_gen and L_dp from final hidden states in one fused op.

Every position of a packed batch predicts its next token, so one target log-prob per position serves both
the rank loss (positions whose target is a query token) and the generation loss (positions inside the
positive's sequence), and one KL per position serves the differential penalty. All three therefore come
from a single call of the fused linear op, whose backward is a single pass over the vocabulary.

The chunked torch path goes further: the gradients of L_gen and L_dp with respect to each token's logp and
KL are constants, and those of L_rank depend only on the query positions (a few percent of the tokens).
So it scores the query positions first, takes the rank loss's coefficients, and then makes one pass over
all logits that yields the losses and dh (and dW) together: three matrix products of the logits' size, as
the plain computation has, with one chunk of logits alive at a time. Only `loss` carries a gradient there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused_linear import check_inputs, default_chunk_rows, default_impl, linear_logprob_kl, torch_forward
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

    impl "reference" builds full logits (the spec); "triton" runs the fused op and the Triton rank loss;
    "torch" the single-pass chunked head, where only `loss` carries a gradient (the parts are values).
    None picks Triton on CUDA and torch elsewhere. The head gets no gradient computed when it does not
    require one.
    """
    impl = impl or default_impl(hidden.device)
    use_ref = ref_hidden is not None and w_dp != 0
    if impl == "torch":
        check_inputs(hidden, weight, batch.targets, ref_hidden if use_ref else None, ref_weight if use_ref else None)
        losses = _ChunkedRankingHead.apply(
            hidden, weight, ref_hidden if use_ref else None, ref_weight if use_ref else None, batch, tau, w_gen, w_dp
        )
        return RankingLosses(*losses)
    logp, _, kl = linear_logprob_kl(
        hidden, weight, batch.targets, ref_hidden if use_ref else None, ref_weight if use_ref else None, impl=impl
    )
    if impl == "reference":
        l_rank = reference_rank_loss(logp, batch.group, tau)
    else:
        l_rank = rank_loss(logp, batch.group, tau, impl=impl)
    l_gen = -logp[batch.gen_mask].sum() / batch.gen_mask.sum()
    l_dp = kl[batch.kl_mask].sum() / batch.kl_mask.sum() if use_ref else torch.zeros_like(l_gen)
    return RankingLosses(l_rank + w_gen * l_gen + w_dp * l_dp, l_rank, l_gen, l_dp)


class _ChunkedRankingHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, batch, tau, w_gen, w_dp):
        chunk_rows = default_chunk_rows(weight.shape[0], weight.device)
        targets, group = batch.targets, batch.group
        # 1. the rank loss and its coefficients d L_rank / d logp from the query positions alone
        query = (group.token_candidate >= 0).nonzero().squeeze(1)
        query_logp = torch_forward(hidden[query], weight, targets[query], None, None, chunk_rows)[0]
        with torch.enable_grad():
            leaf = query_logp.requires_grad_()
            l_rank = rank_loss(leaf, GroupLayout(group.token_candidate[query], group.group_offsets), tau)
            (rank_coef,) = torch.autograd.grad(l_rank, leaf)
        # 2. every upstream gradient is now known: one pass gives the losses and the gradients
        n_gen, n_kl = batch.gen_mask.sum(), batch.kl_mask.sum()
        g_logp = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        g_logp[query] = rank_coef
        g_logp = g_logp - batch.gen_mask * (w_gen / n_gen)
        has_ref = ref_hidden is not None
        g_kl = batch.kl_mask * (w_dp / n_kl) if has_ref else None
        need_dw = ctx.needs_input_grad[1]
        logp, _, kl, _, dh, dw = torch_forward(
            hidden, weight, targets, ref_hidden, ref_weight, chunk_rows, g_logp, g_kl.float() if has_ref else None, need_dw
        )
        l_gen = -logp[batch.gen_mask].sum() / n_gen
        l_dp = kl[batch.kl_mask].sum() / n_kl if has_ref else torch.zeros_like(l_gen)
        ctx.save_for_backward(dh, *((dw,) if need_dw else ()))
        ctx.need_dw, ctx.weight_dtype = need_dw, weight.dtype
        parts = (l_rank.detach(), l_gen, l_dp)
        ctx.mark_non_differentiable(*parts)
        return (l_rank.detach() + w_gen * l_gen + w_dp * l_dp, *parts)

    @staticmethod
    def backward(ctx, g_loss, *_):
        dh, *dw = ctx.saved_tensors
        grad_w = (g_loss * dw[0]).to(ctx.weight_dtype) if ctx.need_dw else None
        return g_loss * dh, grad_w, None, None, None, None, None, None
