"""Triton kernels of the decoder block's small ops (contracts in block_ops.py): RMSNorm, RoPE, SwiGLU.

Each is memory-bound: one program per block of rows reads its inputs once, computes in fp32 and writes once.
RMSNorm saves the fp32 reciprocal RMS per row for its backward and sums the weight gradient per program
(the partial sums are added in torch). RoPE forms its angles from the positions and frequencies in fp32
inside the kernel; its backward is the same rotation by the negative angle.
Row offsets are int64 (rows x row stride passes 2^31 elements on long packs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import config_target

BLOCK_ROWS = {"interpreter": 4, "cuda": 16}
SWIGLU_BLOCK = {"interpreter": 256, "cuda": 1024}
ROW_ELEMENTS = 8192  # on CUDA a program holds at most this many elements of a row block (RMSNorm: no spills)


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, rows, D, stride_x, stride_y, eps,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = (r < rows)[:, None] & (d < D)[None, :]
    x = tl.load(X + r[:, None] * stride_x + d[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    w = tl.load(W + d, mask=d < D, other=0.0).to(tl.float32)
    # x_hat rounded to the input dtype before the weight, as the torch path; the product of two 16-bit
    # values is exact in fp32, so one rounding of it equals the 16-bit multiply
    normed = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + r[:, None] * stride_y + d[None, :], (w[None, :] * normed).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + r, rstd, mask=r < rows)


@triton.jit
def _rms_norm_bwd_kernel(X, W, DY, RSTD, DX, DW_PART, rows, D, stride_x, stride_dy, stride_dx,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx = rstd (g - x_hat mean(g x_hat)) with g = w dy; DW_PART [programs, D] = sum over rows of dy x_hat."""
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = (r < rows)[:, None] & (d < D)[None, :]
    x = tl.load(X + r[:, None] * stride_x + d[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r[:, None] * stride_dy + d[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + r, mask=r < rows, other=0.0)
    w = tl.load(W + d, mask=d < D, other=0.0).to(tl.float32)
    x_hat = x * rstd[:, None]
    g = dy * w[None, :]
    dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, 1) / D)[:, None])
    tl.store(DX + r[:, None] * stride_dx + d[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    normed = x_hat.to(X.dtype.element_ty).to(tl.float32)  # the forward's rounded x_hat multiplies w
    tl.store(DW_PART + pid * D + d, tl.sum(dy * normed, 0), mask=d < D)


@triton.jit
def _rope_kernel(X, Y, POS, INV_FREQ, rows, H, HALF, stride_xt, stride_xh, stride_yt, stride_yh, sign,
                 BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr):
    """Rotate [rows, H, 2 * HALF] by angle sign * pos * inv_freq, first half paired with second half."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.arange(0, BLOCK_H)
    f = tl.arange(0, BLOCK_F)
    inv_freq = tl.load(INV_FREQ + f, mask=f < HALF, other=0.0)
    angle = tl.load(POS + r, mask=r < rows, other=0).to(tl.float32)[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)[:, None, :]
    sin = sign * tl.sin(angle)[:, None, :]
    mask = (r < rows)[:, None, None] & (h < H)[None, :, None] & (f < HALF)[None, None, :]
    at = r[:, None, None] * stride_xt + h[None, :, None] * stride_xh + f[None, None, :]
    x1 = tl.load(X + at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + at + HALF, mask=mask, other=0.0).to(tl.float32)
    out = r[:, None, None] * stride_yt + h[None, :, None] * stride_yh + f[None, None, :]
    tl.store(Y + out, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + out + HALF, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_kernel(G, U, DY, OUT, DG, n, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    """Forward: OUT = silu(g) u. Backward: OUT = dy silu(g) (d up), DG = dy u sig (1 + g (1 - sig))."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    g = tl.load(G + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + i, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    if BACKWARD:
        dy = tl.load(DY + i, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + i, (dy * g * sig).to(OUT.dtype.element_ty), mask=mask)
        tl.store(DG + i, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + i, (g * sig * u).to(OUT.dtype.element_ty), mask=mask)


def _block_rows(x: torch.Tensor, row_elements: int = 1) -> int:
    if config_target(x) == "interpreter":
        return BLOCK_ROWS["interpreter"]
    return max(1, min(BLOCK_ROWS["cuda"], ROW_ELEMENTS // row_elements))


def triton_rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """(y [rows, D] in the promoted dtype of x and weight, as torch's product, rstd [rows] fp32) for a 2-D x
    with a dense last dimension."""
    rows, d = x.shape
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block_d = triton.next_power_of_2(d)
    block = _block_rows(x, block_d)
    _rms_norm_fwd_kernel[(triton.cdiv(rows, block),)](
        x, weight, y, rstd, rows, d, x.stride(0), y.stride(0), eps,
        BLOCK_R=block, BLOCK_D=block_d, num_warps=8 if block * block_d >= 4096 else 4,
    )
    return y, rstd


def triton_rms_norm_backward(x, weight, rstd, dy):
    rows, d = x.shape
    block_d = triton.next_power_of_2(d)
    block = _block_rows(x, block_d)
    programs = triton.cdiv(rows, block)
    dx = torch.empty_like(x)
    dw_part = torch.empty(programs, d, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        x, weight, dy, rstd, dx, dw_part, rows, d, x.stride(0), dy.stride(0), dx.stride(0),
        BLOCK_R=block, BLOCK_D=block_d, num_warps=8 if block * block_d >= 4096 else 4,
    )
    return dx, dw_part.sum(0).to(weight.dtype)


def triton_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, sign: float) -> torch.Tensor:
    """x [T, H, Dh] rotated by sign * positions * inv_freq (sign -1: the backward)."""
    t, h, dh = x.shape
    y = torch.empty_like(x)
    block = _block_rows(x, triton.next_power_of_2(h) * dh)
    _rope_kernel[(triton.cdiv(t, block),)](
        x, y, positions, inv_freq, t, h, dh // 2, x.stride(0), x.stride(1), y.stride(0), y.stride(1), sign,
        BLOCK_R=block, BLOCK_H=triton.next_power_of_2(h), BLOCK_F=triton.next_power_of_2(dh // 2),
    )
    return y


def triton_swiglu(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor | None = None):
    """Forward: silu(gate) * up. Backward (dy given): (d gate, d up). Contiguous inputs of one shape."""
    n = gate.numel()
    block = SWIGLU_BLOCK[config_target(gate)]
    grid = (triton.cdiv(n, block),)
    out = torch.empty_like(gate)
    if dy is None:
        _swiglu_kernel[grid](gate, up, gate, out, gate, n, BACKWARD=False, BLOCK=block)
        return out
    d_gate = torch.empty_like(gate)
    _swiglu_kernel[grid](gate, up, dy, out, d_gate, n, BACKWARD=True, BLOCK=block)
    return d_gate, out
