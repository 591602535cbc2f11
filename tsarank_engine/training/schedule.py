"""The learning-rate schedule of the paper's runs: linear warmup, then cosine decay to 0 (Hugging Face's
`cosine` schedule with warmup_ratio, which the released scripts use)."""

from __future__ import annotations

import math

import torch


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    return math.ceil(max_steps * warmup_ratio)  # as transformers' TrainingArguments rounds it


def cosine_with_warmup(step: int, max_steps: int, warmup: int) -> float:
    """The multiplier of the peak learning rate for the update made at `step` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, max_steps - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, warmup_ratio: float):
    """A LambdaLR applying cosine_with_warmup; its state_dict goes into checkpoints."""
    warmup = warmup_steps(max_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_with_warmup(step, max_steps, warmup))
