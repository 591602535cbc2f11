"""bench/throughput.py: its records for every stage and system, the model-FLOP count its MFU rests on, and the
random checkpoints --shape measures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from model_shapes import CONFIGS, write_random_checkpoint  # noqa: E402
from throughput import forward_flops  # noqa: E402

from tsarank_engine.model.config import ModelConfig  # noqa: E402
from tsarank_engine.data.tokenization import Tokenizer  # noqa: E402
from tsarank_engine.model.loading import load_model  # noqa: E402

TINY_QWEN2 = {**CONFIGS["qwen2.5-0.5b"], "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192}


@pytest.fixture(scope="module")
def random_qwen2_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(TINY_QWEN2, tmp_path_factory.mktemp("shape") / "tiny-qwen2")


def test_random_checkpoint_loads_in_the_engine_and_in_transformers(random_qwen2_dir):
    ids = Tokenizer.from_dir(random_qwen2_dir).encode("Document: the aardvark digs. Query: what digs")
    assert 8 < len(ids) < 20  # the sample-trained BPE cuts words like a real tokenizer
    engine = load_model(random_qwen2_dir).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(random_qwen2_dir, dtype=torch.float32).eval()
    assert hf.config.hidden_size == 64 and engine.config.family == "qwen2"
    norms = [p for n, p in engine.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(bool((p == 1).all()) for p in norms)
    assert 0.015 < float(engine.model.layers[0].mlp.up_proj.weight.detach().std()) < 0.025
    x = torch.tensor(ids)
    with torch.no_grad():
        ours = engine.logits(engine(x, cu_seqlens=torch.tensor([0, len(ids)])))
        theirs = hf(x[None]).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length,loss_positions", [(1, 1), (37, 5), (130, 130)])
def test_forward_flops_count_the_products_the_decoder_runs(random_qwen2_dir, length, loss_positions):
    """forward_flops' matrix and head terms equal what torch's FLOP counter sees; its attention term is the
    causal count, 2 n_layers H_q d_head L (L + 1), where SDPA's math path (batched products) computes the full
    4 n_layers H_q d_head L^2."""
    model = load_model(random_qwen2_dir).eval()
    config = ModelConfig.from_dir(random_qwen2_dir)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        hidden = model(torch.arange(length), cu_seqlens=torch.tensor([0, length]))
        model.logits(hidden[:loss_positions])
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    q_width = config.num_heads * config.head_dim
    assert counts.pop("aten.bmm") == 4 * config.num_layers * q_width * length * length
    attention = 2 * config.num_layers * q_width * length * (length + 1)
    assert set(counts) <= {"aten.mm", "aten.addmm"}
    assert forward_flops(config, length, loss_positions) - attention == sum(counts.values())


@pytest.mark.slow
def test_every_stage_and_system_gets_a_record(random_qwen2_dir, tmp_path):
    out = tmp_path / "records.json"
    proc = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--device", "cpu", "--model",
                           str(random_qwen2_dir), "--steps", "1", "--warmup", "0", "--group-size", "4",
                           "--pairs-per-step", "3", "--baseline-micro-batch", "2", "--rerank-pairs", "6",
                           "--systems", "engine,engine-ac,engine-prepacked,baseline", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    training = ("engine", "engine-ac", "engine-prepacked", "baseline")
    assert [(r["stage"], r["system"]) for r in records] == [
        (stage, system) for stage in ("cpt", "sft", "rerank") for system in training
        if not (stage == "rerank" and system in ("engine-ac", "engine-prepacked"))]
    for r in records:
        assert {"stage", "system", "device", "model", "metric", "value", "peak_mb", "tokens_per_unit"} <= set(r)
        assert r["device"] == "cpu" and r["model"] == "tiny-qwen2" and r["value"] > 0 and r["peak_mb"] > 0
        assert r["metric"] == {"cpt": "tokens/s", "sft": "groups/s", "rerank": "pairs/s"}[r["stage"]]
    cpt = {r["system"]: r for r in records if r["stage"] == "cpt"}
    assert cpt["engine"]["tokens_per_unit"] == cpt["engine-prepacked"]["tokens_per_unit"] > 0  # the same pairs
    for r in records[:4]:
        assert 0 < r["mfu"] < 1 and r["model_tflops"] == pytest.approx(r["mfu"] * r["peak_tflops"])
        assert r["peak_source"].startswith("measured: best float32 product")
    table = proc.stdout
    assert "| stage | system | tokens per pair or group | metric |" in table
    assert table.count("x |") >= 7  # an engine/baseline ratio per engine row


def test_memory_estimate_counts_the_trainers_parameters():
    """The estimate's parameter terms for Qwen2.5-7B, top 14 blocks: LoRA rank 16 on the seven projections trains
    r (in + out) per projection; full training holds float32 masters of all 7.6 B weights and the reference's
    own 14 blocks in bf16."""
    from memory_estimate import GIB, stage2_memory
    from model_shapes import model_config

    from tsarank_engine.recipe import LoraSettings

    config = model_config("qwen2.5-7b")
    d, i, kv = 3584, 18944, 512
    per_block = 16 * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + i) + (i + d))
    lora = stage2_memory(config, 14, LoraSettings(rank=16), 16384)
    assert lora["trained parameters (M)"] == pytest.approx(14 * per_block / 1e6)
    assert lora["gradients"] == pytest.approx(14 * per_block * 4 / GIB)
    full = stage2_memory(config, 14, None, 16384)
    # q, o; k, v; the q, k, v biases; gate, up, down; two norms
    block = 2 * d * d + 2 * d * kv + (d + 2 * kv) + 3 * d * i + 2 * d
    assert full["trained parameters (M)"] == pytest.approx(14 * block / 1e6)
    everything = 2 * 152064 * d + d + 28 * block  # embeddings, untied head, final norm, blocks
    assert full["parameters"] == pytest.approx((4 * everything + 2 * 14 * block) / GIB)
    assert lora["parameters"] == pytest.approx((2 * everything + 4 * 14 * per_block) / GIB)
    assert lora["total"] < full["total"] / 2


@pytest.mark.slow
def test_lora_option_measures_engine_lora_and_prints_the_estimates(random_qwen2_dir, tmp_path):
    out = tmp_path / "records.json"
    proc = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--device", "cpu", "--model",
                           str(random_qwen2_dir), "--stage", "sft", "--systems", "engine", "--lora", "4",
                           "--steps", "1", "--warmup", "0", "--group-size", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert [r["system"] for r in saved["measured"]] == ["engine", "engine-lora"]
    assert all(r["value"] > 0 and r["peak_mb"] > 0 for r in saved["measured"])
    assert [e["model"] for e in saved["memory_estimates"]] == ["tiny-qwen2", "Qwen2.5-7B"]
    assert "| term | full training (GiB) | LoRA (GiB) |" in proc.stdout
