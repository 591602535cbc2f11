"""Packed varlen causal attention with GQA: the plain reference and the Triton flash-attention op.

Contract: q [T, Hq, Dh], k and v [T, Hkv, Dh] (Hq a multiple of Hkv) hold the tokens of documents laid end
to end; cu_seqlens int32 [B + 1] rises strictly from 0 to T. Token i of a document attends to tokens 0..i of
the same document only, with scores scaled by `scale`; query head h reads K/V head h // (Hq / Hkv).
The decoder reaches these through tsarank_engine.model.attention's backends.
"""

from __future__ import annotations

import torch

from .flash_attention_triton import triton_attention_backward, triton_attention_forward


def reference_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """The spec: one document at a time, explicit masked softmax in q's dtype (float64 for tests)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        qd = q[lo:hi].transpose(0, 1)  # [Hq, L, Dh]
        kd = k[lo:hi].transpose(0, 1).repeat_interleave(group, 0)
        vd = v[lo:hi].transpose(0, 1).repeat_interleave(group, 0)
        scores = (qd @ kd.transpose(1, 2)) * scale
        causal = torch.ones(hi - lo, hi - lo, dtype=torch.bool, device=q.device).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        out[lo:hi] = (probs @ vd).transpose(0, 1)
    return out


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """Shapes, dtypes and devices of a varlen attention call; ValueError naming what is wrong."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q [T, Hq, Dh] and k, v [T, Hkv, Dh] expected, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be int32 on {q.device}, got {cu_seqlens.dtype} on {cu_seqlens.device}")


def check_in_document_offsets(max_seqlen: int, *tensors: torch.Tensor) -> None:
    """The kernels address tokens inside a document with int32 offsets (bases are int64)."""
    if max_seqlen * max(t.stride(0) for t in tensors) >= 2**31:
        raise ValueError(f"a document of {max_seqlen} tokens with token strides {[t.stride(0) for t in tensors]} "
                         "passes 2^31 elements; split it")


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        check_in_document_offsets(max_seqlen, q, k, v)
        out, lse = triton_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        d_out = d_out if d_out.stride(-1) == 1 else d_out.contiguous()
        dq, dk, dv = triton_attention_backward(q, k, v, out, lse, d_out, cu_seqlens, ctx.max_seqlen, ctx.scale)
        return dq, dk, dv, None, None, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float) -> torch.Tensor:
    """Causal attention inside each document of a packed row by the Triton kernels (CUDA, or the CPU under
    TRITON_INTERPRET=1); differentiable in q, k and v. max_seqlen: the longest document's length."""
    check_attention_inputs(q, k, v, cu_seqlens)
    return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen, scale)
