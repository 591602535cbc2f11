"""The model a recipe trains, built for this process: the decoder (and the stage-2 reference) on the meta device,
frozen and adapted as the recipe says, sharded, then filled from the checkpoints, each process only its own
shards; and its optimizer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from ..devices import resolve_dtype
from ..distributed import Processes, shard
from ..errors import TsarankError
from ..model.builtin import resolve_model_path
from ..model.decoder import CausalLM
from ..model.loading import checkpoint_tensors, equal_tensors, fill_weights, model_on_meta
from ..model.lora import add_adapters, init_adapters, is_adapter_parameter
from ..recipe import Recipe
from .objectives import TrainingObjective, sharing_with_reference, train_top_blocks, trained_blocks


def compute_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    return resolve_dtype(recipe.model.dtype, device)


def resolve_models(recipe: Recipe, processes: Processes) -> Recipe:
    """The recipe with builtin model names replaced by their directories (rank 0 converts; the rest wait)."""
    if processes.is_main:
        resolve_model_path(recipe.model.path)
        resolve_model_path(recipe.sft.reference)
    dist.barrier()
    return replace(recipe, model=replace(recipe.model, path=resolve_model_path(recipe.model.path)),
                   sft=replace(recipe.sft, reference=resolve_model_path(recipe.sft.reference)))


def build_objective(recipe: Recipe, processes: Processes, dtype: torch.dtype,
                    vocab_size: int | None = None) -> tuple[TrainingObjective, int]:
    """The model in training (and the stage-2 reference) built on the meta device, sharded, then filled from
    the checkpoints: under FSDP every process reads only its own shards, so none ever holds a whole model.
    With LoRA the base model is frozen in the compute dtype and, when it holds the reference's weights, is the
    reference (adapters off). `vocab_size` above the checkpoints' grows both vocabularies (model_on_meta)."""
    device, model_dir, lora = processes.device, recipe.model.path, recipe.lora.rank > 0
    options = dict(attention=recipe.model.attention, block_ops=recipe.model.block_ops, vocab_size=vocab_size)
    lm, entries = model_on_meta(model_dir, **options)  # float32: the master weights
    if lora:
        lm.to(dtype)  # on meta: no memory
    reference, ref_entries, shared_blocks, share_head = None, {}, 0, False
    if recipe.run.stage == "sft":
        sft = recipe.sft
        if lora:
            add_adapters(lm, recipe.lora, trained_blocks(lm, sft.trainable_top_blocks))
        else:
            train_top_blocks(lm, sft.trainable_top_blocks)
        if sft.w_dp != 0:
            ref_dir = sft.reference or model_dir
            same = Path(ref_dir).resolve() == Path(model_dir).resolve()

            def equal(names: list[str]) -> bool:  # each process compares its slice of the rows
                part = (processes.rank, processes.world_size)
                mine = same or equal_tensors(entries, ref_entries, names, dtype, part)
                agreed = torch.tensor([float(mine)], device=device)
                dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
                return bool(agreed.item())

            if lora and not same:
                ref_entries = checkpoint_tensors(ref_dir)
            if lora and equal([n for n, _ in lm.named_parameters() if not is_adapter_parameter(n)]):
                reference, share_head = lm, True  # the base, adapters off
                if sft.shared_trunk:
                    shared_blocks = len(lm.model.layers) - sft.trainable_top_blocks
            else:
                reference, ref_entries = model_on_meta(ref_dir, **options)
                reference.to(dtype).requires_grad_(False)  # on meta: no memory
                if reference.config.vocab_size != lm.config.vocab_size:
                    raise TsarankError(f"{ref_dir}: the reference's vocabulary ({reference.config.vocab_size}) "
                                       f"differs from the model's ({lm.config.vocab_size})")
                if sft.shared_trunk:
                    shared_blocks, share_head = sharing_with_reference(lm, equal)
        objective = TrainingObjective(lm, "sft", reference, sft.losses(), shared_blocks, share_head=share_head)
    else:
        if lora:
            add_adapters(lm, recipe.lora, trained_blocks(lm, None))
        objective = TrainingObjective(lm, "cpt")
    for block in lm.model.layers:
        block.checkpointing = recipe.train.activation_checkpointing
    own_reference = reference if reference is not lm else None
    _shard_and_fill(objective, own_reference, entries, ref_entries, share_head, recipe, processes, dtype)
    return objective, shared_blocks


def _shard_and_fill(objective: TrainingObjective, reference: CausalLM | None, entries: dict, ref_entries: dict,
                    share_head: bool, recipe: Recipe, processes: Processes, dtype: torch.dtype) -> None:
    """Shard the objective (and a reference of its own), allocate this process's shards, and fill them from the
    checkpoints' tensors; LoRA adapters are drawn, not read."""
    lm, device = objective.lm, processes.device
    for unit in shard(objective, lm, reference, processes, dtype):
        unit.to_empty(device=device)  # this process's shards only
    adapter_params = {id(p) for name, p in lm.named_parameters() if is_adapter_parameter(name)}
    fill_weights(lm, entries, device, progress=processes.is_main, skip=adapter_params)
    lm.tie_weights()
    if recipe.lora.rank:
        init_adapters(lm, recipe.run.seed, device)
    if reference is not None:
        fill_weights(reference, ref_entries, device, skip={id(p) for p in lm.parameters()})  # not what it shares
        if not share_head:
            reference.tie_weights()


def make_optimizer(objective: TrainingObjective, recipe: Recipe) -> torch.optim.AdamW:
    trainable = [p for p in objective.parameters() if p.requires_grad]
    if not trainable:
        raise TsarankError("nothing to train: every parameter is frozen")
    decay = [p for p in trainable if p.dim() >= 2]  # matrices; norms' scales are not decayed
    rest = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.train.lr, betas=(0.9, 0.999), eps=1e-8)
