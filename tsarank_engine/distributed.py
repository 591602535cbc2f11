"""Processes and sharding for training (DESIGN.md, "Training").

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) each process joins the group torchrun set
up; without it the process forms a group of one, so a single process runs the same code and writes the same
checkpoints (a single float32 process skips the FSDP wrapper: nothing to shard, nothing to cast). CUDA uses
NCCL (gloo beside it for CPU tensors), the CPU uses gloo. FSDP2 `fully_shard` wraps each decoder block; the
root unit holds the rest of the model (embeddings, final norm, LM head: tied embeddings stay in one unit), so
the loss kernels, which read the head's weight inside the root's forward, see it gathered. On a 2-D mesh
(`parallel.replicate_degree`) the same calls make HSDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .devices import resolve_device
from .errors import TsarankError
from .model.decoder import CausalLM


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes(device: str = "auto", replicate_degree: int = 1) -> Processes:
    """Join torchrun's process group, or form a group of one; device "auto": CUDA when present. With
    replicate_degree > 1 the mesh is 2-D, (replicate, shard): FSDP2 then shards within each of the
    replicate_degree groups of consecutive ranks (a node, with torchrun's rank order) and replicates across them."""
    device = resolve_device(device).type
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        target = torch.device("cuda", torch.cuda.current_device())
        backend = "cpu:gloo,cuda:nccl"
    else:
        target, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if under_torchrun:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if world % replicate_degree:
        stop_processes()
        raise TsarankError(f"parallel.replicate_degree = {replicate_degree} does not divide the {world} processes")
    mesh = (init_device_mesh(target.type, (world,)) if replicate_degree == 1 else
            init_device_mesh(target.type, (replicate_degree, world // replicate_degree),
                             mesh_dim_names=("replicate", "shard")))
    return Processes(dist.get_rank(), world, target, mesh)


def accumulate_gradients(root: nn.Module, last_row: bool) -> None:
    """Under FSDP, reduce gradients once per step: after the backward of the last row."""
    if isinstance(root, FSDPModule):
        root.set_requires_gradient_sync(last_row)


def stop_processes() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(root: nn.Module, lm: CausalLM, reference: CausalLM | None, processes: Processes,
          compute_dtype: torch.dtype) -> list[nn.Module]:
    """fully_shard every decoder block of `lm`, then `root` (everything else), and the frozen reference's own
    blocks (and its embeddings when it has its own); returns the top sharded modules, whose shards are still
    to allocate (to_empty): `root` and the reference's. Parameters stay in their dtype (the model's float32: the master
    weights; the reference's, the compute dtype); with a lower compute_dtype FSDP gathers the model's cast to it
    and reduces gradients in float32. A single float32 process is left unwrapped: there is nothing to shard or
    cast, and FSDP would only copy every parameter it gathers (the root's embeddings for a whole step). What
    stays whole: the reference's final norm, and its LM head when it is not the model's."""
    if processes.world_size == 1 and compute_dtype == torch.float32:
        return []
    if compute_dtype == torch.float32:
        policy = MixedPrecisionPolicy()
    else:
        # Inputs are token ids and layouts (dataclasses FSDP's input cast would try to rebuild); the states
        # between blocks are already in the compute dtype.
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in lm.model.layers:
        fully_shard(block, mesh=processes.mesh, mp_policy=policy)
    units: list[nn.Module] = [fully_shard(root, mesh=processes.mesh, mp_policy=policy)]
    if reference is not None:
        owned = {id(p) for p in lm.parameters()}
        frozen = [m for m in (*reference.model.layers, reference.model.embed_tokens)
                  if any(True for _ in m.parameters()) and not any(id(p) in owned for p in m.parameters())]
        for module in frozen:  # each gathers its weights around its own forward
            units.append(fully_shard(module, mesh=processes.mesh, reshard_after_forward=True))
    return units


Row = TypeVar("Row")


def rows_in_step(rows: list[Row], most: int, filler: Row | None = None) -> list[tuple[Row, bool]]:
    """The rows a rank runs so that every rank runs `most`, as FSDP requires (each forward gathers parameters
    from every rank): its own, marked real, then `filler` (by default its first row) again, marked not real,
    whose results the caller drops."""
    if filler is None and most > len(rows):
        filler = rows[0]
    return [(row, True) for row in rows] + [(filler, False)] * (most - len(rows))
