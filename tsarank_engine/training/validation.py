"""Evaluation during training (recipe [eval]): the model in training reranks a dev run, as `rerank` does, and
the run is measured, as `eval` does.

The run's candidates and the qrels are read once, when training starts; only the run's judged queries are scored
(the others count in no mean). Under torchrun the queries are dealt across ranks like `rerank`'s and the scores
gathered to rank 0, which computes the measure and sends it to the others. Scoring runs in training's compute dtype
on scoring's mixed path (the residual stream, norms and logits in float32; DESIGN.md, "Scoring precision"): exact
for a float32 run, and where training computes in bfloat16 its products in bfloat16 over the master weights' bf16
copies, as FSDP gathers them. The model may be FSDP-sharded: its blocks gather their parameters in every forward,
so every rank runs as many forwards (score_queries' agree_rows), and the root unit's parameters (embeddings, final
norm, head), which are gathered only inside the training objective's forward, are gathered around the scoring.

The best value so far (with the settings that give its meaning) lives in the checkpoints' trainer state, so
that it survives a resume; with eval.keep_best every new best also exports the model to <output_dir>/best,
with best/eval.json saying which step and value.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from ..data.prompting import PromptBuilder
from ..data.readers import read_qrels, rerank_pairs_from_run
from ..data.tokenization import Tokenizer
from ..distributed import Processes
from ..errors import TsarankError
from ..files import atomic_write, staged_dir
from ..model.decoder import CausalLM
from ..model.export import export_model
from ..model.lora import add_adapters_like, has_adapters
from ..rank.evaluation import evaluate, parse_measures
from ..rank.reranking import group_by_query, score_queries
from ..recipe import EvalSettings
from .checkpoints import MODEL_PREFIX

BEST_DIR = "best"
BEST_RECORD = "eval.json"
# Keys that change no value of the measure: a best value recorded under other values of them still compares.
_NEUTRAL_KEYS = ("every_steps", "keep_best", "batch_tokens")


class TrainingEvaluation:
    """The dev run's candidates in memory and what evaluating them at a step takes (every rank holds one)."""

    def __init__(self, settings: EvalSettings, tokenizer: Tokenizer, processes: Processes, out: Path,
                 model_dir: str | Path, files_dir: str | Path):
        """`model_dir`: the model the run started from (a LoRA export's base); `files_dir`: the tokenizer files
        an export takes (run_dir.run_model_files)."""
        self.settings, self.processes, self.out, self.model_dir = settings, processes, out, Path(model_dir)
        self.files_dir = Path(files_dir)
        self.key = f"eval_{settings.metric}"
        self.measures = parse_measures([settings.metric], settings.rel_threshold)
        self.qrels = read_qrels(settings.qrels)
        grouped = group_by_query(rerank_pairs_from_run(settings.run, settings.queries, settings.corpus,
                                                       settings.top_k))
        judged = {q: pairs for q, pairs in grouped.items() if q in self.qrels}
        if not judged:
            raise TsarankError(f"eval.run {settings.run}: none of its queries has judgements in eval.qrels "
                               f"{settings.qrels}")
        self.docids = {q: [p.docid for p in pairs] for q, pairs in judged.items()}
        qids = list(judged)
        mine = qids[processes.rank::processes.world_size]
        # A rank dealt no query (more ranks than queries) scores the first one and drops it: under FSDP it must
        # run the forwards with the others.
        self.owns_queries = bool(mine)
        self.my_queries = {q: judged[q] for q in mine or qids[:1]}
        self.builder = PromptBuilder(tokenizer, settings.max_query_tokens, settings.max_doc_tokens)
        self.best: dict[str, Any] | None = None  # {"step", "value", "settings"}
        if processes.is_main:
            left = len(grouped) - len(judged)
            unjudged = f" ({left} without judgements left out)" if left else ""
            click.echo(f"evaluation: {settings.metric} over {len(judged)} queries of {settings.run}{unjudged}, "
                       f"{sum(len(p) for p in judged.values())} pairs", err=True)

    def due(self, step: int, last_step: int) -> bool:
        every = self.settings.every_steps
        return step == last_step or (every > 0 and step % every == 0)

    def _measured_with(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self.settings).items() if k not in _NEUTRAL_KEYS}

    def restore(self, stored: dict[str, Any] | None) -> None:
        """Take up the best value a resumed run's checkpoint recorded, unless it was measured otherwise."""
        if stored is None:
            return
        if stored.get("settings") != self._measured_with():
            if self.processes.is_main:
                click.echo(f"the best evaluation so far (step {stored['step']}) was measured with other [eval] "
                           "settings: the best is tracked afresh", err=True)
            return
        self.best = stored

    def __call__(self, objective: nn.Module, lm: CausalLM, step: int, progress: bool) -> dict[str, float]:
        """Rerank and measure the model as it is after `step` (every rank calls this; rank 0 shows progress);
        returns the entries for the step's metrics record. A new best is recorded and, with keep_best,
        exported."""
        start = time.perf_counter()
        value = self._measure(objective, lm, step, progress)
        if self.best is None or value > self.best["value"]:
            self.best = {"step": step, "value": value, "settings": self._measured_with()}
            if self.settings.keep_best:
                self._export_best(objective, lm)
        return {self.key: value, "eval_time_s": time.perf_counter() - start}

    def _measure(self, objective: nn.Module, lm: CausalLM, step: int, progress: bool) -> float:
        """The measure of the model's reranking of the dev run (on every rank)."""
        processes = self.processes
        sharded = isinstance(objective, FSDPModule)
        training, residual = lm.training, lm.model.residual_dtype
        try:
            lm.eval()
            lm.model.residual_dtype = torch.float32  # the residual stream and norms as scoring's mixed precision
            if sharded:  # the root unit's parameters are gathered only in the objective's forward, which scoring skips
                objective.unshard()
            with click.progressbar(length=sum(len(p) for p in self.my_queries.values()),
                                   label=f"evaluating step {step}", file=sys.stderr,
                                   hidden=not (progress and processes.is_main), show_pos=True) as bar:
                scores = score_queries(lm, self.builder, self.my_queries, self.settings.batch_tokens,
                                       agree_rows=self._most_rows if sharded else None, on_row=bar.update)
        finally:
            if sharded:
                objective.reshard()
            lm.train(training)
            lm.model.residual_dtype = residual
        parts = [None] * processes.world_size if processes.is_main else None
        dist.gather_object(scores if self.owns_queries else {}, parts, dst=0)
        value = torch.zeros(1, dtype=torch.float64, device=processes.device)
        if processes.is_main:
            run = {q: dict(zip(self.docids[q], s)) for part in parts for q, s in part.items()}
            value[0] = next(iter(evaluate(self.qrels, run, self.measures).measures.values()))
        dist.broadcast(value, src=0)  # every rank decides alike whether to export a new best
        return float(value[0])

    def _most_rows(self, rows: int) -> int:
        count = torch.tensor([rows], device=self.processes.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count[0])

    def _export_best(self, objective: nn.Module, lm: CausalLM) -> None:
        """Write the model as it is now to <out>/best (every rank calls this: the parameters are gathered from
        their shards to rank 0, in their float32 master copies as a checkpoint holds them)."""
        full = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.processes.is_main:
            return
        with torch.device("meta"):
            model = CausalLM(lm.config)
            if has_adapters(lm):
                add_adapters_like(model, lm)
        model.load_state_dict({k.removeprefix(MODEL_PREFIX): v for k, v in full.items()}, assign=True)
        model.tie_weights()
        with staged_dir(self.out / BEST_DIR) as staging:  # the old best/ is replaced only by a whole new one
            export_model(model, staging, tokenizer_dir=self.files_dir, base_model=str(self.model_dir))
            record = {"step": self.best["step"], "metric": self.settings.metric, "value": self.best["value"]}
            with atomic_write(staging / BEST_RECORD) as f:
                f.write(json.dumps(record) + "\n")
