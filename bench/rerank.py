"""Reranking speed: the engine's scoring against a plain transformers loop, same model, device and pairs.

    python bench/rerank.py [--model DIR] [--device cpu|cuda] [--pairs 200] [--batch-size 8] [--json OUT.json]

Pairs come from the bundled MS MARCO sample (each query with its positive and negatives), prompted with the
paper's evaluation construction (the query whole, the document cut to what is left of 512 tokens).
engine: what `tsarank-engine rerank` runs: pairs sorted by length and packed into rows of its default length
for the device, the LM head only at query positions. baseline: the paper's eval loop as tests/paper_reference.py
writes it with transformers: right-padded batches of --batch-size in input order, full-vocabulary log-softmax.
Both run once to warm up, then are timed; the scores are compared (the largest difference is printed).
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
from paper_reference import paper_scores, paper_sequences  # noqa: E402

from tsarank_engine.model.builtin import BUILTIN_PREFIX, SMOLLM2, resolve_model_path  # noqa: E402
from tsarank_engine.data.prompting import PromptBuilder  # noqa: E402
from tsarank_engine.rank.scoring import score_pairs  # noqa: E402
from tsarank_engine.data.tokenization import Tokenizer  # noqa: E402
from tsarank_engine.model.loading import load_model  # noqa: E402


def sample_rows(n: int | None = None) -> list[dict]:
    """The sample's (query, document) pairs, each query with its positives then negatives: the first n, or all."""
    rows = []
    with open(SAMPLES / "msmarco_groups.jsonl", encoding="utf-8") as f:
        for line in f:
            g = json.loads(line)
            for p in g["positive_passages"] + g["negative_passages"]:
                rows.append({"query": g["query"], "document": p["text"]})
                if len(rows) == n:
                    return rows
    return rows


def timed(fn) -> tuple[float, list[float]]:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    scores = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the builtin SmolLM2-135M)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="the baseline's batch size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = args.model or resolve_model_path(BUILTIN_PREFIX + SMOLLM2)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = sample_rows(args.pairs)

    tokenizer = Tokenizer.from_dir(model_dir)
    engine_model = load_model(model_dir, dtype=dtype, device=device).eval()
    builder = PromptBuilder(tokenizer)

    def engine() -> list[float]:
        prompted = [p for r in rows for p in builder.build_many(r["query"], [r["document"]])]
        return score_pairs(engine_model, prompted)

    engine_s, engine_scores = timed(engine)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def baseline() -> list[float]:
        return paper_scores(hf_model, paper_sequences(hf_tokenizer, rows), batch_size=args.batch_size)

    baseline_s, baseline_scores = timed(baseline)
    machine = machine_name(device.type)
    records = [{"stage": "rerank", "system": name, "device": device.type, "machine": machine,
                "model": Path(model_dir).name, "metric": "pairs/s", "value": len(rows) / seconds, "seconds": seconds}
               for name, seconds in (("engine", engine_s), ("baseline", baseline_s))]
    diff = max(abs(a - b) for a, b in zip(engine_scores, baseline_scores))
    print(f"\n{machine}, {Path(model_dir).name}, {len(rows)} pairs, largest score difference {diff:.2e}\n")
    print("| system | pairs/s | seconds | engine/baseline |\n|---|---|---|---|")
    for r in records:
        ratio = f"{r['value'] / records[1]['value']:.2f}x" if r["system"] == "engine" else ""
        print(f"| {r['system']} | {r['value']:.2f} | {r['seconds']:.1f} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
