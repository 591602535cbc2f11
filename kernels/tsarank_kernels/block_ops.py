"""The decoder block's small ops: RMSNorm, rotary position embedding (RoPE) and the SwiGLU product.

Contracts (x [rows, D] or [T, H, Dh]; every op differentiable in its tensor inputs):

    rms_norm(x, w, eps) = w * round_to_x_dtype(x / sqrt(mean(x^2) + eps))       (the statistics in fp32)
    rope(x, pos, inv_freq): pair x[..., i] with x[..., i + Dh/2] and rotate by angle pos_t * inv_freq_i
    swiglu(gate, up) = silu(gate) * up

Per-document positions come from the caller (a packed row's offsets); llama3 or linear scaling lives in
inv_freq (tsarank_engine.model.decoder.rope_inv_freq). Two paths: "torch", the plain computation, which is also the
reference (there is nothing to chunk: these ops are elementwise or per row), and "triton" (block_ops_triton.py:
one read and one write per tensor, fp32 inside; CUDA, or the CPU under TRITON_INTERPRET=1). RoPE's torch path
rounds cos and sin to x's dtype first, as transformers does; its Triton path keeps them in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .block_ops_triton import triton_rms_norm_backward, triton_rms_norm_forward, triton_rope, triton_swiglu
from .impl import resolve_impl

IMPLS = ("torch", "triton")  # the torch path is also the reference: elementwise or per row, nothing to chunk


def _dense_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _dense_rows(x.reshape(-1, x.shape[-1]))
        y, rstd = triton_rms_norm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = triton_rms_norm_backward(x2, weight, rstd, _dense_rows(dy.reshape(x2.shape)))
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "torch") -> torch.Tensor:
    """RMSNorm over the last dimension; the output dtype is that of weight * x (x's when they share one)."""
    resolve_impl(impl, x.device, IMPLS)
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"RMSNorm weight has {weight.shape[0]} entries, x's last dimension {x.shape[-1]}")
    if impl == "triton":
        return _TritonRMSNorm.apply(x, weight, eps)
    x32 = x.float() if x.dtype != torch.float64 else x
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class _TritonRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, inv_freq):
        ctx.save_for_backward(positions, inv_freq)
        return triton_rope(_dense_rows(x), positions, inv_freq, 1.0)

    @staticmethod
    def backward(ctx, dy):
        positions, inv_freq = ctx.saved_tensors
        return triton_rope(_dense_rows(dy), positions, inv_freq, -1.0), None, None  # rotation back


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """Rotate x [T, H, Dh] by positions [T] (integers) times inv_freq [Dh / 2] (fp32), half-split pairing."""
    resolve_impl(impl, x.device, IMPLS)
    if x.dim() != 3 or x.shape[-1] != 2 * inv_freq.shape[0] or positions.shape != x.shape[:1]:
        raise ValueError(f"rope takes x [T, H, Dh], positions [T] and inv_freq [Dh / 2], got {tuple(x.shape)}, "
                         f"{tuple(positions.shape)}, {tuple(inv_freq.shape)}")
    if impl == "triton":
        return _TritonRope.apply(x, positions.contiguous(), inv_freq.float().contiguous())
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    freqs = positions.to(compute)[:, None] * inv_freq.to(compute)[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos().to(x.dtype)[:, None, :], angles.sin().to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return triton_swiglu(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return triton_swiglu(gate, up, dy.contiguous())


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype."""
    resolve_impl(impl, gate.device, IMPLS)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu takes gate and up of one shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    if impl == "triton":
        return _TritonSwiGLU.apply(gate, up)
    return F.silu(gate) * up
