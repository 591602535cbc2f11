"""The training loop both stages share (DESIGN.md, "Training"): a recipe in, checkpoints, metrics and a
Hugging Face model out.

One optimizer step takes the next `batch_size` units of the data order (stage 1: text pairs, stage 2: query
groups), dealt to the ranks balanced by tokens; each rank packs its own units into rows of at most
`max_tokens` tokens and runs them, gradients accumulating over its rows (FSDP reduces them once, after the
last). Each row's loss is scaled by its share of the step (RowShare) so that the step's loss is the mean over
the whole step on any number of ranks. AdamW, the paper's cosine schedule with warmup, clipping of the global
gradient norm; master weights in float32, compute in the recipe's dtype (bfloat16 on CUDA by default). A step
whose gradient norm is not finite is not applied, and counted (bad_steps). The loop hands its records and
progress to run_log.RunLog, checkpoints and the final export to checkpoints.Checkpointer, and with an [eval]
section the reranking of a dev run at its steps and after the last to validation.TrainingEvaluation, outside
the steps' timing.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click
import torch
import torch.distributed as dist

from ..data.packing import PackedRow, StepPart
from ..data.readers import SkipCounter
from ..data.stream import PackedStream, Prefetcher
from ..data.tokenization import Tokenizer, adds_pad_token
from ..devices import tune_cpu
from ..distributed import Processes, accumulate_gradients, rows_in_step, start_processes, stop_processes
from ..errors import TsarankError
from ..model.config import ModelConfig
from ..model.loading import checkpoint_fingerprint
from ..model.lora import peft_config
from ..recipe import Recipe
from .build import build_objective, compute_dtype, make_optimizer, resolve_models
from .checkpoints import Checkpointer
from .model_files import run_model_files
from .objectives import RowShare, TrainingObjective, row_shares, weight_totals
from .run_dir import FINAL_DIR, prepare_output
from .run_log import METRICS_FILE, RunLog, trim_metrics
from .schedule import cosine_scheduler
from .stream import recipe_stream
from .validation import BEST_DIR, TrainingEvaluation


def rows_of_rank(part: StepPart, stage: str, totals: list[float]) -> list[tuple[PackedRow, RowShare]]:
    """A rank's rows of a step (Packer.pack_step) with their shares of the step's loss (`totals`: the step's
    loss weights, summed over the ranks). Every rank runs the same number of rows, as FSDP's collectives
    require: a rank short of one (it got fewer units than the others have rows) repeats a row with a zero
    share."""
    shares = iter(row_shares(part.rows, stage, totals))
    return [(row, next(shares) if real else RowShare())
            for row, real in rows_in_step(part.rows, part.rows_each, part.filler)]


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux: the process's peak RSS


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, device: str = "auto",
          progress: bool = True) -> Path:
    """Run a recipe to its last step; returns the exported model's directory (`<output_dir>/final`)."""
    processes = start_processes(device, recipe.parallel.replicate_degree)
    tune_cpu(processes.device)
    try:
        return _train(recipe, processes, resume, overwrite, progress)
    finally:
        stop_processes()


@dataclass
class _Counters:
    """What a run counts across its steps and keeps in its checkpoints."""
    step: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0
    eval_best: dict[str, Any] | None = None  # the best evaluation so far, kept through runs that do not evaluate


def _train(recipe: Recipe, processes: Processes, resume: bool, overwrite: bool, progress: bool) -> Path:
    out = prepare_output(recipe, resume, overwrite, processes.is_main)
    recipe = resolve_models(recipe, processes)
    torch.manual_seed(recipe.run.seed)
    tokenizer = Tokenizer.from_dir(recipe.model.path, recipe.data.bos_token or None)
    config = ModelConfig.from_dir(recipe.model.path)
    pad = adds_pad_token(recipe.data.add_pad_token, tokenizer, config.family, config.vocab_size, recipe.model.path)
    if pad and recipe.lora.rank:
        raise TsarankError(f"{recipe.model.path}: data.add_pad_token adds an embedding row, which a LoRA adapter "
                           f"cannot carry; set data.add_pad_token = false, or add it in a run without LoRA")
    files_dir = run_model_files(recipe, out, config, config.vocab_size if pad else None, processes.is_main)
    skips = SkipCounter() if recipe.data.skip_bad_rows else None
    stream = recipe_stream(recipe, tokenizer, config.family, skips)
    # Read before the model loads: a bad dev file fails at once.
    evaluator = (TrainingEvaluation(recipe.eval, tokenizer, processes, out, recipe.model.path, files_dir)
                 if recipe.eval.run else None)
    settings = recipe.train
    max_steps = settings.max_steps or math.ceil(settings.epochs * len(stream.index) / settings.batch_size)
    if max_steps < 1:
        raise TsarankError("train.max_steps and train.epochs give no step to run")
    objective, shared_blocks = build_objective(recipe, processes, compute_dtype(recipe, processes.device),
                                               config.vocab_size + pad)
    optimizer = make_optimizer(objective, recipe)
    scheduler = cosine_scheduler(optimizer, max_steps, settings.warmup_ratio)
    adapter_config = peft_config(objective.lm, recipe.model.path) if recipe.lora.rank else None
    checkpointer = Checkpointer(out, objective, optimizer, recipe.checkpoint, files_dir, adapter_config)
    base_fingerprint = checkpoint_fingerprint(recipe.model.path) if recipe.lora.rank else None  # frozen weights
    counters = _Counters()
    if resume and (stored := checkpointer.resume()) is not None:
        if stored.get("base_fingerprint", base_fingerprint) != base_fingerprint:
            raise TsarankError(f"{checkpointer.last_saved}: its LoRA adapters were trained on other base weights "
                               f"than {recipe.model.path} holds now; restore the base model to resume")
        counters = _Counters(stored["step"], stored["skipped_steps"], 0, stored.get("eval_best"))
        if evaluator:
            evaluator.restore(counters.eval_best)
        scheduler.load_state_dict(stored["scheduler"])
        stream.load_state_dict(stored["stream"])
        _say_resumed(checkpointer.last_saved, stored, counters.step, processes)
    if processes.is_main:
        trim_metrics(out / METRICS_FILE, counters.step)
        _say_layout(shared_blocks, processes)
    # the next steps' rows (this rank's part of each), made meanwhile
    with Prefetcher(stream, processes.world_size, processes.rank, max_steps - counters.step) as steps:

        def checkpoint_state() -> dict[str, Any]:  # what a checkpoint holds beside the model and optimizer
            kept = {"scheduler": scheduler.state_dict(), "stream": steps.state_dict(),
                    "skipped_steps": counters.skipped_steps, "world_size": processes.world_size,
                    "eval_best": evaluator.best if evaluator else counters.eval_best}
            return {**kept, "base_fingerprint": base_fingerprint} if base_fingerprint else kept

        with RunLog(out, recipe.run.stage, counters.step, max_steps, recipe.run.tensorboard, progress,
                    processes.is_main) as log:
            _run_steps(recipe, objective, optimizer, scheduler, steps, processes, counters, max_steps, evaluator,
                       checkpointer, checkpoint_state, log, progress)
    return _finish(recipe, out, checkpointer, evaluator, skips, stream, counters.step, processes)


def _run_steps(recipe: Recipe, objective: TrainingObjective, optimizer: torch.optim.Optimizer, scheduler: Any,
               steps: Prefetcher, processes: Processes, counters: _Counters, max_steps: int,
               evaluator: TrainingEvaluation | None, checkpointer: Checkpointer,
               checkpoint_state: Callable[[], dict[str, Any]], log: RunLog, progress: bool) -> None:
    """The loop: a step, its record, the evaluation and checkpoint when due, until max_steps."""
    evaluated = ""  # the last evaluation, on the progress bar
    while counters.step < max_steps:
        record = train_step(objective, optimizer, steps, processes, recipe.run.stage, recipe.train.max_grad_norm)
        counters.step += 1
        record = {"step": counters.step, "lr": scheduler.get_last_lr()[0], **record}
        counters.skipped_steps += record["skipped"]
        scheduler.step()
        if evaluator and evaluator.due(counters.step, max_steps):
            record.update(evaluator(objective, objective.lm, counters.step, progress))
            evaluated = f" {recipe.eval.metric} {record[evaluator.key]:.4f}"
        log.record(record)
        counters.bad_in_row = bad_steps(record, counters.bad_in_row, recipe.train.max_bad_steps,
                                        checkpointer.last_saved, processes.is_main)
        log.show(record, evaluated)
        checkpointer.after_step(counters.step, max_steps, checkpoint_state)


def bad_steps(record: dict[str, Any], in_row: int, max_bad_steps: int, last_saved: Path | None,
              is_main: bool) -> int:
    """The bad-step policy: a step whose loss or gradients were not finite (record["skipped"]: not applied) is
    reported; max_bad_steps of them in a row stop the run. Returns how many in a row now."""
    in_row = in_row + 1 if record["skipped"] else 0
    step = record["step"]
    if in_row and is_main:
        click.echo(f"\nstep {step}: loss or gradients not finite (loss {record['loss']}, grad norm "
                   f"{record['grad_norm']}); the step was not applied ({in_row} in a row)", err=True)
    if in_row >= max_bad_steps:
        kept = f"the last checkpoint, {last_saved}, is untouched" if last_saved else "no checkpoint was written"
        raise TsarankError(f"step {step}: {in_row} steps in a row with a non-finite loss or gradient "
                           f"(train.max_bad_steps = {max_bad_steps}); stopping. {kept}")
    return in_row


def _say_resumed(checkpoint: Path, state: dict[str, Any], step: int, processes: Processes) -> None:
    if processes.is_main:
        written_by = state.get("world_size", processes.world_size)
        resharded = f", resharded from {written_by} to {processes.world_size} processes" \
            if written_by != processes.world_size else ""
        click.echo(f"resuming from {checkpoint} (step {step}{resharded})", err=True)


def _say_layout(shared_blocks: int, processes: Processes) -> None:
    if shared_blocks:
        click.echo(f"shared frozen trunk: the bottom {shared_blocks} blocks run once for model and reference",
                   err=True)
    if processes.mesh.ndim == 2:
        replicas, shards = processes.mesh.shape
        click.echo(f"HSDP over {processes.world_size} processes: {replicas} replicas of the model, each sharded "
                   f"over {shards}", err=True)


def _finish(recipe: Recipe, out: Path, checkpointer: Checkpointer, evaluator: TrainingEvaluation | None,
            skips: SkipCounter | None, stream: PackedStream, step: int, processes: Processes) -> Path:
    """The run's reports, and its last checkpoint exported to <out>/final."""
    final = out / FINAL_DIR
    if not processes.is_main:
        return final
    if skips is not None and skips.skipped:
        click.echo(skips.report(), err=True)
    if recipe.run.stage == "cpt" and (cuts := stream.units.report()):
        click.echo(cuts, err=True)
    checkpointer.export(final)
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
