"""The learning-rate schedule against transformers' cosine schedule with warmup."""

import pytest
import torch
import transformers

from tsarank_engine.training.schedule import cosine_scheduler


@pytest.mark.parametrize("max_steps,warmup_ratio", [(100, 0.1), (37, 0.03), (10, 0.0), (5, 0.5)])
def test_matches_transformers(max_steps, warmup_ratio):
    def lrs(make):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-5)
        sched = make(opt)
        out = []
        for _ in range(max_steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    # transformers 5 takes a ratio as warmup_steps < 1 (the paper's 4.x scripts said warmup_ratio; same rounding)
    args = transformers.TrainingArguments(output_dir="unused", warmup_steps=warmup_ratio, report_to=[])
    warmup = args.get_warmup_steps(max_steps)
    want = lrs(lambda opt: transformers.get_cosine_schedule_with_warmup(opt, warmup, max_steps))
    got = lrs(lambda opt: cosine_scheduler(opt, max_steps, warmup_ratio))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
