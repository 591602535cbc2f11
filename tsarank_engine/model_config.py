"""The decoder's configuration, read from a Hugging Face checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TsarankError

# Hugging Face architecture name -> the family whose quirks it has.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",  # LLaMA 1/2/3, SmolLM
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",  # Qwen2 and Qwen2.5
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
        archs = raw.get("architectures") or []
        arch = archs[0] if len(archs) == 1 else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise TsarankError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
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


def _rope_config(raw: dict[str, Any], source: str) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older checkpoints have `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise TsarankError(
            f"{source}: rope type {rope_type!r} unsupported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    kinds = {"factor": float, "low_freq_factor": float, "high_freq_factor": float,
             "original_max_position_embeddings": int}
    kwargs = {k: _positive(v, kinds[k], f"{source}: rope parameter {k!r}")
              for k, v in params.items() if k in kinds and v is not None}
    return RopeConfig(theta=_positive(theta, float, f"{source}: rope_theta"), rope_type=rope_type, **kwargs)


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
