"""RMSNorm, RoPE and SwiGLU: the Triton path against the plain computation in float64, forward and backward.

Odd sizes (37 rows, widths that are not powers of two), per-document positions of a packed row, llama3
frequencies. fp32: about 1e-5 relative; half: at most twice the plain computation's own error in that dtype
+ 1e-3. The Triton path runs in the interpreter on the CPU (fp32/fp16/bf16) and compiled on CUDA (bf16).
"""

import os

import pytest
import torch

from tsarank_engine.model.attention import PackedLayout
from tsarank_engine.model.decoder import rope_inv_freq
from tsarank_engine.model.config import RopeConfig
from tsarank_kernels.block_ops import rms_norm, rope, swiglu

pytestmark = pytest.mark.kernels
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"  # conftest sets the interpreter
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if DEVICE == "cpu" else [torch.float32, torch.bfloat16]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def compare(fn, inputs, d_out, dtype):
    """fn(impl, *tensors) with the Triton path against float64 torch, outputs and input gradients."""
    def run(impl, cast):
        xs = [x.to(DEVICE, cast).clone().requires_grad_() for x in inputs]
        out = fn(impl, *xs)
        out.backward(d_out.to(DEVICE, out.dtype))
        return [out] + [x.grad for x in xs]

    exact, got, own = run("torch", torch.float64), run("triton", dtype), run("torch", dtype)
    for i, (a, o, b) in enumerate(zip(got, own, exact)):
        assert a.dtype == dtype and a.shape == b.shape
        limit = 2e-5 if dtype == torch.float32 else 2 * rel(o, b) + 1e-3
        assert rel(a, b) < limit, (i, rel(a, b), rel(o, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("width", [48, 50])
def test_rms_norm(dtype, width):
    g = torch.Generator().manual_seed(width)
    x, d_out = torch.randn(37, width, generator=g), torch.randn(37, width, generator=g)
    w = 1 + 0.1 * torch.randn(width, generator=g)
    compare(lambda impl, x, w: rms_norm(x, w, 1e-6, impl=impl), [3 * x, w], d_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("head_dim,rope_type", [(64, "llama3"), (24, "default")])
def test_rope_with_per_document_positions(dtype, head_dim, rope_type):
    g = torch.Generator().manual_seed(head_dim)
    layout = PackedLayout.from_lengths([1, 20, 9, 7])  # positions restart at each document
    t = layout.offsets.numel()
    config = RopeConfig(theta=500000.0, rope_type=rope_type, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8)
    inv_freq = rope_inv_freq(config, head_dim)
    positions = layout.offsets.to(DEVICE)
    x, d_out = torch.randn(t, 3, head_dim, generator=g), torch.randn(t, 3, head_dim, generator=g)
    compare(lambda impl, x: rope(x, positions, inv_freq.to(DEVICE), impl=impl), [x], d_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_swiglu(dtype):
    g = torch.Generator().manual_seed(3)
    gate, up, d_out = (torch.randn(37, 84, generator=g) * 3 for _ in range(3))
    compare(lambda impl, a, b: swiglu(a, b, impl=impl), [gate, up], d_out, dtype)


def test_block_op_input_errors():
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        swiglu(torch.ones(2), torch.ones(2), impl="cuda")
    with pytest.raises(ValueError, match="RMSNorm weight has 3 entries, x's last dimension 4"):
        rms_norm(torch.ones(2, 4), torch.ones(3), 1e-6)
    with pytest.raises(ValueError, match=r"rope takes x \[T, H, Dh\], positions \[T\] and inv_freq \[Dh / 2\]"):
        rope(torch.ones(5, 2, 8), torch.arange(5), torch.ones(3))
    with pytest.raises(ValueError, match="swiglu takes gate and up of one shape and dtype"):
        swiglu(torch.ones(2, 3), torch.ones(3, 2))


def test_rms_norm_with_a_float32_weight_promotes_like_torch():
    """A bf16 activation with an fp32 weight (mixed precision) gives fp32 out on both paths, equal values."""
    g = torch.Generator().manual_seed(9)
    x = (3 * torch.randn(37, 50, generator=g)).to(DEVICE, torch.bfloat16)
    w = (1 + 0.1 * torch.randn(50, generator=g)).to(DEVICE)
    d_out = torch.randn(37, 50, generator=g).to(DEVICE)
    outs = []
    for impl in ("torch", "triton"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = rms_norm(xi, wi, 1e-6, impl=impl)
        y.backward(d_out)
        outs.append((y, xi.grad, wi.grad))
    for a, b in zip(*outs):  # x_hat is rounded to bf16 on both paths: a rounding flip moves a value by an ulp
        assert a.dtype == b.dtype and rel(a, b) < 1e-2
    assert outs[1][0].dtype == torch.float32
