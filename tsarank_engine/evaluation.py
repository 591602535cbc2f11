"""Evaluating a TREC run against qrels with ir_measures (DESIGN.md section 1): the files are read by our
readers, so a bad line is an error naming file and line, then handed to ir_measures as dictionaries."""

from __future__ import annotations

from pathlib import Path

from .errors import TsarankError
from .readers import read_qrels, read_trec_run


def evaluate_run(qrels_path: str | Path, run_path: str | Path, measures: list[str]) -> dict[str, float | int]:
    """{measure: mean over the run's judged queries} plus "queries": how many were judged."""
    import ir_measures

    if not measures:
        raise TsarankError("no measure given")
    try:
        parsed = [ir_measures.parse_measure(m) for m in measures]
    except (ValueError, NameError, SyntaxError, TypeError) as e:
        raise TsarankError(f"unknown measure in {', '.join(measures)} ({e})") from None
    qrels = read_qrels(qrels_path)
    run = {qid: {e.docid: e.score for e in entries} for qid, entries in read_trec_run(run_path).items()}
    judged = set(run) & set(qrels)
    if not judged:
        raise TsarankError(f"{run_path}: none of its queries has judgements in {qrels_path}")
    results = ir_measures.calc_aggregate(parsed, qrels, {q: run[q] for q in judged})
    return {**{str(m): float(results[m]) for m in parsed}, "queries": len(judged)}
