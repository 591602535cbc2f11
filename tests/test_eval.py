"""`tsarank-engine eval` on a small synthetic qrels and run, values worked out by hand: the mean over the run's
judged queries (the default) against trec_eval -c's over every judged query, and the relevance threshold of
the binary measures."""

import json
from math import log2

import pytest
from click.testing import CliRunner

from tsarank_engine.cli import main

ir_measures = pytest.importorskip("ir_measures")  # installed with the package; absent on the bare GPU box

QRELS = """q1 0 a 1
q1 0 b 2
q2 0 c 1
q2 0 f 2
q3 0 d 1
q4 0 e 2
"""
# q1 ranks x (unjudged), a (1), b (2); q2 ranks c (1), y; q9 has no judgements. q3 and q4 are not in the run.
RUN = """q1 Q0 x 1 3.0 t
q1 Q0 a 2 2.0 t
q1 Q0 b 3 1.0 t
q2 Q0 c 1 5.0 t
q2 Q0 y 2 1.0 t
q9 Q0 z 1 1.0 t
"""
# nDCG@10 with the grades as gains (trec_eval's): q1 has 1 at rank 2 and 2 at rank 3; q2 has 1 at rank 1.
NDCG = {"q1": (1 / log2(3) + 2 / log2(4)) / (2 + 1 / log2(3)), "q2": 1 / (2 + 1 / log2(3))}
# per query, by threshold: RR@10 and R@10
BY_HAND = {
    1: {"RR@10": {"q1": 1 / 2, "q2": 1.0}, "R@10": {"q1": 2 / 2, "q2": 1 / 2}},
    2: {"RR@10": {"q1": 1 / 3, "q2": 0.0}, "R@10": {"q1": 1 / 1, "q2": 0 / 1}},  # q2's grade-2 f is not retrieved
}


def evaluate(tmp_path, *extra, metrics="nDCG@10,RR@10,R@10"):
    (tmp_path / "qrels.txt").write_text(QRELS)
    (tmp_path / "run.txt").write_text(RUN)
    result = CliRunner().invoke(main, ["eval", "--qrels", str(tmp_path / "qrels.txt"),
                                       "--run", str(tmp_path / "run.txt"), "--metrics", metrics, *extra])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("threshold", [1, 2])
@pytest.mark.parametrize("all_judged", [False, True])
def test_means_by_hand(tmp_path, threshold, all_judged):
    extra = ["--rel-threshold", str(threshold)] + (["--all-judged"] if all_judged else [])
    got = json.loads(evaluate(tmp_path, *extra, "--json"))
    over = 4 if all_judged else 2  # the missing q3 and q4 count as zero under -c
    assert got["queries"] == over and got["run_judged_queries"] == 2
    assert got["averaged_over"] == ("all_judged_queries" if all_judged else "run_judged_queries")
    assert got["nDCG@10"] == pytest.approx(sum(NDCG.values()) / over, abs=1e-12)  # graded: no threshold
    suffix = "" if threshold == 1 else f"(rel={threshold})"
    for name, per_query in BY_HAND[threshold].items():
        measure, cutoff = name.split("@")
        assert got[f"{measure}{suffix}@{cutoff}"] == pytest.approx(sum(per_query.values()) / over, abs=1e-12)


def test_default_equals_ir_measures_on_the_runs_judged_queries(tmp_path):
    got = json.loads(evaluate(tmp_path, "--json"))
    qrels = {}  # ir_measures' own reading, cut to the run's judged queries q1 and q2
    for row in ir_measures.read_trec_qrels(str(tmp_path / "qrels.txt")):
        if row.query_id in ("q1", "q2"):
            qrels.setdefault(row.query_id, {})[row.doc_id] = row.relevance
    direct = ir_measures.calc_aggregate([ir_measures.parse_measure(m) for m in ("nDCG@10", "RR@10", "R@10")], qrels,
                                        ir_measures.read_trec_run(str(tmp_path / "run.txt")))
    assert {str(m): v for m, v in direct.items()} == pytest.approx({k: got[k] for k in ("nDCG@10", "RR@10", "R@10")})


def test_the_table_says_how_it_averaged(tmp_path):
    assert "averaged over: the run's 2 judged queries" in evaluate(tmp_path)
    assert ("averaged over: all 4 judged queries (trec_eval -c; the 2 the run lacks count as zero)"
            in evaluate(tmp_path, "--all-judged"))


def test_a_measure_with_its_own_threshold_keeps_it(tmp_path):
    got = json.loads(evaluate(tmp_path, "--rel-threshold", "3", "--json", metrics="RR(rel=2)@10,RR@10,NumRet"))
    assert got["RR(rel=2)@10"] == pytest.approx((1 / 3 + 0) / 2)  # its own rel=2, not --rel-threshold's 3
    assert got["RR(rel=3)@10"] == 0.0  # no grade 3 anywhere
    assert got["NumRet"] == 3 + 2  # a count (summed by ir_measures) with no threshold is left alone


def test_dl_convention_is_in_the_help():
    result = CliRunner().invoke(main, ["eval", "--help"])
    assert "tsarank-engine eval --qrels dl19_qrels.txt --run run.trec --rel-threshold 2" in result.output
