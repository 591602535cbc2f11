"""Checkpoints whose weights are PyTorch pickles (pytorch_model.bin, or shards with pytorch_model.bin.index.json, as
transformers 4 saved them by default) converted once into a folder the engine loads: the same tensors in
safetensors files, beside the config and the tokenizer files (`tsarank-engine convert`).

The pickles are read with torch.load(weights_only=True), whose unpickler builds tensors and plain containers only;
this is the one place the engine reads a pickle. The folder appears whole or not at all (files.staged_dir), and
only once every tensor has been checked against the architecture config.json names.
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import click
import torch
from safetensors.torch import save_file

from ..errors import TsarankError
from ..files import staged_dir
from .config import ModelConfig
from .export import TOKENIZER_FILES
from .loading import INDEX_FILE, SINGLE_FILE, model_on_meta

BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


def _bin_shards(src: Path) -> list[Path]:
    """The checkpoint's .bin files, in the order of its index (or its single file)."""
    if (src / BIN_INDEX_FILE).is_file():
        index = src / BIN_INDEX_FILE
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
            if not all(isinstance(f, str) and Path(f).name == f for f in files):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise TsarankError(f"{index}: not a weights index (needs a 'weight_map' of tensor -> file name)") from None
        for f in files:
            if not (src / f).is_file():
                raise TsarankError(f"{index}: shard {f!r} does not exist")
        return [src / f for f in files]
    if (src / BIN_FILE).is_file():
        return [src / BIN_FILE]
    raise TsarankError(f"{src}: no {BIN_FILE} or {BIN_INDEX_FILE} to convert")


def _read_bin(path: Path, tied: bool) -> dict[str, torch.Tensor]:
    try:  # a zip archive (torch >= 1.6) is mapped, not read into memory
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # an unpickling error (a refused global), a corrupt archive, a truncated file ...
        raise TsarankError(f"{path}: not a weights file torch.load(weights_only=True) reads ({e})") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise TsarankError(f"{path}: expected a mapping of tensor names to tensors")
    if tied:  # the head is the embedding: written once, as the loader reads it
        tensors.pop("lm_head.weight", None)
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():  # safetensors stores no two tensors over the same bytes
        pointer = t.untyped_storage().data_ptr()
        out[name] = t.contiguous() if pointer not in seen else t.clone()
        seen.add(pointer)
    return out


def convert_checkpoint(src: str | Path, out: str | Path, progress: bool = False) -> Path:
    """Write the .bin checkpoint in `src` to `out` as safetensors (a file per .bin file, with an index when there
    are several), its config.json and its tokenizer files."""
    src, out = Path(src), Path(out)
    if (src / SINGLE_FILE).is_file() or (src / INDEX_FILE).is_file():
        raise TsarankError(f"{src}: already holds safetensors weights; load it as it is")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TsarankError(f"{out}: conversion target exists and is not an empty directory")
    config = ModelConfig.from_dir(src)
    shards = _bin_shards(src)
    with staged_dir(out) as staging:
        weight_map: dict[str, str] = {}
        total = 0
        with click.progressbar(shards, label="converting weights", hidden=not progress, file=sys.stderr) as bar:
            for i, path in enumerate(bar, 1):
                tensors = _read_bin(path, config.tie_word_embeddings)
                name = SINGLE_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(tensors, staging / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, name))
                total += sum(t.numel() * t.element_size() for t in tensors.values())
                del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for name in ("config.json", *TOKENIZER_FILES):
            if (src / name).is_file():
                shutil.copy2(src / name, staging / name)
        try:
            model_on_meta(staging)  # every parameter there, with its shape
        except TsarankError as e:
            raise TsarankError(f"{src}: its weights do not fit its config.json: {e}") from None
    return out
