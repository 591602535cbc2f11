"""Shared by the benchmarks: the folder of the paper's data samples, CUDA timing (the median of CUDA-event times of
a function, one call per sample) and the machine name their records carry.

Named `bench_common`, not `timing` or `data`: every module here is importable by its bare name while bench/ is
on sys.path, so none may take the name of a package on PyPI (DESIGN.md, "Layout")."""

from __future__ import annotations

import platform
import statistics
from pathlib import Path
from typing import Callable

import torch

SAMPLES = Path(__file__).resolve().parents[1] / "tsarank_engine" / "sample_data" / "rankinggpt"


def cuda_median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of `reps` calls of fn, each timed by CUDA events (warm up before calling this)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def machine_name(device_type: str) -> str:
    """The GPU's name on CUDA; on the CPU the processor and torch's thread count."""
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    return f"{_processor()} x{torch.get_num_threads()}"


def _processor() -> str:
    """platform.processor() is empty on most Linux systems: there, the first "model name" of /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    if not platform.processor() and cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "cpu"
