"""`tsarank-engine rerank` against the paper's scoring done with transformers, its run / BEIR inputs, resuming
after a kill, 2 ranks under torchrun, bad inputs; `eval` against ir_measures called directly."""

import json
import random

import pytest
from click.testing import CliRunner

from tsarank_engine.cli import main
from tsarank_engine.reranking import ranking_lines

from conftest import DATA_DIR, msmarco_groups, sample_pairs
from test_score import reference_scores
from test_trainer import run_cli


def eval_lines(rows):
    return "".join(json.dumps({"qid": r["qid"], "pid": r["docid"], "query": r["query"], "passage": r["document"]})
                   + "\n" for r in rows)


def read_run(path):
    lines = [line.split() for line in path.read_text().splitlines()]
    assert all(len(f) == 6 and f[1] == "Q0" for f in lines)
    return lines


def invoke(*args):
    return CliRunner().invoke(main, ["rerank", *map(str, args)])


def beir_files(tmp_path, groups, per_query):
    """A run (scores descending in file order), queries.jsonl and corpus.jsonl from sample groups."""
    run, queries, corpus = [], [], {}
    for g in groups:
        queries.append({"_id": g["query_id"], "text": g["query"]})
        passages = (g["positive_passages"] + g["negative_passages"])[:per_query]
        for rank, p in enumerate(passages, 1):
            run.append(f"{g['query_id']} Q0 {p['docid']} {rank} {100 - rank} bm25")
            corpus[p["docid"]] = {"_id": p["docid"], "title": "", "text": p["text"]}
    (tmp_path / "run.txt").write_text("\n".join(run) + "\n")
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus.values()))
    return tmp_path / "run.txt", tmp_path / "queries.jsonl", tmp_path / "corpus.jsonl"


@pytest.mark.slow
def test_rerank_scores_equal_the_paper_on_smollm2(smollm2_dir, tmp_path):
    rows = sample_pairs(50)
    (tmp_path / "top.jsonl").write_text(eval_lines(rows))
    result = invoke("--model", smollm2_dir, "--input", tmp_path / "top.jsonl", "--out", tmp_path / "out.run",
                    "--batch-tokens", 2048)
    assert result.exit_code == 0, result.output
    lines = read_run(tmp_path / "out.run")
    ours = {(f[0], f[2]): float(f[4]) for f in lines}
    expected = reference_scores(smollm2_dir, rows)
    assert len(ours) == len(rows) == 50
    for row, score in zip(rows, expected):
        assert ours[(str(row["qid"]), str(row["docid"]))] == pytest.approx(score, abs=1e-4)
    for qid in {f[0] for f in lines}:  # best first, ranks from 1
        mine = [f for f in lines if f[0] == qid]
        assert [int(f[3]) for f in mine] == list(range(1, len(mine) + 1))
        assert [float(f[4]) for f in mine] == sorted((float(f[4]) for f in mine), reverse=True)


def test_run_inputs_top_k_ties_and_resume(tiny_llama_dir, tmp_path):
    run, queries, corpus = beir_files(tmp_path, msmarco_groups()[:5], per_query=6)
    out = tmp_path / "out.run"
    result = invoke("--model", tiny_llama_dir, "--run", run, "--queries", queries, "--corpus", corpus,
                    "--out", out, "--top-k", 4)
    assert result.exit_code == 0, result.output
    full = read_run(out)
    assert len(full) == 5 * 4 and [f[0] for f in full[::4]] == [str(g["query_id"]) for g in msmarco_groups()[:5]]
    # the same pairs given as the paper's lines score the same
    by_run = {(f[0], f[2]): f[4] for f in full}
    rows = [{"qid": q, "docid": d, "query": next(g["query"] for g in msmarco_groups() if str(g["query_id"]) == q),
             "document": json.loads(next(line for line in corpus.read_text().splitlines()
                                         if str(json.loads(line)["_id"]) == d))["text"]} for q, d in by_run]
    (tmp_path / "top.jsonl").write_text(eval_lines(rows))
    assert invoke("--model", tiny_llama_dir, "--input", tmp_path / "top.jsonl", "--out", tmp_path / "b.run").exit_code == 0
    assert {(f[0], f[2]): f[4] for f in read_run(tmp_path / "b.run")} == by_run

    # A killed run: query 1 whole (with marker scores, so keeping it is visible), query 2 cut short.
    q1 = full[0][0]
    kept = [f"{q1} Q0 {f[2]} {f[3]} 99.0 tsarank\n" for f in full[:4]]
    cut = [" ".join(f) + "\n" for f in full[4:6]]
    partial = tmp_path / ".resumed.run.rank0.partial"
    partial.write_text("".join(kept + cut))
    result = invoke("--model", tiny_llama_dir, "--run", run, "--queries", queries, "--corpus", corpus,
                    "--out", tmp_path / "resumed.run", "--top-k", 4)
    assert result.exit_code == 0, result.output
    resumed = read_run(tmp_path / "resumed.run")
    assert [f[4] for f in resumed[:4]] == ["99.0"] * 4 and [f[:4] for f in resumed[4:]] == [f[:4] for f in full[4:]]
    # the rest is packed into other rows than in the full run, which on the CPU rounds differently (oneDNN's
    # blocking follows the row's length)
    assert [float(f[4]) for f in resumed[4:]] == pytest.approx([float(f[4]) for f in full[4:]], abs=1e-6)
    assert not partial.exists()

    assert ranking_lines("q", ["b", "a", "c"], [0.5, 0.5, 0.7], "t").splitlines() == [  # ties: by document id
        "q Q0 c 1 0.70000000 t", "q Q0 a 2 0.50000000 t", "q Q0 b 3 0.50000000 t"]


@pytest.mark.parametrize("case,message", [
    ("unknown_doc", "run.txt:3: document nope is not in"),
    ("empty_run", "run.txt: the run is empty"),
    ("bad_line", "top.jsonl:2: malformed JSON"),
    ("both_inputs", "give either --input or --run"),
])
def test_bad_inputs_are_named(tiny_llama_dir, tmp_path, case, message):
    run, queries, corpus = beir_files(tmp_path, msmarco_groups()[:2], per_query=3)
    if case == "unknown_doc":
        lines = run.read_text().splitlines()
        lines[2] = lines[2].replace(lines[2].split()[2], "nope")
        run.write_text("\n".join(lines) + "\n")
    if case == "empty_run":
        run.write_text("")
    (tmp_path / "top.jsonl").write_text(eval_lines(sample_pairs(1)) + "{not json\n")
    args = ["--input", tmp_path / "top.jsonl"] if case in ("bad_line", "both_inputs") else []
    if case != "bad_line":
        args += ["--run", run, "--queries", queries, "--corpus", corpus]
    result = invoke("--model", tiny_llama_dir, *args, "--out", tmp_path / "out.run")
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "out.run").exists()


@pytest.mark.slow
def test_two_ranks_write_the_same_run(tiny_llama_dir, tmp_path):
    run, queries, corpus = beir_files(tmp_path, msmarco_groups()[:7], per_query=5)
    common = ["rerank", "--model", str(tiny_llama_dir), "--run", str(run), "--queries", str(queries),
              "--corpus", str(corpus), "--device", "cpu"]
    run_cli(*common, "--out", str(tmp_path / "one.run"))
    run_cli(*common, "--out", str(tmp_path / "two.run"), torchrun=True)
    one, two = read_run(tmp_path / "one.run"), read_run(tmp_path / "two.run")
    assert [f[:4] for f in one] == [f[:4] for f in two]
    assert all(float(a[4]) == pytest.approx(float(b[4]), abs=1e-5) for a, b in zip(one, two))


def test_eval_equals_ir_measures(tmp_path):
    ir_measures = pytest.importorskip("ir_measures")  # installed with the package; absent on the bare GPU box
    qrels = DATA_DIR / "dl19_qrels.txt"
    rng = random.Random(0)
    judged = {}
    for line in qrels.read_text().splitlines():
        qid, _, docid, _ = line.split()
        judged.setdefault(qid, []).append(docid)
    run = tmp_path / "run.txt"
    run.write_text("".join(f"{q} Q0 {d} 1 {rng.random():.6f} x\n" for q, docs in judged.items()
                           for d in rng.sample(docs, min(120, len(docs)))))
    result = CliRunner().invoke(main, ["eval", "--qrels", str(qrels), "--run", str(run), "--json"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.output)
    measures = [ir_measures.parse_measure(m) for m in ("nDCG@10", "RR@10", "R@100")]
    direct = ir_measures.calc_aggregate(measures, ir_measures.read_trec_qrels(str(qrels)),
                                        ir_measures.read_trec_run(str(run)))
    assert ours["queries"] == len(judged)
    for m in measures:
        assert ours[str(m)] == pytest.approx(direct[m], abs=1e-9)
    table = CliRunner().invoke(main, ["eval", "--qrels", str(qrels), "--run", str(run), "--metrics", "nDCG@10"])
    assert table.exit_code == 0 and "nDCG@10" in table.output
    bad = CliRunner().invoke(main, ["eval", "--qrels", str(qrels), "--run", str(run), "--metrics", "nDGC@10"])
    assert bad.exit_code == 1 and "unknown measure" in bad.output
