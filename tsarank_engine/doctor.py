"""`tsarank-engine doctor`: versions, devices and which kernels and attention backends will run, and why."""

from __future__ import annotations

import importlib.metadata
import os
import platform


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def report() -> list[str]:
    """The doctor's lines, for every device this machine has."""
    import torch

    from tsarank_kernels.dense import onednn_applies
    from tsarank_kernels.impl import resolve_impl

    from . import __version__
    from .devices import BF16_FASTER, cpu_bf16_speedup, cpu_bf16_units
    from .model.attention import auto_backend_choice
    from .model.decoder import block_ops_impl

    lines = [
        f"tsarank-engine {__version__}, Python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__}, triton {_version('triton')}, flash-attn {_version('flash-attn')}, "
        f"safetensors {_version('safetensors')}, tokenizers {_version('tokenizers')}",
        f"cpu: {_cpu_name()}, {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads, bfloat16 "
        f"units: {cpu_bf16_units()}",
    ]
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
        devices.append("cuda")
    else:
        lines.append("cuda: no device (torch " + ("was built without CUDA" if torch.version.cuda is None
                                                   else f"built for CUDA {torch.version.cuda} finds none") + ")")
    if os.environ.get("TRITON_INTERPRET") == "1":
        lines.append("TRITON_INTERPRET=1: Triton kernels run in the interpreter (tests only; slow)")

    for device in devices:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        name, why = auto_backend_choice(device, dtype)
        lines.append(f"{device} ({str(dtype).removeprefix('torch.')}, the default there):")
        lines.append(f"  attention: {name} ({why})")
        block_ops = block_ops_impl("auto", torch.empty(0, device=device))
        why = "block_ops=auto runs the Triton kernels on CUDA" if block_ops == "triton" else "the Triton kernels need CUDA"
        lines.append(f"  RMSNorm, RoPE, SwiGLU: {block_ops} ({why})")
        loss = resolve_impl(None, torch.device(device))
        lines.append(f"  LM-head losses and scores: {loss} (chunked; never the full [tokens, vocab] logits)")
        if device == "cpu":
            speedup = cpu_bf16_speedup()
            chosen = "bfloat16, on the mixed path" if speedup >= BF16_FASTER else "float32"
            lines.append(f"  scoring --dtype auto: {chosen} (bfloat16 products measured {speedup:.2f}x float32 "
                         f"here; bfloat16 is chosen from {BF16_FASTER}x)")
            probe = torch.empty(1, 1)
            lines.append("  LM-head products: " + ("oneDNN (faster than MKL on the head's shapes)"
                                                    if onednn_applies(probe, probe) else "torch.mm (no oneDNN in this torch)"))
    return lines
