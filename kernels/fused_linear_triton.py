"""Triton kernels of the fused linear log-softmax statistics (contract in fused_linear.py).

Forward: the vocabulary is split into SPLITS ranges; one program per (block of rows, range) streams over its
range in tiles, computing each logits tile with tl.dot over D and folding it into online statistics
(running max and sum for the log-sum-exp of the model and of the reference, the target logit, and
sum_v exp(z_ref - m_ref) (z_ref - z) for the KL). A few [SPLITS, N] partials are merged in torch. Splitting
fills the GPU when N / BLOCK_N alone would leave SMs idle.
Backward: for a chunk of rows at a time, one program per (row block, vocabulary tile) recomputes the tile and
writes dz in the inputs' dtype; dh = dz W and dW = dz^T h are then cuBLAS matrix products. dz never exists
for more than one chunk of rows.
Offsets are int64: row-major strides times row indices pass 2^31 for large heads and strided views.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps). The interpreter runs the small tiles; CUDA the larger ones.
# The CUDA tiles were chosen by compiling for sm_90 on the CPU: every variant uses HGMMA with no spills
# (64x128x64 spilled up to 488 bytes with a reference model; 64x64x64 at 4 warps up to 792).
CONFIGS = {"interpreter": (16, 32, 32, 4), "cuda": (64, 128, 32, 8)}
# Bytes of the dz chunk the backward writes before its matrix products.
DZ_CHUNK_BYTES = {"interpreter": 16 * 2**10, "cuda": 512 * 2**20}
TARGET_PROGRAMS = 4 * 132  # enough programs for a few waves on an H100/H200


def _config(device: torch.device) -> tuple[int, int, int, int]:
    return CONFIGS["cuda" if device.type == "cuda" else "interpreter"]


@triton.jit
def _logits_tile(H, W, rows, cols, row_mask, col_mask, D, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        h = tl.load(H + rows[:, None] * stride_h + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + dd[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _forward_kernel(H, W, T, HR, WR, PART, N, V, D, V_PER_SPLIT, stride_h, stride_w, stride_hr, stride_wr,
                    HAS_REF: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """PART [6, SPLITS, N] fp32 receives this range's m, s, z_target, m_ref, s_ref, c_ref."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    splits = tl.num_programs(1).to(tl.int64)
    row_mask = rows < N
    target = tl.load(T + rows, mask=row_mask, other=-1).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    m_ref = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_ref = tl.zeros((BLOCK_N,), tl.float32)
    c_ref = tl.zeros((BLOCK_N,), tl.float32)  # sum_v exp(z_ref - m_ref) (z_ref - z)
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(0, V_PER_SPLIT, BLOCK_V):
        cols = v_start + v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < v_end
        z_raw = _logits_tile(H, W, rows, cols, row_mask, col_mask, D, stride_h, stride_w,
                             BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        z = tl.where(col_mask[None, :], z_raw, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z_raw, 0.0), 1)
        if HAS_REF:
            zr_raw = _logits_tile(HR, WR, rows, cols, row_mask, col_mask, D, stride_hr, stride_wr,
                                  BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
            zr = tl.where(col_mask[None, :], zr_raw, float("-inf"))
            mr_new = tl.maximum(m_ref, tl.max(zr, 1))
            scale = tl.exp(m_ref - mr_new)
            e = tl.exp(zr - mr_new[:, None])  # 0 past the vocabulary
            s_ref = s_ref * scale + tl.sum(e, 1)
            c_ref = c_ref * scale + tl.sum(e * (zr_raw - z_raw), 1)
            m_ref = mr_new
    out = PART + split * N + rows
    plane = splits * N
    tl.store(out, m, mask=row_mask)
    tl.store(out + plane, s, mask=row_mask)
    tl.store(out + 2 * plane, z_target, mask=row_mask)
    if HAS_REF:
        tl.store(out + 3 * plane, m_ref, mask=row_mask)
        tl.store(out + 4 * plane, s_ref, mask=row_mask)
        tl.store(out + 5 * plane, c_ref, mask=row_mask)


@triton.jit
def _dz_kernel(H, W, T, HR, WR, LSE, LSE_REF, G_LOGP, G_KL, DZ, N, V, D,
               stride_h, stride_w, stride_hr, stride_wr, stride_dz,
               HAS_REF: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """DZ [N, V] = g_logp (onehot(t) - p) + g_kl (p - p_ref), in DZ's dtype."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V
    target = tl.load(T + rows, mask=row_mask, other=-1).to(tl.int64)
    g_logp = tl.load(G_LOGP + rows, mask=row_mask & (target >= 0), other=0.0)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    z = _logits_tile(H, W, rows, cols, row_mask, col_mask, D, stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
    p = tl.exp(z - lse[:, None])
    if HAS_REF:
        g_kl = tl.load(G_KL + rows, mask=row_mask, other=0.0)
        lse_ref = tl.load(LSE_REF + rows, mask=row_mask, other=0.0)
        zr = _logits_tile(HR, WR, rows, cols, row_mask, col_mask, D, stride_hr, stride_wr,
                          BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        dz = (g_kl - g_logp)[:, None] * p - g_kl[:, None] * tl.exp(zr - lse_ref[:, None])
    else:
        dz = -g_logp[:, None] * p
    dz += tl.where(cols[None, :] == target[:, None], g_logp[:, None], 0.0)
    tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], dz.to(DZ.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (tf32 would miss the 1e-5 contract); half inputs use tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_major(x: torch.Tensor | None) -> torch.Tensor | None:
    # Any row stride is honoured; the last dimension must be dense.
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def triton_forward(hidden, weight, targets, ref_hidden, ref_weight):
    hidden, weight, ref_hidden, ref_weight = map(_row_major, (hidden, weight, ref_hidden, ref_weight))
    n, d = hidden.shape
    v = weight.shape[0]
    has_ref = ref_hidden is not None
    block_n, block_v, block_d, warps = _config(hidden.device)
    row_blocks, tiles = triton.cdiv(n, block_n), triton.cdiv(v, block_v)
    # The interpreter always splits in two so that the merge below is tested everywhere.
    splits = max(1, min(tiles, triton.cdiv(TARGET_PROGRAMS, row_blocks))) if hidden.is_cuda else min(2, tiles)
    v_per_split = triton.cdiv(tiles, splits) * block_v
    splits = triton.cdiv(v, v_per_split)
    part = torch.empty(6, splits, n, dtype=torch.float32, device=hidden.device)
    hr, wr = (ref_hidden, ref_weight) if has_ref else (hidden, weight)
    _forward_kernel[(row_blocks, splits)](
        hidden, weight, targets.contiguous(), hr, wr, part, n, v, d, v_per_split,
        hidden.stride(0), weight.stride(0), hr.stride(0), wr.stride(0),
        HAS_REF=has_ref, PRECISION=_precision(hidden.dtype),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps,
    )
    m, s, z_target, m_ref, s_ref, c_ref = part.unbind(0)
    lse = _merge_lse(m, s)
    logp = torch.where(targets >= 0, z_target.sum(0) - lse, torch.zeros_like(lse))
    if not has_ref:
        return logp, lse, None, None
    lse_ref = _merge_lse(m_ref, s_ref)
    # sum_v p_ref (z_ref - z) = sum over splits of c_split exp(m_split - lse_ref)
    return logp, lse, (c_ref * torch.exp(m_ref - lse_ref)).sum(0) - lse_ref + lse, lse_ref


def _merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """log-sum-exp over the splits from per-split (max, sum of exp(z - max)) pairs [SPLITS, N]."""
    top = m.max(0).values
    return top + torch.log((s * torch.exp(m - top)).sum(0))


def triton_backward(hidden, weight, targets, ref_hidden, ref_weight, lse, lse_ref, g_logp, g_kl, need_dw):
    hidden, weight, ref_hidden, ref_weight = map(_row_major, (hidden, weight, ref_hidden, ref_weight))
    n, d = hidden.shape
    v = weight.shape[0]
    has_ref = g_kl is not None
    hr, wr = (ref_hidden, ref_weight) if has_ref else (hidden, weight)
    block_n, block_v, block_d, warps = _config(hidden.device)
    budget = DZ_CHUNK_BYTES["cuda" if hidden.is_cuda else "interpreter"]
    chunk = max(block_n, budget // (v * hidden.element_size()) // block_n * block_n)
    dz = torch.empty(min(chunk, n), v, dtype=hidden.dtype, device=hidden.device)
    dh = torch.empty_like(hidden)
    dw = torch.zeros(v, d, dtype=torch.float32, device=hidden.device) if need_dw else None
    targets = targets.contiguous()
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        rows = hi - lo
        _dz_kernel[(triton.cdiv(rows, block_n), triton.cdiv(v, block_v))](
            hidden[lo:hi], weight, targets[lo:hi], hr[lo:hi], wr, lse[lo:hi],
            (lse_ref if has_ref else lse)[lo:hi], g_logp[lo:hi], (g_kl if has_ref else g_logp)[lo:hi], dz, rows, v, d,
            hidden.stride(0), weight.stride(0), hr.stride(0), wr.stride(0), dz.stride(0),
            HAS_REF=has_ref, PRECISION=_precision(hidden.dtype),
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps,
        )
        torch.mm(dz[:rows], weight, out=dh[lo:hi])
        if need_dw:  # fp32 products and accumulation for the head's gradient
            dw.addmm_(dz[:rows].T.float(), hidden[lo:hi].float())
    return dh, dw
