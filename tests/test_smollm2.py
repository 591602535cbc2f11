"""Real weights: SmolLM2-135M-Instruct (30 layers, GQA 9/3, tied embeddings) against transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from tsarank_engine.cli import main
from tsarank_engine.data.prompting import PromptBuilder
from tsarank_engine.data.tokenization import Tokenizer
from tsarank_engine.model.loading import load_model

from conftest import sample_pairs
from paper_reference import paper_scores, paper_sequences

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def test_logits_match_transformers_padded_and_packed(smollm2_dir, hf_smollm2):
    ours = load_model(smollm2_dir)
    builder = PromptBuilder(Tokenizer.from_dir(smollm2_dir), max_doc_tokens=96)
    seqs = [torch.tensor(builder.build(r["query"], r["document"]).input_ids) for r in sample_pairs(4)]
    width = max(len(s) for s in seqs)
    ids, mask = torch.zeros(len(seqs), width, dtype=torch.long), torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    with torch.no_grad():
        ref = hf_smollm2(input_ids=ids, attention_mask=mask).logits
        padded = ours.logits(ours(ids, attention_mask=mask))
        cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
        packed = ours.logits(ours(torch.cat(seqs), cu_seqlens=cu))
    real = mask.bool()
    scale = ref[real].abs().max()
    assert ((padded[real] - ref[real]).abs().max() / scale).item() < 1e-4
    assert ((packed - ref[real]).abs().max() / scale).item() < 1e-4


def test_score_matches_the_papers_score_on_20_pairs(smollm2_dir, hf_smollm2, tmp_path):
    rows = sample_pairs(20)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(main, ["score", "--model", str(smollm2_dir), "--pairs", str(pairs), "--out", str(out),
                                       "--batch-tokens", "2048", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    got = torch.tensor([json.loads(line)["score"] for line in out.read_text().splitlines()], dtype=torch.float64)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    expected = torch.tensor(paper_scores(hf_smollm2, paper_sequences(tokenizer, rows)), dtype=torch.float64)
    assert len(got) == 20 and (got - expected).abs().max().item() < 1e-4
    assert got.std() > 0.1  # the scores really differ between pairs


def test_loading_peak_memory_stays_under_1_5x(smollm2_dir, tmp_path):
    report = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(REPO / "bench/load_memory.py"), "--model", str(smollm2_dir),
                    "--json", str(report)], check=True)
    records = json.loads(report.read_text())
    assert {r["dtype"] for r in records} == {"float32", "bfloat16"}
    for r in records:
        assert r["ratio"] < 1.5, r
