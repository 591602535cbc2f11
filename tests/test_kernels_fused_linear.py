"""The fused linear op (per-token log-probs and KL to a reference without [N, V] logits) against its reference,
forward and backward, on fresh random inputs of odd sizes (tolerances: kernel_inputs.py). The Triton path runs
in the interpreter on the CPU and compiled on CUDA."""

import os
import sys
from pathlib import Path

import pytest
import torch

import tsarank_kernels.fused_linear as fused
from tsarank_kernels.fused_linear import linear_logprob_kl

from kernel_inputs import D, TRITON_DEVICE, assert_half_precision_errors, cases, inputs, rel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from live_bytes import LiveBytes  # noqa: E402  (a measuring tool of the benchmarks, not of the library)

pytestmark = pytest.mark.kernels


def run(impl, h, w, t, hr, wr, g_logp, g_kl, with_ref=True, head_grad=True):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(head_grad)
    logp, lse, kl = linear_logprob_kl(h, w, t, hr if with_ref else None, wr if with_ref else None, impl=impl, chunk_rows=8)
    loss = (logp * g_logp.to(logp.dtype)).sum() + ((kl * g_kl.to(kl.dtype)).sum() if with_ref else 0)
    loss.backward()
    return [logp, lse] + ([kl] if with_ref else []) + [h.grad] + ([w.grad] if head_grad else [])


@pytest.mark.parametrize("device,impl,dtype", list(cases()))
@pytest.mark.parametrize("with_ref", [True, False], ids=["kl", "logp"])
def test_fused_linear_matches_reference(device, impl, dtype, with_ref):
    args = inputs(device, dtype)
    exact = run("reference", *[a.double() if a.is_floating_point() else a for a in args], with_ref=with_ref)
    got = run(impl, *args, with_ref=with_ref)
    if dtype == torch.float32:
        for name, a, b in zip(["logp", "lse", "kl", "dh", "dW"][: len(got)], got, exact):
            assert rel(a, b) < 2e-5, name
    else:
        own = run("reference", *args, with_ref=with_ref)  # the plain computation in this dtype
        names = ["logp", "lse", "kl", "dh", "dW"] if with_ref else ["logp", "lse", "dh", "dW"]
        # values measured at most 4.7e-6 (kl) over 12 seeds, the reference's at least 5.2e-5 (fp16 lse)
        assert_half_precision_errors(names, got, own, exact, dtype, value_bound=1e-5)
        for name, a, o, b in zip(names, got, own, exact):
            if name not in ("dh", "dW"):  # log-probs, lse and KL: far more accurate than the reference's
                assert rel(a, b) < rel(o, b) / 10, name
    assert got[0].dtype == torch.float32 and bool((got[0][::4] == 0).all())  # masked tokens give 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_frozen_head_gets_no_weight_gradient(impl, monkeypatch):
    seen = []
    original = fused.chunked_backward

    def spy(*args):
        seen.append(args[10])  # need_dw
        return original(*args)

    monkeypatch.setattr(fused, "chunked_backward", spy)
    h, w, t, hr, wr, g_logp, g_kl = inputs(TRITON_DEVICE if impl == "triton" else "cpu", torch.float32)
    grads = run(impl, h, w, t, hr, wr, g_logp, g_kl, head_grad=False)
    assert seen == [False] and len(grads) == 4


def test_chunked_path_holds_one_chunk_of_logits():
    n, v, chunk = 400, 1003, 16
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(n, D, generator=g, requires_grad=True), torch.randn(v, D, generator=g, requires_grad=True)
    hr, wr = torch.randn(n, D, generator=g), torch.randn(v, D, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    full_logits, chunk_logits = n * v * 4, chunk * v * 4
    peaks = {}
    for impl in ("reference", "torch"):
        with LiveBytes() as mode:
            logp, _, kl = linear_logprob_kl(h, w, t, hr, wr, impl=impl, chunk_rows=chunk)
            (logp.sum() + kl.sum()).backward()
            del logp, kl
        peaks[impl] = mode.peak
    assert peaks["reference"] >= 2 * full_logits  # the tracker sees the full logits of model and reference
    # chunked: a few chunk-sized buffers plus the [V, D] fp32 head gradient and the [N, D] input gradient
    budget = 6 * chunk_logits + v * D * 4 + n * D * 4 + 64 * n
    assert peaks["torch"] <= budget < full_logits, (peaks, budget)


_INT64_SCRIPT = r"""
import sys
import torch
from tsarank_kernels.fused_linear import torch_softmax_chunk
from tsarank_kernels.fused_linear_triton import triton_softmax_chunk
device = sys.argv[1]
V, S = 300, 2**30 + 64  # S fits in int32; logits row 2 starts past 2^31 elements
# 4 GiB: on the CPU only address space (3 rows are touched), on CUDA real memory
storage = torch.empty(2 * S + V, dtype=torch.float16, device=device)
g = torch.Generator().manual_seed(0)
rows = (3 * torch.randn(3, V, generator=g)).half().to(device)
z = storage.as_strided((3, V), (S, 1))
z.copy_(rows)
t = torch.tensor([0, 7, V - 1], device=device)
g_logp = torch.randn(3, generator=g).to(device)
stats, want = torch.empty(4, 3, device=device), torch.empty(4, 3, device=device)
dz = triton_softmax_chunk(z, None, t, stats, g_logp, None, True)
dz_want = torch_softmax_chunk(rows.clone(), None, t, want, g_logp, None, True)
print(float((stats[:2] - want[:2]).abs().max()), float((dz.float() - dz_want).abs().max()))
"""


def test_offsets_past_2_pow_31_elements():
    """A chunk of logits whose row index times row stride passes 2^31 elements: with int32 offsets the
    kernel reads and writes the wrong rows (or crashes, hence the subprocess)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _INT64_SCRIPT, TRITON_DEVICE], capture_output=True, text=True,
                         env=os.environ, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    err_stats, err_dz = map(float, out.stdout.split())
    assert err_stats < 1e-4 and err_dz < 1e-3


def test_fused_linear_input_errors():
    h, w, t = torch.randn(5, 8), torch.randn(11, 8), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"hidden \[N, D\] and weight \[V, D\] expected, got \(5, 8\) and \(11, 7\)"):
        linear_logprob_kl(h, torch.randn(11, 7), t)
    with pytest.raises(ValueError, match="targets must be integer"):
        linear_logprob_kl(h, w, t.float())
    with pytest.raises(ValueError, match="a target is >= the vocabulary size 11"):
        linear_logprob_kl(h, w, t + 11)
    with pytest.raises(ValueError, match="ref_hidden and ref_weight go together"):
        linear_logprob_kl(h, w, t, ref_hidden=h)
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        linear_logprob_kl(h, w, t, impl="cuda")
