"""Which path of an op runs: the one check, and the one default, of the `impl` argument every op takes."""

from __future__ import annotations

import torch

IMPLS = ("reference", "torch", "triton")  # the plain spec; the torch path; the Triton kernels


def resolve_impl(impl: str | None, device: torch.device, offered: tuple[str, ...] = IMPLS) -> str:
    """`impl`, or for None Triton on CUDA and the torch path elsewhere (the interpreter is for tests, which
    name it); a ValueError naming the paths the op offers for anything else."""
    impl = impl or ("triton" if device.type == "cuda" else "torch")
    if impl not in offered:
        raise ValueError(f"unknown impl {impl!r}; choose from {', '.join(offered)}")
    return impl
