"""Evaluating a TREC run against qrels with ir_measures (DESIGN.md, "The method"): the files are read by our
readers, so a bad line is an error naming file and line, then handed to ir_measures as dictionaries, as a
run held in memory (evaluation during training) is.

ir_measures averages over every query of the qrels it is given, counting a query the run lacks as zero
(trec_eval -c). By default the qrels are cut to the run's judged queries first, so that a run of a few
queries is averaged over those; all_judged keeps them whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.readers import read_qrels, read_trec_run
from ..errors import TsarankError


@dataclass(frozen=True)
class Evaluation:
    measures: dict[str, float]  # {measure name, as ir_measures writes it: its mean (a sum for counts, e.g. NumRet)}
    queries: int  # how many queries the means are over
    run_judged_queries: int  # the run's queries that have judgements
    all_judged: bool  # averaged over all the qrels' queries (trec_eval -c) rather than the run's judged ones

    @property
    def averaged_over(self) -> str:
        queries = "query" if self.queries == 1 else "queries"
        if self.all_judged:
            return (f"all {self.queries} judged {queries} (trec_eval -c; the {self.queries - self.run_judged_queries}"
                    f" the run lacks count as zero)")
        return f"the run's {self.queries} judged {queries}"


def with_rel_threshold(measure: Any, threshold: int) -> Any:
    """`measure` with rel=threshold where it decides relevance by a grade threshold (RR, R, P, AP, Success, ...)
    and was not given one; measures without a threshold (nDCG's graded gains, NumRet's count) are left alone."""
    param = measure.SUPPORTED_PARAMS.get("rel")
    if param is None or "rel" in measure.params or not isinstance(param.default, int) or param.default == threshold:
        return measure
    return measure(rel=threshold)


def parse_measures(measures: list[str], rel_threshold: int = 1) -> list[Any]:
    """ir_measures' measures for these names, binary ones counting grades >= rel_threshold as relevant."""
    import ir_measures

    if not measures:
        raise TsarankError("no measure given")
    try:
        return [with_rel_threshold(ir_measures.parse_measure(m), rel_threshold) for m in measures]
    except (ValueError, NameError, SyntaxError, TypeError) as e:
        raise TsarankError(f"unknown measure in {', '.join(measures)} ({e})") from None


def evaluate(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], measures: list[Any],
             all_judged: bool = False, names: tuple[str, str] = ("the run", "the qrels")) -> Evaluation:
    """The means of `measures` (parse_measures) for a run {qid: {docid: score}} held in memory against qrels
    {qid: {docid: grade}}: over the run's judged queries, or with all_judged over all the qrels' queries.
    `names` (run, qrels) say where they came from in an error."""
    import ir_measures

    judged = [q for q in run if q in qrels]
    if not judged:
        raise TsarankError(f"{names[0]}: none of its queries has judgements in {names[1]}")
    counted = qrels if all_judged else {q: qrels[q] for q in judged}
    results = ir_measures.calc_aggregate(measures, counted, {q: run[q] for q in judged})
    return Evaluation({str(m): float(results[m]) for m in measures}, len(counted), len(judged), all_judged)


def evaluate_run(qrels_path: str | Path, run_path: str | Path, measures: list[str], all_judged: bool = False,
                 rel_threshold: int = 1) -> Evaluation:
    """evaluate() on the TREC run and qrels files, the measures named."""
    parsed = parse_measures(measures, rel_threshold)  # before reading: a typo fails at once
    qrels = read_qrels(qrels_path)
    run = {qid: {e.docid: e.score for e in entries} for qid, entries in read_trec_run(run_path).items()}
    return evaluate(qrels, run, parsed, all_judged, (str(run_path), str(qrels_path)))
