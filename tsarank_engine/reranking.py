"""Reranking a first-stage run with a trained ranker (DESIGN.md section 1, Reranking) and writing a TREC run.

Queries are scored a chunk at a time (their candidates packed by length into token-budget rows, the LM head
only at query positions); each query's ranking is written whole, in one write, to a `.partial` file beside
the output, one per rank. A killed run, started again, keeps the complete queries of its partial files, drops
a query whose lines were cut short, and scores the rest; the output appears (partial files merged in the
input's query order) only once every query is done. Under torchrun the queries are dealt across ranks.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import click
import torch.distributed as dist

from .decoder import CausalLM
from .distributed import Processes
from .errors import TsarankError
from .prompting import PromptBuilder
from .readers import RerankPair
from .scoring import score_pairs

CHUNK_PAIRS = 2048  # pairs prompted and scored together: enough to pack well, small enough to lose little


def group_by_query(pairs: list[RerankPair]) -> dict[str, list[RerankPair]]:
    """{qid: its pairs}, queries in first-seen order; a document named twice for a query counts once."""
    grouped: dict[str, dict[str, RerankPair]] = {}
    for p in pairs:
        grouped.setdefault(p.qid, {}).setdefault(p.docid, p)
    return {qid: list(docs.values()) for qid, docs in grouped.items()}


def ranking_lines(qid: str, docids: list[str], scores: list[float], tag: str) -> str:
    """TREC lines `qid Q0 docid rank score tag`, best first, ranks from 1, ties broken by document id."""
    order = sorted(range(len(docids)), key=lambda i: (-scores[i], docids[i]))
    return "".join(f"{qid} Q0 {docids[i]} {rank} {scores[i]:.8f} {tag}\n" for rank, i in enumerate(order, 1))


def _partial_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.rank*.partial"))


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
            tmp = path.with_suffix(".tidy")
            tmp.write_text("".join(line for q in whole for line in lines_by_qid[q]))
            os.replace(tmp, path)
        done |= whole
    return done


def rerank(model: CausalLM, builder: PromptBuilder, queries: dict[str, list[RerankPair]], out: Path,
           processes: Processes, batch_tokens: int | None = None, tag: str = "tsarank") -> int:
    """Score every query's candidates and write the TREC run `out`; returns the pairs scored by this rank."""
    expected = {qid: len(pairs) for qid, pairs in queries.items()}
    if processes.is_main:
        _complete_queries(out, expected, tidy=True)
    dist.barrier()
    done = _complete_queries(out, expected, tidy=False)
    mine = [q for i, q in enumerate(queries) if i % processes.world_size == processes.rank and q not in done]
    total = sum(expected[q] for q in mine)
    if processes.is_main and done:
        click.echo(f"resuming: {len(done)} of {len(queries)} queries already ranked", err=True)

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
            prompted, owners = [], []
            for q in chunk:
                pairs = queries[q]
                try:
                    prompted.extend(builder.build_many(pairs[0].query, [p.passage for p in pairs]))
                except TsarankError as e:
                    raise TsarankError(f"query {q}: {e}") from None
                owners.extend([q] * len(pairs))
            scores = score_pairs(model, prompted, batch_tokens)
            by_query: dict[str, list[float]] = defaultdict(list)
            for q, s in zip(owners, scores):
                by_query[q].append(s)
            for q in chunk:  # one write per query: a kill leaves whole queries or a detectably short one
                sink.write(ranking_lines(q, [p.docid for p in queries[q]], by_query[q], tag))
                sink.flush()
            os.fsync(sink.fileno())
            scored += len(owners)
            bar.update(len(owners))
            chunk, chunk_pairs = [], 0
    dist.barrier()
    if processes.is_main:
        _merge(out, queries, expected)
    dist.barrier()
    return scored


def _merge(out: Path, queries: dict[str, list[RerankPair]], expected: dict[str, int]) -> None:
    lines_by_qid: dict[str, list[str]] = defaultdict(list)
    for path in _partial_files(out):
        for qid, lines in _lines_by_query(path, expected).items():
            lines_by_qid[qid].extend(lines)
    missing = [q for q in queries if len(lines_by_qid.get(q, ())) != expected[q]]
    if missing:
        raise TsarankError(f"{out}: {len(missing)} queries were not ranked (first: {missing[0]}); run again to finish")
    tmp = out.parent / f".{out.name}.merging"
    with open(tmp, "w", encoding="utf-8") as f:
        for q in queries:
            f.writelines(lines_by_qid[q])
    os.replace(tmp, out)
    for path in _partial_files(out):
        path.unlink()

