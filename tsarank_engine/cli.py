"""The `tsarank-engine` command line."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import click

from .errors import TsarankError

if TYPE_CHECKING:
    import torch

# torch is imported inside the commands that need it, so that `--help` answers at once.
_DTYPES = ("float32", "bfloat16")
_SCORE_CHUNK_ROWS = 4096  # rows tokenized, scored and written at a time: memory stays flat on huge files


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
def main(debug: bool) -> None:
    """Train and run LLM text rankers (RankingGPT's two-stage recipe)."""
    import logging

    handler = logging.StreamHandler()  # stderr: choices worth knowing (e.g. the attention backend), once each
    handler.setFormatter(logging.Formatter("%(message)s"))
    engine_logger = logging.getLogger("tsarank_engine")
    engine_logger.addHandler(handler)
    engine_logger.setLevel(logging.INFO)
    click.get_current_context().call_on_close(lambda: engine_logger.removeHandler(handler))


def _device_and_dtype(device: str, dtype: str) -> tuple["torch.device", "torch.dtype"]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TsarankError("--device cuda given but no CUDA device is available")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def _scoring_options(command: Any) -> Any:
    """The options `score` and `rerank` share: truncation, batching, dtype, device, attention backend."""
    options = [
        click.option("--max-query-tokens", type=click.IntRange(min=1), default=None,
                     help="Truncate queries to N tokens (default: no truncation, as the paper's reranking)."),
        click.option("--max-doc-tokens", type=click.IntRange(min=1), default=None,
                     help="Truncate documents to N tokens (default: what is left of a 512-token budget)."),
        click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
                     help="Tokens per packed batch (default: 8192 on CUDA, 2048 on the CPU)."),
        click.option("--dtype", type=click.Choice(["auto", *_DTYPES]), default="auto", show_default=True,
                     help="auto: float32 on the CPU, bfloat16 on CUDA."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--attention", type=click.Choice(["auto", "flash_attn", "triton", "sdpa"]), default="auto",
                     show_default=True, help="Attention backend; auto: flash-attn, else Triton on CUDA, SDPA on the CPU."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _read_pairs(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-blank line of a pairs file, each row checked."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TsarankError(f"{path}:{lineno}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TsarankError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TsarankError(f"{path}:{lineno}: expected a JSON object")
            for key in ("qid", "docid"):
                if not isinstance(row.get(key), (str, int)) or isinstance(row.get(key), bool):
                    raise TsarankError(f"{path}:{lineno}: field {key!r} missing or not a string or integer")
            for key in ("query", "document"):
                if not isinstance(row.get(key), str):
                    raise TsarankError(f"{path}:{lineno}: field {key!r} missing or not a string")
                if not row[key].strip():
                    raise TsarankError(f"{path}:{lineno}: field {key!r} is empty")
            yield lineno, row


def _chunks(rows: Iterator[tuple[int, dict[str, Any]]], size: int) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    chunk = []
    for item in rows:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
    from .prompting import PromptBuilder
    from .scoring import score_pairs
    from .tokenization import Tokenizer
    from .weights import load_model

    torch_device, torch_dtype = _device_and_dtype(device, dtype)
    # Check every row before loading anything: a bad line at the end must not cost the whole run.
    total = sum(1 for _ in _read_pairs(pairs))
    if not total:
        raise TsarankError(f"{pairs}: no pairs to score (the file is empty)")
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, dtype=torch_dtype, device=torch_device, attention_backend=attention,
                       progress=True).eval()
    click.echo(f"scoring on {torch_device.type} in {str(torch_dtype).removeprefix('torch.')}", err=True)
    builder = PromptBuilder(tokenizer, max_query_tokens, max_doc_tokens)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as e:
        raise TsarankError(f"{out}: cannot write the output there ({e.strerror})") from None
    start, done = time.perf_counter(), 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as sink, click.progressbar(
            length=total, label="scoring", file=sys.stderr,
            item_show_func=lambda _: f"{done / max(time.perf_counter() - start, 1e-9):.1f} pairs/s",
        ) as bar:
            for chunk in _chunks(_read_pairs(pairs), _SCORE_CHUNK_ROWS):
                prompted = []
                for lineno, row in chunk:
                    try:
                        prompted.append(builder.build(row["query"], row["document"]))
                    except TsarankError as e:
                        raise TsarankError(f"{pairs}:{lineno}: {e}") from None
                for (_, row), s in zip(chunk, score_pairs(model, prompted, batch_tokens)):
                    sink.write(json.dumps({**row, "score": s}, ensure_ascii=False) + "\n")
                done += len(chunk)
                bar.update(len(chunk))
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    click.echo(f"scored {done} pairs in {time.perf_counter() - start:.1f}s -> {out}", err=True)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe key (repeatable), e.g. --set train.max_steps=20.")
@click.option("--resume", is_flag=True, help="Continue the run in output_dir from its newest complete checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the run output_dir holds.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when present (under torchrun, each process its LOCAL_RANK's GPU).")
def train(recipe: Path, overrides: tuple[str, ...], resume: bool, overwrite: bool, device: str) -> None:
    """Train a stage (recipe [run] stage = cpt or sft) and export the model to <output_dir>/final."""
    from .recipe import load_recipe
    from .trainer import train as run_training

    if resume and overwrite:
        raise TsarankError("--resume and --overwrite exclude each other")
    run_training(load_recipe(recipe, list(overrides)), resume=resume, overwrite=overwrite, device=device)


@main.command()
@click.argument("checkpoint_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(_DTYPES), default="float32", show_default=True,
              help="dtype of the exported weights.")
def export(checkpoint_dir: Path, out_dir: Path, dtype: str) -> None:
    """Write a training checkpoint (checkpoints/step-N, or a run's output_dir: its newest) as a Hugging Face
    checkpoint in OUT_DIR."""
    import torch

    from .checkpoints import complete_checkpoints, export_checkpoint

    if (checkpoint_dir / "checkpoints").is_dir():
        found = complete_checkpoints(checkpoint_dir)
        if not found:
            raise TsarankError(f"{checkpoint_dir}: the run has no complete checkpoint")
        checkpoint_dir = found[-1]
    export_checkpoint(checkpoint_dir, out_dir, getattr(torch, dtype))
    click.echo(f"exported {checkpoint_dir} -> {out_dir}", err=True)


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Checkpoint directory (Hugging Face layout, safetensors).")
@click.option("--run", "run_path", type=click.Path(path_type=Path, dir_okay=False), help="First-stage TREC run.")
@click.option("--queries", type=click.Path(path_type=Path, dir_okay=False), help="BEIR queries.jsonl (with --run).")
@click.option("--corpus", type=click.Path(path_type=Path, dir_okay=False), help="BEIR corpus.jsonl (with --run).")
@click.option("--input", "input_path", type=click.Path(path_type=Path, dir_okay=False),
              help='Instead of --run/--queries/--corpus: the paper\'s lines {"qid", "pid", "query", "passage"}.')
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="Output TREC run.")
@click.option("--top-k", type=click.IntRange(min=1), default=100, show_default=True,
              help="Candidates per query: the run's best, or the first in --input's order.")
@_scoring_options
@click.option("--tag", default="tsarank", show_default=True, help="The run's tag column.")
def rerank(model_dir: Path, run_path: Path | None, queries: Path | None, corpus: Path | None,
           input_path: Path | None, out: Path, top_k: int, max_query_tokens: int | None, max_doc_tokens: int | None,
           batch_tokens: int | None, dtype: str, device: str, attention: str, tag: str) -> None:
    """Rerank a first-stage run by the paper's query likelihood and write a TREC run (resumable; under
    torchrun the queries are dealt across GPUs)."""
    from .distributed import start_processes, stop_processes
    from .prompting import PromptBuilder
    from .readers import EvalLinesIndex, rerank_pairs_from_run
    from .reranking import Candidates, QueryPairs, group_by_query, rerank as run_rerank, rerank_settings
    from .tokenization import Tokenizer
    from .weights import load_model

    by_run = (run_path, queries, corpus)
    if input_path is not None and any(by_run):
        raise TsarankError("give either --input or --run with --queries and --corpus, not both")
    if input_path is None and not all(by_run):
        raise TsarankError("give --run, --queries and --corpus together (or --input)")
    if len(tag.split()) != 1 or tag.strip() != tag:
        raise TsarankError(f"--tag must be one word, got {tag!r}")
    empty_docs: list[str] = []
    if input_path is not None:
        inputs = [input_path]
        candidates: Candidates = EvalLinesIndex(input_path, top_k)  # every line checked here, no text kept
    else:
        inputs = [run_path, queries, corpus]
        grouped = group_by_query(rerank_pairs_from_run(run_path, queries, corpus, top_k))
        empty_docs = list(dict.fromkeys(p.docid for pairs in grouped.values() for p in pairs if not p.passage.strip()))
        candidates = QueryPairs(grouped)
    if not candidates.counts:
        raise TsarankError(f"{input_path or run_path}: nothing to rerank")
    torch_device, torch_dtype = _device_and_dtype(device, dtype)
    settings = rerank_settings(model_dir, str(torch_dtype).removeprefix("torch."), max_query_tokens, max_doc_tokens,
                               top_k, inputs, tag)
    processes = start_processes(torch_device.type)
    try:
        tokenizer = Tokenizer.from_dir(model_dir)
        model = load_model(model_dir, dtype=torch_dtype, device=processes.device, attention_backend=attention,
                           progress=processes.is_main).eval()
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
    from .evaluation import evaluate_run

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


@main.command()
def doctor() -> None:
    """Print versions, devices, and which kernels and attention backends will be used and why."""
    from .doctor import report

    for line in report():
        click.echo(line)


if __name__ == "__main__":  # torchrun -m tsarank_engine.cli -- train ...
    main()
