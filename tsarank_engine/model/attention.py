"""Packed causal attention: the layout of documents in a packed row and the backends that attend over it.

A backend takes q [T, Hq, Dh] and k, v [T, Hkv, Dh] for T tokens of concatenated documents and returns
[T, Hq, Dh], each token attending causally to the earlier tokens of its own document only. Backends:
"flash_attn" (flash-attn's varlen kernel; CUDA, fp16/bf16), "torch_varlen" (torch's own varlen flash
attention, torch.nn.attention.varlen, torch >= 2.10; CUDA, fp16/bf16), "triton" (tsarank_kernels' flash
attention; CUDA, or the CPU under TRITON_INTERPRET=1) and "sdpa" (torch SDPA on a padded copy; any device).
"auto" picks, per device and dtype, the first of those that can run, in that order (the order measured:
BENCHMARKS.md, "Measurements behind the defaults"), and logs its choice once.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import TsarankError

logger = logging.getLogger(__name__)


@dataclass
class PackedLayout:
    """Document boundaries of a packed row: document i holds tokens cu_seqlens[i]:cu_seqlens[i+1]."""

    cu_seqlens: torch.Tensor  # int32 [num_docs + 1], strictly increasing from 0 to T
    max_seqlen: int

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, num_tokens: int) -> "PackedLayout":
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise TsarankError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != num_tokens or bool((lengths <= 0).any()):
            raise TsarankError(
                f"cu_seqlens must rise strictly from 0 to the number of tokens ({num_tokens}), "
                f"got {cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}"
            )
        return cls(cu_seqlens.to(torch.int32), int(lengths.max()))

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str = "cpu") -> "PackedLayout":
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        return cls.from_cu_seqlens(cu.to(device), int(cu[-1]))

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @cached_property
    def doc_index(self) -> torch.Tensor:
        """int64 [T]: which document each token belongs to."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.num_docs, device=lengths.device), lengths)

    @cached_property
    def offsets(self) -> torch.Tensor:
        """int64 [T]: each token's index inside its document (also the default position ids)."""
        starts = self.cu_seqlens[:-1].long()
        return torch.arange(self.doc_index.numel(), device=starts.device) - starts[self.doc_index]


AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PackedLayout, float], torch.Tensor]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float
) -> torch.Tensor:
    """Packed attention through torch SDPA: scatter the documents into a right-padded batch and attend causally.

    With right padding a causal mask is the whole mask: a real query at offset i only sees offsets <= i,
    all real tokens of its own document. Outputs at pad slots are discarded by the gather back.
    """
    gqa = q.shape[1] != k.shape[1]
    if layout.num_docs == 1:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=gqa
        )
        return out.transpose(0, 1)

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(layout.num_docs, layout.max_seqlen, x.shape[1], x.shape[2])
        out[layout.doc_index, layout.offsets] = x
        return out.transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)[layout.doc_index, layout.offsets]


def triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float
) -> torch.Tensor:
    """Packed attention by the Triton flash-attention kernels, straight on the packed tokens."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise TsarankError("the triton attention backend runs on CUDA (or on the CPU under TRITON_INTERPRET=1)")
    from tsarank_kernels.flash_attention import varlen_attention

    return varlen_attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, scale)


def flash_attn_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float
) -> torch.Tensor:
    """Packed attention by flash-attn's varlen kernel (GQA native, no copies)."""
    if not _flash_attn_installed():
        raise TsarankError("the flash_attn attention backend needs flash-attn: pip install -e '.[gpu]'")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise TsarankError(f"flash-attn runs on CUDA in float16/bfloat16, not {q.dtype} on {q.device}")
    from flash_attn import flash_attn_varlen_func

    cu = layout.cu_seqlens
    longest = layout.max_seqlen
    return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale, causal=True)


@cache
def _torch_varlen() -> tuple[Callable[..., torch.Tensor], frozenset[str]] | None:
    """torch's varlen attention and its keyword names (they changed after torch 2.10), or None before 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float
) -> torch.Tensor:
    """Packed attention by torch's varlen flash attention (torch >= 2.10, CUDA, fp16/bf16)."""
    found = _torch_varlen()
    if found is None:
        raise TsarankError(f"the torch_varlen attention backend needs torch >= 2.10, not {torch.__version__}")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise TsarankError(f"torch's varlen attention runs on CUDA in float16/bfloat16, not {q.dtype} on {q.device}")
    varlen_attn, names = found
    options: dict = {"window_size": (-1, 0)} if "window_size" in names else {"is_causal": True}  # 2.10: is_causal
    if "scale" in names:
        options["scale"] = scale
    else:  # its fixed scale is 1/sqrt(head dim)
        q = q * (scale * q.shape[-1] ** 0.5)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in names:
            options["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    cu, longest = layout.cu_seqlens, layout.max_seqlen
    return varlen_attn(q, k, v, cu, cu, longest, longest, **options)


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "flash_attn": flash_attn_attention,
    "torch_varlen": torch_varlen_attention,
    "triton": triton_attention,
    "sdpa": sdpa_attention,
}


@cache
def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def auto_backend_choice(device_type: str, dtype: torch.dtype) -> tuple[str, str]:
    """(backend, why) that "auto" picks for tensors of this device type and dtype."""
    if device_type != "cuda":
        return "sdpa", f"the varlen kernels need CUDA, and this is {device_type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return "triton", f"flash-attn and torch's varlen attention do not take {str(dtype).removeprefix('torch.')}"
    if _flash_attn_installed():
        return "flash_attn", "flash-attn is installed"
    if _torch_varlen() is not None:
        return "torch_varlen", f"flash-attn is not installed; torch {torch.__version__} has varlen attention"
    return "triton", f"flash-attn is not installed and torch {torch.__version__} has no varlen attention (>= 2.10)"


@cache
def auto_backend_name(device_type: str, dtype: torch.dtype) -> str:
    """The backend "auto" uses for tensors of this device type and dtype; logged the first time it is chosen."""
    name, why = auto_backend_choice(device_type, dtype)
    logger.info("attention backend for %s %s: %s (%s)", device_type, str(dtype).removeprefix("torch."), name, why)
    return name


def auto_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, scale: float
) -> torch.Tensor:
    return ATTENTION_BACKENDS[auto_backend_name(q.device.type, q.dtype)](q, k, v, layout, scale)


def get_attention_backend(name: str = "auto") -> AttentionBackend:
    """The backend called `name`; "auto" picks the best one available for each call's device and dtype."""
    if name == "auto":
        return auto_attention
    if name not in ATTENTION_BACKENDS:
        raise TsarankError(f"unknown attention backend {name!r}; available: auto, {', '.join(ATTENTION_BACKENDS)}")
    if name == "flash_attn" and not _flash_attn_installed():
        raise TsarankError("the flash_attn attention backend needs flash-attn: pip install -e '.[gpu]'")
    return ATTENTION_BACKENDS[name]
