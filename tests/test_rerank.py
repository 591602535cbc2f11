"""`tsarank-engine rerank` against the paper's scoring done with transformers, its run / BEIR inputs (empty and
title-only documents), the paper's lines streamed, resuming after a kill and starting over when the model or
settings changed, 2 ranks under torchrun, bad inputs; `eval` against ir_measures called directly."""

import json
import os
import random
import shutil

import pytest
from click.testing import CliRunner

import tsarank_engine.rank.reranking as reranking
from tsarank_engine.cli import main
from tsarank_engine.data.readers import DataError, EvalLinesIndex, rerank_pairs_from_run
from tsarank_engine.rank.reranking import ranking_lines

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
    """`rerank`, in float32 unless args name a dtype (auto may pick bfloat16 on this CPU)."""
    dtype = () if "--dtype" in args else ("--dtype", "float32")
    return CliRunner().invoke(main, ["rerank", *map(str, args), *dtype])


def killed_after_first_query(monkeypatch, *args):
    """A rerank that dies once its first query is written: the partial file and settings record a kill leaves."""
    calls = []

    def dying(*a, **k):
        if calls:
            raise RuntimeError("killed")
        calls.append(1)
        return real(*a, **k)

    real = reranking.score_pairs
    with monkeypatch.context() as m:
        m.setattr(reranking, "CHUNK_PAIRS", 1)  # one query per chunk, each written before the next is scored
        m.setattr(reranking, "score_pairs", dying)
        result = invoke(*args)
    assert isinstance(result.exception, RuntimeError), result.output


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


def test_run_inputs_top_k_ties_and_resume(tiny_llama_dir, tmp_path, monkeypatch):
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

    # A killed run: query 1 written whole; its lines are then given marker scores (so that keeping them is
    # visible) and query 2's first lines are added, as a kill in the middle of a write would leave them.
    args = ["--model", tiny_llama_dir, "--run", run, "--queries", queries, "--corpus", corpus, "--top-k", 4,
            "--out", tmp_path / "resumed.run"]
    killed_after_first_query(monkeypatch, *args)
    partial = tmp_path / ".resumed.run.rank0.partial"
    q1 = full[0][0]
    assert [line.split()[:3] for line in partial.read_text().splitlines()] == [f[:3] for f in full[:4]]
    kept = [f"{q1} Q0 {f[2]} {f[3]} 99.0 tsarank\n" for f in full[:4]]
    cut = [" ".join(f) + "\n" for f in full[4:6]]
    partial.write_text("".join(kept + cut))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "resuming: 1 of 5 queries" in result.output and "starting over" not in result.output
    resumed = read_run(tmp_path / "resumed.run")
    assert [f[4] for f in resumed[:4]] == ["99.0"] * 4 and [f[:4] for f in resumed[4:]] == [f[:4] for f in full[4:]]
    # the rest is packed into other rows than in the full run, which on the CPU rounds differently (oneDNN's
    # blocking follows the row's length)
    assert [float(f[4]) for f in resumed[4:]] == pytest.approx([float(f[4]) for f in full[4:]], abs=1e-6)
    assert not partial.exists() and not (tmp_path / ".resumed.run.partial-settings.json").exists()

    assert ranking_lines("q", ["b", "a", "c"], [0.5, 0.5, 0.7], "t").splitlines() == [  # ties: by document id
        "q Q0 c 1 0.70000000 t", "q Q0 a 2 0.50000000 t", "q Q0 b 3 0.50000000 t"]


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_beir_inputs_read_only_what_the_run_names(tmp_path):
    run = tmp_path / "run.txt"
    run.write_text("q1 Q0 d1 1 9 bm25\nq1 Q0 d2 2 8 bm25\nq1 Q0 d3 3 7 bm25\nq2 Q0 4 1 5 bm25\n")
    queries = jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"},
                                                  {"_id": "q3", "text": ""}])  # q3: not in the run, not checked
    good = [{"_id": "d1", "title": "", "text": ""}, {"_id": "d2", "title": "Only a title", "text": ""},
            {"_id": "d3", "title": "T", "text": "three"}, {"_id": 4, "text": "   "}]
    unneeded = [{"_id": "d5", "text": 5}, {"_id": "d6", "title": ["x"]}]  # bad texts, but the run names neither
    corpus = jsonl(tmp_path / "corpus.jsonl", good + unneeded)
    pairs = rerank_pairs_from_run(run, queries, corpus)
    assert [(p.qid, p.docid, p.passage) for p in pairs] == [
        ("q1", "d1", ""), ("q1", "d2", "Only a title"), ("q1", "d3", "T three"), ("q2", "4", "   ")]
    # what a needed line lacks is an error naming it; a line whose _id cannot be found is one wherever it is
    for bad, message in [({"_id": "d1", "text": 1}, "corpus.jsonl:1: field 'text' must be a string, got int"),
                         ({"_id": "d1", "title": "t"}, "corpus.jsonl:1: missing field 'text'"),
                         ({"_id": "d1", "text": "", "title": None}, "corpus.jsonl:1: field 'title' must be a string")]:
        jsonl(corpus, [bad] + good[1:])
        with pytest.raises(DataError, match=message):
            rerank_pairs_from_run(run, queries, corpus)
    for bad, message in [("{not json", "corpus.jsonl:5: malformed JSON"),
                         ({"text": "no id"}, "corpus.jsonl:5: missing field '_id'")]:
        jsonl(corpus, good + [bad])
        with pytest.raises(DataError, match=message):
            rerank_pairs_from_run(run, queries, corpus)
    jsonl(queries, [{"_id": "q1", "text": " "}, {"_id": "q2", "text": "second"}])
    with pytest.raises(DataError, match="queries.jsonl:1: field 'text' is empty"):
        rerank_pairs_from_run(run, queries, jsonl(corpus, good))


def test_empty_and_title_only_documents_are_scored_and_reported(tiny_llama_dir, tmp_path):
    query = "what is a ranker"
    run = tmp_path / "run.txt"
    run.write_text("".join(f"q1 Q0 {d} {r} {10 - r} bm25\n" for r, d in enumerate(["d1", "d2", "d3", "d4"], 1)))
    queries = jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": query}])
    corpus = jsonl(tmp_path / "corpus.jsonl", [
        {"_id": "d0", "text": ""}, {"_id": "d1", "title": "", "text": ""},
        {"_id": "d2", "title": "Ranking", "text": ""}, {"_id": "d3", "text": "A ranker orders documents."},
        {"_id": "d4", "title": "", "text": " "}])
    out = tmp_path / "out.run"
    result = invoke("--model", tiny_llama_dir, "--run", run, "--queries", queries, "--corpus", corpus, "--out", out)
    assert result.exit_code == 0, result.output
    assert "2 documents of the run have no text and were scored as empty documents (first: d1, d4)" in result.output
    ours = {f[2]: float(f[4]) for f in read_run(out)}
    documents = {"d1": "", "d2": "Ranking", "d3": "A ranker orders documents.", "d4": " "}
    expected = reference_scores(tiny_llama_dir, [{"query": query, "document": d} for d in documents.values()])
    assert [ours[d] for d in documents] == pytest.approx(expected, abs=1e-5)


def test_eval_lines_index_keeps_places_not_texts(tmp_path):
    def line(qid, docid, passage=None):
        return {"qid": qid, "pid": docid, "query": f"query {qid}", "passage": passage or f"text {docid}"}

    # q1's and q2's lines interleave; q1 names d1 twice (the second time with another text, which is dropped)
    path = jsonl(tmp_path / "top.jsonl", [line("q1", "d1"), line("q2", "d5"), line("q1", "d2"), "",
                                          line("q1", "d1", "again"), line("q2", "d6"), line("q1", "d3"),
                                          line("q1", "d4")])
    index = EvalLinesIndex(path, top_k=3)
    assert index.counts == {"q1": 3, "q2": 2}  # q1's repeated d1 counts once; d4 is past the top 3
    got = index.pairs(["q2", "q1"])
    assert {q: [(p.docid, p.passage) for p in pairs] for q, pairs in got.items()} == {
        "q2": [("d5", "text d5"), ("d6", "text d6")], "q1": [("d1", "text d1"), ("d2", "text d2"), ("d3", "text d3")]}
    assert all(p.qid == q and p.query == f"query {q}" for q, pairs in got.items() for p in pairs)
    assert EvalLinesIndex(path).counts == {"q1": 4, "q2": 2}
    with path.open("a") as f:
        f.write('{"qid": "q3", "pid": "d9", "query": "late"}\n')
    with pytest.raises(DataError, match="top.jsonl:9: missing field 'passage'"):
        EvalLinesIndex(path)  # the first pass checks every line
    with pytest.raises(DataError, match="top.jsonl: the file changed while it was being reranked"):
        index.pairs(["q1"])


def test_input_lines_are_streamed_a_chunk_of_queries_at_a_time(tiny_llama_dir, tmp_path, monkeypatch):
    rows = sample_pairs(12)
    by_query = {}
    for r in rows:
        by_query.setdefault(r["qid"], []).append(r)
    grouped = [r for pairs in by_query.values() for r in pairs]
    interleaved = [pairs[i] for i in range(2) for pairs in by_query.values()] + [grouped[0]]  # + a repeated line
    (tmp_path / "grouped.jsonl").write_text(eval_lines(grouped))
    (tmp_path / "interleaved.jsonl").write_text(eval_lines(interleaved))
    result = invoke("--model", tiny_llama_dir, "--input", tmp_path / "grouped.jsonl", "--out", tmp_path / "a.run")
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(reranking, "CHUNK_PAIRS", 3)  # two queries per chunk: each chunk read back on its own
    result = invoke("--model", tiny_llama_dir, "--input", tmp_path / "interleaved.jsonl", "--out", tmp_path / "b.run")
    assert result.exit_code == 0, result.output
    a, b = read_run(tmp_path / "a.run"), read_run(tmp_path / "b.run")
    assert [f[:4] for f in a] == [f[:4] for f in b] and len(b) == 12
    assert [float(f[4]) for f in a] == pytest.approx([float(f[4]) for f in b], abs=1e-6)
    # a bad last line fails in the first pass, before the model (here a directory without one) is loaded
    (tmp_path / "bad.jsonl").write_text(eval_lines(grouped) + '{"qid": 1}\n')
    (tmp_path / "no_model").mkdir()
    result = invoke("--model", tmp_path / "no_model", "--input", tmp_path / "bad.jsonl", "--out", tmp_path / "c.run")
    assert result.exit_code == 1 and "bad.jsonl:13: missing field 'pid'" in result.output, result.output


@pytest.mark.parametrize("change,message", [
    ("max_doc_tokens", "other settings (max_doc_tokens: None -> 64)"),
    ("top_k", "other settings (top_k: 4 -> 3)"),
    ("weights", "other settings (model: model.safetensors)"),
    ("corpus", "other settings (inputs: {corpus})"),
    ("no_record", "have no record of the model and settings"),
])
def test_partial_files_of_other_settings_are_not_reused(tiny_llama_dir, tmp_path, monkeypatch, change, message):
    run, queries, corpus = beir_files(tmp_path, msmarco_groups()[:3], per_query=4)
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    out = tmp_path / "out.run"
    args = ["--model", model, "--run", run, "--queries", queries, "--corpus", corpus, "--out", out]
    killed_after_first_query(monkeypatch, *args, "--top-k", 4)
    partial, record = tmp_path / ".out.run.rank0.partial", tmp_path / ".out.run.partial-settings.json"
    assert json.loads(record.read_text())["max_doc_tokens"] is None
    partial.write_text("".join(" ".join([*line.split()[:4], "99.0", "tsarank"]) + "\n"
                               for line in partial.read_text().splitlines()))  # marker scores: visible if kept
    extra = {"max_doc_tokens": ["--top-k", 4, "--max-doc-tokens", 64], "top_k": ["--top-k", 3]}.get(change,
                                                                                                ["--top-k", 4])
    if change in ("weights", "corpus"):  # rewritten in place: a newer mtime
        path = model / "model.safetensors" if change == "weights" else corpus
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    if change == "no_record":
        record.unlink()
    result = invoke(*args, *extra)
    assert result.exit_code == 0, result.output
    assert message.format(corpus=corpus.resolve()) in result.output and "starting over" in result.output
    assert "resuming" not in result.output
    lines = read_run(out)
    assert len(lines) == 3 * (3 if change == "top_k" else 4) and all(f[4] != "99.0" for f in lines)
    assert not partial.exists() and not record.exists()


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
              "--corpus", str(corpus), "--device", "cpu", "--dtype", "float32"]
    run_cli(*common, "--out", str(tmp_path / "one.run"))
    run_cli(*common, "--out", str(tmp_path / "two.run"), nproc=2)
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


def test_reranking_depth_is_every_input_line_or_the_runs_top_100_said_at_the_start(tiny_llama_dir, tmp_path):
    """The paper's eval.py scores every line of its top1000 file: so does `--input` unless --top-k is given. With
    --run the depth is 100 unless given, said at the start and kept in the settings record."""
    group = msmarco_groups()[0]
    docs = [{"qid": group["query_id"], "docid": f"d{i}", "query": group["query"], "document": f"passage number {i}"}
            for i in range(130)]
    (tmp_path / "top.jsonl").write_text(eval_lines(docs))
    common = ["--model", tiny_llama_dir, "--device", "cpu", "--max-doc-tokens", 16]
    result = invoke(*common, "--input", tmp_path / "top.jsonl", "--out", tmp_path / "all.run")
    assert result.exit_code == 0, result.output
    assert len(read_run(tmp_path / "all.run")) == 130
    result = invoke(*common, "--input", tmp_path / "top.jsonl", "--out", tmp_path / "seven.run", "--top-k", 7)
    assert result.exit_code == 0 and len(read_run(tmp_path / "seven.run")) == 7

    (tmp_path / "run.txt").write_text("".join(f"{d['qid']} Q0 {d['docid']} {i + 1} {200 - i} bm25\n"
                                              for i, d in enumerate(docs)))
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": group["query_id"], "text": group["query"]}) + "\n")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"_id": d["docid"], "text": d["document"]}) + "\n"
                                                   for d in docs))
    by_run = ["--run", tmp_path / "run.txt", "--queries", tmp_path / "queries.jsonl", "--corpus",
              tmp_path / "corpus.jsonl"]
    recorded = []  # the settings record a partial run keeps (and a resumed one compares)
    real = reranking.rerank_settings
    with pytest.MonkeyPatch.context() as m:
        m.setattr(reranking, "rerank_settings", lambda *a: recorded.append(real(*a)) or recorded[-1])
        result = invoke(*common, *by_run, "--out", tmp_path / "run.run")
    assert result.exit_code == 0, result.output
    assert f"reranking each query's top 100 of {tmp_path / 'run.txt'} (the default; --top-k sets it)" in result.output
    assert recorded[0]["top_k"] == 100
    lines = read_run(tmp_path / "run.run")
    assert len(lines) == 100 and {f[2] for f in lines} == {f"d{i}" for i in range(100)}  # the run's best 100
    result = invoke(*common, *by_run, "--out", tmp_path / "run12.run", "--top-k", 12)
    assert "top 12 of" in result.output and "the default" not in result.output
    assert len(read_run(tmp_path / "run12.run")) == 12
