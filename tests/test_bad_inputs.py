"""Bad inputs across recipes, data files, checkpoints and command-line options, one table: each must end with a
non-zero exit and one clear message naming the file and line, key or tensor, without a Python traceback
(unless --debug). The CLI runs in-process (click's runner) on a tiny LLaMA."""

import json
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tsarank_engine.cli import main

from conftest import DATA_DIR
from test_trainer import CPT

PAIR = {"qid": "q1", "docid": "d1", "query": "what is a ranker", "document": "A ranker orders documents."}


def _model_copy(ctx, edit=None, config=None, drop=()):
    """A copy of the tiny model with its weights edited, its config replaced or files removed."""
    out = ctx["tmp"] / "model"
    shutil.copytree(ctx["model"], out)
    if edit:
        tensors = load_file(out / "model.safetensors")
        edit(tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if config:
        raw = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(config(raw) if callable(config) else config)
    for name in drop:
        (out / name).unlink()
    return out


def _score(ctx, model):
    pairs = ctx["tmp"] / "pairs.jsonl"
    pairs.write_text(json.dumps(PAIR) + "\n")
    return ["score", "--model", str(model), "--pairs", str(pairs), "--out", str(ctx["tmp"] / "scores.jsonl")]


def _recipe(ctx, text=None, **replace):
    text = text or CPT.format(out=ctx["tmp"] / "run", model=ctx["model"], data=DATA_DIR)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = ctx["tmp"] / "recipe.toml"
    path.write_text(text)
    return path


def _train(ctx, *extra, **replace):
    return ["train", str(_recipe(ctx, **replace)), "--device", "cpu", *extra]


def _data(ctx, name, lines):
    path = ctx["tmp"] / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _train_on(ctx, stage_data, lines):
    data = _data(ctx, "data.jsonl", lines)
    if stage_data == "sft":
        text = CPT.format(out=ctx["tmp"] / "run", model=ctx["model"], data=DATA_DIR).replace('stage = "cpt"', 'stage = "sft"')
        text = text.replace(str(DATA_DIR / "text_pairs.jsonl"), str(data)) + "[sft]\ngroup_size = 2\n"
        return ["train", str(_recipe(ctx, text)), "--device", "cpu"]
    return _train(ctx, **{str(DATA_DIR / "text_pairs.jsonl"): str(data)})


def _pairs_lines():
    return (DATA_DIR / "text_pairs.jsonl").read_text().splitlines()


def _groups_lines():
    return (DATA_DIR / "msmarco_groups.jsonl").read_text().splitlines()


def _doc(text="A ranker orders documents."):
    return json.dumps({"_id": "d1", "text": text})


def _rerank_run(ctx, run_lines, corpus_lines=(_doc(),)):
    run = _data(ctx, "run.trec", run_lines)
    queries = _data(ctx, "queries.jsonl", [json.dumps({"_id": "q1", "text": "what is a ranker"})])
    corpus = _data(ctx, "corpus.jsonl", list(corpus_lines))
    return ["rerank", "--model", str(ctx["model"]), "--run", str(run), "--queries", str(queries), "--corpus",
            str(corpus), "--out", str(ctx["tmp"] / "out.trec")]


def _rerank_input(ctx, lines):
    top = _data(ctx, "top.jsonl", lines)
    return ["rerank", "--model", str(ctx["model"]), "--input", str(top), "--out", str(ctx["tmp"] / "out.trec")]


def _eval_line(qid):
    return json.dumps({"qid": qid, "pid": "d1", "query": PAIR["query"], "passage": PAIR["document"]})


def _held_run(ctx):
    (ctx["tmp"] / "run").mkdir()
    (ctx["tmp"] / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    return _train(ctx)


def _misshapen(t):
    name = next(k for k in t if k.endswith("q_proj.weight"))
    t[name] = t[name][:-1]


# id -> (argv builder, substrings the message must hold). {tmp} is the case's directory, {model} the model's.
CASES = {
    # recipes and --set
    "recipe-unknown-key": (lambda c: _train(c, warmup_ratio="warmup_ration"), ["warmup_ration", "did you mean 'warmup_ratio'"]),
    "recipe-unknown-section": (lambda c: _train(c, **{"[checkpoint]": "[checkpoints]"}), ["checkpoints"]),
    "recipe-wrong-type": (lambda c: _train(c, **{"lr = 1e-3": 'lr = "fast"'}), ["train.lr", "float", "'fast'"]),
    "recipe-out-of-range": (lambda c: _train(c, **{"warmup_ratio = 0.25": "warmup_ratio = 2.5"}),
                            ["train.warmup_ratio", "between 0.0 and 1.0"]),
    "recipe-toml-syntax": (lambda c: _train(c, **{"lr = 1e-3": "lr = = 1"}), ["{tmp}/recipe.toml", "line"]),
    "recipe-missing-required": (lambda c: _train(c, **{"batch_size = 4": ""}), ["train.batch_size"]),
    "recipe-file-missing": (lambda c: ["train", str(c["tmp"] / "nope.toml")], ["nope.toml", "recipe not found"]),
    "set-without-equals": (lambda c: _train(c, "--set", "train.lr"), ["--set", "train.lr", "section.key=value"]),
    "set-bad-path": (lambda c: _train(c, "--set", "trian.lr=1"), ["trian"]),
    "set-bad-value": (lambda c: _train(c, "--set", "train.batch_size=many"), ["train.batch_size", "many"]),
    "output-holds-a-run": (_held_run, ["{tmp}/run", "already holds a run", "--resume", "--overwrite"]),
    # models and checkpoints
    "model-dir-missing": (lambda c: _train(c, **{str(c["model"]): str(c["tmp"] / "gone")}), ["{tmp}/gone"]),
    "model-architecture": (lambda c: _score(c, _model_copy(c, config=lambda r: json.dumps({**r, "architectures": ["GPT2LMHeadModel"]}))),
                           ["unsupported architecture", "GPT2LMHeadModel"]),
    "model-config-not-json": (lambda c: _score(c, _model_copy(c, config="{not json")), ["{tmp}/model/config.json", "JSON"]),
    "safetensors-missing-tensor": (lambda c: _score(c, _model_copy(c, edit=lambda t: t.pop("model.norm.weight"))),
                                   ["model.norm.weight"]),
    "safetensors-extra-tensor": (lambda c: _score(c, _model_copy(c, edit=lambda t: t.update(stray=t["model.norm.weight"].clone()))),
                                 ["stray"]),
    "safetensors-misshapen": (lambda c: _score(c, _model_copy(c, edit=_misshapen)), ["q_proj.weight", "shape"]),
    "safetensors-truncated": (lambda c: _score(c, _truncated(c)), ["{tmp}/model/model.safetensors"]),
    "tokenizer-missing": (lambda c: _score(c, _model_copy(c, drop=["tokenizer.json"])), ["tokenizer"]),
    "export-not-a-checkpoint": (lambda c: ["export", str(c["model"]), str(c["tmp"] / "x")],
                                ["not a complete training checkpoint"]),
    # data files
    "data-malformed-json": (lambda c: _train_on(c, "cpt", _pairs_lines()[:3] + ['{"query": "x"'] + _pairs_lines()[3:]),
                            ["{tmp}/data.jsonl:4", "JSON"]),
    "data-missing-field": (lambda c: _train_on(c, "cpt", _pairs_lines()[:1] + [json.dumps({"query": "Document: x Query:"})]),
                           ["{tmp}/data.jsonl:2", "response"]),
    "data-group-without-positives": (
        lambda c: _train_on(c, "sft", _groups_lines()[:2] + [json.dumps({**json.loads(_groups_lines()[2]), "positive_passages": []})]),
        ["{tmp}/data.jsonl:3", "positive"]),
    "data-group-without-teacher-scores": (lambda c: _train_on(c, "sft", _groups_lines()[:1]) + ["--set", "sft.w_kd=1"],
                                          ["{tmp}/data.jsonl:1", "missing field 'score' in positive_passages[0]",
                                           "sft.w_kd > 0"]),
    "data-file-missing": (lambda c: _train(c, **{str(DATA_DIR / "text_pairs.jsonl"): str(c["tmp"] / "none.jsonl")}),
                          ["{tmp}/none.jsonl"]),
    "pairs-malformed-json": (lambda c: ["score", "--model", str(c["model"]), "--pairs", str(_data(c, "p.jsonl", [json.dumps(PAIR), "{"])),
                                        "--out", str(c["tmp"] / "s.jsonl")], ["{tmp}/p.jsonl:2"]),
    # reranking and evaluation
    "run-empty": (lambda c: _rerank_run(c, []), ["{tmp}/run.trec", "empty"]),
    "run-unknown-document": (lambda c: _rerank_run(c, ["q1 Q0 d1 1 9.0 bm25", "q1 Q0 d7 2 8.0 bm25"]),
                             ["{tmp}/run.trec:2", "d7"]),
    "run-malformed-line": (lambda c: _rerank_run(c, ["q1 Q0 d1 1 high bm25"]), ["{tmp}/run.trec:1", "high"]),
    "rerank-input-and-run": (lambda c: _rerank_run(c, ["q1 Q0 d1 1 9.0 bm25"]) + ["--input", str(c["tmp"] / "run.trec")],
                             ["--input", "--run"]),
    "corpus-needed-text-not-string": (lambda c: _rerank_run(c, ["q1 Q0 d1 1 9.0 bm25"], [_doc(text=7)]),
                                      ["{tmp}/corpus.jsonl:1", "'text' must be a string"]),
    "corpus-malformed-json": (lambda c: _rerank_run(c, ["q1 Q0 d1 1 9.0 bm25"], [_doc(), "{"]),
                              ["{tmp}/corpus.jsonl:2", "JSON"]),
    "corpus-line-without-id": (lambda c: _rerank_run(c, ["q1 Q0 d1 1 9.0 bm25"], [_doc(), json.dumps({"text": "x"})]),
                               ["{tmp}/corpus.jsonl:2", "'_id'"]),
    "input-bad-last-line": (lambda c: _rerank_input(c, [_eval_line("q1"), _eval_line("q2"), '{"qid": "q1"}']),
                            ["{tmp}/top.jsonl:3", "'pid'"]),
    "eval-rel-threshold-zero": (lambda c: ["eval", "--qrels", str(DATA_DIR / "dl19_qrels.txt"), "--run",
                                           str(_data(c, "r.trec", ["19335 Q0 1017759 1 2.0 x"])),
                                           "--rel-threshold", "0"],
                                ["--rel-threshold", "0"]),
    "eval-unknown-measure": (lambda c: ["eval", "--qrels", str(DATA_DIR / "dl19_qrels.txt"), "--run",
                                        str(_data(c, "r.trec", ["19335 Q0 1017759 1 2.0 x"])), "--metrics", "nDCG@ten"],
                             ["nDCG@ten"]),
    "eval-qrels-missing": (lambda c: ["eval", "--qrels", str(c["tmp"] / "q.txt"), "--run", str(_data(c, "r.trec", ["1 Q0 2 1 1.0 x"]))],
                           ["{tmp}/q.txt"]),
}


def _truncated(ctx):
    model = _model_copy(ctx)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_message(case, tmp_path, tiny_llama_dir):
    build, expected = CASES[case]
    ctx = {"tmp": tmp_path, "model": tiny_llama_dir}
    argv = build(ctx)
    result = CliRunner().invoke(main, argv)
    output = result.output
    assert result.exit_code != 0, output
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}\n{output}"
    assert "Traceback" not in output
    for text in expected:
        assert text.format(tmp=tmp_path, model=tiny_llama_dir) in output, (text, output)


def test_debug_shows_the_traceback(tmp_path, tiny_llama_dir):
    ctx = {"tmp": tmp_path, "model": tiny_llama_dir}
    result = CliRunner().invoke(main, ["--debug", *_train(ctx, warmup_ratio="warmup_ration")])
    assert result.exit_code != 0 and not isinstance(result.exception, SystemExit)  # raised for the traceback
