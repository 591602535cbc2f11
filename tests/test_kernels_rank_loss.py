"""The grouped listwise rank loss and the distillation loss (tsarank_kernels.rank_loss) against their reference
and plain per-group computations, forward and backward; the Triton path in the interpreter on the CPU."""

import math

import pytest
import torch

from tsarank_kernels.layout import GroupLayout
from tsarank_kernels.rank_loss import rank_loss, reference_rank_loss

from kernel_inputs import TRITON_DEVICE, distillation_layout, moved, random_layout, rel

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("tau", [1.0, 0.001])
def test_rank_loss_matches_reference_and_is_stable(tau):
    g = torch.Generator().manual_seed(2)
    layout = random_layout(g)
    logp = (-3 * torch.rand(layout.token_candidate.numel(), generator=g, dtype=torch.float64)).requires_grad_()
    ref = reference_rank_loss(logp, layout, tau).rank
    got = rank_loss(logp, layout, tau).rank
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    (g_ref,) = torch.autograd.grad(ref, logp)
    (g_got,) = torch.autograd.grad(got, logp)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)
    assert bool((g_got[layout.token_candidate < 0] == 0).all())  # only scored tokens get a coefficient
    got32 = rank_loss(logp.detach().float(), layout, tau).rank
    assert torch.isfinite(got32) and abs(got32.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("tau", [1.0, 0.001])
def test_triton_rank_loss_matches_reference(tau):
    g = torch.Generator().manual_seed(5)
    layout = random_layout(g, (2, 7, 3, 2))
    n = layout.token_candidate.numel()
    logp64 = (-3 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()
    ref = reference_rank_loss(logp64, layout, tau).rank
    (g_ref,) = torch.autograd.grad(ref, logp64)
    on = lambda x: x.to(TRITON_DEVICE)
    layout_dev = GroupLayout(on(layout.token_candidate), on(layout.group_offsets))
    logp = on(logp64.detach().float()).requires_grad_()
    got = rank_loss(logp, layout_dev, tau, impl="triton").rank
    (g_got,) = torch.autograd.grad(got, logp)
    assert abs(got.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert rel(g_got.cpu(), g_ref) < 1e-5


def test_rank_loss_computes_in_fp32_for_half_inputs():
    g = torch.Generator().manual_seed(8)
    layout = random_layout(g)
    logp = -3 * torch.rand(layout.token_candidate.numel(), generator=g, dtype=torch.float64)
    ref = reference_rank_loss(logp, layout, 0.001).rank
    got = rank_loss(logp.to(torch.bfloat16), layout, 0.001).rank
    bf16_error = (reference_rank_loss(logp.to(torch.bfloat16).double(), layout, 0.001).rank - ref).abs()
    assert got.dtype == torch.float32 and (got.double() - ref).abs() <= bf16_error + 1e-5


def test_triton_rank_loss_with_many_tokens_big_groups_and_repeated_negatives():
    g = torch.Generator().manual_seed(9)
    layout = random_layout(g, (20, 3, 33))  # > 256 tokens, groups wider than 16 lanes
    n = layout.token_candidate.numel()
    assert n > 256
    logp = -3 * torch.rand(n, generator=g, dtype=torch.float64)
    tc = layout.token_candidate
    logp[tc == 4] = logp[tc == 4][0]  # candidates 3 and 4 score alike (a repeated negative)
    logp[tc == 3] = logp[tc == 4][0]
    logp = logp.requires_grad_()
    ref = reference_rank_loss(logp, layout, 0.001).rank
    (g_ref,) = torch.autograd.grad(ref, logp)
    on = lambda x: x.to(TRITON_DEVICE)
    leaf = on(logp.detach().float()).requires_grad_()
    got = rank_loss(leaf, GroupLayout(on(tc), on(layout.group_offsets)), 0.001, impl="triton").rank
    (g_got,) = torch.autograd.grad(got, leaf)
    assert abs(got.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))  # fp32's own error at tau=0.001
    assert rel(g_got.cpu(), g_ref) < 1e-4


def test_rank_loss_with_repeated_negatives():
    # one query, positive + the same negative three times (sampling with replacement)
    layout = GroupLayout(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([0, 4]))
    logp = torch.tensor([-1.0, -1.2, -2.0, -2.5, -2.0, -2.5, -2.0, -2.5], dtype=torch.float64, requires_grad=True)
    ref, got = reference_rank_loss(logp, layout, 0.001).rank, rank_loss(logp, layout, 0.001).rank
    torch.testing.assert_close(got, ref)
    (grad,) = torch.autograd.grad(got, logp)
    torch.testing.assert_close(grad[2:4], grad[4:6])


def plain_listwise_losses(logp, layout, tau, t_kd=1.0):
    """L_rank, -log of the positives' summed softmax probability, and with teacher scores L_kd, KL(softmax(teacher /
    t_kd) || that softmax) (else None), each averaged over groups, written directly (float64)."""
    ranks, kds = [], []
    for q in range(layout.group_offsets.numel() - 1):
        lo, hi = int(layout.group_offsets[q]), int(layout.group_offsets[q + 1])
        scores = torch.stack([logp[layout.token_candidate == c].sum() / (layout.token_candidate == c).sum()
                              for c in range(lo, hi)])
        probs = torch.softmax(torch.exp(scores) / tau, dim=0)
        ranks.append(-torch.log(probs[:int(layout.positives[q])].sum()))
        if layout.teacher is not None:
            teacher = torch.softmax(layout.teacher[lo:hi].double() / t_kd, dim=0)
            kds.append((teacher * (torch.log(teacher) - torch.log(probs))).sum())
    return sum(ranks) / len(ranks), sum(kds) / len(kds) if kds else None


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("tau", [1.0, 0.05, 0.001])
def test_several_positives_match_a_plain_computation(impl, tau):
    g = torch.Generator().manual_seed(11)
    base = random_layout(g, (2, 7, 3, 5, 4))
    positives = torch.tensor([1, 3, 2, 4, 1])
    cpu = GroupLayout(base.token_candidate, base.group_offsets, positives)
    logp64 = (-3 * torch.rand(cpu.token_candidate.numel(), generator=g, dtype=torch.float64)).requires_grad_()
    want = plain_listwise_losses(logp64, cpu, tau)[0] if tau >= 0.05 else reference_rank_loss(logp64, cpu, tau).rank
    (g_want,) = torch.autograd.grad(want, logp64)
    if tau >= 0.05:  # the log-domain spec agrees with the direct formula
        torch.testing.assert_close(reference_rank_loss(logp64, cpu, tau).rank, want, rtol=1e-10, atol=1e-12)
    layout, leaf = cpu, logp64.detach().clone().requires_grad_()
    if impl == "triton":
        on = lambda x: x.to(TRITON_DEVICE)  # noqa: E731
        layout = GroupLayout(on(cpu.token_candidate), on(cpu.group_offsets), on(positives))
        leaf = on(logp64.detach().float()).requires_grad_()
    got = rank_loss(leaf, layout, tau, impl=impl).rank
    (g_got,) = torch.autograd.grad(got, leaf)
    fp32 = leaf.dtype == torch.float32
    assert abs(got.item() - want.item()) <= (1e-5 if fp32 else 1e-10) * max(1.0, abs(want.item()))
    assert rel(g_got.cpu().double(), g_want) < (1e-4 if fp32 else 1e-9)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_positives_far_below_the_best_negative_stay_finite(impl):
    """At tau = 0.001 two positives 300 logits below a negative: their probabilities underflow, their log-sum
    must not (the loss is about 300, its gradient finite)."""
    layout = GroupLayout(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 4]), torch.tensor([2]))
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    layout = GroupLayout(*(t.to(device) for t in (layout.token_candidate, layout.group_offsets, layout.positives)))
    # exp(s) / tau: 0.1 / 0.001 = 100 for the positives against 0.4 / 0.001 = 400 for a negative
    logp = torch.log(torch.tensor([0.1, 0.1, 0.4, 0.2], device=device)).requires_grad_()
    loss = rank_loss(logp, layout, 0.001, impl=impl).rank
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
    assert abs(loss.item() - (300 - math.log(2))) < 1e-3


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
@pytest.mark.parametrize("tau,t_kd", [(1.0, 1.0), (0.05, 0.3), (0.2, 4.0)])
def test_distillation_matches_a_plain_computation(impl, tau, t_kd):
    """L_kd and L_rank forward, and the gradient of every weighting of the two (the Triton backward weights
    each loss's own coefficients), against the plain per-group softmax and KL through autograd."""
    g = torch.Generator().manual_seed(17)
    cpu = distillation_layout(g)
    logp64 = (-3 * torch.rand(cpu.token_candidate.numel(), generator=g, dtype=torch.float64)).requires_grad_()
    want_rank, want_kd = plain_listwise_losses(logp64, cpu, tau, t_kd)
    layout, leaf = cpu, logp64.detach().clone().requires_grad_()
    if impl == "triton":
        layout, leaf = moved(cpu, TRITON_DEVICE), logp64.detach().float().to(TRITON_DEVICE).requires_grad_()
    fp32 = leaf.dtype == torch.float32
    for w_rank, w_kd in ((0.0, 1.0), (0.7, 1.9), (1.0, 0.0)):
        got = reference_rank_loss(leaf, layout, tau, t_kd) if impl == "reference" else \
            rank_loss(leaf, layout, tau, impl=impl, t_kd=t_kd)
        for value, want in ((got.rank, want_rank), (got.kd, want_kd)):
            assert abs(value.item() - want.item()) <= (1e-5 if fp32 else 1e-10) * max(1.0, abs(want.item()))
        (g_got,) = torch.autograd.grad(w_rank * got.rank + w_kd * got.kd, leaf)
        (g_want,) = torch.autograd.grad(w_rank * want_rank + w_kd * want_kd, logp64, retain_graph=True)
        assert rel(g_got.cpu().double(), g_want) < (1e-5 if fp32 else 1e-9), (w_rank, w_kd)
        assert bool((g_got[layout.token_candidate < 0] == 0).all())


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_distillation_with_large_teacher_logits_stays_finite(impl):
    """Teacher scores of +-1e4 at t_kd = 0.001 (logits of 1e7) and the model at tau = 0.001: each group's
    maximum is subtracted before the exponentials, so loss and gradient stay finite and equal the log-domain
    spec."""
    g = torch.Generator().manual_seed(19)
    device = TRITON_DEVICE if impl == "triton" else "cpu"
    cpu = distillation_layout(g, scale=1e4)
    layout = moved(cpu, device)
    logp64 = (-3 * torch.rand(cpu.token_candidate.numel(), generator=g, dtype=torch.float64)).requires_grad_()
    want = reference_rank_loss(logp64, cpu, 0.001, 0.001).kd
    (g_want,) = torch.autograd.grad(want, logp64)
    leaf = logp64.detach().float().to(device).requires_grad_()
    got = rank_loss(leaf, layout, 0.001, impl=impl, t_kd=0.001).kd
    (g_got,) = torch.autograd.grad(got, leaf)
    assert torch.isfinite(got) and bool(torch.isfinite(g_got).all())
    assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    assert rel(g_got.cpu().double(), g_want) < 1e-4


def test_bad_group_layouts_are_named():
    with pytest.raises(ValueError, match="positives must give 1 to size - 1 positives for each of the 2 groups"):
        GroupLayout(torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 2, 5]), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="group 1 has 1 candidate\\(s\\); a listwise group needs a positive and a negative"):
        GroupLayout(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3]))
    with pytest.raises(ValueError, match="candidate 1 has no query tokens"):
        GroupLayout(torch.tensor([0, -1, 2]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"teacher must be a float tensor of 3 scores, one per candidate, got "
                                         r"torch.float32 \(2,\)"):
        GroupLayout(torch.tensor([0, 1, 2]), torch.tensor([0, 3]), teacher=torch.zeros(2))
    with pytest.raises(ValueError, match="teacher must be a float tensor of 3 scores"):
        GroupLayout(torch.tensor([0, 1, 2]), torch.tensor([0, 3]), teacher=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="candidate 1's teacher score is nan, not a finite number"):
        GroupLayout(torch.tensor([0, 1, 2]), torch.tensor([0, 3]), teacher=torch.tensor([0.5, float("nan"), 1.0]))
