"""Float32 CPU products `x @ W^T` routed to oneDNN: the LM head's logits and, for inference, the decoder's linears;
and the head's logits in fp32 from half-precision operands (`logits_nt`).

On the project's CPU machines torch sends this float32 product to MKL; oneDNN's matmul, which torch ships as
`torch.ops.mkldnn._linear_pointwise`, runs it faster (BENCHMARKS.md, "Measurements behind the defaults"). oneDNN
builds and caches a primitive per input shape, so it pays only where shapes repeat: the head's fixed-size
chunks (a short last chunk is padded to a multiple of ROW_QUANTUM rows). The decoder's linears change row
count every training step, so they go to oneDNN only under inference mode and when the caller has padded the
row to a multiple of INFERENCE_ROW_QUANTUM tokens (scoring does: at most 16 shapes per weight in a 2,048-token
row). Same float32 math; the summation order differs, so results agree to rounding.
Elsewhere (CUDA, other dtypes, builds without oneDNN) the products are torch's.

Logits feed a softmax, and with the rank loss's tau = 0.001 an error of 0.01 in a mean log-probability moves a
candidate's logit by over a unit: so half-precision logits are accumulated AND returned in fp32, never rounded
to bf16/fp16 first. On CUDA cuBLAS does that in the half-precision GEMM itself (torch.mm's out_dtype, torch >=
2.8); elsewhere (the CPU, older torch) the operands are upcast and the fp32 product runs (oneDNN on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROW_QUANTUM = 16
INFERENCE_ROW_QUANTUM = 128
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
HALF = (torch.float16, torch.bfloat16)
# aten::mm.dtype_out: half-precision operands, fp32 output (CUDA only; torch >= 2.8)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out")


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight^T runs on oneDNN here: float32 CPU tensors, oneDNN in this torch build."""
    return _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # no fused activation


def matmul_nt(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, D] @ weight [V, D]^T, not differentiated. `out` is used where torch.mm runs the product
    (oneDNN returns a fresh tensor)."""
    if onednn_applies(x, weight):
        rows = x.shape[0]
        short = -rows % ROW_QUANTUM  # few distinct shapes, few cached primitives
        if short:
            x = torch.cat([x, x.new_zeros(short, x.shape[1])])
        return _onednn_linear(x, weight, None)[:rows]
    return torch.mm(x, weight.T, out=out)


def logits_operand(t: torch.Tensor) -> torch.Tensor:
    """t as logits_nt multiplies it: as is where the GEMM takes it (fp32, fp64, half precision on CUDA with
    out_dtype), else an fp32 copy. Callers making many products with one head upcast it once with this (the
    copy is twice a half-precision head's bytes) instead of once per product."""
    return t.float() if t.dtype in HALF and not (_MM_OUT_DTYPE and t.is_cuda) else t


def logits_nt(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, D] @ weight [V, D]^T accumulated and returned in fp32 for fp32 and half-precision inputs (fp64
    stays fp64), not differentiated. Either operand may already be logits_operand's fp32 copy. `out` (of the
    result's dtype) is used where torch.mm runs the product."""
    x, weight = logits_operand(x), logits_operand(weight)
    if x.dtype in HALF:  # and so is weight: CUDA's GEMM writes fp32
        return torch.mm(x, weight.T, out_dtype=torch.float32, out=out)
    return matmul_nt(x, weight, out)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, on oneDNN for float32 CPU rows padded to INFERENCE_ROW_QUANTUM under inference mode."""
    if (torch.is_inference_mode_enabled() and x.dim() == 2 and x.shape[0] % INFERENCE_ROW_QUANTUM == 0
            and onednn_applies(x, weight)):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)
