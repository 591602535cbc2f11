"""The training loop both stages share (DESIGN.md, "Training"): a recipe in, checkpoints, metrics and a
Hugging Face model out.

One optimizer step takes the next `batch_size` units of the data order (stage 1: text pairs, stage 2: query
groups), packed into rows of at most `max_tokens` tokens; every rank packs the same rows and runs its share
of them, gradients accumulating over a rank's rows (FSDP reduces them once, after the last). Each row's loss
is scaled by its share of the step (RowShare) so that the step's loss is the mean over the whole step on
any number of ranks. AdamW, the paper's cosine schedule with warmup, clipping of the global gradient norm;
master weights in float32, compute in the recipe's dtype (bfloat16 on CUDA by default). A step whose
gradient norm is not finite is not applied, and counted. With an [eval] section the model reranks a dev run
at its steps and after the last (train_eval.py), outside the steps' timing.
"""

from __future__ import annotations

import ctypes
import json
import math
import resource
import shutil
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist

from ..data.packing import PackedRow, StepPart
from ..data.readers import SkipCounter
from ..data.stream import PackedStream, Prefetcher
from ..data.tokenization import Tokenizer
from ..devices import resolve_dtype
from ..distributed import Processes, accumulate_gradients, shard, start_processes, stop_processes
from ..errors import TsarankError
from ..files import atomic_write, stale_temporaries
from ..model.builtin import resolve_model_path
from ..model.config import ModelConfig
from ..model.lora import add_adapters, init_adapters, is_adapter_parameter, peft_config
from ..model.weights import checkpoint_fingerprint, checkpoint_tensors, equal_tensors, fill_weights, model_on_meta
from ..recipe import EvalSettings, Recipe
from .checkpoints import (complete_checkpoints, export_checkpoint, load_checkpoint, remove_partial_checkpoints,
                          save_checkpoint)
from .objectives import (RowShare, TrainingObjective, row_shares, sharing_with_reference, train_top_blocks,
                         trained_blocks, weight_totals)
from .schedule import cosine_scheduler
from .stream import recipe_stream
from .validation import BEST_DIR, TrainingEvaluation

METRICS_FILE = "metrics.jsonl"
LOG_EVERY_S = 30.0  # progress lines in a log file
TENSORBOARD_DIR = "tensorboard"
RECIPE_FILE = "recipe.json"
FINAL_DIR = "final"


def compute_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    return resolve_dtype(recipe.model.dtype, device)


def rows_of_rank(part: StepPart, stage: str, totals: list[float]) -> list[tuple[PackedRow, RowShare]]:
    """A rank's rows of a step (Packer.pack_step) with their shares of the step's loss (`totals`: the step's
    loss weights, summed over the ranks). Every rank runs the same number of rows, as FSDP's collectives
    require: a rank short of one (it got fewer units than the others have rows) repeats a row with a zero
    share."""
    mine = list(zip(part.rows, row_shares(part.rows, stage, totals)))
    return mine + [(part.filler, RowShare(0.0))] * (part.rows_each - len(part.rows))


def balance(tokens_max: float, tokens_sum: float, copied: float, world: int) -> dict[str, float]:
    """How evenly a step's tokens fall on the ranks (max / mean of their real tokens) and the share of the
    tokens computed that are zero-share copies (rows_of_rank's fillers), from the ranks' most real tokens, the
    sum of them and of the copied tokens."""
    mean = tokens_sum / world
    return {"rank_tokens_max_mean": tokens_max / mean if mean else 1.0,
            "copied_token_share": copied / (tokens_sum + copied) if tokens_sum else 0.0}


def step_balance(parts: list[StepPart]) -> dict[str, float]:
    """balance() of every rank's part of a step, held in one place (the benchmarks and tests)."""
    tokens = [sum(row.num_tokens for row in part.rows) for part in parts]
    return balance(max(tokens), sum(tokens), sum(part.copied_tokens for part in parts), len(parts))


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


def _prepare_output(recipe: Recipe, resume: bool, overwrite: bool, is_main: bool) -> Path:
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


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop the records of steps after the checkpoint a resumed run restarts from (they will be redone), and a
    last line a kill tore while it was appended; the file is replaced whole (a kill leaves the old or the new)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines):
                break  # torn by a kill during its append: its step is redone
            raise TsarankError(f"{path}, line {number}: not a metrics record; fix or remove the line") from None
        if step <= last_step:
            kept.append(line)
    with atomic_write(path) as f:
        f.writelines(line + "\n" for line in kept)


def tensorboard_writer(out: Path, resumed_at: int) -> Any:
    """A TensorBoard writer of <out>/tensorboard; a resumed run drops the events after its checkpoint's step
    (they are redone), as it trims metrics.jsonl."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TsarankError("run.tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'") from None
    return SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=resumed_at + 1 if resumed_at else None)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux: the process's peak RSS


def build_objective(recipe: Recipe, processes: Processes, dtype: torch.dtype) -> tuple[TrainingObjective, int]:
    """The model in training (and the stage-2 reference) built on the meta device, sharded, then filled from
    the checkpoints: under FSDP every process reads only its own shards, so none ever holds a whole model.
    With LoRA the base model is frozen in the compute dtype and, when it holds the reference's weights, is the
    reference (adapters off)."""
    device, model_dir, lora = processes.device, recipe.model.path, recipe.lora.rank > 0
    kernels = dict(attention_backend=recipe.model.attention, block_ops=recipe.model.block_ops)
    lm, entries = model_on_meta(model_dir, **kernels)  # float32: the master weights
    if lora:
        lm.to(dtype)  # on meta: no memory
    reference, ref_entries, shared, share_head = None, {}, 0, False
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
                    shared = len(lm.model.layers) - sft.trainable_top_blocks
            else:
                reference, ref_entries = model_on_meta(ref_dir, **kernels)
                reference.to(dtype).requires_grad_(False)  # on meta: no memory
                if reference.config.vocab_size != lm.config.vocab_size:
                    raise TsarankError(f"{ref_dir}: the reference's vocabulary ({reference.config.vocab_size}) "
                                       f"differs from the model's ({lm.config.vocab_size})")
                if sft.shared_trunk:
                    shared, share_head = sharing_with_reference(lm, equal)
        objective = TrainingObjective(lm, "sft", reference, sft.tau, sft.w_gen, sft.w_dp, shared,
                                      share_head=share_head, w_kd=sft.w_kd, t_kd=sft.t_kd)
    else:
        if lora:
            add_adapters(lm, recipe.lora, trained_blocks(lm, None))
        objective = TrainingObjective(lm, "cpt")
    for block in lm.model.layers:
        block.checkpointing = recipe.train.activation_checkpointing
    own_reference = reference if reference is not lm else None
    sharded = shard(objective, lm, own_reference, processes, dtype)
    for unit in sharded:
        unit.to_empty(device=device)  # this process's shards only
    adapter_params = {id(p) for name, p in lm.named_parameters() if is_adapter_parameter(name)}
    fill_weights(lm, entries, device, progress=processes.is_main, skip=adapter_params)
    lm.tie_weights()
    if lora:
        init_adapters(lm, recipe.run.seed, device)
    if own_reference is not None:
        fill_weights(own_reference, ref_entries, device, skip={id(p) for p in lm.parameters()})  # not what it shares
        if not share_head:
            own_reference.tie_weights()
    return objective, shared


def make_optimizer(objective: TrainingObjective, recipe: Recipe) -> torch.optim.AdamW:
    trainable = [p for p in objective.parameters() if p.requires_grad]
    if not trainable:
        raise TsarankError("nothing to train: every parameter is frozen")
    decay = [p for p in trainable if p.dim() >= 2]  # matrices; norms' scales are not decayed
    rest = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.train.lr, betas=(0.9, 0.999), eps=1e-8)


def tune_cpu(device: torch.device) -> None:
    """Two settings a CPU run needs, made before the model loads (threads started later inherit the second):
    - glibc raises its mmap threshold as large blocks are freed, after which freed activations stay in a
      fragmented heap: pinning it at 16 MB lowers the CPU peak (3.3 -> 2.8 GB on SmolLM2 stage 2 at G = 48).
    - subnormal floats flushed to zero: L_rank's gradient reaches a candidate the softmax all but excludes as
      values below 1e-38, which x86 multiplies 10-100x slower; without L_dp nothing larger joins them, and
      stage-2 steps took 100-220 s instead of 15 (SmolLM2, groups of 8, tau 0.001, 2-core Xeon; BENCHMARKS.md).
      A value that small changes no sum it joins in float32."""
    if device.type != "cpu":
        return
    torch.set_flush_denormal(True)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 16 * 2**20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc
            pass


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, device: str = "auto",
          progress: bool = True) -> Path:
    """Run a recipe to its last step; returns the exported model's directory (`<output_dir>/final`)."""
    processes = start_processes(device, recipe.parallel.replicate_degree)
    tune_cpu(processes.device)
    try:
        return _train(recipe, processes, resume, overwrite, progress)
    finally:
        stop_processes()


def _resolve_models(recipe: Recipe, processes: Processes) -> Recipe:
    """The recipe with builtin model names replaced by their directories (rank 0 converts; the rest wait)."""
    if processes.is_main:
        resolve_model_path(recipe.model.path)
        resolve_model_path(recipe.sft.reference)
    dist.barrier()
    return replace(recipe, model=replace(recipe.model, path=resolve_model_path(recipe.model.path)),
                   sft=replace(recipe.sft, reference=resolve_model_path(recipe.sft.reference)))


def _train(recipe: Recipe, processes: Processes, resume: bool, overwrite: bool, progress: bool) -> Path:
    out = _prepare_output(recipe, resume, overwrite, processes.is_main)
    recipe = _resolve_models(recipe, processes)
    device, stage, settings = processes.device, recipe.run.stage, recipe.train
    dtype = compute_dtype(recipe, device)
    torch.manual_seed(recipe.run.seed)
    tokenizer = Tokenizer.from_dir(recipe.model.path)
    skips = SkipCounter() if recipe.data.skip_bad_rows else None
    family = ModelConfig.from_dir(recipe.model.path).family
    stream = recipe_stream(recipe, tokenizer, family, skips)
    # Read before the model loads: a bad dev file fails at once.
    evaluator = (TrainingEvaluation(recipe.eval, tokenizer, processes, out, recipe.model.path)
                 if recipe.eval.run else None)
    max_steps = settings.max_steps or math.ceil(settings.epochs * len(stream.index) / settings.batch_size)
    if max_steps < 1:
        raise TsarankError("train.max_steps and train.epochs give no step to run")
    objective, shared = build_objective(recipe, processes, dtype)
    optimizer = make_optimizer(objective, recipe)
    scheduler = cosine_scheduler(optimizer, max_steps, settings.warmup_ratio)

    step, skipped_steps, bad_in_row = 0, 0, 0
    base_fingerprint = checkpoint_fingerprint(recipe.model.path) if recipe.lora.rank else None  # frozen weights
    eval_best = None  # the best evaluation so far, kept through a resumed run that does not evaluate
    checkpoints = complete_checkpoints(out)
    if resume and checkpoints:
        state = load_checkpoint(checkpoints[-1], objective, optimizer)
        if state.get("base_fingerprint", base_fingerprint) != base_fingerprint:
            raise TsarankError(f"{checkpoints[-1]}: its LoRA adapters were trained on other base weights than "
                               f"{recipe.model.path} holds now; restore the base model to resume")
        step, skipped_steps, eval_best = state["step"], state["skipped_steps"], state.get("eval_best")
        if evaluator:
            evaluator.restore(eval_best)
        scheduler.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["stream"])
        if processes.is_main:
            written_by = state.get("world_size", processes.world_size)
            resharded = f", resharded from {written_by} to {processes.world_size} processes" \
                if written_by != processes.world_size else ""
            click.echo(f"resuming from {checkpoints[-1]} (step {step}{resharded})", err=True)
    if processes.is_main:
        _trim_metrics(out / METRICS_FILE, step)
        if shared:
            click.echo(f"shared frozen trunk: the bottom {shared} blocks run once for model and reference", err=True)
        if processes.mesh.ndim == 2:
            replicas, shards = processes.mesh.shape
            click.echo(f"HSDP over {processes.world_size} processes: {replicas} replicas of the model, each sharded "
                       f"over {shards}", err=True)

    adapter_config = peft_config(objective.lm, recipe.model.path) if recipe.lora.rank else None
    # the next steps' rows (this rank's part of each), made meanwhile
    steps = Prefetcher(stream, processes.world_size, processes.rank, max_steps - step)

    def save(at: int) -> Path:
        state = {"scheduler": scheduler.state_dict(), "stream": steps.state_dict(), "skipped_steps": skipped_steps,
                 "world_size": processes.world_size, "eval_best": evaluator.best if evaluator else eval_best}
        if base_fingerprint:
            state["base_fingerprint"] = base_fingerprint
        return save_checkpoint(out, at, objective, optimizer, state, recipe.model.path, recipe.checkpoint.keep_last,
                               adapter_config)

    last_saved = checkpoints[-1] if resume and checkpoints else None
    evaluated = ""  # the last evaluation, on the progress bar
    metrics_file = open(out / METRICS_FILE, "a") if processes.is_main else None
    events = tensorboard_writer(out, step) if recipe.run.tensorboard and processes.is_main else None
    bar = click.progressbar(length=max_steps, label=f"training ({stage})", file=sys.stderr,
                            hidden=not (progress and processes.is_main), show_pos=True)
    bar.update(step)
    # A terminal gets the bar; a log file (stderr not a terminal, where click draws nothing after the label) a
    # line at most every LOG_EVERY_S seconds and at the last step, with the same figures.
    log_lines = progress and processes.is_main and not sys.stderr.isatty()
    started, start_step, logged = time.perf_counter(), step, -LOG_EVERY_S  # the first step is logged
    try:
        with bar, steps:
            while step < max_steps:
                record = train_step(objective, optimizer, steps, processes, stage, settings.max_grad_norm)
                step += 1
                record = {"step": step, "lr": scheduler.get_last_lr()[0], **record}
                bad_in_row = bad_in_row + 1 if record["skipped"] else 0
                skipped_steps += record["skipped"]
                scheduler.step()
                if evaluator and evaluator.due(step, max_steps):
                    record.update(evaluator(objective, objective.lm, step, progress))
                    evaluated = f" {recipe.eval.metric} {record[evaluator.key]:.4f}"
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if events:
                    for name, value in record.items():
                        if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                            events.add_scalar(name, value, step)
                if bad_in_row and processes.is_main:
                    click.echo(f"\nstep {step}: loss or gradients not finite (loss {record['loss']}, grad norm "
                               f"{record['grad_norm']}); the step was not applied ({bad_in_row} in a row)", err=True)
                if bad_in_row >= settings.max_bad_steps:
                    kept = f"the last checkpoint, {last_saved}, is untouched" if last_saved else "no checkpoint was written"
                    raise TsarankError(f"step {step}: {bad_in_row} steps in a row with a non-finite loss or gradient "
                                       f"(train.max_bad_steps = {settings.max_bad_steps}); stopping. {kept}")
                figures = f"loss {record['loss']:.4f} {record['tokens'] / record['step_time_s']:,.0f} tok/s{evaluated}"
                bar.label = f"training ({stage}) {figures}"
                bar.update(1)
                elapsed = time.perf_counter() - started
                if log_lines and (elapsed - logged >= LOG_EVERY_S or step == max_steps):
                    eta = elapsed / (step - start_step) * (max_steps - step)
                    click.echo(f"step {step}/{max_steps} {figures} eta {_clock(eta)}", err=True)
                    logged = elapsed
                every = recipe.checkpoint.every_steps
                if (every and step % every == 0) or step == max_steps:
                    last_saved = save(step)
    finally:
        if metrics_file:
            metrics_file.close()
        if events:
            events.close()
    if skips is not None and skips.skipped and processes.is_main:
        click.echo(skips.report(), err=True)
    if stage == "cpt" and processes.is_main and (cuts := stream.units.report()):
        click.echo(cuts, err=True)
    final = out / FINAL_DIR
    if processes.is_main:
        if last_saved is None:
            raise TsarankError(f"{out}: no checkpoint to export")
        shutil.rmtree(final, ignore_errors=True)
        export_checkpoint(last_saved, final)
        click.echo(f"trained {step} steps; model in {final}, metrics in {out / METRICS_FILE}", err=True)
        if evaluator and evaluator.best:
            kept = f", model in {out / BEST_DIR}" if recipe.eval.keep_best else ""
            click.echo(f"best {recipe.eval.metric}: {evaluator.best['value']:.4f} at step {evaluator.best['step']}"
                       f"{kept}", err=True)
    return final


def train_step(objective: TrainingObjective, optimizer: torch.optim.Optimizer, steps: PackedStream | Prefetcher,
               processes: Processes, stage: str, max_grad_norm: float) -> dict[str, Any]:
    """One optimizer step over the next window of the stream (or of its prefetcher). A step whose loss or
    gradient norm is not finite on any rank is not applied (record["skipped"])."""
    device = processes.device
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    part = steps.next_step(processes.world_size, processes.rank)
    totals = torch.tensor(weight_totals(part.rows, stage), dtype=torch.float64, device=device)
    dist.all_reduce(totals)  # the step's loss weights: each rank packed only its own units
    mine = rows_of_rank(part, stage, totals.tolist())
    sums: dict[str, torch.Tensor] = {}
    for i, (row, share) in enumerate(mine):
        accumulate_gradients(objective, last_row=i == len(mine) - 1)
        loss, parts = objective(row.to(device), share)
        (loss * processes.world_size).backward()  # FSDP averages gradients over ranks; the shares already sum to 1
        for name, value in parts.items():
            sums[name] = sums.get(name, 0) + value.float()
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm > 0 else math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    names = sorted(sums)
    losses = torch.stack([sums[n] for n in names]).to(device)
    dist.all_reduce(losses)
    finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(losses).all())  # the same on every rank
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(row.num_tokens for row in part.rows)
    units = sum(len(row.cu_seqlens) - 1 if stage == "cpt" else row.group.group_offsets.numel() - 1
                for row in part.rows)
    counts = torch.tensor([sum(row.num_tokens for row, _ in mine), tokens, part.copied_tokens, units],
                          dtype=torch.float64, device=device)
    maxima = torch.tensor([time.perf_counter() - start, peak_memory_mb(device), tokens], dtype=torch.float64,
                          device=device)
    dist.all_reduce(counts)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    slots, tokens, copied, units = counts.tolist()
    record = {name: float(v) for name, v in zip(names, losses.tolist())}
    record.update(tokens=int(tokens), slots=int(slots), grad_norm=float(grad_norm), skipped=not finite,
                  step_time_s=float(maxima[0]), peak_mem_mb=round(float(maxima[1]), 1),
                  **balance(float(maxima[2]), tokens, copied, processes.world_size))
    record["sequences" if stage == "cpt" else "groups"] = int(units)
    return record
