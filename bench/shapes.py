"""The architectures the GPU measurements and the compile check use, as their Hugging Face config.json
fields (public model cards: Qwen/Qwen2.5-{0.5B,1.5B,7B}, meta-llama/Llama-2-7b-hf). Nothing is downloaded:
bench code builds randomly initialised models or kernel inputs of these shapes."""

from __future__ import annotations

from tsarank_engine.model_config import ModelConfig

_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0}
_LLAMA = {"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5, "rope_theta": 10_000.0}

CONFIGS = {
    "qwen2.5-0.5b": {**_QWEN2, "vocab_size": 151_936, "hidden_size": 896, "intermediate_size": 4_864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "tie_word_embeddings": True},
    "qwen2.5-1.5b": {**_QWEN2, "vocab_size": 151_936, "hidden_size": 1_536, "intermediate_size": 8_960,
                     "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "tie_word_embeddings": True},
    "qwen2.5-7b": {**_QWEN2, "vocab_size": 152_064, "hidden_size": 3_584, "intermediate_size": 18_944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "tie_word_embeddings": False},
    "llama2-7b": {**_LLAMA, "vocab_size": 32_000, "hidden_size": 4_096, "intermediate_size": 11_008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "tie_word_embeddings": False},
}


def model_config(name: str) -> ModelConfig:
    return ModelConfig.from_dict(dict(CONFIGS[name]), source=name)
