"""Evaluation during training ([eval]) on a tiny LLaMA and a small dev set cut from the bundled sample: the
records equal what `rerank` + `eval` give on the exported model of the step, keep_best's best/, the best value
and the records through a kill and --resume, 2 ranks under torchrun against 1 process; the shared scoring's
padding to the ranks' agreed number of forwards, the dealing of queries, the in-memory evaluation, the
recipe's resumable keys, and a bfloat16 model scored on the mixed path."""

import json
import signal
from dataclasses import asdict, replace

import pytest
import torch
from click.testing import CliRunner

import tsarank_engine.rank.reranking as reranking
from tsarank_engine.cli import main
from tsarank_engine.distributed import Processes
from tsarank_engine.errors import TsarankError
from tsarank_engine.rank.evaluation import evaluate, evaluate_run, parse_measures
from tsarank_engine.data.prompting import PromptBuilder
from tsarank_engine.data.readers import read_qrels, read_trec_run, rerank_pairs_from_run
from tsarank_engine.recipe import EvalSettings, load_recipe
from tsarank_engine.rank.reranking import group_by_query, score_queries
from tsarank_engine.rank.scoring import score_pairs
from tsarank_engine.data.tokenization import Tokenizer
from tsarank_engine.training.validation import TrainingEvaluation
from tsarank_engine.training.run_dir import recipe_changes
from tsarank_engine.model.loading import load_model

from conftest import msmarco_groups
from test_trainer import SFT, metrics, recipe, run_cli, weights

pytest.importorskip("ir_measures")  # installed with the package; absent on the bare GPU box

# Paths relative to the recipe's folder, as a user would write them.
EVAL = """
[eval]
run = "dev/run.txt"
queries = "dev/queries.jsonl"
corpus = "dev/corpus.jsonl"
qrels = "dev/qrels.txt"
top_k = 4
"""
KEY = "eval_nDCG@10"
LEARNING = ["--set", "train.lr=1e-2"]  # learns fast enough for the ranking to change within a few steps


def dev_set(folder, queries=4, judged=3):
    """A BEIR dev set from the sample's last groups: per query 5 candidates in the run, the positive third (top_k
    4 keeps it); the positives of the first `judged` queries judged (grade 1), the rest unjudged; the qrels
    also judge a query the run lacks."""
    folder.mkdir(parents=True, exist_ok=True)
    run, qs, corpus, qrels = [], [], {}, []
    for g in msmarco_groups()[-queries:]:
        qs.append({"_id": g["query_id"], "text": g["query"]})
        negatives = g["negative_passages"][:4]
        passages = negatives[:2] + g["positive_passages"][:1] + negatives[2:]
        for rank, p in enumerate(passages, 1):
            run.append(f"{g['query_id']} Q0 {p['docid']} {rank} {100 - rank} bm25")
            corpus[p["docid"]] = {"_id": p["docid"], "title": "", "text": p["text"]}
        if len(qrels) < judged:
            qrels.append(f"{g['query_id']} 0 {g['positive_passages'][0]['docid']} 1")
    qrels.append("not-in-the-run 0 x 1")
    (folder / "run.txt").write_text("\n".join(run) + "\n")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (folder / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus.values()))
    (folder / "qrels.txt").write_text("\n".join(qrels) + "\n")
    return folder


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def rerank_and_eval(model_dir, dev, tmp_path):
    """nDCG@10 of `model_dir` by the `rerank` and `eval` commands."""
    out = tmp_path / f"{model_dir.parent.name}-{model_dir.name}.run"
    invoke("rerank", "--model", model_dir, "--run", dev / "run.txt", "--queries", dev / "queries.jsonl",
           "--corpus", dev / "corpus.jsonl", "--top-k", 4, "--device", "cpu", "--dtype", "float32", "--out", out)
    return json.loads(invoke("eval", "--qrels", dev / "qrels.txt", "--run", out, "--metrics", "nDCG@10",
                             "--json"))["nDCG@10"]


def evals(out):
    return {m["step"]: m[KEY] for m in metrics(out) if KEY in m}


def best_record(out):
    return json.loads((out / "best" / "eval.json").read_text())


@pytest.mark.slow
def test_records_equal_rerank_and_eval_of_the_steps_model_and_best_is_kept(tmp_path, tiny_llama_dir):
    dev = dev_set(tmp_path / "dev")
    path = recipe(tmp_path, SFT + EVAL, tiny_llama_dir, "run")
    # lr 1e-2: the ranking changes within a few steps (measured: nDCG@10 0.754 after step 1, 0.877 after 2-4)
    proc = run_cli("train", str(path), "--device", "cpu", *LEARNING, "--set", "checkpoint.every_steps=1",
                   "--set", "checkpoint.keep_last=4", "--set", "eval.every_steps=1", "--set", "eval.keep_best=true")
    out = tmp_path / "run"
    records = metrics(out)
    assert [m["step"] for m in records if KEY in m] == [1, 2, 3, 4]
    assert all(0 <= m[KEY] <= 1 and m["eval_time_s"] > 0 for m in records if KEY in m)
    assert "evaluating step 2" in proc.stderr and "over 3 queries" in proc.stderr  # the unjudged one left out

    for step in (1, 2):
        invoke("export", out / "checkpoints" / f"step-{step}", tmp_path / f"step{step}")
    value = evals(out)
    assert value[1] != value[4]  # the model moved: each record is its own step's model's
    assert value[1] == pytest.approx(rerank_and_eval(tmp_path / "step1", dev, tmp_path), abs=1e-6)
    assert value[4] == pytest.approx(rerank_and_eval(out / "final", dev, tmp_path), abs=1e-6)

    best = max(value, key=lambda s: (value[s], -s))  # the first of equal values stays the best
    assert best_record(out) == {"step": best, "metric": "nDCG@10", "value": value[best]}
    exported, kept = weights(tmp_path / f"step{best}"), weights(out / "best")
    assert exported.keys() == kept.keys() and all(torch.equal(exported[k], kept[k]) for k in kept)
    assert (out / "best" / "tokenizer.json").is_file() and load_model(out / "best").config.num_layers == 2


@pytest.mark.slow
def test_resume_keeps_the_records_and_the_best_value(tmp_path, tiny_llama_dir):
    dev_set(tmp_path / "dev")
    extra = [*LEARNING, "--set", "eval.every_steps=1", "--set", "eval.keep_best=true"]
    run_cli("train", str(recipe(tmp_path, SFT + EVAL, tiny_llama_dir, "straight")), "--device", "cpu", *extra)
    killed = recipe(tmp_path, SFT + EVAL, tiny_llama_dir, "killed")
    proc = run_cli("train", str(killed), "--device", "cpu", *extra, env={"TSARANK_KILL_AT": "step:3"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state_file = tmp_path / "killed" / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    before = evals(tmp_path / "straight")
    best_before_kill = max((1, 2), key=lambda s: (before[s], -s))
    assert state["eval_best"]["step"] == best_before_kill and state["eval_best"]["value"] == before[best_before_kill]
    assert best_record(tmp_path / "killed")["step"] == best_before_kill

    # A best value no later step can beat: kept through the resume, no later step is exported as the best.
    state["eval_best"]["value"] = 2.0
    state_file.write_text(json.dumps(state))
    # eval keys may change on resume: every 2 steps from now on
    resumed = run_cli("train", str(killed), "--device", "cpu", "--resume", *LEARNING, "--set", "eval.every_steps=2",
                      "--set", "eval.keep_best=true")
    assert evals(tmp_path / "killed") == {s: v for s, v in before.items() if s in (1, 2, 4)}
    final_state = json.loads((tmp_path / "killed" / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert final_state["eval_best"]["value"] == 2.0 and final_state["eval_best"]["step"] == best_before_kill
    assert best_record(tmp_path / "killed")["step"] == best_before_kill
    assert f"best nDCG@10: 2.0000 at step {best_before_kill}" in resumed.stderr


@pytest.mark.slow
def test_two_ranks_give_the_values_of_one_process(tmp_path, tiny_llama_dir):
    dev_set(tmp_path / "dev", queries=5, judged=5)  # 3 queries on rank 0, 2 on rank 1
    # Rows of 96 tokens: a row or two per pair, so the ranks run different numbers of rows and pad.
    extra = ["--set", "eval.every_steps=2", "--set", "eval.keep_best=true", "--set", "eval.batch_tokens=96",
             "--set", "eval.max_doc_tokens=24"]
    run_cli("train", str(recipe(tmp_path, SFT + EVAL, tiny_llama_dir, "one")), "--device", "cpu", *extra)
    run_cli("train", str(recipe(tmp_path, SFT + EVAL, tiny_llama_dir, "two")), "--device", "cpu", *extra,
            nproc=2)
    one, two = evals(tmp_path / "one"), evals(tmp_path / "two")
    assert one.keys() == two.keys() == {2, 4}
    assert all(two[s] == pytest.approx(one[s], abs=1e-6) for s in one)
    assert best_record(tmp_path / "two")["step"] == best_record(tmp_path / "one")["step"]
    w1, w2 = weights(tmp_path / "one" / "best"), weights(tmp_path / "two" / "best")
    assert w1.keys() == w2.keys() and all(w2[k].dtype == torch.float32 for k in w2)  # gathered masters
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_score_queries_pads_to_the_agreed_rows_and_keeps_the_scores(tmp_path, tiny_llama_dir, monkeypatch):
    dev = dev_set(tmp_path / "dev")
    grouped = group_by_query(rerank_pairs_from_run(dev / "run.txt", dev / "queries.jsonl", dev / "corpus.jsonl", 4))
    model = load_model(tiny_llama_dir).eval()
    builder = PromptBuilder(Tokenizer.from_dir(tiny_llama_dir), max_doc_tokens=24)
    calls, real = [], reranking.score_pairs
    monkeypatch.setattr(reranking, "score_pairs", lambda *a: calls.append(1) or real(*a))
    done = []
    plain = score_queries(model, builder, grouped, batch_tokens=96, on_row=done.append)
    rows = len(calls)
    assert rows > 1 and sum(done) == 16
    padded = score_queries(model, builder, grouped, batch_tokens=96, agree_rows=lambda n: n + 2, on_row=done.append)
    assert len(calls) == 2 * rows + 2 and padded == plain and sum(done) == 32  # repeats run, their scores dropped
    assert list(plain) == list(grouped) and [len(s) for s in plain.values()] == [4] * 4
    at_once = score_pairs(model, [builder.build(p.query, p.passage) for pairs in grouped.values() for p in pairs], 96)
    assert [s for scores in plain.values() for s in scores] == pytest.approx(at_once, abs=1e-6)


def test_queries_are_dealt_to_ranks_judged_ones_only(tmp_path, tiny_llama_dir):
    dev = dev_set(tmp_path / "dev", queries=4, judged=3)
    settings = EvalSettings(run=str(dev / "run.txt"), queries=str(dev / "queries.jsonl"),
                            corpus=str(dev / "corpus.jsonl"), qrels=str(dev / "qrels.txt"), top_k=4)
    tokenizer = Tokenizer.from_dir(tiny_llama_dir)
    judged = list(read_qrels(dev / "qrels.txt"))[:3]

    def evaluation(rank, world, **changes):
        return TrainingEvaluation(replace(settings, **changes), tokenizer,
                                  Processes(rank, world, torch.device("cpu"), None), tmp_path, tiny_llama_dir,
                                  tiny_llama_dir)

    shares = [evaluation(r, 2) for r in range(2)]
    assert [list(e.my_queries) for e in shares] == [judged[0::2], judged[1::2]] and all(e.owns_queries for e in shares)
    spare = evaluation(3, 4)  # more ranks than judged queries: it scores the first along, for nobody
    assert list(spare.my_queries) == judged[:1] and not spare.owns_queries
    (dev / "other_qrels.txt").write_text("elsewhere 0 x 1\n")
    with pytest.raises(TsarankError, match="eval.run .*run.txt: none of its queries has judgements in eval.qrels"):
        evaluation(0, 1, qrels=str(dev / "other_qrels.txt"))


def test_in_memory_evaluation_is_evaluate_runs(tmp_path):
    dev = dev_set(tmp_path / "dev")
    run = {q: {e.docid: e.score for e in entries} for q, entries in read_trec_run(dev / "run.txt").items()}
    in_memory = evaluate(read_qrels(dev / "qrels.txt"), run, parse_measures(["nDCG@10", "RR@10"]))
    assert in_memory == evaluate_run(dev / "qrels.txt", dev / "run.txt", ["nDCG@10", "RR@10"])
    assert in_memory.queries == 3 and 0 < in_memory.measures["nDCG@10"] < 1  # the positive third: not perfect


def test_eval_keys_may_change_on_resume(tmp_path):
    dev = dev_set(tmp_path / "dev")
    path = tmp_path / "r.toml"
    path.write_text(SFT.format(out=tmp_path / "out", model="m", data="d") + EVAL)
    stored = asdict(load_recipe(path))
    changed = load_recipe(path, ["eval.every_steps=10", "eval.metric=RR@10", "eval.keep_best=true", "eval.top_k=2",
                                 "eval.batch_tokens=64", f"eval.run={dev / 'other.txt'}"])
    assert recipe_changes(stored, changed) == []
    assert recipe_changes(stored, replace(changed, train=replace(changed.train, lr=1.0)))  # others still count


def test_evaluation_scores_a_bfloat16_model_on_the_mixed_path(tmp_path, tiny_llama_dir, monkeypatch):
    """Where training computes in bfloat16 (FSDP gathers bf16 copies of every parameter), [eval] scores with the
    residual stream, norms and logits in float32 as the mixed path does, every product in training's bf16 (on the
    CPU `rerank --dtype bfloat16` also keeps q/k/v and the head float32): closer to float32 than the all-bfloat16
    forward."""
    import tsarank_engine.training.validation as validation

    dev = dev_set(tmp_path / "dev", queries=4, judged=4)
    settings = EvalSettings(run=str(dev / "run.txt"), queries=str(dev / "queries.jsonl"),
                            corpus=str(dev / "corpus.jsonl"), qrels=str(dev / "qrels.txt"), top_k=4)
    builder = PromptBuilder(Tokenizer.from_dir(tiny_llama_dir))
    grouped = group_by_query(rerank_pairs_from_run(dev / "run.txt", dev / "queries.jsonl", dev / "corpus.jsonl", 4))
    exact = score_queries(load_model(tiny_llama_dir).eval(), builder, grouped, 2048)
    model = load_model(tiny_llama_dir, dtype=torch.bfloat16).train()
    pure = score_queries(model.eval(), builder, grouped, 2048)
    seen, real = [], validation.score_queries
    monkeypatch.setattr(validation, "score_queries",
                        lambda lm, *a, **k: seen.append((lm.model.residual_dtype, real(lm, *a, **k))) or seen[-1][1])
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        evaluation = TrainingEvaluation(settings, builder.tokenizer, Processes(0, 1, torch.device("cpu"), None),
                                        tmp_path, tiny_llama_dir, tiny_llama_dir)
        model.train()
        record = evaluation(model, model, 1, progress=False)
    finally:
        torch.distributed.destroy_process_group()
    [(residual, scores)] = seen
    assert residual == torch.float32 and model.model.residual_dtype is None and model.training
    error = {name: max(abs(a - b) for q in exact for a, b in zip(s[q], exact[q])) for name, s in
             (("eval", scores), ("pure", pure))}
    assert 0 < error["eval"] < error["pure"], error
    run = {q: dict(zip([p.docid for p in grouped[q]], scores[q])) for q in grouped}
    assert record[KEY] == evaluate(read_qrels(dev / "qrels.txt"), run, parse_measures(["nDCG@10"])).measures["nDCG@10"]
