"""The stage-2 "ranking head": L_rank, L_gen, L_dp (and L_kd) from final hidden states in one fused op.

Every position of a packed batch predicts its next token, so one target log-prob per position serves both
the rank loss (positions whose target is a query token) and the generation loss (positions inside the
positive's sequence), and one KL per position serves the differential penalty; L_kd, the distillation from
teacher scores, reads the same candidate scores as the rank loss. The reference path takes them from full
logits.

The chunked paths (torch and Triton) go further: the gradients of L_gen and L_dp with respect to each
token's logp and KL are constants, and those of L_rank and L_kd depend only on the query positions (a few
percent of the tokens). So they score the query positions first, take the listwise losses' coefficients, and
then make one pass over all logits that yields the losses and dh (and dW) together: three matrix products of
the logits' size, as the plain computation has (a backward recomputing the logits would need five), with one
chunk of logits alive at a time. The gradient formed is that of `loss`; a backward that weights the parts
differently is refused rather than answered wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused_linear import check_inputs, chunked_forward, default_chunk_rows, linear_logprob_kl
from .impl import resolve_impl
from .layout import RankingBatch
from .rank_loss import rank_loss, reference_rank_loss


@dataclass(frozen=True)
class LossSettings:
    """What stage 2 optimizes: loss = L_rank + w_gen L_gen + w_dp L_dp + w_kd L_kd, with tau the temperature of
    L_rank's softmax over exp(s) and t_kd the teacher's in L_kd. One object from the recipe to the kernels."""

    tau: float = 0.001
    w_gen: float = 1.0
    w_dp: float = 1.0
    w_kd: float = 0.0
    t_kd: float = 1.0


@dataclass(frozen=True)
class RankingLosses:
    loss: torch.Tensor
    l_rank: torch.Tensor
    l_gen: torch.Tensor
    l_dp: torch.Tensor
    l_kd: torch.Tensor  # 0 when the layout has no teacher scores


def ranking_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    batch: RankingBatch,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    settings: LossSettings = LossSettings(),
    impl: str | None = None,
    chunk_rows: int | None = None,
) -> RankingLosses:
    """loss = L_rank + w_gen L_gen + w_dp L_dp + w_kd L_kd as `settings` weigh them (L_dp needs the reference
    states and head; 0 without them; L_kd, KL(softmax(teacher / t_kd) || the group softmax of L_rank), needs the
    layout's teacher scores).

    impl "reference" builds full logits (the spec); "torch" and "triton" run the single-pass chunked head
    (`chunk_rows` rows of logits at a time, swept by plain torch or by the Triton kernels), which forms the
    gradient of `loss` during the forward: backpropagating the parts with other weights than loss's is an
    error there. None picks Triton on CUDA and torch elsewhere. The head gets no gradient computed when it
    does not require one, and nothing is formed for the backward when neither hidden nor head requires one.
    Every scored or generation position must have a target.
    """
    impl = resolve_impl(impl, hidden.device)
    s = settings
    if s.w_kd > 0 and batch.group.teacher is None:
        raise ValueError("w_kd > 0 needs teacher scores in the group layout (GroupLayout.teacher)")
    if ref_hidden is None or s.w_dp == 0:
        ref_hidden = ref_weight = None
    missing = (batch.targets < 0) & ((batch.group.token_candidate >= 0) | (batch.gen_weight != 0))
    if bool(missing.any()):
        raise ValueError(f"position {int(missing.nonzero()[0])} is a query or generation position without a target")
    if impl == "reference":
        logp, _, kl = linear_logprob_kl(hidden, weight, batch.targets, ref_hidden, ref_weight, impl=impl)
        l_rank, l_kd = reference_rank_loss(logp, batch.group, s.tau, s.t_kd)
        l_gen, l_dp = _gen_and_dp(logp, kl, batch)
        return RankingLosses(l_rank + s.w_gen * l_gen + s.w_dp * l_dp + s.w_kd * l_kd, l_rank, l_gen, l_dp, l_kd)
    check_inputs(hidden, weight, batch.targets, ref_hidden, ref_weight)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.dtype, weight.device, impl)
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    form_grad = torch.is_grad_enabled()  # Function.forward itself always runs with grad mode off
    losses = _ChunkedRankingHead.apply(hidden, weight, ref_hidden, ref_weight, batch, s, impl, chunk_rows, form_grad)
    return RankingLosses(*losses)


def _gen_and_dp(logp: torch.Tensor, kl: torch.Tensor | None, batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """L_gen (-logp over the positive's positions) and L_dp (KL over the counted positions; 0 without KL), each a
    mean weighted by its mask. Masks multiply rather than index: boolean indexing would wait for the device."""
    l_gen = -(logp * batch.gen_weight).sum() / batch.gen_weight.sum()
    l_dp = (kl * batch.kl_weight).sum() / batch.kl_weight.sum() if kl is not None else torch.zeros_like(l_gen)
    return l_gen, l_dp


class _ChunkedRankingHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, batch, settings, impl, chunk_rows, form_grad):
        targets, group = batch.targets, batch.group
        w_gen, w_dp, w_kd = settings.w_gen, settings.w_dp, settings.w_kd
        need_dh, need_dw = form_grad and ctx.needs_input_grad[0], form_grad and ctx.needs_input_grad[1]
        # 1. the listwise losses and the coefficients d (L_rank + w_kd L_kd) / d logp from the query positions
        # alone (no host synchronisation: the layout knows its positions, so the device never waits for the host)
        query = group.scored_positions
        query_logp = chunked_forward(hidden[query], weight, targets[query], None, None, impl, chunk_rows)[0]
        with torch.enable_grad():
            leaf = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
            leaf = leaf.index_put((query,), query_logp).requires_grad_()
            l_rank, l_kd = rank_loss(leaf, group, settings.tau, impl=impl, t_kd=settings.t_kd)
            rank_coef = torch.autograd.grad(l_rank + w_kd * l_kd, leaf)[0] if need_dh or need_dw else None
        # 2. every upstream gradient is now known: one pass gives the losses and the gradients
        has_ref = ref_hidden is not None
        g_logp = g_kl = None
        if need_dh or need_dw:
            g_logp = rank_coef - batch.gen_weight * (w_gen / batch.gen_weight.sum())
            g_kl = (batch.kl_weight * (w_dp / batch.kl_weight.sum())).float() if has_ref else None
        out = chunked_forward(hidden, weight, targets, ref_hidden, ref_weight, impl, chunk_rows,
                              g_logp, g_kl, need_dh, need_dw)
        l_gen, l_dp = _gen_and_dp(out[0], out[2], batch)
        if need_dh or need_dw:
            ctx.save_for_backward(out[4], out[5])  # dh, dW, each None when not needed
        ctx.weights, ctx.weight_dtype = (1.0, w_gen, w_dp if has_ref else 0.0, w_kd), weight.dtype
        ctx.set_materialize_grads(False)  # unused outputs get None, not zeros to be checked on the device
        l_rank, l_kd = l_rank.detach(), l_kd.detach()
        return l_rank + w_gen * l_gen + w_dp * l_dp + w_kd * l_kd, l_rank, l_gen, l_dp, l_kd

    @staticmethod
    def backward(ctx, g_loss, g_rank, g_gen, g_dp, g_kd):
        # The gradient was formed for `loss`; any mix of loss and parts must weight the parts as loss does.
        scale = _common_scale(g_loss, (g_rank, g_gen, g_dp, g_kd), ctx.weights)
        dh, dw = ctx.saved_tensors
        return (
            scale * dh if dh is not None else None,
            (scale * dw).to(ctx.weight_dtype) if dw is not None else None,
            None, None, None, None, None, None, None,
        )


def _common_scale(g_loss, g_parts, weights) -> torch.Tensor:
    """The c with upstream gradients equal to c * d loss / d part, or an error explaining the restriction.
    Outputs that were not backpropagated arrive as None."""
    if all(g is None for g in g_parts):  # loss alone was backpropagated: nothing to check, no host sync
        return g_loss
    present = next(g for g in (g_loss, *g_parts) if g is not None)
    g_loss, *g_parts = [torch.zeros_like(present) if g is None else g for g in (g_loss, *g_parts)]
    scales = []
    for g, w in zip(g_parts, weights):
        if w == 0:
            if bool(g != 0):
                raise RuntimeError("the chunked ranking head cannot backpropagate a part whose loss weight is 0")
            continue
        scales.append(g_loss + g / w)
    scales = torch.stack(scales)
    if not torch.allclose(scales, scales[0].expand_as(scales), rtol=1e-6, atol=0):
        raise RuntimeError(
            "the chunked ranking head formed its gradient for `loss` in the forward pass: backpropagate loss "
            "(or a multiple of it), or use impl='reference' to weight the parts freely"
        )
    return scales[0]
