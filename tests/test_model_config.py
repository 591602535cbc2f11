import pytest

from tsarank_engine.errors import TsarankError
from tsarank_engine.model_config import ModelConfig

from conftest import tiny_config


@pytest.mark.parametrize("family,arch,qkv_bias,qk_norm,tied", [
    ("llama", "LlamaForCausalLM", False, False, False),
    ("mistral", "MistralForCausalLM", False, False, False),
    ("qwen2", "Qwen2ForCausalLM", True, False, True),
    ("qwen3", "Qwen3ForCausalLM", False, True, True),
])
def test_families_from_transformers_configs(family, arch, qkv_bias, qk_norm, tied):
    raw = tiny_config(family).to_dict()
    raw["architectures"] = [arch]
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.architecture, cfg.qkv_bias, cfg.qk_norm, cfg.tie_word_embeddings) == (arch, qkv_bias, qk_norm, tied)
    assert (cfg.num_heads, cfg.num_kv_heads) == (6, 2)
    assert cfg.head_dim == (16 if family == "qwen3" else 8)


def test_llama3_rope_from_new_and_old_config_styles():
    new = tiny_config("llama3").to_dict() | {"architectures": ["LlamaForCausalLM"]}
    assert new["rope_parameters"]["rope_type"] == "llama3"  # transformers >= 5 writes rope_parameters
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old |= {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    assert ModelConfig.from_dict(new).rope == ModelConfig.from_dict(old).rope
    assert ModelConfig.from_dict(old).rope.theta == 500000.0


def _llama_raw(**changes):
    return tiny_config("llama").to_dict() | {"architectures": ["LlamaForCausalLM"]} | changes


@pytest.mark.parametrize("changes,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture ['GPT2LMHeadModel']; supported: "
     "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' unsupported; supported: default, linear, llama3"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' unsupported"),
    ({"num_key_value_heads": 4}, "num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
    ({"hidden_size": "48"}, "key 'hidden_size' must be a positive int, got '48'"),
    ({"head_dim": "8"}, "key 'head_dim' must be a positive int, got '8'"),
    ({"num_key_value_heads": 0}, "key 'num_key_value_heads' must be a positive int, got 0"),
    ({"rms_norm_eps": True}, "key 'rms_norm_eps' must be a positive float, got True"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "2"}}, "rope parameter 'factor' must be a positive float, got '2'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1}}, "rope_theta must be a positive float, got -1.0"),
    ({"mlp_bias": True}, "mlp_bias=true is unsupported"),
])
def test_config_errors_name_the_problem(changes, message):
    with pytest.raises(TsarankError) as err:
        ModelConfig.from_dict(_llama_raw(**changes), source="x/config.json")
    assert str(err.value).startswith("x/config.json: ") and message in str(err.value)


def test_missing_key_and_missing_file(tmp_path):
    raw = _llama_raw()
    del raw["vocab_size"]
    with pytest.raises(TsarankError, match="missing key 'vocab_size' required for LlamaForCausalLM"):
        ModelConfig.from_dict(raw)
    with pytest.raises(TsarankError, match=f"{tmp_path}/config.json: no config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TsarankError, match="config.json: not valid JSON"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(TsarankError, match="config.json: expected a JSON object, got list"):
        ModelConfig.from_dir(tmp_path)


def test_sliding_window_only_when_used():
    assert ModelConfig.from_dict(_llama_raw()).sliding_window is None
    qwen = tiny_config("qwen2").to_dict() | {"architectures": ["Qwen2ForCausalLM"], "sliding_window": 32}
    assert ModelConfig.from_dict(qwen).sliding_window is None  # use_sliding_window is false
    mistral = tiny_config("mistral", sliding_window=32).to_dict() | {"architectures": ["MistralForCausalLM"]}
    assert ModelConfig.from_dict(mistral).sliding_window == 32
