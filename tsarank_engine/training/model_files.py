"""A run's model files: config.json and the tokenizer files as a run that adds the paper's [PAD] (data.add_pad_token)
or puts another BOS first (data.bos_token) changes them, in <output_dir>/model_files, where its checkpoints and
exports take them from; a run that changes neither takes them from its model's folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..data.tokenization import PAD_TOKEN, read_json
from ..errors import TsarankError
from ..files import staged_dir
from ..model.config import ModelConfig
from ..model.export import TOKENIZER_FILES
from ..recipe import Recipe

MODEL_FILES_DIR = "model_files"


def run_model_files(recipe: Recipe, out: Path, config: ModelConfig, pad_id: int | None, is_main: bool) -> Path:
    """The folder a run's checkpoints and exports take config.json and the tokenizer files from: the model's own,
    or, when the run adds [PAD] (`pad_id`, one more embedding row) or rebinds the BOS (data.bos_token),
    <out>/model_files holding them so changed (written by the main process; the others wait)."""
    if pad_id is None and not recipe.data.bos_token:
        return Path(recipe.model.path)
    files = out / MODEL_FILES_DIR
    if is_main:
        with staged_dir(files) as staging:
            write_tokenizer_files(recipe.model.path, staging, pad_id, recipe.data.bos_token)
            raw = {**config.raw, "vocab_size": config.vocab_size + (pad_id is not None)}
            (staging / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    dist.barrier()
    return files


def write_tokenizer_files(src: str | Path, dst: str | Path, pad_id: int | None, bos_token: str) -> None:
    """The tokenizer files of `src` written to `dst` as a run changed them: with `pad_id`, [PAD] added as a special
    token with that id (tokenizer.json's added tokens or added_tokens.json, and the pad token the settings name);
    with `bos_token`, that token declared the BOS, and put first by tokenizer.json's post-processor."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    pad = {"content": PAD_TOKEN, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
           "special": True}
    edited = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    if pad_id is not None:
        edited.add("added_tokens.json")
    for name in TOKENIZER_FILES:
        if not (src / name).is_file():
            continue
        if name not in edited:
            shutil.copy2(src / name, dst / name)
            continue
        data = read_json(src / name)
        if name == "tokenizer.json":
            if pad_id is not None:
                data["added_tokens"] = [*data.get("added_tokens", []), {"id": pad_id, **pad}]
            if bos_token:
                _rebind_post_processor(data, bos_token, src / name)
        elif name == "added_tokens.json":
            data[PAD_TOKEN] = pad_id
        else:
            if pad_id is not None:
                data["pad_token"] = PAD_TOKEN
                if name == "tokenizer_config.json" and "added_tokens_decoder" in data:
                    data["added_tokens_decoder"][str(pad_id)] = pad
            if bos_token:
                data["bos_token"] = bos_token
        (dst / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    if pad_id is not None and not (src / "tokenizer.json").is_file() and not (src / "added_tokens.json").is_file():
        (dst / "added_tokens.json").write_text(json.dumps({PAD_TOKEN: pad_id}) + "\n")


def _rebind_post_processor(data: dict[str, Any], bos_token: str, path: Path) -> None:
    """A TemplateProcessing post-processor's first special token replaced by `bos_token`."""
    post = data.get("post_processor") or {}
    ids = {t["content"]: t["id"] for t in data.get("added_tokens", [])} | (data.get("model", {}).get("vocab") or {})
    if post.get("type") != "TemplateProcessing" or bos_token not in ids:
        raise TsarankError(f"{path}: cannot make {bos_token!r} the BOS (it needs a TemplateProcessing "
                           f"post-processor and {bos_token!r} in the vocabulary)")
    old = None
    for template in ("single", "pair"):
        for item in post.get(template, []):
            if "SpecialToken" in item:
                old = old or item["SpecialToken"]["id"]
                if item["SpecialToken"]["id"] == old:
                    item["SpecialToken"]["id"] = bos_token
    post.setdefault("special_tokens", {}).pop(old, None)
    post["special_tokens"][bos_token] = {"id": bos_token, "ids": [ids[bos_token]], "tokens": [bos_token]}
