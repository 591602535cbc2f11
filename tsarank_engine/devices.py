"""The one resolution of "auto" devices and dtypes (CUDA when present, bfloat16 on CUDA and float32 on the CPU),
and the process settings a CPU run needs."""

from __future__ import annotations

import ctypes
import sys

import torch

from .choices import DEVICES, DTYPES
from .errors import TsarankError


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto", "cpu", "cuda" or "cuda:N" (or a torch.device) as a device; CUDA without a CUDA device is an
    error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICES:
        raise TsarankError(f"unknown device {name!r}; choose {', '.join(DEVICES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TsarankError("device cuda asked for but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TsarankError(f"device {device} asked for but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" (bfloat16 on CUDA, float32 on the CPU) or one of DTYPES (by name or as a torch.dtype); float16
    only on CUDA, where the paper's evaluation ran in it (the CPU has no fast float16 kernels)."""
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    if name not in DTYPES:
        raise TsarankError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    if name == "float16" and device.type != "cuda":
        raise TsarankError("float16 runs on CUDA only; use float32 or bfloat16 on the CPU")
    return getattr(torch, name)


def tune_cpu(device: torch.device) -> None:
    """Two settings a CPU run needs, made before the model loads (threads started later inherit the second):
    - glibc raises its mmap threshold as large blocks are freed, after which freed activations stay in a
      fragmented heap: pinning it at 16 MB lowers the CPU peak.
    - subnormal floats flushed to zero: L_rank's gradient reaches a candidate the softmax all but excludes as
      values below 1e-38, which x86 multiplies 10-100x slower; without L_dp nothing larger joins them. A value
      that small changes no sum it joins in float32.
    Both measured: BENCHMARKS.md, "Measurements behind the defaults"."""
    if device.type != "cpu":
        return
    torch.set_flush_denormal(True)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 16 * 2**20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc
            pass
