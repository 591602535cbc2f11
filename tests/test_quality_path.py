"""The whole path from a collection to a trained reranker and its figures, with the engine's commands only:
`pairs` -> train stage 1 -> `groups` -> train stage 2 with [eval] -> `rerank` -> `eval`, on a few sample queries
and a tiny model. Each artefact is checked, not the quality (bench/quality.py measures that)."""

import json

import pytest

from tsarank_engine.data.readers import read_query_groups, read_text_pairs, read_trec_run

from conftest import msmarco_groups
from test_trainer import metrics, run_cli

pytestmark = pytest.mark.slow

STAGE1 = """
[run]
stage = "cpt"
output_dir = "{out}"
[model]
path = "{model}"
[data]
path = "{data}"
max_tokens = 512
[train]
epochs = 1.0
batch_size = 4
lr = 1e-3
"""

STAGE2 = """
[run]
stage = "sft"
output_dir = "{out}"
[model]
path = "{model}"
[data]
path = "{data}"
max_tokens = 1024
max_query_tokens = 16
max_doc_tokens = 32
[train]
epochs = 1.0
batch_size = 2
lr = 1e-3
[sft]
group_size = 4
[eval]
run = "{dev}/dev.run"
queries = "{dev}/queries.jsonl"
corpus = "{dev}/corpus.jsonl"
qrels = "{dev}/dev.qrels"
every_steps = 1
max_doc_tokens = 32
keep_best = true
"""


def write_collection(root, groups):
    """BEIR queries and corpus of the groups, and per split (train: all but the last two) qrels and a run."""
    corpus = {}
    with open(root / "queries.jsonl", "w") as f:
        for g in groups:
            f.write(json.dumps({"_id": str(g["query_id"]), "text": g["query"]}) + "\n")
            for p in g["positive_passages"] + g["negative_passages"][:6]:
                corpus[str(p["docid"])] = p["text"][:200]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in corpus.items()))
    for name, part in (("train", groups[:-2]), ("dev", groups[-2:])):
        with open(root / f"{name}.qrels", "w") as qrels, open(root / f"{name}.run", "w") as run:
            for g in part:
                positives = [str(p["docid"]) for p in g["positive_passages"]]
                qrels.writelines(f"{g['query_id']} 0 {d} 1\n" for d in positives)
                candidates = [str(p["docid"]) for p in g["negative_passages"][:6]] + positives
                run.writelines(f"{g['query_id']} Q0 {d} {r} {-r} bm25\n" for r, d in enumerate(candidates, 1))


def test_from_a_collection_to_a_reranker_and_its_figures(tmp_path, tiny_llama_dir):
    groups = msmarco_groups()[:8]
    write_collection(tmp_path, groups)
    beir = ["--queries", str(tmp_path / "queries.jsonl"), "--corpus", str(tmp_path / "corpus.jsonl")]

    run_cli("pairs", "--qrels", str(tmp_path / "train.qrels"), *beir, "--out", str(tmp_path / "pairs.jsonl"))
    pairs = list(read_text_pairs(tmp_path / "pairs.jsonl"))
    assert len(pairs) == sum(len(g["positive_passages"]) for g in groups[:-2])
    assert {p.response for p in pairs} == {g["query"] for g in groups[:-2]}

    stage1 = tmp_path / "stage1.toml"
    stage1.write_text(STAGE1.format(out=tmp_path / "cpt", model=tiny_llama_dir, data=tmp_path / "pairs.jsonl"))
    run_cli("train", str(stage1), "--device", "cpu")
    assert (tmp_path / "cpt" / "final" / "model.safetensors").is_file()

    run_cli("groups", "--qrels", str(tmp_path / "train.qrels"), "--run", str(tmp_path / "train.run"), *beir,
            "--out", str(tmp_path / "groups.jsonl"), "--negatives", "3", "--seed", "1")
    built = list(read_query_groups(tmp_path / "groups.jsonl"))
    assert [g.query_id for g in built] == [str(g["query_id"]) for g in groups[:-2]]
    for group, source in zip(built, groups):
        assert {p.docid for p in group.positives} == {str(p["docid"]) for p in source["positive_passages"]}
        negatives = {p.docid for p in group.negatives}
        assert len(negatives) == 3 and negatives <= {str(p["docid"]) for p in source["negative_passages"][:6]}

    stage2 = tmp_path / "stage2.toml"
    stage2.write_text(STAGE2.format(out=tmp_path / "sft", model=tmp_path / "cpt" / "final",
                                    data=tmp_path / "groups.jsonl", dev=tmp_path))
    run_cli("train", str(stage2), "--device", "cpu")
    records = metrics(tmp_path / "sft")
    assert len(records) == 3 and all(0.0 <= r["eval_nDCG@10"] <= 1.0 for r in records)
    best = json.loads((tmp_path / "sft" / "best" / "eval.json").read_text())
    assert best["value"] == max(r["eval_nDCG@10"] for r in records)
    assert (tmp_path / "sft" / "best" / "model.safetensors").is_file()

    run_cli("rerank", "--model", str(tmp_path / "sft" / "final"), "--run", str(tmp_path / "dev.run"), *beir,
            "--out", str(tmp_path / "reranked.run"), "--max-doc-tokens", "32", "--device", "cpu", "--dtype", "float32")
    reranked = read_trec_run(tmp_path / "reranked.run")
    assert {q: {e.docid for e in entries} for q, entries in reranked.items()} == \
        {q: {e.docid for e in entries} for q, entries in read_trec_run(tmp_path / "dev.run").items()}
    proc = run_cli("eval", "--qrels", str(tmp_path / "dev.qrels"), "--run", str(tmp_path / "reranked.run"),
                   "--metrics", "nDCG@10,RR@10", "--json")
    figures = json.loads(proc.stdout)
    assert figures["queries"] == 2 and figures["averaged_over"] == "run_judged_queries"
    # the final step's [eval] figure is this very evaluation
    assert figures["nDCG@10"] == pytest.approx(records[-1]["eval_nDCG@10"], abs=1e-6)
