"""Scoring's half precision: the mixed path (products in bfloat16, the residual stream, norms and logits in float32)
against float32 and against the all-bfloat16 model, and the `auto` choice that takes it where the CPU's bfloat16
products measure faster."""

import json
from pathlib import Path

import pytest
import torch

from tsarank_engine import devices
from tsarank_engine.data.prompting import PromptBuilder
from tsarank_engine.data.tokenization import Tokenizer
from tsarank_engine.devices import cpu_bf16_speedup, resolve_scoring_dtype
from tsarank_engine.model.decoder import Linear, RMSNorm
from tsarank_engine.model.loading import load_model, model_on_meta, place_mixed_precision
from tsarank_engine.rank.scoring import score_pairs

from conftest import msmarco_groups, sample_pairs, save_tiny_model, tiny_config


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # an untied and a tied head
def test_the_mixed_model_keeps_norms_embeddings_and_the_residual_in_float32(tmp_path, bpe_tokenizer_dir, family):
    save_tiny_model(tiny_config(family), tmp_path, bpe_tokenizer_dir)
    model = load_model(tmp_path, dtype=torch.bfloat16, mixed=True)
    tied = family == "qwen2"
    for name, module in model.named_modules():
        if isinstance(module, Linear):  # on the CPU the attention's inputs are float32 products
            float32 = name.endswith(("q_proj", "k_proj", "v_proj"))
            assert module.weight.dtype == (torch.float32 if float32 else torch.bfloat16), name
        if isinstance(module, RMSNorm):
            assert module.weight.dtype == torch.float32
    # on the CPU the head stays float32 (its logits must be, and no CPU product gives them from bf16 operands)
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids = torch.tensor([5, 9, 13, 2, 7])
    hidden = model(ids, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    assert hidden.dtype == torch.float32
    builder = PromptBuilder(Tokenizer.from_dir(tmp_path))
    pairs = [builder.build(r["query"], r["document"]) for r in sample_pairs(8)]
    exact = torch.tensor(score_pairs(load_model(tmp_path), pairs))
    mixed = torch.tensor(score_pairs(model, pairs))
    assert (mixed - exact).abs().max() < 0.05
    assert load_model(tmp_path, dtype=torch.float32, mixed=True).lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_on_cuda_the_mixed_model_runs_every_product_and_the_head_in_half_precision(tmp_path, bpe_tokenizer_dir,
                                                                                   family):
    # laid out on meta, as load_model does before it reads the weights onto the GPU: no GPU needed
    save_tiny_model(tiny_config(family), tmp_path, bpe_tokenizer_dir)
    model, _ = model_on_meta(tmp_path)
    place_mixed_precision(model, torch.float16, cuda=True)
    tied = family == "qwen2"
    linears = [m for m in model.model.modules() if isinstance(m, Linear)]
    assert len(linears) == 7 * model.config.num_layers and all(m.weight.dtype == torch.float16 for m in linears)
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, RMSNorm))
    assert model.lm_head.weight.dtype == torch.float16  # half-precision operands, fp32 logits from the fused head
    assert model.model.embed_tokens.weight.dtype == (torch.float16 if tied else torch.float32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.model.residual_dtype == torch.float32


def test_auto_takes_bfloat16_where_the_cpu_multiplies_it_faster(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_bf16_speedup", lambda: devices.BF16_FASTER + 0.5)
    assert resolve_scoring_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_bf16_speedup", lambda: devices.BF16_FASTER - 0.5)
    assert resolve_scoring_dtype("auto", cpu) == torch.float32
    assert resolve_scoring_dtype("float32", cpu) == torch.float32
    assert resolve_scoring_dtype("auto", torch.device("cuda")) == torch.bfloat16  # no GPU needed to resolve
    monkeypatch.undo()
    speedup = cpu_bf16_speedup()
    assert speedup > 0 and cpu_bf16_speedup() == speedup  # measured once a process


def top10_overlaps(query_ids: list[str], exact: torch.Tensor, mixed: torch.Tensor) -> list[float]:
    """Each query's share of float32's top 10 that the mixed scores also put in their top 10."""
    overlaps = []
    for qid in dict.fromkeys(query_ids):
        idx = [i for i, q in enumerate(query_ids) if q == qid]
        top = [set(sorted(idx, key=lambda i: -s[i])[:10]) for s in (exact, mixed)]
        overlaps.append(len(top[0] & top[1]) / 10)
    return overlaps


def sample_rows(groups: list[dict]) -> list[tuple[str, str, str]]:
    """(query id, query, document) for each group's first positive and 20 negatives."""
    return [(g["query_id"], g["query"], p["text"]) for g in groups
            for p in g["positive_passages"][:1] + g["negative_passages"][:20]]


@pytest.mark.slow
def test_mixed_bfloat16_keeps_the_float32_ranking_of_smollm2(smollm2_dir):
    """Three sample queries with their positive and 20 negatives each. Measured (AMD EPYC): the mixed path's scores
    differ from float32 by up to 0.027 (mean 0.0075) and keep all 30 top-10 places; the all-bfloat16 model's by up
    to 0.085 (mean 0.019)."""
    rows = sample_rows(msmarco_groups()[:3])
    builder = PromptBuilder(Tokenizer.from_dir(smollm2_dir))
    pairs = [builder.build(q, d) for _, q, d in rows]
    exact = torch.tensor(score_pairs(load_model(smollm2_dir), pairs), dtype=torch.float64)
    mixed = torch.tensor(score_pairs(load_model(smollm2_dir, torch.bfloat16, mixed=True), pairs), dtype=torch.float64)
    pure = torch.tensor(score_pairs(load_model(smollm2_dir, torch.bfloat16), pairs), dtype=torch.float64)
    overlaps = top10_overlaps([q for q, _, _ in rows], exact, mixed)
    errors = {name: (s - exact).abs() for name, s in (("mixed", mixed), ("pure", pure))}
    print(json.dumps({k: [round(v.max().item(), 4), round(v.mean().item(), 4)] for k, v in errors.items()}), overlaps)
    assert sum(overlaps) / len(overlaps) >= 0.9 and errors["mixed"].max() < 0.08
    assert errors["mixed"].mean() < errors["pure"].mean()


@pytest.mark.slow
def test_mixed_bfloat16_keeps_the_float32_ranking_of_a_random_qwen2_5_0_5b_shaped_model(tmp_path, monkeypatch):
    """The Qwen2.5-0.5B architecture (24 layers, 14 query and 2 key/value heads, tied 151,936-token head) with
    random weights and bench's sample tokenizer, over three other sample queries with 21 candidates each: the
    mixed path against float32 of the same weights. Measured (AMD EPYC): scores up to 0.0050 apart (mean 0.0017,
    against a spread of 0.26 across candidates), all 30 top-10 places kept."""
    monkeypatch.syspath_prepend(Path(__file__).resolve().parents[1] / "bench")
    from model_shapes import CONFIGS, write_random_checkpoint

    checkpoint = write_random_checkpoint(CONFIGS["qwen2.5-0.5b"], tmp_path / "qwen2.5-0.5b")
    rows = sample_rows(msmarco_groups()[3:6])
    builder = PromptBuilder(Tokenizer.from_dir(checkpoint))
    pairs = [builder.build(q, d) for _, q, d in rows]
    exact = torch.tensor(score_pairs(load_model(checkpoint), pairs), dtype=torch.float64)
    mixed = torch.tensor(score_pairs(load_model(checkpoint, torch.bfloat16, mixed=True), pairs), dtype=torch.float64)
    overlaps = top10_overlaps([q for q, _, _ in rows], exact, mixed)
    error = (mixed - exact).abs()
    print({"max_abs_diff": error.max().item(), "mean_abs_diff": error.mean().item(), "overlap": overlaps,
           "score_spread": exact.std().item()})
    assert sum(overlaps) / len(overlaps) >= 0.95 and 0 < error.max() < 0.02


@pytest.mark.slow
def test_rerank_of_a_beir_collection_keeps_its_order_and_ndcg_in_bfloat16(smollm2_dir, tmp_path):
    """`rerank` over BEIR files (a run, queries.jsonl, corpus.jsonl: four other sample queries, 16 candidates each)
    and `eval` against their qrels, float32 against the mixed bfloat16 path, as a user runs them. Measured (AMD
    EPYC): top-10 overlap 1.0, nDCG@10 equal (0.833), scores up to 0.030 apart."""
    from click.testing import CliRunner

    from tsarank_engine.cli import main
    from test_rerank import beir_files

    groups = msmarco_groups()[10:14]
    run, queries, corpus = beir_files(tmp_path, groups, per_query=16)
    (tmp_path / "qrels.txt").write_text("".join(f"{g['query_id']} 0 {p['docid']} 1\n" for g in groups
                                                for p in g["positive_passages"]))
    ranked, ndcg = {}, {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.run"
        result = CliRunner().invoke(main, ["rerank", "--model", str(smollm2_dir), "--run", str(run), "--queries",
                                           str(queries), "--corpus", str(corpus), "--dtype", dtype, "--out", str(out)])
        assert result.exit_code == 0, result.output
        ranked[dtype] = {}
        for line in out.read_text().splitlines():
            qid, _, docid, _, score, _ = line.split()
            ranked[dtype].setdefault(qid, []).append((docid, float(score)))
        result = CliRunner().invoke(main, ["eval", "--qrels", str(tmp_path / "qrels.txt"), "--run", str(out),
                                           "--metrics", "nDCG@10", "--json"])
        assert result.exit_code == 0, result.output
        ndcg[dtype] = json.loads(result.output)["nDCG@10"]
    overlaps, differences = [], []
    for qid, exact in ranked["float32"].items():
        mixed = dict(ranked["bfloat16"][qid])
        overlaps.append(len({d for d, _ in exact[:10]} & {d for d, _ in ranked["bfloat16"][qid][:10]}) / 10)
        differences += [abs(mixed[d] - s) for d, s in exact]
    print({"overlap": overlaps, "ndcg": ndcg, "max_abs_diff": max(differences)})
    assert len(overlaps) == 4 and sum(overlaps) / 4 >= 0.95 and abs(ndcg["bfloat16"] - ndcg["float32"]) <= 0.01
    assert 0 < max(differences) < 0.08
