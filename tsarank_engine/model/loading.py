"""Hugging Face checkpoints in: safetensors (single or sharded) straight into the decoder, and what the engine
reads of checkpoints besides (their tensors' entries, equality of two checkpoints' tensors, fingerprints).

Loading builds the decoder on the meta device (no random initialisation, no memory) and then fills
each parameter from its file, tensor by tensor, in the requested dtype and on the requested device; a
parameter FSDP2 has sharded gets only this process's rows, so that no process holds the whole model.
"""

from __future__ import annotations

import hashlib
import json
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

import click
import torch
from torch import nn

from ..errors import TsarankError
from .config import ModelConfig
from .decoder import CausalLM, use_kernels
from .safetensors_io import FLOAT_DTYPES, TensorEntry, conversion_buffer, read_header, read_tensor
from .shards import local_rows

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FINGERPRINT_BYTES = 64 * 1024  # read at each end of every tensor by checkpoint_fingerprint
_MEAN_ROWS = 4096  # rows read at a time for an added row's mean


def weights_path(model_dir: str | Path) -> Path:
    """The file that lists the checkpoint's tensors: its single safetensors file, else its index (the
    order transformers uses, should a stale index lie beside a single file)."""
    model_dir = Path(model_dir)
    for path in (model_dir / SINGLE_FILE, model_dir / INDEX_FILE):
        if path.is_file():
            return path
    if not model_dir.is_dir():
        raise TsarankError(f"{model_dir}: model directory does not exist")
    raise TsarankError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 of a checkpoint's tensors: every name, dtype and shape, and the first and last 64 KiB of each
    tensor's bytes (some 30 MB of a 7B model's 15 GB). Another model, another dtype or retrained weights change
    it; a change confined to the middle of a large tensor does not. A LoRA run records its base model's."""
    digest = hashlib.sha256()
    entries = checkpoint_tensors(model_dir)
    with ExitStack() as files:
        opened: dict[Path, BinaryIO] = {}
        for name in sorted(entries):
            entry = entries[name]
            if entry.file not in opened:
                opened[entry.file] = files.enter_context(open(entry.file, "rb"))
            f = opened[entry.file]
            digest.update(f"{name}\0{entry.dtype}\0{entry.shape}\0".encode())
            for start in sorted({entry.start, max(entry.start, entry.end - FINGERPRINT_BYTES)}):
                f.seek(start)
                digest.update(f.read(min(FINGERPRINT_BYTES, entry.end - start)))
    return digest.hexdigest()


def checkpoint_tensors(model_dir: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint in `model_dir`, by name, from its single file or its index."""
    path = weights_path(model_dir)
    if path.name == INDEX_FILE:
        index_path = path
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TsarankError(f"{index_path}: not a safetensors index (needs a 'weight_map' object)") from None
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        entries: dict[str, TensorEntry] = {}
        for shard, names in shards.items():
            shard_path = index_path.parent / shard
            if Path(shard).name != shard or not shard_path.is_file():
                raise TsarankError(f"{index_path}: shard {shard!r} (holding tensor {names[0]!r}) does not exist")
            held = read_header(shard_path)
            for name in names:
                if name not in held:
                    raise TsarankError(f"{index_path}: tensor {name!r} is mapped to {shard}, which does not hold it")
                entries[name] = held[name]
        return entries
    return read_header(path)


_VOCABULARY = ("model.embed_tokens.weight", "lm_head.weight")  # a row per token id


def _ignorable(name: str, config: ModelConfig) -> bool:
    # Tied checkpoints sometimes store the head anyway; old conversions stored RoPE tables.
    return (config.tie_word_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


def model_on_meta(model_dir: str | Path, attention: str = "auto", block_ops: str = "auto",
                  vocab_size: int | None = None) -> tuple[CausalLM, dict[str, TensorEntry]]:
    """The checkpoint's decoder on the meta device (no memory, no initialisation) and its tensors' entries,
    checked against each other: every parameter present, with its shape and a float dtype; no unknown tensor.
    With `vocab_size` above the checkpoint's, the decoder has that many embedding (and LM head) rows, and
    fill_weights makes each added row the mean of the checkpoint's rows (the paper's resize for its [PAD])."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TsarankError(f"{model_dir}: model directory does not exist")
    config = ModelConfig.from_dir(model_dir)
    rows = config.vocab_size
    if vocab_size is not None and vocab_size != config.vocab_size:
        if vocab_size < config.vocab_size:
            raise TsarankError(f"{model_dir}: cannot shrink the vocabulary from {config.vocab_size} to {vocab_size}")
        config = replace(config, vocab_size=vocab_size, raw={**config.raw, "vocab_size": vocab_size})
    entries = checkpoint_tensors(model_dir)
    with torch.device("meta"):
        model = use_kernels(CausalLM(config), attention, block_ops)
    params = dict(model.named_parameters())  # a tied head appears once, as the embedding

    missing = sorted(set(params) - set(entries))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise TsarankError(f"{weights_path(model_dir)}: checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}")
    unexpected = sorted(n for n in set(entries) - set(params) if not _ignorable(n, config))
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise TsarankError(
            f"{entries[unexpected[0]].file}: unexpected tensor(s) {', '.join(unexpected[:3])}{more} "
            f"for {config.architecture}"
        )
    for name, param in params.items():
        entry = entries[name]
        if entry.shape != tuple(param.shape) and not (name in _VOCABULARY and entry.shape == (rows, *param.shape[1:])):
            raise TsarankError(
                f"{entry.file}: tensor {name!r} has shape {list(entry.shape)}, expected {list(param.shape)}"
            )
        if entry.dtype not in FLOAT_DTYPES:
            raise TsarankError(f"{entry.file}: tensor {name!r} has non-float dtype {entry.dtype}")
    return model, entries


@torch.no_grad()
def fill_weights(module: nn.Module, entries: dict[str, TensorEntry], device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, progress: bool = False, skip: set[int] = frozenset()) -> None:
    """Fill `module`'s parameters from the checkpoint's tensors (by parameter name): a parameter still on the
    meta device becomes a new one in `dtype` (default: its own) on `device`, keeping its requires_grad; a
    sharded one (a DTensor of FSDP2, its local shard already allocated: module.to_empty) gets only its own rows,
    read from the file alone. Parameters whose id is in `skip` are left alone."""
    params = {name: p for name, p in module.named_parameters() if id(p) not in skip}
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(entries[name].file, []).append(name)
    targets = {name: dtype or p.dtype for name, p in params.items()}
    buffers = {d: conversion_buffer([entries[n] for n in params if targets[n] == d], d) for d in set(targets.values())}
    with click.progressbar(length=len(params), label="loading weights", hidden=not progress, file=sys.stderr) as bar:
        for path, names in by_file.items():
            with open(path, "rb") as f:
                for name in names:
                    param, rows = params[name], local_rows(params[name])
                    local = param.to_local() if rows is not None else None
                    entry, buffer = entries[name], buffers[targets[name]]
                    if entry.shape[0] < param.shape[0]:  # added vocabulary rows
                        direct = False
                        tensor = _with_mean_rows(f, entry, targets[name], buffer, rows or (0, param.shape[0]))
                    else:
                        direct = local is not None and local.device.type == "cpu" and local.is_contiguous()
                        tensor = read_tensor(f, entry, targets[name], buffer, rows, out=local if direct else None)
                    if local is not None:
                        if not direct:
                            local.copy_(tensor)
                    else:
                        module_name, _, attr = name.rpartition(".")
                        setattr(module.get_submodule(module_name), attr,
                                nn.Parameter(tensor.to(device), requires_grad=param.requires_grad))
                    bar.update(1)


def _with_mean_rows(f: BinaryIO, entry: TensorEntry, dtype: torch.dtype, buffer: torch.Tensor,
                    rows: tuple[int, int]) -> torch.Tensor:
    """Rows `rows` of the checkpoint's tensor grown past its last row, each added row the mean of its rows."""
    start, stop = rows
    held = entry.shape[0]
    out = torch.empty(stop - start, *entry.shape[1:], dtype=dtype)
    if start < held:
        out[: min(stop, held) - start] = read_tensor(f, entry, dtype, buffer, (start, min(stop, held)))
    if stop > held:
        total = torch.zeros(entry.shape[1:], dtype=torch.float64)
        wide = conversion_buffer([entry], torch.float32)
        for lo in range(0, held, _MEAN_ROWS):  # a block of rows at a time: never the whole tensor
            total += read_tensor(f, entry, torch.float32, wide, (lo, min(lo + _MEAN_ROWS, held))).sum(0)
        out[max(held - start, 0):] = (total / held).to(dtype)
    return out


# The products a mixed model keeps in float32 on the CPU: the attention's inputs, whose rounding the softmax
# amplifies (measured on all 4,839 sample pairs: a quarter less score error, nDCG@10 within 0.005 of float32, for
# 3-18 % of the mixed path's speed; DESIGN.md, "Scoring precision"). On CUDA float32 products run at a fraction of
# the tensor cores' rate and the varlen attention kernels take half precision only.
_FLOAT32_ON_CPU = ("q_proj", "k_proj", "v_proj")


def place_mixed_precision(model: CausalLM, dtype: torch.dtype, cuda: bool) -> None:
    """Scoring's mixed precision (DESIGN.md, "Scoring precision") on `model`, in place (on meta: no memory): the
    matrices of the decoder's products in `dtype` (on the CPU all but the attention's q/k/v projections), the norms
    and the embedding in float32, and with them the residual stream; the LM head (so a tied embedding too) in `dtype`
    on CUDA, whose half-precision products return fp32 logits, and in float32 elsewhere, where its fp32 logits would
    need an fp32 copy at every row."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and module is not model.lm_head
                and (cuda or name.rpartition(".")[2] not in _FLOAT32_ON_CPU)):
            module.to(dtype)
    if cuda:
        model.lm_head.to(dtype)
        if model.config.tie_word_embeddings:
            model.model.embed_tokens.to(dtype)
    model.tie_weights()
    model.model.residual_dtype = torch.float32


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attention: str = "auto",
    progress: bool = False,
    block_ops: str = "auto",
    mixed: bool = False,
) -> CausalLM:
    """The decoder with the checkpoint's weights, every parameter in `dtype` on `device`. attention (a name of
    choices.ATTENTION) and block_ops (choices.BLOCK_OPS: RMSNorm, RoPE, SwiGLU) choose the kernels; auto: the
    best available. mixed: scoring's half precision, `place_mixed_precision` for `device`, where `dtype` is not
    float32."""
    model, entries = model_on_meta(model_dir, attention, block_ops)
    if mixed and dtype != torch.float32:
        place_mixed_precision(model, dtype, cuda=torch.device(device).type == "cuda")
        dtype = None  # each parameter in its own
    fill_weights(model, entries, device, dtype, progress)
    model.tie_weights()
    return model


@torch.no_grad()
def equal_tensors(a: dict[str, TensorEntry], b: dict[str, TensorEntry], names: list[str], dtype: torch.dtype,
                  part: tuple[int, int] = (0, 1)) -> bool:
    """Whether two checkpoints (their entries) hold equal values for `names` once read in `dtype`; with part
    = (i, n), only the i-th of n slices of each tensor's rows is compared (one process's share of the work)."""
    buffer = conversion_buffer([e[n] for e in (a, b) for n in names], dtype)
    for name in names:
        x, y = a[name], b[name]
        if x.shape != y.shape:
            return False
        chunk = -(-x.shape[0] // part[1]) if x.shape else 0
        rows = (min(part[0] * chunk, x.shape[0]), min((part[0] + 1) * chunk, x.shape[0])) if x.shape else None
        with open(x.file, "rb") as fx, open(y.file, "rb") as fy:
            if not torch.equal(read_tensor(fx, x, dtype, buffer, rows), read_tensor(fy, y, dtype, buffer, rows)):
                return False
    return True
