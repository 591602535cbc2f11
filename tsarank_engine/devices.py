"""The one resolution of "auto" devices and dtypes: CUDA when present, bfloat16 on CUDA and float32 on the CPU."""

from __future__ import annotations

import torch

from .errors import TsarankError

DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(name: str) -> torch.device:
    """"auto", "cpu" or "cuda" as a device; "cuda" without a CUDA device is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TsarankError("device cuda asked for but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise TsarankError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" (bfloat16 on CUDA, float32 on the CPU) or one of DTYPES; float16 only on CUDA, where the paper's
    evaluation ran in it (the CPU has no fast float16 kernels)."""
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    if name not in DTYPES:
        raise TsarankError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    if name == "float16" and device.type != "cuda":
        raise TsarankError("float16 runs on CUDA only; use float32 or bfloat16 on the CPU")
    return getattr(torch, name)
