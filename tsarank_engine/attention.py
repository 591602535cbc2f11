"""Packed causal attention: the layout of documents in a packed row and the backends that attend over it.

A backend takes q [T, Hq, Dh] and k, v [T, Hkv, Dh] for T tokens of concatenated documents and returns
[T, Hq, Dh], each token attending causally to the earlier tokens of its own document only. The Triton
and flash-attn backends of DESIGN.md section 3 register here beside SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import TsarankError


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


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {"sdpa": sdpa_attention}


def get_attention_backend(name: str = "auto") -> AttentionBackend:
    """The backend called `name`; "auto" picks the best one available (SDPA until the kernels land)."""
    if name == "auto":
        name = "sdpa"
    if name not in ATTENTION_BACKENDS:
        raise TsarankError(f"unknown attention backend {name!r}; available: auto, {', '.join(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]
