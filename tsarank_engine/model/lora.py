"""LoRA adapters on the decoder's projections (recipe section [lora]), their merge and their PEFT export.

An adapted projection computes W x + (alpha / rank) B A dropout(x): the base W frozen in the compute dtype,
A [rank, in] and B [out, rank] trained in float32 (A drawn as PEFT draws it, B zero, so that training starts
from the base model exactly). Only the adapters get gradients and optimizer state. Switched off
(`adapters_off`), the model is its base: in stage 2 that is the frozen reference, so no second copy of any
base weight is kept. The exported model has each B A merged into its W; beside it, the adapter alone in
PEFT's layout (adapter_config.json, adapter_model.safetensors) for loading onto the base model.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import TsarankError
from .decoder import CausalLM, Linear
from .shards import local_rows

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LoraSettings:
    """The recipe's [lora] section: adapters on the trained blocks, all blocks in stage 1, the top
    sft.trainable_top_blocks in stage 2; off while rank is 0."""

    rank: int = 0
    alpha: float = 32.0  # the update is scaled by alpha / rank
    # on the adapter's input (PEFT's default 0): each adapted projection then keeps its own dropped copy of its
    # input for the backward (BENCHMARKS.md, "LoRA")
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # the projections adapted


# The recipe's target names and the projections they name (module names of the Hugging Face layout).
TARGETS = dict(zip(LORA_TARGETS, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))
CONFIG_FILE = "adapter_config.json"  # PEFT's names
WEIGHTS_FILE = "adapter_model.safetensors"


class LoraLinear(Linear):
    """A projection with a LoRA adapter; its parameters keep the projection's names (`q_proj.weight`) and add
    `q_proj.lora_A`, `q_proj.lora_B`."""

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        factory = dict(dtype=torch.float32, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **factory))
        self.scale, self.dropout, self.enabled = alpha / rank, nn.Dropout(dropout), True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.enabled:
            return out
        a, b = self.lora_A, self.lora_B
        flat, out2 = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        h = (self.dropout(flat) if self.dropout.p else flat).to(a.dtype) @ a.t()  # [tokens, rank]
        if h.dtype == out.dtype:  # under FSDP's mixed precision the adapters are gathered in the compute dtype
            # one product into the output: the [tokens, out] temporaries of B h, its scaling and the sum would
            # fragment the CPU heap (BENCHMARKS.md, "LoRA")
            return torch.addmm(out2, h, b.t(), alpha=self.scale).view_as(out)
        return out + ((h @ b.t()) * self.scale).to(out.dtype).view_as(out)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale B A, computed in float32, in W's dtype."""
        return (self.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)


def add_adapters(model: CausalLM, settings: LoraSettings, blocks: list[int]) -> list[str]:
    """Freeze the model and put a float32 adapter on each target projection of `blocks` (indices, as
    objectives.trained_blocks gives them); returns the adapters'
    parameter names. On the meta device the adapters take no memory until the model's storage is allocated;
    their values are then set by init_adapters."""
    if settings.rank < 1:
        raise TsarankError(f"lora.rank must be at least 1 to add adapters, got {settings.rank}")
    unknown = [t for t in settings.targets if t not in TARGETS]
    if unknown or not settings.targets:
        raise TsarankError(f"lora.targets: unknown projection(s) {unknown}; choose from {', '.join(TARGETS)}")
    model.requires_grad_(False)
    for i in blocks:
        block = model.model.layers[i]
        for target in settings.targets:
            parent_name, _, attr = TARGETS[target].rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, attr, LoraLinear(getattr(parent, attr), settings.rank, settings.alpha, settings.dropout))
    return [name for name, p in model.named_parameters() if p.requires_grad]


def adapters(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(module name, adapted projection) of every adapter in the model, in order."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear))


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name (`...q_proj.lora_A`) is an adapter's rather than the base model's."""
    return ".lora_" in name


def has_adapters(model: nn.Module) -> bool:
    return next(adapters(model), None) is not None


@torch.no_grad()
def init_adapters(model: CausalLM, seed: int, device: torch.device | str) -> None:
    """A as PEFT draws it (kaiming-uniform, a = sqrt(5): uniform within 1 / sqrt(in)), B zero. Each adapter's A
    comes from its own generator seeded by `seed` and its place, drawn whole and then cut to the rows this
    process holds, so that any number of processes trains the same model. An adapter still on the meta device
    (a model no sharding wrapper allocated) gets new parameters on `device`."""
    for i, (_, module) in enumerate(adapters(model)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        bound = 1 / math.sqrt(module.in_features)
        a = torch.empty(module.lora_A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        for attr, value in (("lora_A", a), ("lora_B", torch.zeros(module.lora_B.shape))):
            param = getattr(module, attr)
            if param.is_meta:
                setattr(module, attr, nn.Parameter(value.to(device)))
            elif (rows := local_rows(param)) is not None:
                param.to_local().copy_(value[rows[0]:rows[1]])
            else:
                param.copy_(value)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The base model for the duration: every adapter skipped."""
    found = [m for _, m in adapters(model)]
    for m in found:
        m.enabled = False
    try:
        yield
    finally:
        for m in found:
            m.enabled = True


def peft_config(model: nn.Module, base_model: str) -> dict:
    """PEFT's adapter_config.json for the model's adapters (read off the adapted modules), on `base_model`."""
    found = list(adapters(model))
    if not found:
        raise TsarankError("the model has no LoRA adapters")
    first = found[0][1]
    rank = first.lora_A.shape[0]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": first.scale * rank, "lora_dropout": first.dropout.p, "bias": "none",
        "target_modules": sorted({name.rpartition(".")[2] for name, _ in found}),
        "layers_to_transform": sorted({int(name.split(".")[2]) for name, _ in found}),  # model.layers.<i>.
        "layers_pattern": "layers", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def adapter_layout(config: dict) -> tuple[LoraSettings, list[int], str]:
    """(settings, adapted blocks, base model) of an adapter_config.json the engine wrote (peft_config)."""
    projections = {module.rpartition(".")[2]: target for target, module in TARGETS.items()}
    settings = LoraSettings(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                            dropout=float(config["lora_dropout"]),
                            targets=[projections[m] for m in config["target_modules"]])
    return settings, [int(b) for b in config["layers_to_transform"]], str(config["base_model_name_or_path"])


def read_peft_config(path: Path) -> tuple[LoraSettings, list[int], str]:
    """adapter_layout of the file at `path`, or an error naming it."""
    try:
        return adapter_layout(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TsarankError(f"{path}: not a LoRA adapter record the engine wrote ({type(e).__name__}: {e})") from None


def add_adapters_like(model: CausalLM, template: nn.Module) -> None:
    """Put on `model` the adapters `template` carries (same places, rank, alpha, dropout)."""
    settings, blocks, _ = adapter_layout(peft_config(template, ""))
    add_adapters(model, settings, blocks)


def peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under PEFT's names, float32 on the CPU."""
    return {f"base_model.model.{name}.{part}.weight": getattr(m, part).detach().float().cpu().contiguous()
            for name, m in adapters(model) for part in ("lora_A", "lora_B")}


def export_tensor(model: nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """The value an export writes for parameter `name`: an adapted projection's weight merged with its adapter."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return module.merged_weight() if isinstance(module, LoraLinear) and attr == "weight" else param
