"""Triton kernel of the fused linear op's softmax sweep over one chunk of logits (contract in fused_linear.py).

The chunk's logits z = h W^T (and z_ref) come from cuBLAS in fp32 (half-precision operands, fp32 accumulation
and output: no rounding of logits to 16 bits); one program per row then reads them at memory speed (the
kernel is dtype-generic, all arithmetic in fp32): a first sweep folds the row into per-lane online
statistics (log-sum-exp of model and reference, and sum_v exp(z_ref - m_ref) (z_ref - z) for the KL), and,
when the upstream gradients are known, a second sweep writes dz over z in place (in z's dtype, fp32; the
caller rounds it to the head's dtype for dh = dz W and keeps it in fp32 for dW):

    dz_v = g_logp (1[v = t] - p_v) + g_kl (p_v - p_ref,v)

Why not one kernel that also forms the products: one that recomputes logits tiles inside the sweep has to
re-read the head per block of rows and to recompute both products in the backward; this split runs each
product once at cuBLAS speed (BENCHMARKS.md, "Measurements behind the defaults").
Row offsets are int64: a chunk's row index times its row stride can pass 2^31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import config_target

# (BLOCK_V, num_warps). The interpreter takes a small block so that tests cross several blocks and a ragged
# end; CUDA the block compiled for sm_90 without spills (see bench/results for the measured speed).
CONFIGS = {"interpreter": (256, 1), "cuda": (2048, 8)}


@triton.jit
def _softmax_rows_kernel(Z, ZR, T, STATS, G_LOGP, G_KL, V, stride_z, stride_zr, stride_stats,
                         HAS_REF: tl.constexpr, FIND_STATS: tl.constexpr, WRITE_DZ: tl.constexpr,
                         BLOCK_V: tl.constexpr):
    """STATS [4, rows] fp32: lse, logp, lse_ref, kl; written when FIND_STATS, else lse and lse_ref are read."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    zr_row = ZR + row * stride_zr
    target = tl.load(T + row).to(tl.int64)
    lanes = tl.arange(0, BLOCK_V)
    if FIND_STATS:
        # per-lane running maxima start finite, so that exp(m_old - m_new) is never exp(-inf + inf)
        m = tl.full((BLOCK_V,), -3.0e38, tl.float32)
        s = tl.zeros((BLOCK_V,), tl.float32)
        m_r = tl.full((BLOCK_V,), -3.0e38, tl.float32)
        s_r = tl.zeros((BLOCK_V,), tl.float32)
        c_r = tl.zeros((BLOCK_V,), tl.float32)  # sum exp(z_ref - m_r) (z_ref - z) per lane
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + lanes
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            z_in = tl.where(mask, z, float("-inf"))  # lanes past the vocabulary add exp(-inf) = 0
            m_new = tl.maximum(m, z_in)
            s = s * tl.exp(m - m_new) + tl.exp(z_in - m_new)
            m = m_new
            if HAS_REF:
                zr = tl.load(zr_row + cols, mask=mask, other=0.0).to(tl.float32)
                zr_in = tl.where(mask, zr, float("-inf"))
                mr_new = tl.maximum(m_r, zr_in)
                scale = tl.exp(m_r - mr_new)
                e = tl.exp(zr_in - mr_new)
                s_r = s_r * scale + e
                c_r = c_r * scale + e * (zr - z)
                m_r = mr_new
        top = tl.max(m, 0)
        lse = top + tl.log(tl.sum(s * tl.exp(m - top), 0))
        z_target = tl.load(z_row + tl.maximum(target, 0)).to(tl.float32)
        tl.store(STATS + row, lse)
        tl.store(STATS + stride_stats + row, tl.where(target >= 0, z_target - lse, 0.0))
        if HAS_REF:
            top_r = tl.max(m_r, 0)
            sum_r = tl.sum(s_r * tl.exp(m_r - top_r), 0)
            lse_r = top_r + tl.log(sum_r)
            # sum_v p_ref (z_ref - z) - lse_ref + lse
            kl = tl.sum(c_r * tl.exp(m_r - top_r), 0) / sum_r - lse_r + lse
            tl.store(STATS + 2 * stride_stats + row, lse_r)
            tl.store(STATS + 3 * stride_stats + row, kl)
    else:
        lse = tl.load(STATS + row)
        lse_r = tl.load(STATS + 2 * stride_stats + row)
    if WRITE_DZ:
        g_logp = tl.where(target >= 0, tl.load(G_LOGP + row), 0.0)
        g_kl = 0.0
        if HAS_REF:
            g_kl = tl.load(G_KL + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + lanes
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            dz = (g_kl - g_logp) * tl.exp(z - lse) + tl.where(cols == target, g_logp, 0.0)
            if HAS_REF:
                zr = tl.load(zr_row + cols, mask=mask, other=0.0).to(tl.float32)
                dz -= g_kl * tl.exp(zr - lse_r)
            tl.store(z_row + cols, dz.to(Z.dtype.element_ty), mask=mask)


def triton_softmax_chunk(
    z: torch.Tensor,
    zr: torch.Tensor | None,
    targets: torch.Tensor,
    stats: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_kl: torch.Tensor | None,
    find_stats: bool,
) -> torch.Tensor | None:
    """The chunk's statistics into `stats` [4, rows] (when find_stats) and, given g_logp, dz written over z
    (returned). g_logp must already be 0 where a row has no target."""
    rows, v = z.shape
    block_v, warps = CONFIGS[config_target(z)]
    has_ref, write_dz = zr is not None, g_logp is not None
    dummy = stats  # never read when the matching flag is off
    _softmax_rows_kernel[(rows,)](
        z, zr if has_ref else z, targets, stats, g_logp if write_dz else dummy,
        g_kl if (write_dz and has_ref) else dummy, v, z.stride(0), (zr if has_ref else z).stride(0), stats.stride(0),
        HAS_REF=has_ref, FIND_STATS=find_stats, WRITE_DZ=write_dz, BLOCK_V=block_v, num_warps=warps,
    )
    return z if write_dz else None
