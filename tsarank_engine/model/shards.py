"""Which rows of a full tensor this process holds of a parameter FSDP2 sharded: read by the loader (each process
fills only its rows) and by the LoRA adapters' initialisation (each draws the whole A and keeps its rows)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard

from ..errors import TsarankError


def local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """The rows of the full tensor that this process holds of a sharded parameter (a DTensor sharded on its
    first dimension, as FSDP2 shards: torch.chunk's split over the mesh dimension it shards on); None for a
    parameter held whole."""
    if not isinstance(param, DTensor):
        return None
    start, rows = 0, param.shape[0]
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise TsarankError(f"a parameter sharded on dimension {placement.dim}: only dimension 0 is read")
            start = param.device_mesh.get_coordinate()[dim] * -(-rows // param.device_mesh.size(dim))
    return start, start + param.to_local().shape[0]
