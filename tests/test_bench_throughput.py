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

from shapes import CONFIGS, write_random_checkpoint  # noqa: E402
from throughput import forward_flops  # noqa: E402

from tsarank_engine.model_config import ModelConfig  # noqa: E402
from tsarank_engine.tokenization import Tokenizer  # noqa: E402
from tsarank_engine.weights import load_model  # noqa: E402

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
