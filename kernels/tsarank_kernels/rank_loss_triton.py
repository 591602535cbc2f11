"""Triton path of the grouped listwise rank loss and the distillation loss (contract in rank_loss.py).

Two kernels: one adds each scored token's log-prob into its candidate's sum (fp32 atomics), one program
per query group then forms the scores, the softmax of exp(score) / tau, the group's L_rank (minus the log of
its positives' summed probability) and, given teacher scores, its L_kd, with each candidate's coefficients
d loss / d score / count, one array per loss; the backward only weights and gathers them per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_TOKENS = 256


@triton.jit
def _candidate_sums_kernel(LOGP, CAND, SUMS, COUNTS, N, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    cand = tl.load(CAND + i, mask=i < N, other=-1)
    scored = (i < N) & (cand >= 0)
    tl.atomic_add(SUMS + cand, tl.load(LOGP + i, mask=scored, other=0.0), mask=scored)
    tl.atomic_add(COUNTS + cand, tl.where(scored, 1.0, 0.0), mask=scored)


@triton.jit
def _group_kernel(SUMS, COUNTS, OFFSETS, POSITIVES, TEACHER, LOSS, COEF, KD_LOSS, KD_COEF, inv_tau, inv_t_kd,
                  inv_groups, HAS_TEACHER: tl.constexpr, BLOCK_G: tl.constexpr):
    q = tl.program_id(0)
    lo = tl.load(OFFSETS + q)
    hi = tl.load(OFFSETS + q + 1)
    npos = tl.load(POSITIVES + q)
    c = lo + tl.arange(0, BLOCK_G).to(tl.int64)
    valid = c < hi
    counts = tl.load(COUNTS + c, mask=valid, other=1.0)
    x = tl.exp(tl.load(SUMS + c, mask=valid, other=0.0) / counts) * inv_tau  # exp(score) / tau
    x = tl.where(valid, x, 0.0)
    top = tl.max(tl.where(valid, x, float("-inf")), 0)
    e = tl.exp(tl.where(valid, x - top, float("-inf")))
    total = tl.sum(e, 0)
    positive = valid & (c < lo + npos)
    # the positives' own log-sum-exp, shifted by their own maximum: far below the group's, theirs would vanish
    top_positive = tl.max(tl.where(positive, x, float("-inf")), 0)
    e_positive = tl.exp(tl.where(positive, x - top_positive, float("-inf")))
    total_positive = tl.sum(e_positive, 0)
    tl.store(LOSS + q, (top + tl.log(total) - top_positive - tl.log(total_positive)) * inv_groups)
    # d loss / d logp_i for a token of candidate c = (softmax_c - [c positive] p_c / sum of the positives' p)
    # * x_c / count_c / Q
    coef = (e / total - e_positive / total_positive) * x / counts * inv_groups
    tl.store(COEF + c, coef, mask=valid)
    if HAS_TEACHER:
        # KL(softmax(teacher / t_kd) || softmax(x)); the teacher's scores shifted by their maximum before the
        # scaling, which may be large
        t = tl.load(TEACHER + c, mask=valid, other=0.0)
        t = (t - tl.max(tl.where(valid, t, float("-inf")), 0)) * inv_t_kd
        e_teacher = tl.exp(tl.where(valid, t, float("-inf")))
        total_teacher = tl.sum(e_teacher, 0)
        p_teacher = e_teacher / total_teacher
        log_ratio = (t - tl.log(total_teacher)) - (x - top - tl.log(total))
        tl.store(KD_LOSS + q, tl.sum(tl.where(valid, p_teacher * log_ratio, 0.0), 0) * inv_groups)
        # d L_kd / d logp_i for a token of candidate c = (p_model_c - p_teacher_c) * x_c / count_c / Q
        tl.store(KD_COEF + c, (e / total - p_teacher) * x / counts * inv_groups, mask=valid)


def triton_rank_loss(logp: torch.Tensor, token_candidate: torch.Tensor, group_offsets: torch.Tensor,
                     positives: torch.Tensor, num_candidates: int, max_group: int, tau: float,
                     teacher: torch.Tensor | None = None, t_kd: float = 1.0,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(L_rank, L_kd, L_rank's per-candidate coefficients, L_kd's) for fp32 logp; without a teacher L_kd is 0
    and has no coefficients (None)."""
    n, groups = logp.numel(), group_offsets.numel() - 1
    sums = torch.zeros(num_candidates, dtype=torch.float32, device=logp.device)
    counts = torch.zeros_like(sums)
    _candidate_sums_kernel[(triton.cdiv(n, BLOCK_TOKENS),)](
        logp.contiguous(), token_candidate.contiguous(), sums, counts, n, BLOCK=BLOCK_TOKENS
    )
    losses = torch.empty(groups, dtype=torch.float32, device=logp.device)
    coef = torch.empty_like(sums)
    has_teacher = teacher is not None
    kd_losses = torch.empty_like(losses) if has_teacher else losses  # never written without a teacher
    kd_coef = torch.empty_like(sums) if has_teacher else coef
    _group_kernel[(groups,)](
        sums, counts, group_offsets.contiguous(), positives.contiguous(),
        teacher.float().contiguous() if has_teacher else sums, losses, coef, kd_losses, kd_coef,
        1.0 / tau, 1.0 / t_kd, 1.0 / groups, HAS_TEACHER=has_teacher,
        BLOCK_G=max(16, triton.next_power_of_2(max_group)),
    )
    if not has_teacher:
        return losses.sum(), torch.zeros((), device=logp.device), coef, None
    return losses.sum(), kd_losses.sum(), coef, kd_coef
