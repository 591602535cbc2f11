"""Shared fixtures: tiny random Hugging Face checkpoints, a small BPE tokenizer, and SmolLM2-135M."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tsarank_engine.model.builtin import smollm2_checkpoint

# The paper's public samples, bundled with the package (see SOURCE.md there).
DATA_DIR = Path(__file__).resolve().parents[1] / "tsarank_engine" / "sample_data" / "rankinggpt"
CACHE_DIR = Path(os.environ.get("TSARANK_TEST_CACHE", Path.home() / ".cache" / "tsarank-engine-tests"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Without a GPU the Triton kernels run in the interpreter; Triton reads this when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: needs the SmolLM2-135M checkpoint or takes more than a few seconds")
    config.addinivalue_line("markers", "kernels: the fused loss and attention kernels against their references")


def onednn_calls(fn, with_weights: bool = False):
    """fn()'s result and the row counts of the oneDNN products (tsarank_kernels.dense) it ran; with_weights:
    (rows, the weight's output features) pairs."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def recorder(x, weight, *args):
        calls.append((x.shape[0], weight.shape[0]) if with_weights else x.shape[0])
        return real(x, weight, *args)

    try:
        torch.ops.mkldnn._linear_pointwise = recorder
        return fn(), calls
    finally:
        torch.ops.mkldnn._linear_pointwise = real


def msmarco_groups() -> list[dict]:
    path = DATA_DIR / "msmarco_groups.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bundled sample data is missing")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample_pairs(n: int) -> list[dict]:
    """n (qid, docid, query, document) rows from the MS MARCO sample: positives and negatives alternate."""
    rows = []
    for group in msmarco_groups():
        for passage in (group["positive_passages"][0], group["negative_passages"][0]):
            rows.append({"qid": group["query_id"], "docid": passage["docid"],
                         "query": group["query"], "document": passage["text"]})
            if len(rows) == n:
                return rows
    return rows


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-token byte-level BPE tokenizer trained on the sample data, with a BOS added by its post-processor
    and transformers' space clean-up on: the LLaMA-style paths the SmolLM2 tokenizer does not take."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [g["query"] + " " + p["text"] for g in msmarco_groups()[:40] for p in g["negative_passages"][:3]]
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    out = tmp_path_factory.mktemp("bpe_tokenizer")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "clean_up_tokenization_spaces": True,
    }))
    return out


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaMA-1/2-style checkpoint tokenizer: a SentencePiece BPE model (byte fallback, dummy prefix, BOS)
    trained on the sample data, as tokenizer.model and as the tokenizer.json layout LLaMA-2 checkpoints ship
    (normalizer prepending and replacing with "▁", BPE over the SentencePiece vocabulary and merges)."""
    import io

    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    texts = [g["query"] + " " + g["positive_passages"][0]["text"] for g in msmarco_groups()]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=600, model_type="bpe", byte_fallback=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []  # every split of a merged piece into two pieces, in the order SentencePiece ranks the pieces
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)):
            splits = [(vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                      if piece[:k] in vocab and piece[k:] in vocab]
            merges += [(a, b) for _, _, a, b in sorted(splits)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = tmp_path_factory.mktemp("spm_tokenizer")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer.model").write_bytes(proto.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": True,
    }))
    return out


def tiny_config(family: str, **overrides):
    """A small random config of each supported family: GQA (6 query heads, 2 KV heads), odd sizes."""
    import transformers

    common = dict(vocab_size=400, hidden_size=48, intermediate_size=84, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024)
    classes = {"llama": transformers.LlamaConfig, "llama3": transformers.LlamaConfig,
               "llama_linear": transformers.LlamaConfig,
               "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config}
    extra = {
        "llama": dict(tie_word_embeddings=False),
        "llama3": dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}),
        "llama_linear": dict(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "mistral": dict(tie_word_embeddings=False, sliding_window=None),
        "qwen2": dict(tie_word_embeddings=True),
        "qwen3": dict(tie_word_embeddings=True, head_dim=16),  # head_dim != hidden / heads
    }[family]
    return classes[family](**{**common, **extra, **overrides})


def save_tiny_model(config, out: Path, tokenizer_dir: Path | None = None, seed: int = 0, **save_kwargs):
    """Build a transformers model from `config` with non-trivial random weights and save it to `out`."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights around 1, everything else (biases included) random: every weight matters.
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(out, **save_kwargs)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy2(f, out / f.name)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_model(tiny_config("llama"), out, bpe_tokenizer_dir)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an ordinary Hugging Face checkpoint: the builtin default model, converted
    once per machine into the test cache."""
    return smollm2_checkpoint(CACHE_DIR)
