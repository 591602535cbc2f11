"""Reranking speed and agreement, side by side in one run: the engine in float32 and on its mixed bfloat16 path, the
paper's loop (transformers, float32) and transformers in bfloat16 as a user would tune it; same model, device, pairs.

    python bench/rerank.py [--model DIR | --shape NAME] [--device cpu|cuda] [--pairs 200 | 0: all]
                           [--collection msmarco|beir-test|beir-all] [--systems a,b,...] [--batch-size 8]
                           [--json OUT.json]

Pairs come from the bundled MS MARCO sample, whole queries in order (each with its positive and negatives), or from
the BEIR-format collection bench/quality.py writes of it (read by `rerank`'s BEIR reader, candidates in document-id
order, relevance from its qrels), prompted with the paper's evaluation construction (the query whole, the document
cut to what is left of 512 tokens). Systems:
- engine-fp32, engine-bf16, engine-fp16 (CUDA): what `tsarank-engine rerank --dtype float32 | bfloat16 | float16`
  runs (pairs sorted by length and packed into rows of the device's default length, the LM head at query
  positions only; half precision is the mixed path: products in it, the residual stream, norms and logits in
  float32).
- paper-fp32: the paper's eval loop as tests/paper_reference.py writes it with transformers: right-padded batches
  of --batch-size in input order, full-vocabulary log-softmax.
- hf-bf16: transformers in bfloat16 with SDPA attention, batches of 16 sorted by length, logits upcast to float32
  for the log-softmax.
Each warms up on 16 pairs, then is timed. Against engine-fp32 each system reports the largest score difference,
the mean top-10 overlap per query and nDCG@10 with the sample's positives as the relevant documents. On the CPU
engine-fp32 and engine-bf16 are also held to the ceiling of their products' dtype measured in the same run
(bench/throughput.py's cpu_peak_tflops): the model's FLOPs per second against the best product of two [2048, 2048]
matrices; and every CPU record names the CPU's bfloat16 units and their measured gain as `doctor` gives them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the paper's reference loop, shared with the tests

from bench_common import SAMPLES, machine_name  # noqa: E402
from model_shapes import add_model_options, model_dir_from  # noqa: E402
from paper_reference import paper_scores, paper_sequences  # noqa: E402

from tsarank_engine.data.prompting import PromptBuilder  # noqa: E402
from tsarank_engine.data.tokenization import Tokenizer  # noqa: E402
from tsarank_engine.model.loading import load_model  # noqa: E402
from tsarank_engine.rank.scoring import score_pairs  # noqa: E402

SYSTEMS = ("engine-fp32", "engine-bf16", "engine-fp16", "paper-fp32", "hf-bf16")
ENGINE_DTYPES = {"engine-fp32": torch.float32, "engine-bf16": torch.bfloat16, "engine-fp16": torch.float16}


def sample_rows(n: int | None = None) -> list[dict]:
    """The sample's (query, document) pairs, each query with its positives then negatives: the first n, or all;
    "relevant" marks the positives."""
    rows = []
    with open(SAMPLES / "msmarco_groups.jsonl", encoding="utf-8") as f:
        for line in f:
            g = json.loads(line)
            for k, p in enumerate(g["positive_passages"] + g["negative_passages"]):
                rows.append({"qid": g["query_id"], "docid": p["docid"], "query": g["query"], "document": p["text"],
                             "relevant": k < len(g["positive_passages"])})
                if len(rows) == n:
                    return rows
    return rows


def beir_rows(split: str, n: int | None = None) -> list[dict]:
    """The pairs of the BEIR-format collection bench/quality.py writes from the sample (BEIR corpus and queries,
    TREC qrels, a run per split of the protocol's queries), read back by the engine's BEIR reader as `rerank --run
    --queries --corpus` reads them; "relevant" from the qrels. split: test (20 queries), train (80) or all."""
    import tempfile

    from quality import write_collection

    from tsarank_engine.data.readers import read_qrels, rerank_pairs_from_run

    rows = []
    with tempfile.TemporaryDirectory() as work:
        write_collection(Path(work))
        for name in ("test", "train") if split == "all" else (split,):
            qrels = read_qrels(Path(work) / f"{name}.qrels")
            for p in rerank_pairs_from_run(*(Path(work) / f for f in (f"{name}.run", "queries.jsonl", "corpus.jsonl"))):
                rows.append({"qid": p.qid, "docid": p.docid, "query": p.query, "document": p.passage,
                             "relevant": qrels.get(p.qid, {}).get(p.docid, 0) > 0})
    return rows[:n]


def timed(fn, rows: list[dict]) -> tuple[float, list[float]]:
    fn(rows[:16])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    scores = fn(rows)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, scores


def agreement(rows: list[dict], scores: list[float], reference: list[float]) -> dict:
    """Largest |difference|, the mean per-query overlap of the top 10 and nDCG@10 of both (binary relevance)."""
    queries: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        queries.setdefault(r["qid"], []).append(i)

    def top(s: list[float], idx: list[int]) -> list[int]:
        return sorted(idx, key=lambda i: (-s[i], rows[i]["docid"]))[:10]

    def ndcg(s: list[float]) -> float:
        values = []
        for idx in queries.values():
            gains = [1.0 / torch.log2(torch.tensor(k + 2.0)).item() for k, i in enumerate(top(s, idx))
                     if rows[i]["relevant"]]
            ideal = sum(1.0 / torch.log2(torch.tensor(k + 2.0)).item()
                        for k in range(min(10, sum(rows[i]["relevant"] for i in idx))))
            values.append(sum(gains) / ideal if ideal else 0.0)
        return sum(values) / len(values)

    overlap = [len(set(top(scores, idx)) & set(top(reference, idx))) / min(10, len(idx)) for idx in queries.values()]
    return {"max_abs_diff": max(abs(a - b) for a, b in zip(scores, reference)),
            "top10_overlap": sum(overlap) / len(overlap), "ndcg10": ndcg(scores), "ndcg10_fp32": ndcg(reference),
            "queries": len(queries)}


def decoder_flops(model, pairs) -> float:
    """Forward FLOPs of scoring `pairs`: the blocks' products, causal attention and the head at query positions."""
    config = model.config
    block_weights = sum(p.numel() for name, p in model.model.layers.named_parameters() if p.dim() == 2)
    flops = 0.0
    for p in pairs:
        n = len(p.input_ids)
        flops += 2 * n * block_weights + 2 * n * n * config.num_heads * config.head_dim * config.num_layers
        flops += 2 * p.num_query_tokens * config.vocab_size * config.hidden_size
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, default=200, help="the first N sample pairs (0: all 4,839)")
    parser.add_argument("--collection", default="msmarco", choices=("msmarco", "beir-test", "beir-all"),
                        help="the sample's groups as they are, or as the BEIR-format collection bench/quality.py "
                        "writes (its 20 test queries, or all 100)")
    parser.add_argument("--systems", help=f"any of {', '.join(SYSTEMS)} (default: all; on the CPU all but "
                        "engine-fp16, whose half-precision products run there at a fifth of float32's speed)")
    parser.add_argument("--batch-size", type=int, default=8, help="the paper loop's batch size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    systems = (args.systems.split(",") if args.systems
               else [s for s in SYSTEMS if s != "engine-fp16" or args.device.startswith("cuda")])
    if "engine-fp32" not in systems or not set(systems) <= set(SYSTEMS):
        parser.error(f"--systems: engine-fp32 (the reference) and any of {', '.join(SYSTEMS)}")
    model_dir = model_dir_from(args)
    device = torch.device(args.device)
    rows = (sample_rows(args.pairs or None) if args.collection == "msmarco"
            else beir_rows(args.collection.removeprefix("beir-"), args.pairs or None))
    builder = PromptBuilder(Tokenizer.from_dir(model_dir))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    def engine(dtype: torch.dtype):
        model = load_model(model_dir, dtype=dtype, device=device, mixed=True).eval()
        return model, lambda some: score_pairs(model, [builder.build(r["query"], r["document"]) for r in some])

    def transformers_loop(dtype: torch.dtype, sort: bool, batch_size: int):
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        hf = hf.to(device).eval()

        def run(some: list[dict]) -> list[float]:
            sequences = paper_sequences(hf_tokenizer, some)
            order = sorted(range(len(some)), key=lambda i: len(sequences[i][0])) if sort else range(len(some))
            got = paper_scores(hf, [sequences[i] for i in order], batch_size=batch_size)
            scores = [0.0] * len(some)
            for i, s in zip(order, got):
                scores[i] = s
            return scores

        return hf, run

    results, fp32_model = {}, None
    for system in systems:
        if system.startswith("engine"):
            model, run = engine(ENGINE_DTYPES[system])
            fp32_model = model if system == "engine-fp32" else fp32_model
        elif system == "paper-fp32":
            model, run = transformers_loop(torch.float32, False, args.batch_size)
        else:
            model, run = transformers_loop(torch.bfloat16, True, 16)
        results[system] = timed(run, rows)
        print(f"{system}: {len(rows) / results[system][0]:.2f} pairs/s", file=sys.stderr, flush=True)
        del model

    machine = machine_name(device.type)
    reference = results["engine-fp32"][1]
    records = []
    for system, (seconds, scores) in results.items():
        records.append({"stage": "rerank", "system": system, "device": device.type, "machine": machine,
                        "model": Path(model_dir).name, "collection": args.collection, "pairs": len(rows),
                        "metric": "pairs/s", "value": len(rows) / seconds, "seconds": seconds,
                        **({} if system == "engine-fp32" else agreement(rows, scores, reference))})
    if device.type == "cpu":  # each engine system against the ceiling of its products' dtype, measured now
        from throughput import cpu_peak_tflops

        from tsarank_engine.devices import cpu_bf16_speedup, cpu_bf16_units

        bf16 = {"cpu_bf16_units": cpu_bf16_units(), "cpu_bf16_speedup": cpu_bf16_speedup()}

        prompted = [builder.build(r["query"], r["document"]) for r in rows]
        flops = decoder_flops(fp32_model, prompted)
        for record in records:
            record.update(bf16)
            dtype = ENGINE_DTYPES.get(record["system"])
            if dtype in (torch.float32, torch.bfloat16):
                ceiling, how = cpu_peak_tflops(dtype=dtype)
                gflops = flops / record["seconds"] / 1e9
                record.update(gflop_per_s=gflops, ceiling_gflop_per_s=ceiling * 1e3, ceiling=how,
                              of_ceiling=gflops / (ceiling * 1e3))
    units = f" (bfloat16 units: {records[0]['cpu_bf16_units']})" if device.type == "cpu" else ""
    print(f"\n{machine}{units}, {Path(model_dir).name}, {args.collection}, {len(rows)} pairs\n")
    print("| system | pairs/s | seconds | x engine-fp32 | max abs diff | top-10 overlap | nDCG@10 (fp32) |\n"
          "|---|---|---|---|---|---|---|")
    base = next(r["value"] for r in records if r["system"] == "engine-fp32")
    for r in records:
        extra = (f"{r['max_abs_diff']:.4f} | {r['top10_overlap']:.3f} | {r['ndcg10']:.4f} ({r['ndcg10_fp32']:.4f})"
                 if "max_abs_diff" in r else "- | - | -")
        print(f"| {r['system']} | {r['value']:.2f} | {r['seconds']:.1f} | {r['value'] / base:.2f}x | {extra} |")
    for r in records:
        if "of_ceiling" in r:
            print(f"{r['system']}: {r['gflop_per_s']:.0f} GFLOP/s, {100 * r['of_ceiling']:.0f} % of the ceiling "
                  f"({r['ceiling']})")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
