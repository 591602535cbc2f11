import pytest

from tsarank_engine.errors import TsarankError
from tsarank_engine.model.config import ModelConfig, RopeConfig

from conftest import tiny_config


@pytest.mark.parametrize("family,arch,qkv_bias,qk_norm,tied", [
    ("llama", "LlamaForCausalLM", False, False, False),
    ("mistral", "MistralForCausalLM", False, False, False),
    ("qwen2", "Qwen2ForCausalLM", True, False, True),
    ("qwen3", "Qwen3ForCausalLM", False, True, True),
])
@pytest.mark.parametrize("architectures", ["named", "null", "missing"])
def test_families_from_transformers_configs(family, arch, qkv_bias, qk_norm, tied, architectures):
    # A bare config's to_dict() has architectures null and model_type set: model_type then names the family.
    raw = tiny_config(family).to_dict()
    assert raw["architectures"] is None and raw["model_type"] == family
    if architectures == "named":
        raw["architectures"] = [arch]
    elif architectures == "missing":
        del raw["architectures"]
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.architecture, cfg.qkv_bias, cfg.qk_norm, cfg.tie_word_embeddings) == (arch, qkv_bias, qk_norm, tied)
    assert (cfg.num_heads, cfg.num_kv_heads) == (6, 2)
    assert cfg.head_dim == (16 if family == "qwen3" else 8)


SUPPORTED = ("supported: architectures LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM; "
             "model_type llama, mistral, qwen2, qwen3")


def _llama_raw(**changes):
    return tiny_config("llama").to_dict() | {"architectures": ["LlamaForCausalLM"]} | changes


@pytest.mark.parametrize("changes,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture ['GPT2LMHeadModel'] (key 'architectures'); "
     + SUPPORTED),
    ({"architectures": ["LlamaForCausalLM", "LlamaModel"]}, "unsupported architecture ['LlamaForCausalLM', 'LlamaModel']"),
    ({"architectures": None, "model_type": "gpt2"}, "unsupported model_type 'gpt2' (key 'model_type'); " + SUPPORTED),
    ({"architectures": ["MistralForCausalLM"]}, "key 'architectures' ['MistralForCausalLM'] and key 'model_type' "
     "'llama' disagree (architecture MistralForCausalLM has model_type 'mistral'); " + SUPPORTED),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "gpt2"}, "key 'architectures' ['LlamaForCausalLM'] and "
     "key 'model_type' 'gpt2' disagree"),
    ({"architectures": None, "model_type": None}, "neither key 'architectures' nor key 'model_type' is set; " + SUPPORTED),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     "rope_parameters: rope type 'yarn' unsupported; supported: default, linear, llama3"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling: rope type 'dynamic' unsupported; supported: default, linear, llama3"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 4]}},
     "rope_parameters: rope key 'mrope_section' unsupported for rope type 'default'"),
    ({"rope_parameters": {"rope_type": "default", "factor": 2.0}}, "rope key 'factor' unsupported for rope type 'default'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0, "beta_fast": 32}},
     "rope key 'beta_fast' unsupported for rope type 'llama3'"),
    ({"rope_parameters": {"rope_type": "linear"}}, "rope type 'linear' requires 'factor'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": None}}, "rope type 'linear' requires 'factor'"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "rope_parameters: partial_rotary_factor 0.5 unsupported"),
    ({"partial_rotary_factor": 0.25}, "rope_parameters: partial_rotary_factor 0.25 unsupported"),
    ({"rope_parameters": {"rope_type": "linear", "type": "llama3", "factor": 2.0}},
     "rope_parameters: 'rope_type' 'linear' and 'type' 'llama3' disagree"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "both 'rope_parameters' and 'rope_scaling' are set"),
    ({"rope_parameters": [10000.0]}, "key 'rope_parameters' must be an object, got [10000.0]"),
    # per layer type without layer_types: transformers' LLaMA would silently run theta 10000 here
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
     "rope_parameters: rope key 'full_attention' unsupported for rope type 'default' (per-layer-type rope "
     "parameters are keyed by entries of layer_types)"),
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


@pytest.mark.parametrize("missing", ["factor", "low_freq_factor", "high_freq_factor",
                                     "original_max_position_embeddings"])
@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_llama3_parameters_are_required_not_defaulted(missing, key):
    raw = tiny_config("llama3").to_dict()
    params = {k: v for k, v in raw.pop("rope_parameters").items() if k != missing}
    with pytest.raises(TsarankError) as err:
        ModelConfig.from_dict(raw | {key: params}, source="x/config.json")
    assert str(err.value) == f"x/config.json: {key}: rope type 'llama3' requires {missing!r}"


def test_rope_forms_transformers_reads():
    """Flat rope_parameters, with rope_theta inside or at the top level, and the older rope_theta + rope_scaling
    keyed by `type` or `rope_type` (or null) all give the same rope."""
    raw = tiny_config("llama3").to_dict()
    new = ModelConfig.from_dict(raw).rope
    params = raw.pop("rope_parameters")
    theta = params.pop("rope_theta")
    legacy_type = {k: v for k, v in params.items() if k != "rope_type"} | {"type": "llama3"}
    for other in [{"rope_parameters": params, "rope_theta": theta},
                  {"rope_scaling": params, "rope_theta": theta},
                  {"rope_scaling": legacy_type, "rope_theta": theta},
                  {"rope_parameters": params | {"rope_theta": theta, "partial_rotary_factor": 1.0}}]:
        assert ModelConfig.from_dict(raw | other).rope == new, other
    default = tiny_config("llama").to_dict()
    del default["rope_parameters"]
    for old in [{"rope_theta": 5e5}, {"rope_theta": 5e5, "rope_scaling": None}]:
        assert ModelConfig.from_dict(default | old).rope == RopeConfig(theta=5e5)
    assert ModelConfig.from_dict(default).rope == RopeConfig(theta=10000.0)  # transformers' default_theta
    linear = {"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelConfig.from_dict(default | linear).rope == RopeConfig(theta=1e4, rope_type="linear", factor=2.0)


def _qwen3_raw(layer_types, rope_parameters, **changes):
    return tiny_config("qwen3").to_dict() | {"layer_types": layer_types, "rope_parameters": rope_parameters} | changes


LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_rope_per_layer_type():
    both = ["full_attention", "sliding_attention"]
    expected = ModelConfig.from_dict(_qwen3_raw(both, LLAMA3)).rope
    assert expected.rope_type == "llama3" and expected.theta == 5e5
    # identical for the types used (rope_type and rope_theta may be implied), anything for an unused one
    same = {"full_attention": LLAMA3, "sliding_attention": {k: v for k, v in LLAMA3.items() if k != "rope_theta"}}
    assert ModelConfig.from_dict(_qwen3_raw(both, same, rope_theta=5e5)).rope == expected
    unused = {"full_attention": LLAMA3, "sliding_attention": {"rope_type": "yarn", "factor": 4.0}, "chunked": None}
    assert ModelConfig.from_dict(_qwen3_raw(["full_attention"] * 2, unused)).rope == expected


@pytest.mark.parametrize("layer_types,rope_parameters,message", [
    (["full_attention", "sliding_attention"],
     {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}},
     "rope_parameters differs between layer types 'full_attention' ({'rope_theta': 1000000.0}) and "
     "'sliding_attention' ({'rope_theta': 10000.0}); the decoder applies one rope to every layer"),
    (["sliding_attention", "full_attention"], {"full_attention": {"rope_theta": 1e6}},
     "rope_parameters has no rope for layer type 'sliding_attention', which layer_types uses"),
    (["full_attention", "sliding_attention"], {"full_attention": {"rope_theta": 1e6}, "sliding_attention": None},
     "rope_parameters has no rope for layer type 'sliding_attention', which layer_types uses"),
    (["full_attention"] * 2, {"full_attention": {"rope_theta": 1e6}, "rope_theta": 1e4},
     "rope_parameters is keyed by layer type but also holds 'rope_theta': 10000.0"),
    (["full_attention"] * 2, {"full_attention": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_parameters['full_attention']: rope type 'dynamic' unsupported"),
    (["full_attention"] * 2, {"full_attention": {"rope_type": "llama3", "factor": 8.0}},
     "rope_parameters['full_attention']: rope type 'llama3' requires 'low_freq_factor', 'high_freq_factor', "
     "'original_max_position_embeddings'"),
    (["full_attention"] * 2, {"full_attention": {"rope_theta": 1e6, "attention_factor": 1.0}},
     "rope_parameters['full_attention']: rope key 'attention_factor' unsupported"),
    ("full_attention", {"rope_theta": 1e6}, "key 'layer_types' must be a list of strings, got 'full_attention'"),
])
def test_rope_per_layer_type_errors(layer_types, rope_parameters, message):
    with pytest.raises(TsarankError) as err:
        ModelConfig.from_dict(_qwen3_raw(layer_types, rope_parameters), source="x/config.json")
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
