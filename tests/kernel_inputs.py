"""Inputs and tolerances the kernel tests share (tests/test_kernels_*.py): random hidden states and heads, group
layouts and ranking batches of odd sizes, and the half-precision error rule.

fp32: about 1e-5 relative. Half precision, the rule of Cut Cross-Entropy's tests: errors against float64 no
larger than the reference's (the transformers-style computation: logits in that dtype, log-softmax in fp32)
in the same dtype, with a small measured slack for gradients; the values (log-probs, losses) have fp32 logits
and must be fp32-grade, far more accurate than the reference's.
"""

import os

import pytest
import torch

from tsarank_kernels.layout import GroupLayout, RankingBatch

from conftest import DEVICES

N, D, V = 37, 48, 1003


TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"  # conftest sets the interpreter


def cases():
    for device in DEVICES:
        for impl in ("torch", "triton"):
            if impl == "triton" and device != TRITON_DEVICE:
                continue  # Triton runs either compiled on CUDA or, without a GPU, in the interpreter
            halves = (torch.float16, torch.bfloat16) if (device == "cpu" and impl == "triton") else (torch.bfloat16,)
            for dtype in (torch.float32, *halves):
                yield pytest.param(device, impl, dtype, id=f"{device}-{impl}-{str(dtype)[6:]}")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


# Half-precision gradients (dh = dz W rounds dz, fp32 in the fused paths, to the head's dtype, as the reference's
# backward rounds its logits' gradient): no worse than the reference's error + this many of the dtype's eps.
# Measured over 12 seeds of both tests, torch and triton, bf16 and fp16: at most 0.19 eps (fp16 dh; bf16 0.17).
GRAD_SLACK_EPS = 0.25


def assert_half_precision_errors(names, got, own, exact, dtype, value_bound):
    """got (fused) and own (the reference in this dtype) against exact (float64 on the same rounded inputs)."""
    for name, a, o, b in zip(names, got, own, exact):
        if name in ("dh", "dW"):
            assert rel(a, b) <= rel(o, b) + GRAD_SLACK_EPS * torch.finfo(dtype).eps, (name, rel(a, b), rel(o, b))
        else:  # fp32 logits from the rounded inputs: fp32-grade values
            assert rel(a, b) < value_bound, (name, rel(a, b), rel(o, b))


def inputs(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.3
    hr = h + 0.3 * torch.randn(N, D, generator=g)
    wr = w + 0.05 * torch.randn(V, D, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -1  # masked tokens
    g_logp, g_kl = torch.randn(N, generator=g), torch.randn(N, generator=g)
    cast = lambda x: x.to(device=device, dtype=dtype)
    return cast(h), cast(w), t.to(device), cast(hr), cast(wr), g_logp.to(device), g_kl.to(device)


def random_layout(g, candidates_per_group=(2, 5, 3), scored=(2, 5)):
    """Packed positions: each candidate gets scored[0] to scored[1] - 1 scored positions, 0-2 others between."""
    token_candidate, offsets = [], [0]
    c = 0
    for size in candidates_per_group:
        for _ in range(size):
            for _ in range(int(torch.randint(*scored, (1,), generator=g))):
                token_candidate += [-1] * int(torch.randint(0, 3, (1,), generator=g)) + [c]
            c += 1
        offsets.append(c)
    return GroupLayout(torch.tensor(token_candidate), torch.tensor(offsets))


def distillation_layout(g, sizes=(2, 7, 3, 5, 4), positives=(1, 3, 2, 4, 1), scale=3.0, scored=(2, 5)):
    """Mixed group sizes, several positives, a teacher score per candidate (some of them whole numbers)."""
    base = random_layout(g, sizes, scored)
    teacher = scale * torch.randn(base.num_candidates, generator=g)
    teacher[::3] = teacher[::3].round()
    return GroupLayout(base.token_candidate, base.group_offsets, torch.tensor(positives), teacher)


def moved(layout, device):
    return GroupLayout(*(t.to(device) for t in (layout.token_candidate, layout.group_offsets, layout.positives,
                                                layout.teacher)))


def ranking_batch(g, n_positions, layout=None):
    layout = layout or random_layout(g, (3, 2), scored=(2, 3))  # 2 scored positions each: at most 5 x 2 x 3 = 30
    n = layout.token_candidate.numel()
    assert n <= n_positions
    pad = n_positions - n
    layout = GroupLayout(torch.cat([layout.token_candidate, torch.full((pad,), -1)]), layout.group_offsets,
                         layout.positives, layout.teacher)
    targets = torch.randint(0, V, (n_positions,), generator=g)
    gen_weight = torch.zeros(n_positions, dtype=torch.bool)
    gen_weight[: n // 3] = True
    kl_weight = torch.ones(n_positions, dtype=torch.bool)
    kl_weight[-2:] = False
    targets[-2:] = -1
    return RankingBatch(targets, layout, gen_weight, kl_weight)
