"""The one resolution of "auto" devices and dtypes (CUDA when present; bfloat16 on CUDA and float32 on the CPU,
where scoring takes bfloat16 if the CPU's bfloat16 products are measured faster), and the process settings a CPU
run needs."""

from __future__ import annotations

import ctypes
import functools
import sys
import time

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


def resolve_scoring_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Scoring's dtype (`score`, `rerank`, `serve`, Ranker): "auto" is bfloat16 on CUDA, and on the CPU bfloat16
    where this CPU's bfloat16 products measure at least BF16_FASTER times faster than float32 ones, else float32;
    otherwise as resolve_dtype. A half-precision dtype scores on the mixed path (loading.load_model's `mixed`)."""
    if name == "auto" and device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_speedup() >= BF16_FASTER else torch.float32
    return resolve_dtype(name, device)


BF16_FASTER = 1.3  # a CPU's bf16 products must beat its float32 ones by this much to be chosen


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster this CPU multiplies in bfloat16 than in float32: the fastest of five timings each of
    a [512, 1024] x [1024, 1024] product, the shape of a small model's linears (some 50 ms in all, once a process;
    the fastest, not the median, so that a busy machine does not flip the choice). Above 1 only where the CPU has
    bfloat16 units (AVX512-BF16, AMX) that torch's oneDNN uses."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(512, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        torch.nn.functional.linear(x, w)  # oneDNN builds its kernel on the first call
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            samples.append(time.perf_counter() - start)
        times[dtype] = min(samples)
    return times[torch.float32] / times[torch.bfloat16]


# CPU feature flags (/proc/cpuinfo's "flags" on x86, "Features" on Arm) of bfloat16 products, by the name people know
_BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16", "bf16": "Arm BF16"}


def cpu_bf16_units(cpuinfo: str | None = None) -> str:
    """The CPU's bfloat16 product units as its feature flags name them ("AMX, AVX512-BF16", "AVX512-BF16",
    "none"), from `cpuinfo` (the text of /proc/cpuinfo, read when None); "unknown" where there is none (not
    Linux). What the bfloat16 products gain there is measured, by cpu_bf16_speedup."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return "unknown"
    flags = next((line.partition(":")[2].split() for line in cpuinfo.splitlines()
                  if line.split(":")[0].strip() in ("flags", "Features")), [])
    return ", ".join(name for flag, name in _BF16_FLAGS.items() if flag in flags) or "none"


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
