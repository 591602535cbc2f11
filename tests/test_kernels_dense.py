"""Float32 CPU products on oneDNN (tsarank_kernels.dense): the LM head's logits and the decoder's linears when
scoring; torch's products otherwise; fp32 logits from half-precision operands."""

import pytest
import torch

from tsarank_kernels import dense

from conftest import DEVICES, onednn_calls

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("rows", [1, 15, 16, 37, 160])
def test_matmul_nt_equals_torch_mm(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=gen)
    w = torch.randn(1003, 48, generator=gen)
    expected = x.double() @ w.double().T
    got = dense.matmul_nt(x, w)
    assert got.shape == (rows, 1003) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_onednn_is_used_for_float32_cpu_only():
    x, w = torch.randn(5, 8), torch.randn(7, 8)
    assert dense.onednn_applies(x, w) == (torch.backends.mkldnn.is_available()
                                          and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    assert not dense.onednn_applies(x.double(), w.double())
    out = torch.empty(5, 7, dtype=torch.float64)
    assert dense.matmul_nt(x.double(), w.double(), out=out) is out  # torch.mm path writes into out
    torch.testing.assert_close(out, x.double() @ w.double().T)


def test_short_products_reuse_few_shapes():
    """Row counts are padded to multiples of ROW_QUANTUM, so oneDNN's per-shape primitive cache stays small."""
    if not dense.onednn_applies(torch.ones(1, 1), torch.ones(1, 1)):
        pytest.skip("this torch build has no oneDNN")
    w = torch.randn(11, 8)
    _, calls = onednn_calls(lambda: [dense.matmul_nt(torch.randn(rows, 8), w) for rows in range(1, 40)])
    assert sorted(set(calls)) == [16, 32, 48]


@pytest.mark.parametrize("rows", [128, 130, 256])
@pytest.mark.parametrize("mode", ["inference", "no_grad", "grad"])
def test_linear_equals_torch_and_uses_onednn_only_for_padded_inference_rows(rows, mode):
    if not dense.onednn_applies(torch.ones(1, 1), torch.ones(1, 1)):
        pytest.skip("this torch build has no oneDNN")
    gen = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 40, generator=gen), torch.randn(23, 40, generator=gen), torch.randn(23, generator=gen)
    context = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]
    with context():
        got, calls = onednn_calls(lambda: dense.linear(x, w, b))
    torch.testing.assert_close(got.double(), x.double() @ w.double().T + b.double(), rtol=1e-5, atol=1e-5)
    assert calls == ([rows] if mode == "inference" and rows % dense.INFERENCE_ROW_QUANTUM == 0 else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_logits_nt_accumulates_and_returns_fp32(device, dtype):
    """Half-precision operands give fp32 logits to fp32 accuracy (rounding them to 16 bits would be off by
    ~2e-3 relative), whether the head is passed as is or as logits_operand's copy; fp64 stays fp64."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 48, generator=gen).to(device, dtype)
    w = torch.randn(1003, 48, generator=gen).to(device, dtype)
    exact = x.double() @ w.double().T
    want = torch.float64 if dtype == torch.float64 else torch.float32
    head = dense.logits_operand(w)
    for weight in (w, head):
        got = dense.logits_nt(x, weight)
        assert got.dtype == want and got.shape == (37, 1003)
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    out = torch.empty(37, 1003, dtype=want, device=device)
    if not dense.onednn_applies(dense.logits_operand(x), head):  # torch.mm runs the product: into `out`
        assert dense.logits_nt(x, head, out=out) is out
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
