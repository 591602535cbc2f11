"""Which launch configurations a Triton launcher picks for its tensors."""

from __future__ import annotations

import torch


def config_target(x: torch.Tensor) -> str:
    """"interpreter" for CPU tensors (TRITON_INTERPRET=1: small blocks, so that tests cross several), "cuda"
    otherwise: a GPU, or the meta device, on which bench/compile_check.py runs the launchers to record what
    they would launch and compile it for GPUs this machine does not have."""
    return "interpreter" if x.device.type == "cpu" else "cuda"
