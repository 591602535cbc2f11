"""The Triton packed varlen attention against a float64 per-document reference, and the decoder on the
Triton kernels (attention and block ops) against the decoder on torch.

Forward and backward on odd layouts (1-token documents, documents longer than a block, many documents in a
row), GQA and plain multi-head, head dims 64 and 128 (and 24, not a power of two, and 8, below the 16 that
a GPU's tl.dot needs, as in the tiny test models). The Triton path runs in
the interpreter on the CPU (fp32/fp16; its bf16 dot is broken) and compiled on CUDA (bf16).
fp32: about 1e-5 relative; half: at most twice the plain computation's own error in that dtype + 1e-3.
"""

import os

import pytest
import torch

from tsarank_engine.model.attention import PackedLayout, get_attention_backend
from tsarank_kernels.flash_attention import reference_varlen_attention, varlen_attention

from conftest import save_tiny_model, tiny_config

pytestmark = pytest.mark.kernels
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"  # conftest sets the interpreter
HALF = torch.float16 if DEVICE == "cpu" else torch.bfloat16
# the interpreter's blocks are 16 tokens: 37 and 40 cross several, 1-token documents sit between
LAYOUTS = {"mixed": [1, 37, 5, 1, 16, 40], "one": [33], "many": [3] * 11 + [2]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run(fn, q, k, v, d_out):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(d_out.to(out.dtype))
    return [out, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("heads,head_dim", [((4, 2), 64), ((2, 2), 128), ((3, 1), 24), ((2, 1), 8)],
                         ids=["gqa64", "mha128", "mqa24", "mqa8"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_varlen_attention_matches_reference(layout, heads, head_dim, dtype):
    lengths = LAYOUTS[layout]
    g = torch.Generator().manual_seed(len(lengths) * head_dim)
    t, (hq, hkv) = sum(lengths), heads
    q, d_out = torch.randn(t, hq, head_dim, generator=g), torch.randn(t, hq, head_dim, generator=g)
    k, v = torch.randn(t, hkv, head_dim, generator=g), torch.randn(t, hkv, head_dim, generator=g)
    cu = PackedLayout.from_lengths(lengths, DEVICE).cu_seqlens
    scale = head_dim**-0.5
    exact = run(lambda *x: reference_varlen_attention(*x, cu, scale), *(x.double().to(DEVICE) for x in (q, k, v)),
                d_out.double().to(DEVICE))
    cast = [x.to(DEVICE, dtype) for x in (q, k, v, d_out)]
    got = run(lambda *x: varlen_attention(*x, cu, max(lengths), scale), *cast)
    own = run(lambda *x: reference_varlen_attention(*x, cu, scale), *cast)
    for name, a, o, b in zip(["out", "dq", "dk", "dv"], got, own, exact):
        assert a.dtype == dtype and a.shape == b.shape
        limit = 2e-5 if dtype == torch.float32 else 2 * rel(o, b) + 1e-3
        assert rel(a, b) < limit, (name, rel(a, b), rel(o, b))


def test_documents_do_not_see_each_other():
    """Changing one document's keys and values changes nothing in the others' outputs or gradients."""
    lengths = [7, 20, 4]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(31, 2, 64, generator=g).to(DEVICE) for _ in range(3))
    cu = PackedLayout.from_lengths(lengths, DEVICE).cu_seqlens
    base = varlen_attention(q, k, v, cu, 20, 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[7:27] += 1.0
    v2[7:27] -= 2.0
    other = varlen_attention(q, k2, v2, cu, 20, 0.125)
    assert torch.equal(base[:7], other[:7]) and torch.equal(base[27:], other[27:])
    assert not torch.allclose(base[7:27], other[7:27])


_INT64_SCRIPT = r"""
import sys
import torch
from tsarank_kernels.flash_attention import reference_varlen_attention, varlen_attention
device = sys.argv[1]
D, S = 64, 2**30 + 64  # token 2 of each tensor starts past 2^31 elements
g = torch.Generator().manual_seed(0)
views, dense = [], []
for _ in range(3):  # q, k, v: 4 GiB each, on the CPU only address space (3 tokens are touched)
    storage = torch.empty(2 * S + D, dtype=torch.float16, device=device)
    x = torch.randn(3, 1, D, generator=g).half().to(device)
    view = storage.as_strided((3, 1, D), (S, D, 1))
    view.copy_(x)
    views.append(view)
    dense.append(x)
cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=device)  # three 1-token documents
got = varlen_attention(*views, cu, 1, 0.125)
want = reference_varlen_attention(*(x.float() for x in dense), cu, 0.125)
print(float((got.float() - want).abs().max()))
"""


def test_offsets_past_2_pow_31_elements():
    """Documents whose first token lies past 2^31 elements: with int32 bases the kernel reads the wrong
    tokens (or crashes, hence the subprocess)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _INT64_SCRIPT, DEVICE], capture_output=True, text=True,
                         env=os.environ, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout) < 1e-2


def test_attention_input_errors():
    q, k = torch.randn(5, 4, 8), torch.randn(5, 2, 8)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"q \[T, Hq, Dh\] and k, v \[T, Hkv, Dh\] expected"):
        varlen_attention(q, k, torch.randn(5, 2, 4), cu, 5, 1.0)
    with pytest.raises(ValueError, match="4 query heads are not a multiple of 3 key/value heads"):
        varlen_attention(q, torch.randn(5, 3, 8), torch.randn(5, 3, 8), cu, 5, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        varlen_attention(q, k, k, cu.long(), 5, 1.0)
    with pytest.raises(ValueError, match="passes 2\\^31 elements"):
        varlen_attention(q, k, k, cu, 2**28, 1.0)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3"])
def test_decoder_with_triton_kernels_matches_torch(family, tmp_path):
    """Triton attention and block ops (RMSNorm, RoPE, SwiGLU) against SDPA and plain torch, fp32, with grads."""
    from tsarank_engine.model.loading import load_model

    save_tiny_model(tiny_config(family), tmp_path)
    ids = torch.randint(0, 400, (41,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    cu = torch.tensor([0, 1, 18, 22, 41], dtype=torch.int32, device=DEVICE)
    outs = []
    for backend, block_ops in (("sdpa", "torch"), ("triton", "triton")):
        model = load_model(tmp_path, device=DEVICE, attention=backend, block_ops=block_ops)
        h = model(ids, cu_seqlens=cu)
        h.square().sum().backward()
        outs.append([h] + [p.grad for p in model.parameters() if p.grad is not None])  # an untied head gets none
    assert len(outs[0]) == len(outs[1]) > 10
    for a, b in zip(*outs):
        assert rel(a, b) < 1e-5


def test_auto_backend_choice_is_logged_once(caplog):
    import logging

    from tsarank_engine.model import attention

    attention.auto_backend_name.cache_clear()
    auto = get_attention_backend("auto")
    layout = PackedLayout.from_lengths([2, 3])
    q, k = torch.randn(5, 2, 8), torch.randn(5, 1, 8)
    with caplog.at_level(logging.INFO, logger="tsarank_engine.model.attention"):
        for _ in range(3):
            auto(q, k, k, layout, 0.3)
    assert [r.getMessage() for r in caplog.records] == [
        "attention backend for cpu float32: sdpa (the varlen kernels need CUDA, and this is cpu)"
    ]


def test_auto_prefers_flash_attn_then_torch_varlen_then_triton(monkeypatch):
    from tsarank_engine.model import attention

    half, fp32 = torch.bfloat16, torch.float32
    assert attention.auto_backend_choice("cpu", half)[0] == "sdpa"
    assert attention.auto_backend_choice("cuda", fp32)[0] == "triton"  # neither varlen function takes float32
    monkeypatch.setattr(attention, "_flash_attn_installed", lambda: True)
    assert attention.auto_backend_choice("cuda", half)[0] == "flash_attn"
    monkeypatch.setattr(attention, "_flash_attn_installed", lambda: False)
    assert attention._torch_varlen() is not None  # this torch (>= 2.10) has it
    assert attention.auto_backend_choice("cuda", torch.float16) == (
        "torch_varlen", f"flash-attn is not installed; torch {torch.__version__} has varlen attention")
    monkeypatch.setattr(attention, "_torch_varlen", lambda: None)
    assert attention.auto_backend_choice("cuda", half)[0] == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen attention runs on CUDA only")
@pytest.mark.parametrize("heads,head_dim", [((4, 2), 64), ((2, 2), 128)], ids=["gqa64", "mha128"])
def test_torch_varlen_backend_matches_reference(heads, head_dim):
    lengths = LAYOUTS["mixed"]
    g = torch.Generator().manual_seed(head_dim)
    t, (hq, hkv) = sum(lengths), heads
    q, d_out = torch.randn(t, hq, head_dim, generator=g), torch.randn(t, hq, head_dim, generator=g)
    k, v = torch.randn(t, hkv, head_dim, generator=g), torch.randn(t, hkv, head_dim, generator=g)
    layout = PackedLayout.from_lengths(lengths, "cuda")
    scale = 0.7 * head_dim**-0.5  # not the default scale
    exact = run(lambda *x: reference_varlen_attention(*x, layout.cu_seqlens, scale),
                *(x.double().cuda() for x in (q, k, v)), d_out.double().cuda())
    cast = [x.to("cuda", torch.bfloat16) for x in (q, k, v, d_out)]
    got = run(lambda *x: get_attention_backend("torch_varlen")(*x, layout, scale), *cast)
    own = run(lambda *x: reference_varlen_attention(*x, layout.cu_seqlens, scale), *cast)
    for name, a, o, b in zip(["out", "dq", "dk", "dv"], got, own, exact):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        assert rel(a, b) < 2 * rel(o, b) + 1e-3, (name, rel(a, b), rel(o, b))
