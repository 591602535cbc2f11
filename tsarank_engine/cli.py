"""The `tsarank-engine` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import click

from . import __version__
from .choices import ATTENTION, DEVICES, DTYPES, WIDE_DTYPES
from .errors import TsarankError
from .files import atomic_write

if TYPE_CHECKING:
    from .data.collection import Summary, Track

# torch is imported inside the commands that need it, so that `--help` answers at once.


class _Group(click.Group):
    """Turns TsarankError into one clean line and exit status 1; --debug shows the traceback instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TsarankError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(__version__, prog_name="tsarank-engine")
def main(debug: bool) -> None:
    """Train and run LLM text rankers (RankingGPT's two-stage recipe)."""
    import logging

    handler = logging.StreamHandler()  # stderr: choices worth knowing (e.g. the attention backend), once each
    handler.setFormatter(logging.Formatter("%(message)s"))
    engine_logger = logging.getLogger("tsarank_engine")
    engine_logger.addHandler(handler)
    engine_logger.setLevel(logging.INFO)
    click.get_current_context().call_on_close(lambda: engine_logger.removeHandler(handler))


def _scoring_options(command: Any) -> Any:
    """The options `score` and `rerank` share: truncation, batching, dtype, device, attention backend."""
    options = [
        click.option("--max-query-tokens", type=click.IntRange(min=1), default=None,
                     help="Truncate queries to N tokens (default: no truncation, as the paper's reranking)."),
        click.option("--max-doc-tokens", type=click.IntRange(min=1), default=None,
                     help="Truncate documents to N tokens (default: what is left of a 512-token budget)."),
        click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
                     help="Tokens per packed batch (default: 8192 on CUDA, 2048 on the CPU)."),
        click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto",
                     show_default=True, help="auto: bfloat16 on CUDA and on CPUs whose bfloat16 products measure "
                     "faster, else float32 (`doctor` says which); float16 on CUDA only. Half precision scores on "
                     "the mixed path: its products in half (on the CPU all but attention's q/k/v and the head), "
                     "the residual stream, norms and logits in float32."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True),
        click.option("--attention", default="auto", type=click.Choice(ATTENTION),
                     show_default=True, help="Attention backend; auto: on CUDA flash-attn, else torch's varlen "
                     "attention, else Triton; SDPA on the CPU."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _read_pairs(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line of a `score` pairs file, each row checked."""
    from .data.readers import parse_score_pair, read_numbered_jsonl

    return read_numbered_jsonl(path, parse_score_pair)


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Checkpoint directory (Hugging Face layout, safetensors).")
@click.option("--pairs", required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help='JSONL rows {"qid", "docid", "query", "document"}.')
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output JSONL.")
@_scoring_options
def score(
    model_dir: Path,
    pairs: Path,
    out: Path,
    max_query_tokens: int | None,
    max_doc_tokens: int | None,
    batch_tokens: int | None,
    dtype: str,
    device: str,
    attention: str,
) -> None:
    """Write each pair back with "score": the paper's query likelihood (mean log-prob of the query tokens)."""
    from .rank.ranker import Ranker
    from .rank.scoring import chunks

    # Check every row before loading anything: a bad line at the end must not cost the whole run.
    total = sum(1 for _ in _read_pairs(pairs))
    if not total:
        raise TsarankError(f"{pairs}: no pairs to score (the file is empty)")
    ranker = Ranker.load(model_dir, device, dtype, attention, max_query_tokens, max_doc_tokens, batch_tokens,
                         progress=True)
    click.echo(f"scoring on {ranker.device.type} in {str(ranker.dtype).removeprefix('torch.')}", err=True)

    start, done = time.perf_counter(), 0
    with atomic_write(out) as sink, click.progressbar(
        length=total, label="scoring", file=sys.stderr,
        item_show_func=lambda _: f"{done / max(time.perf_counter() - start, 1e-9):.1f} pairs/s",
    ) as bar:
        for chunk in chunks(_read_pairs(pairs)):
            prompted = []
            for lineno, row in chunk:
                try:
                    prompted.append(ranker.prompt(row["query"], row["document"]))
                except TsarankError as e:
                    raise TsarankError(f"{pairs}:{lineno}: {e}") from None
            for (_, row), s in zip(chunk, ranker.score_prompts(prompted)):
                sink.write(json.dumps({**row, "score": s}, ensure_ascii=False) + "\n")
            done += len(chunk)
            bar.update(len(chunk))
    click.echo(f"scored {done} pairs in {time.perf_counter() - start:.1f}s -> {out}", err=True)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe key (repeatable), e.g. --set train.max_steps=20.")
@click.option("--resume", is_flag=True, help="Continue the run in output_dir from its newest complete checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the run output_dir holds.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto: CUDA when present (under torchrun, each process its LOCAL_RANK's GPU).")
def train(recipe: Path, overrides: tuple[str, ...], resume: bool, overwrite: bool, device: str) -> None:
    """Train a stage (recipe [run] stage = cpt or sft) and export the model to <output_dir>/final.

    Every recipe key with its value and default: `tsarank-engine recipe show RECIPE`; their meaning:
    tsarank_engine/recipe.py and DESIGN.md."""
    from .recipe import load_recipe
    from .training.trainer import train as run_training

    if resume and overwrite:
        raise TsarankError("--resume and --overwrite exclude each other")
    run_training(load_recipe(recipe, list(overrides)), resume=resume, overwrite=overwrite, device=device)


@main.group()
def recipe() -> None:
    """Inspect recipes."""


@recipe.command("show")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a key (repeatable).")
def recipe_show(path: Path, overrides: tuple[str, ...]) -> None:
    """Print the resolved recipe: every key with its value (after --set and path resolution) and its default."""
    from dataclasses import fields

    from .recipe import REQUIRED, Recipe, load_recipe

    resolved, defaults = load_recipe(path, list(overrides)), Recipe()
    for section in fields(Recipe):
        click.echo(f"[{section.name}]")
        for f in fields(getattr(resolved, section.name)):
            value = getattr(getattr(resolved, section.name), f.name)
            default = getattr(getattr(defaults, section.name), f.name)
            shown = "required" if default is REQUIRED else _toml(default)
            mark = "" if value == default else "   (set)"
            click.echo(f"{f.name} = {_toml(value)}   # default: {shown}{mark}")
        click.echo("")


def _toml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, bool, list)) else repr(value)


@main.command()
@click.argument("checkpoint_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(WIDE_DTYPES), default="float32", show_default=True,
              help="dtype of the exported weights.")
def export(checkpoint_dir: Path, out_dir: Path, dtype: str) -> None:
    """Write a training checkpoint (checkpoints/step-N, or a run's output_dir: its newest) as a Hugging Face
    checkpoint in OUT_DIR."""
    import torch

    from .training.checkpoints import complete_checkpoints, export_checkpoint

    if (checkpoint_dir / "checkpoints").is_dir():
        found = complete_checkpoints(checkpoint_dir)
        if not found:
            raise TsarankError(f"{checkpoint_dir}: the run has no complete checkpoint")
        checkpoint_dir = found[-1]
    export_checkpoint(checkpoint_dir, out_dir, getattr(torch, dtype))
    click.echo(f"exported {checkpoint_dir} -> {out_dir}", err=True)


@main.command()
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every "
              "interface; give the server an --api-key-env then).")
@click.option("--port", default=8000, type=click.IntRange(0, 65535), show_default=True, help="0: a free port.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
              help="As score's and rerank's: auto is bfloat16 (the mixed path) on CUDA and on CPUs whose bfloat16 "
              "products measure faster, else float32.")
@click.option("--max-batch-tokens", type=click.IntRange(min=16), default=None,
              help="Tokens scored together, from all waiting requests (default: 8192 on CUDA, 2048 on the CPU).")
@click.option("--max-documents", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Documents one request may hold (more: 413).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Requests that may wait for scores (more: 503 with Retry-After).")
@click.option("--api-key-env", metavar="VAR", default=None,
              help="Require 'Authorization: Bearer <key>', the key read from environment variable VAR (/health "
              "stays open).")
@click.option("--served-model-name", metavar="NAME", default=None,
              help="The name /v1/models and the answers give (default: the model's folder name).")
@click.option("--batching/--no-batching", default=True, show_default=True,
              help="Score the pairs of all waiting requests together; --no-batching: one request at a time (the "
              "baseline of bench/serve.py).")
def serve(model: str, host: str, port: int, device: str, dtype: str, max_batch_tokens: int | None,
          max_documents: int, max_queue: int, api_key_env: str | None, served_model_name: str | None,
          batching: bool) -> None:
    """Serve MODEL (a run's final/ or best/, a Hugging Face checkpoint, builtin:NAME) behind the reranking APIs:
    POST /v1/rerank and /v2/rerank (Cohere's and Jina's shape), POST /score (vLLM's), GET /health, /v1/models and
    /metrics (Prometheus). relevance_score is exp(s), s the paper's score (also returned, as mean_logprob)."""
    try:
        from .serving.app import ServeSettings, build_app, run_server
    except ImportError as e:
        raise TsarankError(f"serve needs the serve extra ({e.name} is missing): pip install 'tsarank-engine[serve]'"
                           ) from None
    from .rank.ranker import Ranker
    from .rank.scoring import DEFAULT_BATCH_TOKENS

    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise TsarankError(f"--api-key-env {api_key_env}: the environment variable is not set or empty")
    ranker = Ranker.load(model, device=device, dtype=dtype, progress=True)
    name = served_model_name or Path(model.removeprefix("builtin:")).name
    settings = ServeSettings(name, max_batch_tokens or DEFAULT_BATCH_TOKENS.get(ranker.device.type, 8192),
                             max_documents, max_queue, api_key, batching)
    app = build_app(ranker.model, ranker.prompts, settings)
    run_server(app, host, port, lambda url: click.echo(
        f"serving {model} as {name!r} on {url} ({ranker.device}, {str(ranker.dtype).removeprefix('torch.')}, "
        f"batches of {settings.max_batch_tokens} tokens{'' if batching else ', one request at a time'})", err=True))


@main.command()
@click.argument("src_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(path_type=Path))
def convert(src_dir: Path, out_dir: Path) -> None:
    """Convert a checkpoint whose weights are PyTorch .bin files (pytorch_model.bin or its shards, as transformers 4
    saved them) into OUT_DIR: the tensors as safetensors, with the config and tokenizer files, a folder every command
    loads. The .bin files are read with torch.load(weights_only=True), which builds tensors and nothing else."""
    from .model.conversion import convert_checkpoint

    convert_checkpoint(src_dir, out_dir, progress=True)
    click.echo(f"converted {src_dir} -> {out_dir}", err=True)


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Checkpoint directory (Hugging Face layout, safetensors).")
@click.option("--run", "run_path", type=click.Path(path_type=Path, dir_okay=False), help="First-stage TREC run.")
@click.option("--queries", type=click.Path(path_type=Path, dir_okay=False), help="BEIR queries.jsonl (with --run).")
@click.option("--corpus", type=click.Path(path_type=Path, dir_okay=False), help="BEIR corpus.jsonl (with --run).")
@click.option("--input", "input_path", type=click.Path(path_type=Path, dir_okay=False),
              help='Instead of --run/--queries/--corpus: the paper\'s lines {"qid", "pid", "query", "passage"}.')
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output TREC run.")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Candidates per query: the run's best (default with --run: 100), or the first in --input's "
              "order (default: every one, as the paper's evaluation).")
@_scoring_options
@click.option("--tag", default="tsarank", show_default=True, help="The run's tag column.")
def rerank(model_dir: Path, run_path: Path | None, queries: Path | None, corpus: Path | None,
           input_path: Path | None, out: Path, top_k: int | None, max_query_tokens: int | None,
           max_doc_tokens: int | None,
           batch_tokens: int | None, dtype: str, device: str, attention: str, tag: str) -> None:
    """Rerank a first-stage run by the paper's query likelihood and write a TREC run (resumable; under
    torchrun the queries are dealt across GPUs)."""
    from .data.prompting import PromptBuilder
    from .data.readers import EvalLinesIndex, rerank_pairs_from_run
    from .data.tokenization import Tokenizer
    from .devices import resolve_device, resolve_scoring_dtype
    from .distributed import start_processes, stop_processes
    from .model.loading import load_model
    from .rank.reranking import RUN_DEPTH, Candidates, QueryPairs, group_by_query, rerank as run_rerank, rerank_settings

    by_run = (run_path, queries, corpus)
    if input_path is not None and any(by_run):
        raise TsarankError("give either --input or --run with --queries and --corpus, not both")
    if input_path is None and not all(by_run):
        raise TsarankError("give --run, --queries and --corpus together (or --input)")
    if len(tag.split()) != 1 or tag.strip() != tag:
        raise TsarankError(f"--tag must be one word, got {tag!r}")
    empty_docs: list[str] = []
    depth_note = ""  # with --run: how deep each query is reranked, said at the start
    if input_path is not None:
        inputs = [input_path]
        candidates: Candidates = EvalLinesIndex(input_path, top_k)  # every line checked here, no text kept
    else:
        inputs = [run_path, queries, corpus]
        depth_note = f"reranking each query's top {top_k or RUN_DEPTH} of {run_path}"
        if top_k is None:
            top_k, depth_note = RUN_DEPTH, depth_note + " (the default; --top-k sets it)"
        grouped = group_by_query(rerank_pairs_from_run(run_path, queries, corpus, top_k))
        empty_docs = list(dict.fromkeys(p.docid for pairs in grouped.values() for p in pairs if not p.passage.strip()))
        candidates = QueryPairs(grouped)
    if not candidates.counts:
        raise TsarankError(f"{input_path or run_path}: nothing to rerank")
    torch_device = resolve_device(device)
    torch_dtype = resolve_scoring_dtype(dtype, torch_device)
    settings = rerank_settings(model_dir, str(torch_dtype).removeprefix("torch."), max_query_tokens, max_doc_tokens,
                               top_k, inputs, tag)
    processes = start_processes(torch_device.type)
    try:
        if processes.is_main and depth_note:
            click.echo(depth_note, err=True)
        tokenizer = Tokenizer.from_dir(model_dir)
        model = load_model(model_dir, dtype=torch_dtype, device=processes.device, attention=attention,
                           progress=processes.is_main, mixed=True).eval()
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        scored = run_rerank(model, PromptBuilder(tokenizer, max_query_tokens, max_doc_tokens), candidates, out,
                            processes, settings, batch_tokens, tag)
        if processes.is_main:
            click.echo(f"reranked {len(candidates.counts)} queries ({scored} pairs here in "
                       f"{time.perf_counter() - start:.1f}s) -> {out}", err=True)
            if empty_docs:
                click.echo(f"{len(empty_docs)} documents of the run have no text and were scored as empty documents"
                           f" (first: {', '.join(empty_docs[:5])})", err=True)
    finally:
        stop_processes()


@main.command("eval")
@click.option("--qrels", required=True, type=click.Path(path_type=Path, dir_okay=False), help="TREC qrels.")
@click.option("--run", "run_path", required=True, type=click.Path(path_type=Path, dir_okay=False), help="TREC run.")
@click.option("--metrics", default="nDCG@10,RR@10,R@100", show_default=True,
              help="Comma-separated ir_measures names.")
@click.option("--rel-threshold", type=click.IntRange(min=1), default=1, show_default=True,
              help="Lowest relevance grade that counts as relevant for binary measures (RR, R, P, AP, Success, "
                   "...; not nDCG, which uses the grades); a measure written with its own rel=, e.g. "
                   "RR(rel=3)@10, keeps it.")
@click.option("--all-judged", is_flag=True,
              help="Average over every judged query of the qrels, those the run lacks counting as zero (trec_eval -c); "
                   "default: over the run's judged queries.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def evaluate(qrels: Path, run_path: Path, metrics: str, rel_threshold: int, all_judged: bool, as_json: bool) -> None:
    """Evaluate a TREC run against qrels with ir_measures, averaged over the run's queries that have
    judgements (or, with --all-judged, over all the qrels' queries). The output says which.

    TREC DL 2019/2020 passage ranking counts grade 1 as not relevant for its binary measures (RR, R, AP):
    evaluate those runs with

    \b
        tsarank-engine eval --qrels dl19_qrels.txt --run run.trec --rel-threshold 2
    """
    from .rank.evaluation import evaluate_run

    result = evaluate_run(qrels, run_path, [m.strip() for m in metrics.split(",") if m.strip()],
                          all_judged=all_judged, rel_threshold=rel_threshold)
    if as_json:
        click.echo(json.dumps({**result.measures, "queries": result.queries,
                               "run_judged_queries": result.run_judged_queries,
                               "averaged_over": "all_judged_queries" if all_judged else "run_judged_queries"}))
        return
    width = max(len("queries"), *(len(name) for name in result.measures))
    click.echo(f"{'measure':<{width}}  value")
    for name, value in result.measures.items():
        click.echo(f"{name:<{width}}  {value:.4f}")
    click.echo(f"{'queries':<{width}}  {result.queries}")
    click.echo(f"averaged over: {result.averaged_over}")


def _progress(label: str) -> "Track":
    """A data.collection Track: the corpus lines read so far, on stderr (the corpus's line count is not known)."""

    def track(items: Iterator[Any]) -> Iterator[Any]:
        with click.progressbar(items, label=label, file=sys.stderr, show_pos=True) as bar:
            yield from bar

    return track


def _write_rows(out: Path, rows: Iterator[dict[str, Any]], summary: "Summary", noun: str) -> None:
    """Write `rows` as JSONL through a temporary file renamed onto `out` only when all are written and there is
    at least one: an error or an empty result leaves `out` as it was. The summary line goes to stderr."""
    with atomic_write(out) as sink:
        for row in rows:
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        if not summary.written:
            raise TsarankError(f"nothing to write to {out}: {summary.report(noun)}")
    click.echo(f"{summary.report(noun)} -> {out}", err=True)


@main.command()
@click.option("--qrels", required=True, type=click.Path(path_type=Path, dir_okay=False), help="TREC qrels.")
@click.option("--run", "run_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="First-stage TREC run: where the negatives come from.")
@click.option("--queries", required=True, type=click.Path(path_type=Path, dir_okay=False), help="BEIR queries.jsonl.")
@click.option("--corpus", required=True, type=click.Path(path_type=Path, dir_okay=False), help="BEIR corpus.jsonl.")
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output JSONL groups.")
@click.option("--negatives", type=click.IntRange(min=1), default=30, show_default=True,
              help="Most hard negatives per query.")
@click.option("--depth", type=click.IntRange(min=1), default=100, show_default=True,
              help="Draw negatives from the run's top N ranks.")
@click.option("--skip-top", type=click.IntRange(min=0), default=0, show_default=True,
              help="Leave out the run's first N ranks, where unjudged relevant documents hide.")
@click.option("--min-relevance", type=click.IntRange(min=1), default=1, show_default=True,
              help="Lowest grade that makes a positive (and keeps a document out of the negatives).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the negatives' draw (per query).")
@click.option("--teacher-scores", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="What `score` wrote with a teacher model: each passage gets its (qid, docid)'s \"score\", for "
                   "distillation (sft.w_kd); every passage written must be scored there.")
def groups(qrels: Path, run_path: Path, queries: Path, corpus: Path, out: Path, negatives: int, depth: int,
           skip_top: int, min_relevance: int, seed: int, teacher_scores: Path | None) -> None:
    """Write stage-2 groups (Tevatron JSONL) from a collection: per judged query its documents judged >=
    --min-relevance as positives and up to --negatives hard negatives drawn from the run's ranks --skip-top+1 to
    --depth that are not judged relevant. A passage's title is joined into its "text"."""
    from .data.collection import build_groups

    if skip_top >= depth:
        raise TsarankError(f"--skip-top {skip_top} leaves none of the run's top --depth {depth} ranks")
    rows, summary = build_groups(qrels, run_path, queries, corpus, negatives=negatives, depth=depth,
                                 skip_top=skip_top, min_relevance=min_relevance, seed=seed,
                                 track=_progress("reading corpus"), teacher_scores=teacher_scores)
    _write_rows(out, rows, summary, "groups")


@main.command()
@click.option("--corpus", required=True, type=click.Path(path_type=Path, dir_okay=False), help="BEIR corpus.jsonl.")
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output JSONL pairs.")
@click.option("--qrels", type=click.Path(path_type=Path, dir_okay=False),
              help="TREC qrels: each judged positive with its query (with --queries).")
@click.option("--queries", type=click.Path(path_type=Path, dir_okay=False), help="BEIR queries.jsonl (with --qrels).")
@click.option("--min-relevance", type=click.IntRange(min=1), default=1, show_default=True,
              help="Lowest grade that makes a positive (with --qrels).")
@click.option("--titles", is_flag=True,
              help="Instead of --qrels/--queries: each document's text with its title as the query.")
def pairs(corpus: Path, out: Path, qrels: Path | None, queries: Path | None, min_relevance: int,
          titles: bool) -> None:
    """Write stage-1 (document, query) pairs as JSONL {"document", "query"}: the judged positives of --qrels
    with their queries, or with --titles each titled document of the corpus (text -> title)."""
    from click.core import ParameterSource

    from .data.collection import build_qrels_pairs, build_title_pairs

    if titles:
        given = [name for name, value in (("--qrels", qrels), ("--queries", queries)) if value is not None]
        if click.get_current_context().get_parameter_source("min_relevance") is ParameterSource.COMMANDLINE:
            given.append("--min-relevance")
        if given:
            raise TsarankError(f"--titles builds pairs from the corpus alone; drop {', '.join(given)}")
        rows, summary = build_title_pairs(corpus, track=_progress("reading corpus"))
    else:
        if qrels is None or queries is None:
            raise TsarankError("give --qrels and --queries together (or --titles)")
        rows, summary = build_qrels_pairs(qrels, queries, corpus, min_relevance=min_relevance,
                                          track=_progress("reading corpus"))
    _write_rows(out, rows, summary, "pairs")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Image to write (.png, .svg or .pdf); default: RUN_DIR/curves.png.")
def plot(run_dir: Path, out: Path | None) -> None:
    """Draw a training run's curves (losses, learning rate, tokens/s, eval metrics) against the step."""
    from .plotting import plot_run

    out = out or run_dir / "curves.png"
    drawn = plot_run(run_dir, out)
    click.echo(f"drew {', '.join(drawn)} -> {out}", err=True)


@main.command()
def doctor() -> None:
    """Print versions, devices, and which kernels and attention backends will be used and why."""
    from .doctor import report

    for line in report():
        click.echo(line)


def run() -> None:
    """The console script (and `python -m tsarank_engine.cli`): the CLI, ended without finalizing the
    interpreter once a command has loaded the process-group code (train, rerank). A gloo worker thread may still
    be releasing a finished collective's tensors, which takes the GIL, and a thread asking for the GIL during
    finalization aborts the process after a run that succeeded (DESIGN.md, "Environment facts")."""
    try:
        main()
    except SystemExit as done:
        if "tsarank_engine.distributed" not in sys.modules:
            raise
        code = done.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else int(code is not None))


if __name__ == "__main__":  # torchrun -m tsarank_engine.cli -- train ...
    run()
