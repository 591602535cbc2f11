"""The architectures the GPU measurements and the compile check use, as their Hugging Face config.json
fields (public model cards: Qwen/Qwen2.5-{0.5B,1.5B,7B}, meta-llama/Llama-2-7b-hf). Nothing is downloaded:
bench code builds randomly initialised models or kernel inputs of these shapes."""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from bench_common import SAMPLES
from tsarank_engine.model.builtin import BUILTIN_PREFIX, SMOLLM2, resolve_model_path
from tsarank_engine.model.decoder import CausalLM
from tsarank_engine.model.config import ModelConfig
from tsarank_engine.model.export import export_model

_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6,
          "rope_theta": 1_000_000.0}
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
          "rope_theta": 10_000.0}

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


def sample_tokenizer(out_dir: Path, vocab_size: int = 8192) -> None:
    """A byte-level BPE tokenizer trained on the bundled sample texts (~1.5 s), written as tokenizer.json and
    tokenizer_config.json. At 8,192 entries it cuts the sample texts into as many tokens as SmolLM2's tokenizer
    does (85.5 against 84.4 per text over 500 texts), so sequence lengths are those of a real checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    with open(SAMPLES / "msmarco_groups.jsonl", encoding="utf-8") as f:
        for line in f:
            group = json.loads(line)
            texts += [group["query"]] + [p["text"] for p in group["positive_passages"] + group["negative_passages"]]
    texts += (SAMPLES / "text_pairs.jsonl").read_text(encoding="utf-8").splitlines()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))


def temporary_checkpoint(shape: str) -> str:
    """A random checkpoint of the shape named (CONFIGS) in a temporary folder, removed when this process exits."""
    work = Path(tempfile.mkdtemp(prefix=f"tsarank-{shape}-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return str(write_random_checkpoint(CONFIGS[shape], work / shape))


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --shape, for model_dir_from."""
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the builtin SmolLM2-135M)")
    parser.add_argument("--shape", default=None, help="instead of --model, a random model of this shape "
                        "(bench/model_shapes.py: qwen2.5-0.5b, ...; the GPU machine has no SmolLM2)")


def model_dir_from(args: argparse.Namespace) -> str:
    """The checkpoint directory add_model_options' arguments name: a random one of --shape, --model, or the
    builtin SmolLM2-135M."""
    if args.shape:
        return temporary_checkpoint(args.shape)
    return args.model or resolve_model_path(BUILTIN_PREFIX + SMOLLM2)


def write_random_checkpoint(config: dict, out_dir: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A Hugging Face checkpoint of this config.json with random weights (normal, std 0.02, norms 1, as
    transformers initialises) and the sample tokenizer; what `bench/throughput.py --shape` measures."""
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_dict(dict(config), source="shape"))
    gen = torch.Generator().manual_seed(seed)
    for name, param in list(model.named_parameters()):
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape, dtype=dtype)
        else:
            value = torch.empty(param.shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=False))
    model.tie_weights()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        sample_tokenizer(Path(tokenizer_dir))
        return export_model(model, out_dir, tokenizer_dir)
