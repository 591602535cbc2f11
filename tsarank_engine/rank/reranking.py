"""Reranking a first-stage run with a trained ranker (DESIGN.md, "The method") and writing a TREC run.

Queries are scored a chunk at a time by score_queries, which evaluation during training shares (their
candidates packed by length into token-budget rows, the LM head only at query positions); each query's
ranking is written whole, in one write, to a `.partial` file beside the output, one per rank. A killed run,
started again, keeps the complete queries of its partial files, drops a query whose lines were cut short, and
scores the rest; the output appears (partial files merged in the input's query order) only once every query
is done. Under torchrun the queries are dealt across ranks.

The partial files are only worth keeping for the same model, settings and inputs: a record of those is
written beside them before any is written to, and a run whose record differs (or is missing) starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Protocol

import click
import torch.distributed as dist

from ..data.prompting import PromptBuilder, PromptedPair
from ..data.readers import RerankPair
from ..distributed import Processes, rows_in_step
from ..errors import TsarankError
from ..files import atomic_write
from ..model.decoder import CausalLM
from .scoring import CHUNK_PAIRS, DEFAULT_BATCH_TOKENS, pack_by_length, score_pairs

RUN_DEPTH = 100  # candidates per query reranked from a first-stage run unless told otherwise (`rerank --top-k`)
# What in a model directory makes its scores: weights, config and tokenizer files.
_MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "tokenizer.model",
                "tokenizer_config.json", "special_tokens_map.json")


class Candidates(Protocol):
    """The pairs to rerank, handed out a few queries at a time so that no input need be held whole."""

    counts: dict[str, int]  # {qid: number of candidates}, queries in the input's order

    def pairs(self, qids: list[str]) -> dict[str, list[RerankPair]]: ...


class QueryPairs:
    """Candidates already in memory (a run joined with the texts it names)."""

    def __init__(self, grouped: dict[str, list[RerankPair]]):
        self._grouped = grouped
        self.counts = {qid: len(pairs) for qid, pairs in grouped.items()}

    def pairs(self, qids: list[str]) -> dict[str, list[RerankPair]]:
        return {qid: self._grouped[qid] for qid in qids}


def group_by_query(pairs: list[RerankPair]) -> dict[str, list[RerankPair]]:
    """{qid: its pairs}, queries in first-seen order; a document named twice for a query counts once."""
    grouped: dict[str, dict[str, RerankPair]] = {}
    for p in pairs:
        grouped.setdefault(p.qid, {}).setdefault(p.docid, p)
    return {qid: list(docs.values()) for qid, docs in grouped.items()}


def score_queries(model: CausalLM, builder: PromptBuilder, grouped: dict[str, list[RerankPair]],
                  batch_tokens: int | None = None, agree_rows: Callable[[int], int] | None = None,
                  on_row: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """{qid: its candidates' scores, in their order} for queries held in memory: every query's prompts packed
    together by length into rows of at most `batch_tokens` tokens (default: scoring's for the model's device),
    each row one forward; on_row(pairs) after each.

    A model sharded across processes (FSDP) gathers its parameters in every forward, so every rank must run as
    many: `agree_rows` is given this rank's number of rows and returns the most any rank has; the rank then
    runs its first row again until it has run that many, the repeats' scores dropped (distributed.rows_in_step;
    `grouped` must not be empty then)."""
    prompted: list[PromptedPair] = []
    for qid, pairs in grouped.items():
        try:
            prompted.extend(builder.build_many(pairs[0].query, [p.passage for p in pairs]))
        except TsarankError as e:
            raise TsarankError(f"query {qid}: {e}") from None
    if batch_tokens is None:
        batch_tokens = DEFAULT_BATCH_TOKENS.get(model.lm_head.weight.device.type, 8192)  # score_pairs' default
    # score_pairs on one packed row packs it as the same one row: the scores are those of scoring all at once.
    rows = pack_by_length(prompted, batch_tokens)
    forwards = agree_rows(len(rows)) if agree_rows is not None else len(rows)
    scores = [0.0] * len(prompted)
    for row, real in rows_in_step(rows, forwards):
        row_scores = score_pairs(model, [prompted[i] for i in row], batch_tokens)
        if real:
            for i, s in zip(row, row_scores):
                scores[i] = s
            if on_row is not None:
                on_row(len(row))
    by_query: dict[str, list[float]] = {}
    start = 0
    for qid, pairs in grouped.items():
        by_query[qid] = scores[start:start + len(pairs)]
        start += len(pairs)
    return by_query


def ranking_lines(qid: str, docids: list[str], scores: list[float], tag: str) -> str:
    """TREC lines `qid Q0 docid rank score tag`, best first, ranks from 1, ties broken by document id."""
    order = sorted(range(len(docids)), key=lambda i: (-scores[i], docids[i]))
    return "".join(f"{qid} Q0 {docids[i]} {rank} {scores[i]:.8f} {tag}\n" for rank, i in enumerate(order, 1))


def _partial_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.rank*.partial"))


def _settings_file(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-settings.json"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def rerank_settings(model_dir: Path, dtype: str, max_query_tokens: int | None, max_doc_tokens: int | None,
                    top_k: int | None, inputs: list[Path], tag: str) -> dict[str, Any]:
    """What a run's scores depend on, as JSON: the model (its resolved path, a hash of config.json, the size
    and mtime of its weight and tokenizer files), the dtype, the truncation, top_k, the inputs (size and mtime)
    and the tag. Batching and the device are left out: they change no ranking, only the last bits of a score."""
    model: dict[str, Any] = {"path": str(model_dir.resolve())}
    for pattern in _MODEL_FILES:
        for path in sorted(model_dir.glob(pattern)):
            model[path.name] = (hashlib.sha256(path.read_bytes()).hexdigest() if path.name == "config.json"
                                else _stamp(path))
    return {"model": model, "dtype": dtype, "max_query_tokens": max_query_tokens, "max_doc_tokens": max_doc_tokens,
            "top_k": top_k, "inputs": {str(p.resolve()): _stamp(p) for p in inputs}, "tag": tag}


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two settings records, in words: "max_doc_tokens: None -> 64", "model: config.json"."""
    out = []
    for key in sorted(new.keys() | old.keys()):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.append(f"{key}: {', '.join(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))}")
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _keep_or_discard_partials(out: Path, settings: dict[str, Any]) -> None:
    """Drop partial files made with other settings than these (or with none recorded), then record these.
    The record is written (atomically) only after any stale partial file is gone, so that a kill between the
    two never leaves stale files under a record that vouches for them."""
    partials = _partial_files(out)
    if partials:
        try:
            recorded = json.loads(_settings_file(out).read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != settings:
            why = (f"were made with other settings ({'; '.join(_changes(recorded, settings))})"
                   if isinstance(recorded, dict) else "have no record of the model and settings they were made with")
            click.echo(f"{out}: the partial files of an earlier run {why}: starting over", err=True)
            for path in partials:
                path.unlink()
    with atomic_write(_settings_file(out)) as f:
        f.write(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def _lines_by_query(path: Path, expected: dict[str, int]) -> dict[str, list[str]]:
    """A partial file's whole lines (a kill can cut the last) of the queries asked for, by query."""
    lines_by_qid: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n") and line.split(maxsplit=1)[0] in expected:
            lines_by_qid[line.split(maxsplit=1)[0]].append(line)
    return lines_by_qid


def _complete_queries(out: Path, expected: dict[str, int], tidy: bool) -> set[str]:
    """Queries written whole in the partial files; with tidy, the files are rewritten without the others."""
    done: set[str] = set()
    for path in _partial_files(out):
        lines_by_qid = _lines_by_query(path, expected)
        whole = {q for q, lines in lines_by_qid.items() if len(lines) == expected[q]}
        if tidy:
            with atomic_write(path) as f:
                f.write("".join(line for q in whole for line in lines_by_qid[q]))
        done |= whole
    return done


def rerank(model: CausalLM, builder: PromptBuilder, candidates: Candidates, out: Path, processes: Processes,
           settings: dict[str, Any], batch_tokens: int | None = None, tag: str = "tsarank") -> int:
    """Score every query's candidates and write the TREC run `out`; returns the pairs scored by this rank.
    `settings` (rerank_settings) decides whether partial files of an earlier run may be kept."""
    expected = candidates.counts
    if processes.is_main:
        _keep_or_discard_partials(out, settings)
        _complete_queries(out, expected, tidy=True)
    dist.barrier()
    done = _complete_queries(out, expected, tidy=False)
    mine = [q for i, q in enumerate(expected) if i % processes.world_size == processes.rank and q not in done]
    total = sum(expected[q] for q in mine)
    if processes.is_main and done:
        click.echo(f"resuming: {len(done)} of {len(expected)} queries already ranked", err=True)

    partial = out.parent / f".{out.name}.rank{processes.rank}.partial"
    start, scored = time.perf_counter(), 0
    with open(partial, "a", encoding="utf-8") as sink, click.progressbar(
        length=total, label="reranking", file=sys.stderr, hidden=not processes.is_main,
        item_show_func=lambda _: f"{scored / max(time.perf_counter() - start, 1e-9):.1f} pairs/s",
    ) as bar:
        chunk: list[str] = []
        chunk_pairs = 0
        for n, qid in enumerate(mine):
            chunk.append(qid)
            chunk_pairs += expected[qid]
            if chunk_pairs < CHUNK_PAIRS and n + 1 < len(mine):
                continue
            chunk_candidates = candidates.pairs(chunk)
            by_query = score_queries(model, builder, chunk_candidates, batch_tokens)
            for q in chunk:  # one write per query: a kill leaves whole queries or a detectably short one
                sink.write(ranking_lines(q, [p.docid for p in chunk_candidates[q]], by_query[q], tag))
                sink.flush()
            os.fsync(sink.fileno())
            scored += chunk_pairs
            bar.update(chunk_pairs)
            chunk, chunk_pairs = [], 0
    dist.barrier()
    if processes.is_main:
        _merge(out, expected)
    dist.barrier()
    return scored


def _merge(out: Path, expected: dict[str, int]) -> None:
    lines_by_qid: dict[str, list[str]] = defaultdict(list)
    for path in _partial_files(out):
        for qid, lines in _lines_by_query(path, expected).items():
            lines_by_qid[qid].extend(lines)
    missing = [q for q in expected if len(lines_by_qid.get(q, ())) != expected[q]]
    if missing:
        raise TsarankError(f"{out}: {len(missing)} queries were not ranked (first: {missing[0]}); run again to finish")
    with atomic_write(out) as f:
        for q in expected:
            f.writelines(lines_by_qid[q])
    for path in _partial_files(out):
        path.unlink()
    _settings_file(out).unlink(missing_ok=True)  # last: a kill before it leaves a record of no partial file

