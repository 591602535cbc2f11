"""Fused linear log-softmax statistics: per-token target log-probs and KL to a reference model.

From hidden states h [N, D] and an LM head W [V, D] (and, for the KL, reference states and head), compute
per token, without ever holding the [N, V] logits:

    lse_i  = logsumexp_v z_iv                          z = h W^T (fp32 accumulation and values)
    logp_i = z_i,t_i - lse_i                           (0 where t_i < 0: no target)
    kl_i   = KL(p_ref,i || p_i) = sum_v p_ref,iv (z_ref,iv - z_iv) - lse_ref,i + lse_i

The backward takes upstream gradients g_logp and g_kl and needs one pass over the vocabulary:

    dz_iv = g_logp,i (1[v = t_i] - p_iv) + g_kl,i (p_iv - p_ref,iv),   dh = dz W,   dW = dz^T h

Three implementations share this contract: `reference_linear_logprob_kl` (the spec; full logits), and two
chunked paths that hold one chunk of rows' logits at a time: "torch" (plain torch on the chunk, any device)
and "triton" (fused Triton sweeps over the chunk, fused_linear_triton.py; CUDA, or the CPU under
TRITON_INTERPRET=1). Both take the logits products from cuBLAS (on the CPU from oneDNN, dense.py) in fp32,
also for half-precision inputs (dense.logits_nt): the reference rounds logits to the inputs' dtype before its
fp32 log-softmax, as transformers does, and the chunked paths are more accurate than it there (the rank
loss's tau = 0.001 magnifies a logit's error in a mean log-prob a thousandfold).
`linear_logprob_kl` picks one and wires autograd.
"""

from __future__ import annotations

import torch

from .dense import ROW_QUANTUM, logits_nt, logits_operand, onednn_applies
from .fused_linear_triton import triton_softmax_chunk
from .impl import resolve_impl

# The chunked paths size their row chunks so that one chunk of logits (fp32 for every input dtype but fp64) is
# about this big: small on the CPU (cache-sized work), large on CUDA, where the products of a few hundred rows
# leave SMs idle; the torch path's fp32 temporaries triple a chunk's footprint, so it keeps smaller chunks
# (BENCHMARKS.md, "Measurements behind the defaults").
CHUNK_BYTES = {"cpu": {"torch": 32 * 2**20, "triton": 32 * 2**20}, "cuda": {"torch": 512 * 2**20, "triton": 2**30}}


def default_chunk_rows(vocab_size: int, dtype: torch.dtype, device: torch.device, impl: str) -> int:
    """Rows per chunk; a multiple of 128 on CUDA so that the products tile evenly, of dense.ROW_QUANTUM on
    the CPU so that oneDNN's row padding is only ever the last chunk's."""
    on_cuda = device.type == "cuda"
    rows = CHUNK_BYTES["cuda" if on_cuda else "cpu"][impl] // (max(dtype.itemsize, 4) * vocab_size)
    return max(128, rows // 128 * 128) if on_cuda else max(ROW_QUANTUM, rows // ROW_QUANTUM * ROW_QUANTUM)


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


def torch_softmax_chunk(z, zr, targets, stats, g_logp, g_kl, find_stats):
    """The plain-torch counterpart of triton_softmax_chunk: fp32 statistics of a chunk of logits into
    `stats` [4, rows] (lse, logp, lse_ref, kl) when find_stats (else lse and lse_ref are read from it), and
    with g_logp (0 where no target) dz = g_logp (onehot(t) - p) + g_kl (p - p_ref) in fp32. The logits
    buffers are consumed: log-probs and dz are built in place."""
    log_p = z.float()  # fp32 logits already, but for fp64 inputs
    log_p_ref = zr.float() if zr is not None else None
    if find_stats:
        stats[0] = torch.logsumexp(log_p, dim=-1)
    log_p.sub_(stats[0, :, None])
    if find_stats:
        picked = log_p.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
        stats[1] = torch.where(targets >= 0, picked, torch.zeros_like(picked))
    p_ref = None
    if log_p_ref is not None:
        if find_stats:
            stats[2] = torch.logsumexp(log_p_ref, dim=-1)
        log_p_ref.sub_(stats[2, :, None])
        p_ref = log_p_ref.exp()
        if find_stats:  # KL = p_ref . (log p_ref - log p), a batched dot; log_p_ref is not needed after it
            diff = log_p_ref.sub_(log_p)
            stats[3] = torch.bmm(p_ref[:, None, :], diff[:, :, None]).view(-1)
    if g_logp is None:
        return None
    g_kl = torch.zeros_like(g_logp) if g_kl is None else g_kl
    dz = log_p.exp_().mul_((g_kl - g_logp)[:, None])
    if p_ref is not None:
        dz.addcmul_(p_ref, g_kl[:, None], value=-1.0)
    return dz.scatter_add_(1, targets.clamp(min=0)[:, None], g_logp[:, None])


SOFTMAX_CHUNK = {"torch": torch_softmax_chunk, "triton": triton_softmax_chunk}


def _sweep(hidden, weight, targets, ref_hidden, ref_weight, impl, chunk_rows, stats, find_stats,
           g_logp, g_kl, need_dh, need_dw):
    """One pass over the rows, a chunk at a time: the logits products (cuBLAS or the CPU's BLAS; fp32 logits
    from half-precision inputs), the softmax statistics and, given upstream gradients, dh = dz W and
    dW = dz^T h (fp32) from the same chunk. Only one chunk of logits (and of reference logits) is ever alive;
    on the CPU, half-precision inputs are upcast to fp32 once per sweep (dense.logits_operand)."""
    n, v = hidden.shape[0], weight.shape[0]
    has_ref = ref_hidden is not None
    with_grad = g_logp is not None and (need_dh or need_dw)
    if with_grad:
        g_logp = torch.where(targets >= 0, g_logp, torch.zeros_like(g_logp))
    dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if with_grad and need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad and need_dw else None
    rows_alloc = min(chunk_rows, n)
    h_op, w_op = logits_operand(hidden), logits_operand(weight)
    hr_op, wr_op = (logits_operand(ref_hidden), logits_operand(ref_weight)) if has_ref else (None, None)
    buffered = not onednn_applies(h_op, w_op)  # oneDNN writes fresh tensors; torch's BLAS reuses these
    logits_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    buf = torch.empty(rows_alloc, v, dtype=logits_dtype, device=hidden.device) if buffered else None
    ref_buf = torch.empty(rows_alloc, v, dtype=logits_dtype, device=hidden.device) if has_ref and buffered else None
    softmax_chunk = SOFTMAX_CHUNK[impl]
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        rows = slice(lo, hi)
        z = logits_nt(h_op[rows], w_op, out=buf[: hi - lo] if buffered else None)
        zr = logits_nt(hr_op[rows], wr_op, out=ref_buf[: hi - lo] if buffered else None) if has_ref else None
        dz = softmax_chunk(z, zr, targets[rows], stats[:, rows], g_logp[rows] if with_grad else None,
                           g_kl[rows] if with_grad and has_ref else None, find_stats)
        if dh is not None:
            torch.mm(dz.to(weight.dtype), weight, out=dh[rows])
        if dw is not None:
            dw.addmm_(dz.T.float(), h_op[rows].float())  # h_op: already fp32 on the CPU
        del z, zr, dz
    return dh, dw


def chunked_forward(hidden, weight, targets, ref_hidden, ref_weight, impl, chunk_rows,
                    g_logp=None, g_kl=None, need_dh=False, need_dw=False):
    """fp32 (logp, lse, kl or None, lse_ref or None) of the torch or Triton path, one chunk of rows at a time.

    With upstream gradients g_logp (and g_kl) already known, also returns (dh or None, dW or None) from the
    same pass, so no backward recomputation is needed (the ranking head).
    """
    has_ref = ref_hidden is not None
    stats = torch.empty(4, hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grads = _sweep(hidden, weight, targets.contiguous(), ref_hidden, ref_weight, impl, chunk_rows, stats, True,
                   g_logp, g_kl, need_dh, need_dw)
    lse, logp, lse_ref, kl = stats.unbind(0)
    outputs = (logp, lse, kl if has_ref else None, lse_ref if has_ref else None)
    return outputs + grads if g_logp is not None else outputs


def chunked_backward(hidden, weight, targets, ref_hidden, ref_weight, lse, lse_ref, g_logp, g_kl,
                     need_dh, need_dw, impl, chunk_rows):
    """(dh or None, dW in fp32 or None), recomputing each chunk's logits and using the saved log-sum-exps."""
    zeros = torch.zeros_like(lse)
    stats = torch.stack([lse, zeros, lse_ref if lse_ref is not None else zeros, zeros])
    return _sweep(hidden, weight, targets.contiguous(), ref_hidden, ref_weight, impl, chunk_rows, stats, False,
                  g_logp, g_kl, need_dh, need_dw)


class _LinearLogprobKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ref_hidden, ref_weight, impl, chunk_rows):
        has_ref = ref_hidden is not None
        logp, lse, kl, lse_ref = chunked_forward(hidden, weight, targets, ref_hidden, ref_weight, impl, chunk_rows)
        ctx.save_for_backward(hidden, weight, targets, lse, *((ref_hidden, ref_weight, lse_ref) if has_ref else ()))
        ctx.impl, ctx.chunk_rows, ctx.has_ref = impl, chunk_rows, has_ref
        ctx.mark_non_differentiable(lse)
        return logp, lse, kl

    @staticmethod
    def backward(ctx, g_logp, _g_lse, g_kl):
        hidden, weight, targets, lse, *ref = ctx.saved_tensors
        ref_hidden, ref_weight, lse_ref = ref if ctx.has_ref else (None, None, None)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw):
            return (None,) * 7
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        if ctx.has_ref:
            g_kl = torch.zeros_like(lse) if g_kl is None else g_kl.float().contiguous()
        dh, dw = chunked_backward(hidden, weight, targets, ref_hidden, ref_weight, lse, lse_ref, g_logp,
                                  g_kl if ctx.has_ref else None, need_dh, need_dw, ctx.impl, ctx.chunk_rows)
        return dh, dw.to(weight.dtype) if dw is not None else None, None, None, None, None, None


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
    fp32 logits) or "triton"; None picks Triton on CUDA and the chunked path elsewhere. The chunked paths'
    logits are fp32 for half-precision inputs too; the reference's are rounded to the inputs' dtype."""
    check_inputs(hidden, weight, targets, ref_hidden, ref_weight)
    impl = resolve_impl(impl, hidden.device)
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    if impl == "reference":
        return reference_linear_logprob_kl(hidden, weight, targets, ref_hidden, ref_weight)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0], hidden.dtype, weight.device, impl)
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
    dtypes = {t.dtype for t in (hidden, weight, ref_hidden, ref_weight) if t is not None}
    if len(dtypes) > 1:
        raise ValueError(f"hidden, weight and the reference must share one dtype, got {sorted(map(str, dtypes))}")
    if bool((targets >= weight.shape[0]).any()):
        raise ValueError(f"a target is >= the vocabulary size {weight.shape[0]}")
