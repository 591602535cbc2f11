"""`groups` and `pairs`: training data from a small synthetic BEIR collection, checked to the row."""

import json
import random

import pytest
from click.testing import CliRunner

from tsarank_engine.cli import main
from tsarank_engine.data.collection import build_groups, draw_negatives
from tsarank_engine.data.readers import (DataError, Passage, QueryGroup, TextPair, read_query_groups,
                                    read_text_pairs)

CORPUS = [
    {"_id": "d1", "title": "T1", "text": "one"},
    {"_id": "d2", "title": "", "text": "two"},
    {"_id": "d3", "text": "three"},
    {"_id": "d4", "text": "four"},
    {"_id": "d5", "text": "five"},
    {"_id": "d6", "text": "six"},
    {"_id": "d8", "text": "eight"},
    {"_id": "d10", "text": "ten"},
    {"_id": "d11", "text": "eleven"},
    {"_id": "d12", "text": "twelve"},
    {"_id": "d13", "text": "thirteen"},
    {"_id": "d14", "text": "fourteen"},
    {"_id": "d15", "title": "Only title", "text": ""},
    {"_id": "d16", "title": "", "text": " "},
]
QUERIES = [{"_id": q, "text": f"query {q}"} for q in ("q1", "q2", "q3", "q5", "q6")]  # q4 is missing
QRELS = [
    "q1 0 d1 2", "q1 0 d2 1", "q1 0 d3 0", "q1 0 dX 1",  # graded; dX is not in the corpus
    "q2 0 d4 0",  # judged, no positive
    "q3 0 d5 1", "q3 0 d6 1",  # its run holds only its positives: no negative left
    "q4 0 d1 1",  # not in queries.jsonl
    "q5 0 d8 1",  # not in the run
    "q6 0 dZ 1",  # its only positive is not in the corpus
]
# q1's ranking: d2 (relevant) d10 d11 d12 (d11/d12 tie: by docid) d3 (judged 0) dY (not in the corpus)
# d15 (title only) d16 (empty) d13 d14.
RUN = [
    "q1 Q0 d2 1 9.0 bm25", "q1 Q0 d10 2 8.0 bm25", "q1 Q0 d12 3 7.0 bm25", "q1 Q0 d11 4 7.0 bm25",
    "q1 Q0 d3 5 6.0 bm25", "q1 Q0 dY 6 5.0 bm25", "q1 Q0 d15 7 4.0 bm25", "q1 Q0 d16 8 3.0 bm25",
    "q1 Q0 d13 9 2.0 bm25", "q1 Q0 d14 10 1.0 bm25",
    "q2 Q0 d4 1 3.0 bm25", "q3 Q0 d5 1 2.0 bm25", "q3 Q0 d6 2 1.0 bm25", "q6 Q0 d1 1 1.0 bm25",
    "q7 Q0 d1 1 1.0 bm25",  # not judged: ignored
]
Q1_POSITIVES = [{"docid": "d1", "text": "T1 one"}, {"docid": "d2", "text": "two"}]  # highest grade first
TEXTS = {"d3": "three", "d10": "ten", "d11": "eleven", "d12": "twelve", "d13": "thirteen", "d14": "fourteen",
         "d15": "Only title", "d2": "two"}


def negatives(*docids):
    return [{"docid": d, "text": TEXTS[d]} for d in docids]


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def collection(tmp_path):
    return {"qrels": write(tmp_path / "qrels.txt", QRELS), "run": write(tmp_path / "run.trec", RUN),
            "queries": write(tmp_path / "queries.jsonl", QUERIES),
            "corpus": write(tmp_path / "corpus.jsonl", CORPUS), "out": tmp_path / "out" / "data.jsonl"}


def invoke(command, files, *options):
    args = [command] + [f"--{k}={v}" for k, v in files.items()] + [str(o) for o in options]
    return CliRunner().invoke(main, args)


def groups(files, *options):
    result = invoke("groups", {k: files[k] for k in ("qrels", "run", "queries", "corpus", "out")}, *options)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in files["out"].read_text().splitlines()], result.stderr


def q1_negatives(files, *options):
    (group,), _ = groups(files, *options)
    assert group["query_id"] == "q1" and group["positive_passages"] == Q1_POSITIVES
    return group["negative_passages"]


def test_groups_exact_output_and_summary(collection):
    rows, stderr = groups(collection)
    # Title and text joined; title-only d15 kept, empty d16 and missing dY skipped; d2 (relevant) left out.
    assert rows == [{"query_id": "q1", "query": "query q1", "positive_passages": Q1_POSITIVES,
                     "negative_passages": negatives("d10", "d11", "d12", "d3", "d15", "d13", "d14")}]
    assert stderr.splitlines()[-1] == (
        "wrote 1 group; skipped 5 queries: 1 x no negative left (first: q3), 1 x no positive in the corpus "
        "(first: q6), 1 x no positive judged >= 1 (first: q2), 1 x not in the queries file (first: q4), "
        "1 x not in the run (first: q5); skipped 4 documents: 2 x positive not in the corpus (first: dX), "
        f"1 x empty (first: d16), 1 x run document not in the corpus (first: dY) -> {collection['out']}")
    assert "reading corpus" in stderr


def test_groups_file_is_what_the_trainer_reads(collection):
    groups(collection)
    assert list(read_query_groups(collection["out"])) == [QueryGroup(
        "q1", "query q1", (Passage("d1", "T1 one"), Passage("d2", "two")),
        tuple(Passage(d["docid"], d["text"]) for d in negatives("d10", "d11", "d12", "d3", "d15", "d13", "d14")))]


def test_depth_and_skip_top(collection):
    assert q1_negatives(collection, "--depth", 3) == negatives("d10", "d11")  # ranks 1-3, d2 relevant
    assert q1_negatives(collection, "--skip-top", 2, "--depth", 5) == negatives("d11", "d12", "d3")


def test_min_relevance_makes_lower_grades_negatives(collection):
    (group,), stderr = groups(collection, "--min-relevance", 2)
    assert group["positive_passages"] == Q1_POSITIVES[:1]
    assert group["negative_passages"][:2] == negatives("d2", "d10")  # d2 (grade 1) is now a negative
    assert "no positive judged >= 2" in stderr


def test_negatives_cap_is_a_seeded_sample_in_run_order(collection):
    eligible = negatives("d10", "d11", "d12", "d3", "d15", "d13", "d14")
    draws = {}
    for seed in range(8):
        drawn = q1_negatives(collection, "--negatives", 3, "--seed", seed)
        assert len(drawn) == 3 and drawn == [n for n in eligible if n in drawn]  # a subset, in run order
        assert q1_negatives(collection, "--negatives", 3, "--seed", seed) == drawn
        draws[seed] = [n["docid"] for n in drawn]
    assert len({tuple(d) for d in draws.values()}) > 1  # the seed matters


def test_draw_independent_of_file_order_and_other_queries(collection, tmp_path):
    def q1_group(files):
        rows, _ = build_groups(*files, negatives=3, seed=5)
        return [g for g in rows if g["query_id"] == "q1"]

    expected = q1_group([collection[k] for k in ("qrels", "run", "queries", "corpus")])
    assert len(expected[0]["negative_passages"]) == 3
    # Every file shuffled, and a query drawing its own negatives judged first: q1's draw is the same.
    rng = random.Random(0)
    extra = {"qrels": ["q8 0 d13 1"], "run": [f"q8 Q0 d1{i} {i} {i}.0 bm25" for i in range(5)],
             "queries": [{"_id": "q8", "text": "query q8"}], "corpus": []}
    shuffled = []
    for key, lines in (("qrels", QRELS), ("run", RUN), ("queries", QUERIES), ("corpus", CORPUS)):
        shuffled.append(write(tmp_path / f"shuffled_{key}", extra[key] + rng.sample(lines, len(lines))))
    assert q1_group(shuffled) == expected
    assert draw_negatives(["a", "b", "c"], 5, 0, "q") == ["a", "b", "c"]


def test_pairs_from_qrels(collection):
    files = {k: collection[k] for k in ("qrels", "queries", "corpus", "out")}
    result = invoke("pairs", files)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in collection["out"].read_text().splitlines()]
    assert rows == [{"document": "T1 one", "query": "query q1"}, {"document": "two", "query": "query q1"},
                    {"document": "five", "query": "query q3"}, {"document": "six", "query": "query q3"},
                    {"document": "eight", "query": "query q5"}]
    assert result.stderr.splitlines()[-1].startswith(
        "wrote 5 pairs; skipped 3 queries: 1 x no positive in the corpus (first: q6), 1 x no positive judged >= 1 "
        "(first: q2), 1 x not in the queries file (first: q4); skipped 2 documents: 2 x positive not in the corpus")
    assert list(read_text_pairs(collection["out"]))[0] == TextPair("Document: T1 one Query:", "query q1")
    result = invoke("pairs", files, "--min-relevance", 2)
    assert collection["out"].read_text() == json.dumps({"document": "T1 one", "query": "query q1"}) + "\n"


def test_pairs_from_titles(collection):
    result = invoke("pairs", {"corpus": collection["corpus"], "out": collection["out"]}, "--titles")
    assert result.exit_code == 0, result.output
    assert list(read_text_pairs(collection["out"])) == [TextPair("Document: one Query:", "T1")]
    assert result.stderr.splitlines()[-1] == (
        "wrote 1 pair; skipped 13 documents: 12 x no title (first: d2), 1 x title but no text (first: d15)"
        f" -> {collection['out']}")


@pytest.mark.parametrize("command,keys,options,message", [
    ("pairs", ("corpus", "out", "qrels"), ["--titles"], "--titles builds pairs from the corpus alone; drop --qrels"),
    ("pairs", ("corpus", "out"), ["--titles", "--min-relevance", 2], "drop --min-relevance"),
    ("pairs", ("corpus", "out", "qrels"), [], "give --qrels and --queries together (or --titles)"),
    ("groups", ("qrels", "run", "queries", "corpus", "out"), ["--skip-top", 5, "--depth", 5],
     "--skip-top 5 leaves none of the run's top --depth 5 ranks"),
])
def test_options_that_do_not_go_together(collection, command, keys, options, message):
    result = invoke(command, {k: collection[k] for k in keys}, *options)
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert not collection["out"].parent.exists()


@pytest.mark.parametrize("command,keys,options", [
    ("groups", ("qrels", "run", "queries", "corpus", "out"), []),
    ("pairs", ("qrels", "queries", "corpus", "out"), []),
    ("pairs", ("corpus", "out"), ["--titles"]),
])
def test_bad_line_names_file_and_line_and_writes_nothing(collection, command, keys, options):
    write(collection["corpus"], [*CORPUS[:2], "{not json", *CORPUS[2:]])
    collection["out"].parent.mkdir()
    collection["out"].write_text("earlier\n")
    result = invoke(command, {k: collection[k] for k in keys}, *options)
    assert result.exit_code == 1
    assert f"error: {collection['corpus']}:3: malformed JSON" in result.stderr
    assert collection["out"].read_text() == "earlier\n"  # left as it was, no temporary file left beside it
    assert [p.name for p in collection["out"].parent.iterdir()] == ["data.jsonl"]


def test_nothing_to_write_is_an_error(collection):
    write(collection["qrels"], ["q2 0 d4 0"])
    result = invoke("groups", {k: collection[k] for k in ("qrels", "run", "queries", "corpus", "out")})
    assert result.exit_code == 1
    assert "nothing to write to" in result.stderr and "1 x no positive judged >= 1" in result.stderr
    assert not collection["out"].exists() and list(collection["out"].parent.iterdir()) == []


def test_builder_errors_name_file_and_line(collection):
    write(collection["run"], ["q1 Q0 d1 1 high bm25"])
    with pytest.raises(DataError, match=r"run.trec:1: score 'high' is not a number"):
        build_groups(*(collection[k] for k in ("qrels", "run", "queries", "corpus")))


Q1_CANDIDATES = ["d1", "d2", "d10", "d11", "d12", "d3", "d15", "d13", "d14"]


def teacher_file(path, scores):
    """What `score` writes: its input lines {"qid", "docid", "query", "document"} with each "score"."""
    return write(path, [{"qid": q, "docid": d, "query": f"query {q}", "document": "a text", "score": s}
                        for (q, d), s in scores.items()])


def test_groups_carry_the_teacher_scores(collection, tmp_path):
    scores = {("q1", d): -i / 4 for i, d in enumerate(Q1_CANDIDATES)}
    scores["q1", "d10"] = 3  # JSON ints are scores too
    path = teacher_file(tmp_path / "teacher.jsonl", {**scores, ("q9", "d1"): 0.5})  # pairs no group uses are fine
    (group,), _ = groups(collection, "--teacher-scores", path)
    assert group["positive_passages"] == [{**p, "score": scores["q1", p["docid"]]} for p in Q1_POSITIVES]
    assert group["negative_passages"] == [{**n, "score": scores["q1", n["docid"]]}
                                          for n in negatives("d10", "d11", "d12", "d3", "d15", "d13", "d14")]
    (read,) = read_query_groups(collection["out"], scores=True)  # what stage 2 reads with sft.w_kd > 0
    assert [p.score for p in read.positives + read.negatives] == [scores["q1", d] for d in Q1_CANDIDATES]


def test_a_candidate_without_a_teacher_score_is_named_and_nothing_written(collection, tmp_path):
    path = teacher_file(tmp_path / "teacher.jsonl", {("q1", d): 1.0 for d in Q1_CANDIDATES if d != "d13"})
    collection["out"].parent.mkdir()
    collection["out"].write_text("earlier\n")
    result = invoke("groups", {k: collection[k] for k in ("qrels", "run", "queries", "corpus", "out")},
                    "--teacher-scores", path)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == f"error: {path}: no teacher score for query q1, document d13"
    assert collection["out"].read_text() == "earlier\n"


@pytest.mark.parametrize("edit,message", [
    (lambda rows: rows[1].update(score="high"), ":2: field 'score' must be a finite number, got 'high'"),
    (lambda rows: rows[1].update(score=False), ":2: field 'score' must be a finite number, got False"),
    (lambda rows: rows[2].pop("score"), ":3: missing field 'score'"),
    (lambda rows: rows[3].pop("docid"), ":4: missing field 'docid'"),
    (lambda rows: rows.append({**rows[0], "score": 7.0}), ":10: query q1, document d1 scored again: 7.0 after 0.0"),
])
def test_bad_teacher_score_lines_name_file_and_line(collection, tmp_path, edit, message):
    rows = [{"qid": "q1", "docid": d, "query": "query q1", "document": "a text", "score": float(i)}
            for i, d in enumerate(Q1_CANDIDATES)]
    edit(rows)
    path = write(tmp_path / "teacher.jsonl", rows)
    result = invoke("groups", {k: collection[k] for k in ("qrels", "run", "queries", "corpus", "out")},
                    "--teacher-scores", path)
    assert result.exit_code == 1 and result.stderr.splitlines()[-1] == f"error: {path}{message}"
    assert not collection["out"].exists()
