"""Checkpoints whose config.json transformers itself wrote, in each of its forms (no hand-added `architectures`),
score as transformers scores them: the family comes from model_type where architectures is null or missing."""

import json
import shutil

import pytest
import torch
import transformers

from tsarank_engine.data.prompting import PromptBuilder
from tsarank_engine.rank.scoring import score_pairs
from tsarank_engine.data.tokenization import Tokenizer
from tsarank_engine.model.loading import load_model

from conftest import sample_pairs, save_tiny_model, tiny_config
from paper_reference import paper_scores, paper_sequences

FAMILIES = ["llama", "llama3", "llama_linear", "mistral", "qwen2", "qwen3"]
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}  # by model_type
ROPE_TYPES = {"llama3": "llama3", "llama_linear": "linear"}  # by tiny_config family; the others: default


@pytest.fixture(scope="module", params=FAMILIES)
def saved_model(request, tmp_path_factory, bpe_tokenizer_dir):
    """(family, a checkpoint saved by the model's save_pretrained, the tokenizer included)."""
    out = tmp_path_factory.mktemp(request.param)
    save_tiny_model(tiny_config(request.param), out, bpe_tokenizer_dir)
    return request.param, out


def _write_config(family, form, model_dir):
    """Rewrite model_dir/config.json in `form` from a fresh config (save_tiny_model's model filled in its own
    config's architectures); the config.json as it is written."""
    config, path = tiny_config(family), model_dir / "config.json"
    if form == "config.save_pretrained":  # a bare config: only what differs from the defaults
        config.save_pretrained(model_dir)
    elif form == "config.to_json_file":  # every field, architectures as null
        config.to_json_file(path, use_diff=False)
    elif form == "legacy":  # the pre-5 layout: rope_theta at the top level, scaling (if any) in rope_scaling
        raw = config.to_dict()
        params = raw.pop("rope_parameters")
        raw["rope_theta"] = params.pop("rope_theta")
        raw["rope_scaling"] = None if params == {"rope_type": "default"} else params
        path.write_text(json.dumps(raw))
    return json.loads(path.read_text())


@pytest.mark.parametrize("form", ["model.save_pretrained", "config.save_pretrained", "config.to_json_file",
                                  "legacy"])
def test_scores_match_transformers(saved_model, form, tmp_path, bpe_tokenizer_dir):
    family, saved = saved_model
    model_dir = tmp_path / "model"
    shutil.copytree(saved, model_dir)
    written = _write_config(family, form, model_dir)
    # what each form leaves in architectures: the model path is the only one that names it
    assert written.get("architectures", "missing") == {
        "model.save_pretrained": [ARCHITECTURES[written["model_type"]]],
        "config.save_pretrained": "missing",
        "config.to_json_file": None,
        "legacy": None,
    }[form]

    rows = sample_pairs(8)
    builder = PromptBuilder(Tokenizer.from_dir(model_dir))
    model = load_model(model_dir).eval()
    assert model.config.architecture == ARCHITECTURES[written["model_type"]]
    assert model.config.rope.rope_type == ROPE_TYPES.get(family, "default")
    ours = score_pairs(model, [builder.build(r["query"], r["document"]) for r in rows])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # The tokenizer from its own directory: from the checkpoint's, transformers would pick one by model_type
    # (Qwen2Tokenizer ignores clean_up_tokenization_spaces), which is not what these tests are about.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    expected = paper_scores(hf_model, paper_sequences(hf_tokenizer, rows))
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
