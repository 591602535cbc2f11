"""Fused linear log-softmax statistics: per-token target log-probs and KL to a reference model.

From hidden states h [N, D] and an LM head W [V, D] (and, for the KL, reference states and head), compute
per token, without ever holding the [N, V] logits:

    lse_i  = logsumexp_v z_iv                          z = h W^T (fp32 accumulation)
    logp_i = z_i,t_i - lse_i                           (0 where t_i < 0: no target)
    kl_i   = KL(p_ref,i || p_i) = sum_v p_ref,iv (z_ref,iv - z_iv) - lse_ref,i + lse_i

The backward takes upstream gradients g_logp and g_kl and needs one pass over the vocabulary:

    dz_iv = g_logp,i (1[v = t_i] - p_iv) + g_kl,i (p_iv - p_ref,iv),   dh = dz W,   dW = dz^T h

Three implementations share this contract: `reference_linear_logprob_kl` (the spec; full logits),
the chunked torch path (one chunk of rows' logits alive at a time, any device) and the Triton path (CUDA,
or the CPU under TRITON_INTERPRET=1). `linear_logprob_kl` picks one and wires autograd.
"""

from __future__ import annotations

import torch

from .fused_linear_triton import triton_backward, triton_forward

IMPLS = ("reference", "torch", "triton")
# The chunked path sizes its row chunks so that one fp32 logits chunk is about this big: small on the CPU
# (cache-sized work), large on CUDA (matrix products of a few dozen rows leave the GPU idle).
CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 512 * 2**20}


def default_chunk_rows(vocab_size: int, device: torch.device) -> int:
    return max(16, CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"] // (4 * vocab_size))


def default_impl(device: torch.device) -> str:
    """Triton on CUDA, the chunked torch path elsewhere (the interpreter is for tests, which name it)."""
    return "triton" if device.type == "cuda" else "torch"


def reference_linear_logprob_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp, lse, kl) the plain way: logits in the inputs' dtype, then log-softmax in fp32 (fp64 for fp64
    inputs), as transformers computes a loss. Differentiable by autograd."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden @ weight.T).to(compute)
    logprobs = torch.log_softmax(logits, dim=-1)
    has_target = targets >= 0
    picked = logprobs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    logp = torch.where(has_target, picked, torch.zeros_like(picked))
    lse = torch.logsumexp(logits, dim=-1)
    if ref_hidden is None:
        return logp, lse, None
    ref_logprobs = torch.log_softmax((ref_hidden @ ref_weight.T).to(compute), dim=-1)
    kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
    return logp, lse, kl


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Same rounding as the reference: the product in the inputs' dtype, the softmax statistics in fp32.
    return (hidden @ weight.T).float()


def _chunk_stats(hidden, weight, targets, ref_hidden, ref_weight):
    """One chunk's log-probs: (log p [c, V], lse, logp, log p_ref [c, V] or None, lse_ref or None, kl or None)."""
    log_p = _chunk_logits(hidden, weight)
    lse = torch.logsumexp(log_p, dim=-1)
    log_p.sub_(lse[:, None])
    picked = log_p.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    logp = torch.where(targets >= 0, picked, torch.zeros_like(picked))
    if ref_hidden is None:
        return log_p, lse, logp, None, None, None
    log_p_ref = _chunk_logits(ref_hidden, ref_weight)
    lse_ref = torch.logsumexp(log_p_ref, dim=-1)
    log_p_ref.sub_(lse_ref[:, None])
    kl = (log_p_ref.exp() * (log_p_ref - log_p)).sum(-1)
    return log_p, lse, logp, log_p_ref, lse_ref, kl


def _grad_chunk(log_p, log_p_ref, targets, g_logp, g_kl, hidden, weight, dw):
    """dh of one chunk from its log-probs (both buffers are consumed); adds the chunk's dW into `dw` if given.

    dz = g_logp (onehot(t) - p) + g_kl (p - p_ref), built in place in log_p's buffer.
    """
    g_logp = torch.where(targets >= 0, g_logp, torch.zeros_like(g_logp))
    g_kl = torch.zeros_like(g_logp) if g_kl is None else g_kl
    dz = log_p.exp_().mul_((g_kl - g_logp)[:, None])
    if log_p_ref is not None:
        dz.sub_(log_p_ref.exp_().mul_(g_kl[:, None]))
    dz.scatter_add_(1, targets.clamp(min=0)[:, None], g_logp[:, None])
    if dw is not None:  # fp32 accumulation straight into dW: no [V, D] temporary
        dw.addmm_(dz.T, hidden.float())
    return dz.to(weight.dtype) @ weight


def torch_forward(hidden, weight, targets, ref_hidden, ref_weight, chunk_rows, g_logp=None, g_kl=None, need_dw=False):
    """Chunked forward: fp32 (logp, lse, kl or None, lse_ref or None).

    With upstream gradients g_logp (and g_kl) already known, also returns (dh, dW or None) from the same
    pass over the logits, so no backward recomputation is needed (the ranking head's torch path).
    """
    n = hidden.shape[0]
    has_ref = ref_hidden is not None
    stats = torch.empty(4 if has_ref else 2, n, dtype=torch.float32, device=hidden.device)
    with_grad = g_logp is not None
    dh = torch.empty_like(hidden) if with_grad else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        rows = slice(lo, hi)
        log_p, stats[1, rows], stats[0, rows], log_p_ref, lse_ref, kl = _chunk_stats(
            hidden[rows], weight, targets[rows], ref_hidden[rows] if has_ref else None, ref_weight
        )
        if has_ref:
            stats[2, rows], stats[3, rows] = kl, lse_ref
        if with_grad:
            dh[rows] = _grad_chunk(log_p, log_p_ref, targets[rows], g_logp[rows],
                                   g_kl[rows] if g_kl is not None else None, hidden[rows], weight, dw)
        del log_p, log_p_ref
    rows_out = stats.unbind(0)
    outputs = (rows_out[0], rows_out[1], *((rows_out[2], rows_out[3]) if has_ref else (None, None)))
    return outputs + (dh, dw) if with_grad else outputs


def torch_backward(hidden, weight, targets, ref_hidden, ref_weight, lse, lse_ref, g_logp, g_kl, need_dw, chunk_rows):
    """Chunked backward, recomputing each chunk's logits: (dh in hidden's dtype, dW in fp32 or None)."""
    n = hidden.shape[0]
    dh = torch.empty_like(hidden)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    for lo in range(0, n, chunk_rows):
        rows = slice(lo, min(n, lo + chunk_rows))
        log_p = _chunk_logits(hidden[rows], weight).sub_(lse[rows, None])
        log_p_ref = None
        if g_kl is not None:
            log_p_ref = _chunk_logits(ref_hidden[rows], ref_weight).sub_(lse_ref[rows, None])
        dh[rows] = _grad_chunk(log_p, log_p_ref, targets[rows], g_logp[rows],
                               g_kl[rows] if g_kl is not None else None, hidden[rows], weight, dw)
        del log_p, log_p_ref
    return dh, dw


class _LinearLogprobKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ref_hidden, ref_weight, impl, chunk_rows):
        has_ref = ref_hidden is not None
        if impl == "triton":
            logp, lse, kl, lse_ref = triton_forward(hidden, weight, targets, ref_hidden, ref_weight)
        else:
            logp, lse, kl, lse_ref = torch_forward(hidden, weight, targets, ref_hidden, ref_weight, chunk_rows)
        ctx.save_for_backward(hidden, weight, targets, lse, *((ref_hidden, ref_weight, lse_ref) if has_ref else ()))
        ctx.impl, ctx.chunk_rows, ctx.has_ref = impl, chunk_rows, has_ref
        ctx.mark_non_differentiable(lse)
        return logp, lse, kl

    @staticmethod
    def backward(ctx, g_logp, _g_lse, g_kl):
        hidden, weight, targets, lse, *ref = ctx.saved_tensors
        ref_hidden, ref_weight, lse_ref = ref if ctx.has_ref else (None, None, None)
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g_logp = g_logp.float().contiguous()
        g_kl = g_kl.float().contiguous() if g_kl is not None and ctx.has_ref else None
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw):
            return (None,) * 7
        if ctx.impl == "triton":
            dh, dw = triton_backward(hidden, weight, targets, ref_hidden, ref_weight, lse, lse_ref, g_logp, g_kl, need_dw)
        else:
            dh, dw = torch_backward(
                hidden, weight, targets, ref_hidden, ref_weight, lse, lse_ref, g_logp, g_kl, need_dw, ctx.chunk_rows
            )
        return dh if need_dh else None, dw.to(weight.dtype) if need_dw else None, None, None, None, None, None


def linear_logprob_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    impl: str | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token fp32 (logp [N], lse [N], kl [N] or None) for hidden [N, D], head [V, D], targets [N]
    (negative: no target, logp 0). With ref_hidden [N, D] and ref_weight [V, D] (never differentiated) the
    KL(p_ref || p) is computed too. Gradients flow to hidden and weight through logp and kl.
    impl: "reference", "torch" (chunked, `chunk_rows` rows of logits at a time; default: about CHUNK_BYTES of
    fp32 logits) or "triton"; None picks Triton on CUDA and the chunked path elsewhere."""
    check_inputs(hidden, weight, targets, ref_hidden, ref_weight)
    impl = impl or default_impl(hidden.device)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    if impl == "reference":
        return reference_linear_logprob_kl(hidden, weight, targets, ref_hidden, ref_weight)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0], weight.device)
    return _LinearLogprobKL.apply(hidden, weight, targets, ref_hidden, ref_weight, impl, chunk_rows)


def check_inputs(hidden, weight, targets, ref_hidden, ref_weight) -> None:
    """Shapes and target range of a fused linear call; ValueError naming what is wrong."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [V, D] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be integer [N={hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight go together")
    if ref_hidden is not None and (ref_hidden.shape != hidden.shape or ref_weight.shape != weight.shape):
        raise ValueError(
            f"reference shapes {tuple(ref_hidden.shape)}, {tuple(ref_weight.shape)} differ from the model's "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if bool((targets >= weight.shape[0]).any()):
        raise ValueError(f"a target is >= the vocabulary size {weight.shape[0]}")
