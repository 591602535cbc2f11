"""Recipes: typed keys, errors naming the key (and the closest valid one), --set overrides, paths."""

from pathlib import Path

import pytest

from tsarank_engine.errors import TsarankError
from tsarank_engine.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

BASE = """
[run]
stage = "sft"
output_dir = "out"
[model]
path = "models/cpt"
[data]
path = "/data/groups.jsonl"
[train]
max_steps = 10
batch_size = 2
lr = 3e-5
warmup_ratio = 0.03
[sft]
trainable_top_blocks = 4
"""


def write(tmp_path, text):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_values_types_defaults_and_paths(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.run.stage == "sft" and recipe.train.lr == 3e-5 and recipe.sft.trainable_top_blocks == 4
    assert recipe.sft.tau == 0.001 and recipe.sft.group_size == 48 and recipe.data.max_query_tokens == 32
    assert recipe.model.path == str(tmp_path / "models/cpt") and recipe.run.output_dir == str(tmp_path / "out")
    assert recipe.data.path == "/data/groups.jsonl"  # absolute paths stay
    assert recipe.sft.w_kd == 0.0 and recipe.sft.t_kd == 1.0  # no distillation unless asked for


def test_overrides(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), ["train.lr=1e-4", "sft.tau=1", "model.dtype=bfloat16",
                                                 "data.skip_bad_rows=true", "run.output_dir=elsewhere",
                                                 "sft.w_kd=2", "sft.t_kd=0.5"])
    assert recipe.train.lr == 1e-4 and recipe.sft.tau == 1.0 and recipe.model.dtype == "bfloat16"
    assert recipe.sft.w_kd == 2.0 and recipe.sft.t_kd == 0.5
    assert recipe.data.skip_bad_rows is True and recipe.run.output_dir == str(tmp_path / "elsewhere")


@pytest.mark.parametrize("text,overrides,message", [
    (BASE.replace("warmup_ratio", "warmup_ration"), [],
     r"recipe.toml: unknown key train.warmup_ration \(did you mean 'warmup_ratio'\?\)"),
    (BASE.replace("lr = 3e-5", "lr = 3e-5\nlearning_rate = 1.0"), [],
     r"unknown key train.learning_rate \(valid: max_steps, batch_size, lr, "),
    (BASE + "[trian]\nlr = 1.0\n", [], r"unknown section \[trian\] \(did you mean 'train'\?\)"),
    (BASE.replace("batch_size = 2", 'batch_size = "2"'), [], "train.batch_size must be int, got str '2'"),
    (BASE, ["train.max_steps=ten"], r"--set train.max_steps=ten: train.max_steps must be int, got str 'ten'"),
    (BASE, ["train.max_steps=true"], "train.max_steps must be int, got bool"),
    (BASE, ["sft.group_sise=4"], r"--set sft.group_sise=4: unknown key sft.group_sise \(did you mean 'group_size'\?\)"),
    (BASE, ["lr=1"], r"--set 'lr=1': expected section.key=value"),
    (BASE, ["run.stage=pretrain"], "run.stage must be one of cpt, sft, got 'pretrain'"),
    (BASE, ["sft.w_kd=-0.5"], "sft.w_kd must be at least 0.0, got -0.5"),
    (BASE, ["sft.t_kd=0"], r"sft.t_kd must be at least 1e-09, got 0.0"),
    (BASE, ["sft.w_kd=true"], "sft.w_kd must be float, got bool"),
])
def test_bad_keys_and_values_are_named(tmp_path, text, overrides, message):
    with pytest.raises(TsarankError, match=message):
        load_recipe(write(tmp_path, text), overrides)


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.toml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_bundled_recipe_loads(path):
    recipe = load_recipe(path)  # every key known and of its type
    if path.parent.name == "distill":  # stage 2 with distillation, on what the recipe's README writes
        assert recipe.run.stage == "sft" and recipe.sft.w_kd > 0
        assert Path(recipe.data.path).is_relative_to(RECIPES.parent / "runs")


def test_missing_required_key_and_bad_files(tmp_path):
    with pytest.raises(TsarankError, match="data.path is required"):
        load_recipe(write(tmp_path, BASE.replace('path = "/data/groups.jsonl"', "")))
    with pytest.raises(TsarankError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[run\n"))
    with pytest.raises(TsarankError, match="recipe not found"):
        load_recipe(tmp_path / "missing.toml")


EVAL = """
[eval]
run = "dev/run.txt"
queries = "dev/queries.jsonl"
corpus = "/dev-set/corpus.jsonl"
qrels = "dev/qrels.txt"
"""


def test_eval_section_is_off_by_default_and_its_paths_resolve(tmp_path):
    off = load_recipe(write(tmp_path, BASE)).eval
    assert off.run == "" and off.every_steps == 0 and off.top_k == 100 and off.metric == "nDCG@10"
    assert off.keep_best is False and off.max_query_tokens is None and off.max_doc_tokens is None
    on = load_recipe(write(tmp_path, BASE + EVAL), ["eval.max_doc_tokens=64", "eval.every_steps=50"]).eval
    assert on.run == str(tmp_path / "dev/run.txt") and on.qrels == str(tmp_path / "dev/qrels.txt")
    assert on.corpus == "/dev-set/corpus.jsonl" and on.max_doc_tokens == 64 and on.every_steps == 50


@pytest.mark.parametrize("text,overrides,message", [
    (BASE + EVAL.replace('qrels = "dev/qrels.txt"', ""), [], "eval.qrels is required when eval.run is set"),
    (BASE + EVAL, ["eval.queries="], "eval.queries is required when eval.run is set"),
    (BASE + EVAL, ["eval.metric=nDGC@10"], r"eval.metric: unknown measure in nDGC@10"),
    (BASE + EVAL, ["eval.max_doc_tokens=0"], "eval.max_doc_tokens must be at least 1, got 0"),
    (BASE + EVAL, ["eval.batch_tokens=many"], "eval.batch_tokens must be int, got str 'many'"),
    (BASE + EVAL, ["eval.keep_best=1"], "eval.keep_best must be bool, got int 1"),
])
def test_bad_eval_settings_are_named(tmp_path, text, overrides, message):
    with pytest.raises(TsarankError, match=message):
        load_recipe(write(tmp_path, text), overrides)

