"""Hugging Face checkpoints out: the decoder written as config.json, safetensors (one file or shards) and the
tokenizer's files; with LoRA adapters, merged, and the adapter alone beside in PEFT's layout. The folder
appears whole or not at all (files.staged_dir).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import TsarankError
from ..files import staged_dir
from .decoder import CausalLM
from .loading import INDEX_FILE, SINGLE_FILE
from .lora import (CONFIG_FILE as ADAPTER_CONFIG, WEIGHTS_FILE as ADAPTER_WEIGHTS, export_tensor, has_adapters,
                   is_adapter_parameter, peft_config, peft_tensors)

# Copied with an export so that the result is a complete checkpoint (tokenizer.model for SentencePiece
# loaders such as the paper's LlamaTokenizer, vocab.json + merges.txt for slow byte-level BPE ones).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)
TOKENIZERS = ("tokenizer.json", "tokenizer.model")  # the files a tokenizer is read from (data/tokenization.py)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
ADAPTER_DIR = "adapter"  # beside a LoRA run's merged model: the adapter alone
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _shards(size: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names in order, in files of at most max_shard_bytes (a larger tensor alone in its file)."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, nbytes in size.items():
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    return shards


def export_model(
    model: CausalLM,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
) -> Path:
    """Write `model` as a Hugging Face checkpoint: config.json, safetensors (an index above
    `max_shard_bytes`) and the tokenizer files found in `tokenizer_dir`, which must hold a tokenizer (TOKENIZERS);
    weights in `dtype` (default: their own). A model with LoRA adapters is written merged, and its adapter
    alone in `<out_dir>/adapter` in PEFT's layout, naming `base_model`.

    The directory appears complete or not at all: it is assembled beside `out_dir` and renamed into place.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TsarankError(f"{out_dir}: export target exists and is not an empty directory")
    if tokenizer_dir is not None and not any((Path(tokenizer_dir) / f).is_file() for f in TOKENIZERS):
        raise TsarankError(f"{tokenizer_dir}: no tokenizer.json or tokenizer.model to export with the model")
    # a tied head is written once, as the embedding; adapters only merged
    params = {name: p for name, p in model.named_parameters() if not is_adapter_parameter(name)}
    dtypes = {dtype} if dtype else {p.dtype for p in params.values()}
    size = {name: p.numel() * (dtype or p.dtype).itemsize for name, p in params.items()}
    total = sum(size.values())
    shards = _shards(size, max_shard_bytes)

    def host_copy(names: list[str]) -> dict[str, torch.Tensor]:  # one shard at a time in host memory
        return {name: export_tensor(model, name, params[name]).detach().to("cpu", dtype or params[name].dtype)
                .contiguous() for name in names}

    with staged_dir(out_dir) as staging:
        config = dict(model.config.raw)
        if len(dtypes) == 1:
            config["dtype"] = _DTYPE_NAMES.get(dtypes.pop(), config.get("dtype"))
            config.pop("torch_dtype", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            save_file(host_copy(shards[0]), staging / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(host_copy(names), staging / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(names, file))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if has_adapters(model):
            (staging / ADAPTER_DIR).mkdir()
            config = peft_config(model, str(base_model or ""))
            (staging / ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            save_file(peft_tensors(model), staging / ADAPTER_DIR / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        if tokenizer_dir is not None:
            for file in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / file).is_file():
                    shutil.copy2(Path(tokenizer_dir) / file, staging / file)
    return out_dir
