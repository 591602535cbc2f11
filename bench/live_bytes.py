"""Peak bytes of live tensors, tracked per operation: how memory claims are checked on any device.

Under `LiveBytes()`, every tensor an operation creates (not a view of, nor an in-place result on, one of its
inputs) is counted from its creation until Python frees it; `peak` is the high-water mark. Unlike the
process RSS it sees only tensor memory, on the CPU as on CUDA, and needs no allocator support. It does
not see temporaries an operator allocates and frees inside itself (logsumexp's, say), so it bounds
what a Python-level implementation keeps alive, and undercounts every implementation alike by those.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, n)
        return out

    def _release(self, n: int) -> None:
        self.live -= n
