"""CUDA timing shared by the benchmarks: the median of CUDA-event times of a function, one call per sample."""

from __future__ import annotations

import statistics
from typing import Callable

import torch


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
