"""Training checkpoints under `<output_dir>/checkpoints/step-N/` (DESIGN.md, "Training").

A checkpoint holds, written with torch.distributed.checkpoint (every rank its shards): the model's
parameters (all of them, frozen ones too, so that any checkpoint exports to a full model) and the
optimizer's state; beside them trainer_state.json (step, scheduler, data order, counters), each rank's RNG
state as safetensors, and the model's config.json and tokenizer files, so that `export` needs nothing else.
Everything is written into `.step-N.partial/` and renamed to `step-N/` last: a kill during a save leaves
the previous checkpoint as it was, and the newest `step-N/` is always complete. The last `keep_last` stay.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..errors import TsarankError
from ..model.config import ModelConfig
from ..model.decoder import CausalLM
from ..model.export import TOKENIZER_FILES, export_model
from ..model.loading import checkpoint_fingerprint, load_model
from ..model.lora import CONFIG_FILE as ADAPTER_CONFIG, add_adapters, is_adapter_parameter, read_peft_config
from ..recipe import CheckpointSettings

STATE_FILE = "trainer_state.json"
MODEL_PREFIX = "lm."  # the trained model's place in the training objective module
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def _state_options(trained_only: bool) -> StateDictOptions:
    # a checkpoint of the trained parameters alone leaves the frozen ones as the model was built (not strict)
    return StateDictOptions(ignore_frozen_params=trained_only, strict=not trained_only)


def _model_state(root: nn.Module, optimizer: torch.optim.Optimizer, trained_only: bool) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(root, optimizer, options=_state_options(trained_only))
    if trained_only:  # a tied head's second name escapes ignore_frozen_params
        trained = {name for name, p in root.named_parameters(remove_duplicate=False) if p.requires_grad}
        model_sd = {name: t for name, t in model_sd.items() if name in trained}
    return {"model": model_sd, "optim": optim_sd}


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(output_dir: str | Path, step: int, root: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], model_dir: str | Path, keep_last: int,
                    adapter_config: dict[str, Any] | None = None) -> Path:
    """Write step-N (every rank calls this); returns its path once it is in place. With LoRA (adapter_config,
    lora.peft_config) only the trained parameters are written, and the adapter's record naming the base model:
    the frozen base is the model the run started from."""
    root_dir = checkpoint_root(output_dir)
    final = root_dir / f"step-{step}"
    partial = root_dir / f".step-{step}.partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    try:
        dcp.save(_model_state(root, optimizer, adapter_config is not None), checkpoint_id=partial)
        save_file(_rng_state(), partial / _rng_file(rank))
        dist.barrier()
        if rank == 0:
            for name in ("config.json", *TOKENIZER_FILES):
                if (Path(model_dir) / name).is_file():
                    shutil.copy2(Path(model_dir) / name, partial / name)
            if adapter_config is not None:
                (partial / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
            (partial / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=1) + "\n")
            _sync_dir(partial)
            if final.exists():  # a step saved before a crash whose metrics were then redone
                shutil.rmtree(final)
            os.replace(partial, final)
            _sync_dir(root_dir)
            for old in complete_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old)
    except (OSError, CheckpointException) as e:  # DCP wraps its writers' errors in CheckpointException
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # the space it took is likely what ran out
        previous = complete_checkpoints(output_dir)
        kept = f"; the previous checkpoint {previous[-1]} is intact" if previous else "; no earlier checkpoint exists"
        raise TsarankError(f"{partial}: saving the checkpoint of step {step} failed ({_io_reason(e)}){kept}") from e
    dist.barrier()
    return final


def _io_reason(err: BaseException) -> str:
    """The operating system's words for an I/O failure, also when DCP wrapped it (per rank)."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    causes = [exc for exc, _trace in getattr(err, "failures", {}).values()]  # rank -> (exception, stack)
    reasons = {c.strerror or str(c) if isinstance(c, OSError) else f"{type(c).__name__}: {c}" for c in causes}
    return "; ".join(sorted(reasons)) or str(err)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_checkpoints(output_dir: str | Path) -> None:
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.glob(".step-*.partial"):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from `path`; returns its trainer state."""
    trained_only = (path / ADAPTER_CONFIG).is_file()
    state = _model_state(root, optimizer, trained_only)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_options(trained_only))
    # A checkpoint written by fewer processes has no state for the new ranks: they take rank 0's (training
    # draws nothing from torch's generators; candidates are sampled from the seed and the position).
    rng_path = path / _rng_file(dist.get_rank())
    if not rng_path.is_file():
        rng_path = path / _rng_file(0)
    if not rng_path.is_file():
        raise TsarankError(f"{path}: no RNG state ({rng_path.name} missing); the checkpoint is incomplete")
    rng = load_file(rng_path)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / STATE_FILE).read_text())


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a training checkpoint as a Hugging Face checkpoint (one process; reads only the model's tensors).
    A LoRA checkpoint's adapters are read onto its base model and merged; the adapter alone goes beside, in
    PEFT's layout (model/export.py). A base model whose weights are no longer those the adapters were
    trained on (model/loading.py's checkpoint_fingerprint, recorded by the run) is refused."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / STATE_FILE).is_file() or not (checkpoint_dir / ".metadata").is_file():
        raise TsarankError(f"{checkpoint_dir}: not a complete training checkpoint (no {STATE_FILE} or .metadata)")
    config = ModelConfig.from_dir(checkpoint_dir)
    base = None
    if (checkpoint_dir / ADAPTER_CONFIG).is_file():
        settings, blocks, base = read_peft_config(checkpoint_dir / ADAPTER_CONFIG)
        if not Path(base).is_dir():
            raise TsarankError(f"{checkpoint_dir}: the LoRA adapter's base model {base} is not there "
                               f"(named in {ADAPTER_CONFIG}); restore it to export the merged model")
        recorded = json.loads((checkpoint_dir / STATE_FILE).read_text()).get("base_fingerprint")
        if recorded is not None and recorded != checkpoint_fingerprint(base):
            raise TsarankError(f"{checkpoint_dir}: the LoRA adapter's base model {base} (named in {ADAPTER_CONFIG}) "
                               f"holds other weights than those it was trained on; restore them to export")
        lm = load_model(base)
        add_adapters(lm, settings, blocks)
    else:
        with torch.device("meta"):
            lm = CausalLM(config)
        lm.to_empty(device="cpu")
        lm.tie_weights()
    tensors = {f"{MODEL_PREFIX}{name}": t for name, t in lm.state_dict().items() if base is None or is_adapter_parameter(name)}
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": tensors}, checkpoint_id=checkpoint_dir, no_dist=True)
    except Exception as e:  # DCP names the missing or misshapen key
        raise TsarankError(f"{checkpoint_dir}: the checkpoint does not fit {config.architecture} ({e})") from None
    return export_model(lm, out_dir, tokenizer_dir=checkpoint_dir, dtype=dtype, base_model=base)


class Checkpointer:
    """A run's save, keep and export policy: a checkpoint after every `every_steps` steps and after the last
    (save_checkpoint; every rank calls `after_step`), the newest `keep_last` kept, the newest exported to a
    Hugging Face folder at the end. What a checkpoint holds beside the model and optimizer (schedule, data
    order, counters) comes from the `state` the caller gives at each step."""

    def __init__(self, out: Path, root: nn.Module, optimizer: torch.optim.Optimizer, settings: CheckpointSettings,
                 model_dir: str | Path, adapter_config: dict[str, Any] | None):
        self.out, self.root, self.optimizer, self.settings = out, root, optimizer, settings
        self.model_dir, self.adapter_config = model_dir, adapter_config
        self.last_saved: Path | None = None

    def resume(self) -> dict[str, Any] | None:
        """The newest complete checkpoint loaded into the model and optimizer, and its trainer state; None
        without one."""
        found = complete_checkpoints(self.out)
        if not found:
            return None
        self.last_saved = found[-1]
        return load_checkpoint(found[-1], self.root, self.optimizer)

    def after_step(self, step: int, max_steps: int, state: Callable[[], dict[str, Any]]) -> None:
        every = self.settings.every_steps
        if (every and step % every == 0) or step == max_steps:
            self.last_saved = save_checkpoint(self.out, step, self.root, self.optimizer, state(), self.model_dir,
                                              self.settings.keep_last, self.adapter_config)

    def export(self, final: Path) -> None:
        """The newest checkpoint as a Hugging Face folder at `final` (the main process only)."""
        if self.last_saved is None:
            raise TsarankError(f"{self.out}: no checkpoint to export")
        shutil.rmtree(final, ignore_errors=True)
        export_checkpoint(self.last_saved, final)
