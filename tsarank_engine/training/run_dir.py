"""A run's output folder: what a new, resumed or overwritten run may find there, the recipe it records
(recipe.json, written whole), and which recipe keys a resumed run may change."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..errors import TsarankError
from ..files import atomic_write, stale_temporaries
from ..recipe import EvalSettings, Recipe
from .checkpoints import complete_checkpoints, remove_partial_checkpoints
from .run_log import METRICS_FILE, TENSORBOARD_DIR
from .validation import BEST_DIR

RECIPE_FILE = "recipe.json"
FINAL_DIR = "final"
# Keys a resumed run may change: they say how the run is computed, kept, watched or stopped, not what it
# computes (the data order, the schedule and the model stay those of the checkpoints; evaluation only reads
# the model). The number of processes is no key: checkpoints reshard.
RESUMABLE_KEYS = {("checkpoint", "every_steps"), ("checkpoint", "keep_last"), ("train", "max_bad_steps"),
                  ("train", "activation_checkpointing"), ("model", "attention"), ("model", "block_ops"),
                  ("data", "max_tokens"), ("data", "skip_bad_rows"), ("run", "output_dir"), ("run", "tensorboard"),
                  ("parallel", "replicate_degree"),
                  *(("eval", f.name) for f in fields(EvalSettings))}


def recipe_changes(stored: dict[str, dict[str, Any]], recipe: Recipe) -> list[str]:
    """`section.key: old -> new` for each key whose change a resumed run refuses (a key the stored record lacks,
    written by an older version, is compared with today's default)."""
    changes = []
    for section, values in asdict(recipe).items():
        defaults = asdict(getattr(Recipe(), section))
        for key, value in values.items():
            old = stored.get(section, {}).get(key, defaults[key])
            if old != value and (section, key) not in RESUMABLE_KEYS:
                changes.append(f"{section}.{key}: {old!r} -> {value!r}")
    return changes


def prepare_output(recipe: Recipe, resume: bool, overwrite: bool, is_main: bool) -> Path:
    out = Path(recipe.run.output_dir)
    record = json.dumps(asdict(recipe), indent=1, sort_keys=True) + "\n"
    holds_run = (out / RECIPE_FILE).is_file() or (out / METRICS_FILE).is_file() or complete_checkpoints(out)
    if holds_run and not (resume or overwrite):
        raise TsarankError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
    if resume and (out / RECIPE_FILE).is_file():
        try:
            stored = json.loads((out / RECIPE_FILE).read_text())
        except json.JSONDecodeError as e:
            raise TsarankError(f"{out / RECIPE_FILE}: not valid JSON ({e}); cannot check the resumed recipe") from None
        if changes := recipe_changes(stored, recipe):
            raise TsarankError(
                f"{out}: the recipe differs from the run's ({out / RECIPE_FILE}) in keys that change its data order, "
                "schedule or model; resuming would mix two runs:\n  " + "\n  ".join(changes)
                + "\nrestore them, or start a new run (another run.output_dir, or --overwrite)")
    dist.barrier()  # every rank has looked before rank 0 writes
    if is_main:
        if overwrite:
            for name in (METRICS_FILE, RECIPE_FILE):
                (out / name).unlink(missing_ok=True)
            for name in ("checkpoints", FINAL_DIR, BEST_DIR, TENSORBOARD_DIR):
                shutil.rmtree(out / name, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(out)
        for name in (METRICS_FILE, RECIPE_FILE):
            for stale in stale_temporaries(out / name):
                stale.unlink()
        with atomic_write(out / RECIPE_FILE) as f:
            f.write(record)
    dist.barrier()
    return out
