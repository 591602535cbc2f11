"""Triton kernels of the fused linear log-softmax statistics (contract in fused_linear.py).

Forward: one program per block of rows streams over the vocabulary in tiles, computing each logits tile
with tl.dot over D and folding it into online statistics (running max and sum for the log-sum-exp of the
model and of the reference, the target logit, and sum_v exp(z_ref - m_ref) (z_ref - z) for the KL).
Backward: one program per (row block, vocabulary tile) recomputes the tile, forms dz and adds dz W into dh
and dz^T h into dW with fp32 atomics: a single pass over the vocabulary for both gradients.
Offsets are int64 (a 151,936-row head times D passes 2^31 elements in a flat index at D >= 14,134, and
row-major strides of views can be larger still).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps). The interpreter runs the small tiles; CUDA the larger ones.
# The CUDA tiles were chosen by compiling for sm_90 on the CPU: every variant uses HGMMA with no spills
# (64x128x64 spilled up to 488 bytes with a reference model; 64x64x64 at 4 warps up to 792).
CONFIGS = {"interpreter": (16, 32, 32, 4), "cuda": (64, 128, 32, 8)}


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
def _forward_kernel(H, W, T, HR, WR, LOGP, LSE, KL, LSE_REF, N, V, D, stride_h, stride_w, stride_hr, stride_wr,
                    HAS_REF: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    target = tl.load(T + rows, mask=row_mask, other=-1).to(tl.int64)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    m_ref = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_ref = tl.zeros((BLOCK_N,), tl.float32)
    c_ref = tl.zeros((BLOCK_N,), tl.float32)  # sum_v exp(z_ref - m_ref) (z_ref - z)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
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
    lse = m + tl.log(s)
    tl.store(LSE + rows, lse, mask=row_mask)
    tl.store(LOGP + rows, tl.where(target >= 0, z_target - lse, 0.0), mask=row_mask)
    if HAS_REF:
        lse_ref = m_ref + tl.log(s_ref)
        tl.store(LSE_REF + rows, lse_ref, mask=row_mask)
        tl.store(KL + rows, c_ref / s_ref - lse_ref + lse, mask=row_mask)


@triton.jit
def _backward_kernel(H, W, T, HR, WR, LSE, LSE_REF, G_LOGP, G_KL, DH, DW, N, V, D,
                     stride_h, stride_w, stride_hr, stride_wr,
                     HAS_REF: tl.constexpr, COMPUTE_DW: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
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
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    dz_in = dz.to(H.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        w = tl.load(W + cols[:, None] * stride_w + dd[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        dh = tl.dot(dz_in, w, input_precision=PRECISION)
        tl.atomic_add(DH + rows[:, None] * D + dd[None, :], dh, mask=row_mask[:, None] & d_mask[None, :])
        if COMPUTE_DW:
            h = tl.load(H + rows[:, None] * stride_h + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            dw = tl.dot(tl.trans(dz_in), h, input_precision=PRECISION)
            tl.atomic_add(DW + cols[:, None] * D + dd[None, :], dw, mask=col_mask[:, None] & d_mask[None, :])


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
    out = [torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(4 if has_ref else 2)]
    logp, lse = out[0], out[1]
    kl, lse_ref = (out[2], out[3]) if has_ref else (lse, lse)  # placeholders never written without a reference
    block_n, block_v, block_d, warps = _config(hidden.device)
    hr, wr = (ref_hidden, ref_weight) if has_ref else (hidden, weight)
    _forward_kernel[(triton.cdiv(n, block_n),)](
        hidden, weight, targets.contiguous(), hr, wr, logp, lse, kl, lse_ref, n, v, d,
        hidden.stride(0), weight.stride(0), hr.stride(0), wr.stride(0),
        HAS_REF=has_ref, PRECISION=_precision(hidden.dtype),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps,
    )
    return logp, lse, (kl if has_ref else None), (lse_ref if has_ref else None)


def triton_backward(hidden, weight, targets, ref_hidden, ref_weight, lse, lse_ref, g_logp, g_kl, need_dw):
    hidden, weight, ref_hidden, ref_weight = map(_row_major, (hidden, weight, ref_hidden, ref_weight))
    n, d = hidden.shape
    v = weight.shape[0]
    has_ref = g_kl is not None
    dh = torch.zeros(n, d, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(v, d, dtype=torch.float32, device=hidden.device) if need_dw else dh
    hr, wr = (ref_hidden, ref_weight) if has_ref else (hidden, weight)
    block_n, block_v, block_d, warps = _config(hidden.device)
    _backward_kernel[(triton.cdiv(n, block_n), triton.cdiv(v, block_v))](
        hidden, weight, targets.contiguous(), hr, wr, lse, lse_ref if has_ref else lse, g_logp,
        g_kl if has_ref else g_logp, dh, dw, n, v, d,
        hidden.stride(0), weight.stride(0), hr.stride(0), wr.stride(0),
        HAS_REF=has_ref, COMPUTE_DW=need_dw, PRECISION=_precision(hidden.dtype),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps,
    )
    return dh.to(hidden.dtype), (dw if need_dw else None)
