"""The decoder's configuration, read from a Hugging Face checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TsarankError

# Hugging Face architecture name -> the family whose quirks it has.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",  # LLaMA 1/2/3, SmolLM
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",  # Qwen2 and Qwen2.5
    "Qwen3ForCausalLM": "qwen3",
}
# config.json's model_type is the family's name. transformers always writes it, but `architectures` only when
# a model (not a bare config) was saved, so it is what names the architecture when `architectures` is null.
SUPPORTED_MODEL_TYPES = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}
# Rope type -> the scaling parameters it requires; the decoder implements these and no others.
_ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
SUPPORTED_ROPE_TYPES = tuple(_ROPE_SCALING_KEYS)
# What transformers uses (`default_theta`) for these families when a config names no rope_theta anywhere.
_DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 frequency-dependent scaling
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    # None when every layer attends to the whole document; otherwise the window the checkpoint uses
    sliding_window: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise TsarankError(f"{path}: no config.json (is {model_dir} a Hugging Face checkpoint directory?)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TsarankError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise TsarankError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        arch = _architecture(raw, source)
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str, kind: type = int, default: Any = None) -> Any:
            """raw[key] checked to be a positive `kind`; `default` when absent or null (required if None)."""
            value = raw.get(key)
            if value is None:
                if default is None:
                    raise TsarankError(f"{source}: missing key {key!r} required for {arch}")
                return default
            return _positive(value, kind, f"{source}: key {key!r}")

        if raw.get("hidden_act", "silu") != "silu":
            raise TsarankError(f"{source}: hidden_act {raw['hidden_act']!r} unsupported (only 'silu')")
        if raw.get("mlp_bias", False):
            raise TsarankError(f"{source}: mlp_bias=true is unsupported")

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=arch,
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=need("num_key_value_heads", default=heads),
            head_dim=need("head_dim", default=hidden // heads),
            rms_norm_eps=need("rms_norm_eps", float),
            rope=_rope_config(raw, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and none on o; LLaMA/Mistral/Qwen3 follow attention_bias.
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            qk_norm=family == "qwen3",
            sliding_window=_sliding_window(raw, family, source),
            raw=raw,
        )._validated(source)

    def _validated(self, source: str) -> "ModelConfig":
        if self.num_heads % self.num_kv_heads:
            raise TsarankError(
                f"{source}: num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise TsarankError(f"{source}: head_dim {self.head_dim} must be even for RoPE")
        return self


def _architecture(raw: dict[str, Any], source: str) -> str:
    """The architecture name from `architectures`, or from `model_type` where `architectures` is null or missing;
    an error naming the key and its value when either is unsupported or the two disagree."""
    supported = (f"supported: architectures {', '.join(SUPPORTED_ARCHITECTURES)}; "
                 f"model_type {', '.join(SUPPORTED_MODEL_TYPES)}")
    archs, model_type = raw.get("architectures"), raw.get("model_type")
    arch = None
    if archs:
        if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)
                and archs[0] in SUPPORTED_ARCHITECTURES):
            raise TsarankError(f"{source}: unsupported architecture {archs!r} (key 'architectures'); {supported}")
        arch = archs[0]
    if model_type is None:
        if arch is None:
            raise TsarankError(f"{source}: neither key 'architectures' nor key 'model_type' is set; {supported}")
        return arch
    if arch is not None and SUPPORTED_ARCHITECTURES[arch] != model_type:
        raise TsarankError(f"{source}: key 'architectures' {archs!r} and key 'model_type' {model_type!r} disagree "
                           f"(architecture {arch} has model_type {SUPPORTED_ARCHITECTURES[arch]!r}); {supported}")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        raise TsarankError(f"{source}: unsupported model_type {model_type!r} (key 'model_type'); {supported}")
    return SUPPORTED_MODEL_TYPES[model_type]


def _rope_config(raw: dict[str, Any], source: str) -> RopeConfig:
    """The one rope the decoder applies to every layer, from any layout transformers writes: `rope_parameters`
    (>= 5), flat or keyed by the entries of `layer_types`, or the older `rope_theta` + `rope_scaling`."""
    if raw.get("rope_parameters") is not None and raw.get("rope_scaling") is not None:
        raise TsarankError(f"{source}: both 'rope_parameters' and 'rope_scaling' are set; which rope applies "
                           "is ambiguous")
    key = "rope_parameters" if raw.get("rope_parameters") is not None else "rope_scaling"
    params = raw.get(key) or {}
    layer_types = raw.get("layer_types") or []
    if not isinstance(params, dict):
        raise TsarankError(f"{source}: key {key!r} must be an object, got {params!r}")
    if not (isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types)):
        raise TsarankError(f"{source}: key 'layer_types' must be a list of strings, got {layer_types!r}")
    if not any(k in layer_types for k in params):
        return _one_rope(params, raw, f"{source}: {key}")

    # Per layer type: entries for types no layer uses are ignored (null is a layer without rope, as transformers
    # writes it); the used ones must all give the same rope.
    for k, v in params.items():
        if v is not None and not isinstance(v, dict):
            raise TsarankError(f"{source}: {key} is keyed by layer type but also holds {k!r}: {v!r}")
    ropes = {}
    for layer_type in dict.fromkeys(layer_types):
        if params.get(layer_type) is None:
            raise TsarankError(f"{source}: {key} has no rope for layer type {layer_type!r}, which layer_types uses "
                               "(layers without rope are not implemented)")
        ropes[layer_type] = _one_rope(params[layer_type], raw, f"{source}: {key}[{layer_type!r}]")
    (first, rope), *others = ropes.items()
    for other, other_rope in others:
        if other_rope != rope:
            raise TsarankError(f"{source}: {key} differs between layer types {first!r} ({params[first]}) and "
                               f"{other!r} ({params[other]}); the decoder applies one rope to every layer")
    return rope


def _one_rope(params: dict[str, Any], raw: dict[str, Any], where: str) -> RopeConfig:
    """One flat rope dict (`rope_theta` and `partial_rotary_factor` default to the top-level keys, as in
    transformers); every rope type and key the decoder does not implement is an error naming it."""
    params = dict(params)
    rope_type, legacy_type = params.pop("rope_type", None), params.pop("type", None)
    if rope_type is not None and legacy_type is not None and rope_type != legacy_type:
        raise TsarankError(f"{where}: 'rope_type' {rope_type!r} and 'type' {legacy_type!r} disagree")
    rope_type = rope_type or legacy_type or "default"
    if not isinstance(rope_type, str) or rope_type not in _ROPE_SCALING_KEYS:
        raise TsarankError(
            f"{where}: rope type {rope_type!r} unsupported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = _first_set(params.pop("rope_theta", None), raw.get("rope_theta"), _DEFAULT_ROPE_THETA)
    # transformers may write partial_rotary_factor (1.0 rotates the whole head); the decoder rotates whole heads.
    partial = _first_set(params.pop("partial_rotary_factor", None), raw.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        raise TsarankError(f"{where}: partial_rotary_factor {partial!r} unsupported (only 1.0: the whole head)")
    needed = _ROPE_SCALING_KEYS[rope_type]
    unknown = [k for k in params if k not in needed]
    if unknown:
        hint = (" (per-layer-type rope parameters are keyed by entries of layer_types)"
                if any(isinstance(params[k], dict) for k in unknown) else "")
        raise TsarankError(f"{where}: rope key {', '.join(map(repr, unknown))} unsupported for rope type "
                           f"{rope_type!r}{hint}; it takes rope_theta, partial_rotary_factor (1.0)"
                           + "".join(f", {k}" for k in needed))
    missing = [k for k in needed if params.get(k) is None]
    if missing:
        raise TsarankError(f"{where}: rope type {rope_type!r} requires {', '.join(map(repr, missing))}")
    kinds = {"factor": float, "low_freq_factor": float, "high_freq_factor": float,
             "original_max_position_embeddings": int}
    kwargs = {k: _positive(v, kinds[k], f"{where}: rope parameter {k!r}") for k, v in params.items()}
    return RopeConfig(theta=_positive(theta, float, f"{where}: rope_theta"), rope_type=rope_type, **kwargs)


def _first_set(*values: Any) -> Any:
    """The first value that is not None (null in config.json means unset), or None."""
    return next((v for v in values if v is not None), None)


def _sliding_window(raw: dict[str, Any], family: str, source: str) -> int | None:
    uses_window = family == "mistral" or raw.get("use_sliding_window", False) or "sliding_attention" in (
        raw.get("layer_types") or []
    )
    window = raw.get("sliding_window")
    return _positive(window, int, f"{source}: key 'sliding_window'") if uses_window and window is not None else None


def _positive(value: Any, kind: type, what: str) -> Any:
    """`value` as a positive int or float (ints are accepted as floats), or an error naming `what`."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise TsarankError(f"{what} must be a positive {kind.__name__}, got {value!r}")
    return value
