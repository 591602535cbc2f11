"""Where scoring's time goes on the CPU: torch.profiler around the engine's scoring of the same pairs in float32, on
the mixed bfloat16 path as `rerank --dtype bfloat16` runs it, and on that path with every product in bfloat16 (the
CPU's float32 q/k/v projections cast down too), each op's self CPU time summed by kind.

    python bench/rerank_profile.py [--model DIR | --shape NAME] [--pairs 200] [--json OUT.json]

Kinds: oneDNN's float32 products (`mkldnn::_linear_pointwise`: the decoder's float32 linears and the head at query
positions), torch's other products (aten::mm/addmm: on the mixed path the bfloat16 linears), attention (torch
SDPA's CPU kernels; the copies into and out of their padded batch count with the rest), and the rest (norms, RoPE,
SwiGLU, residual adds, casts, indexing, Python) as the wall time less those. Each variant scores 16 pairs to warm up
first. The profiler's own overhead is in the wall time; compare the variants with each other, and take speeds from
bench/rerank.py. Then each distinct shape of the decoder's products is timed alone on a row of 2,048 tokens (the
CPU's scoring row) in float32 (the engine's oneDNN linear) and in bfloat16 (torch's, as the mixed path runs them):
the ratio of the two is what the mixed path can gain on its products.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from bench_common import machine_name
from model_shapes import add_model_options, model_dir_from
from rerank import sample_rows
from throughput import product_tflops
from tsarank_kernels.dense import linear

from tsarank_engine.data.prompting import PromptBuilder
from tsarank_engine.data.tokenization import Tokenizer
from tsarank_engine.devices import cpu_bf16_units
from tsarank_engine.model.loading import load_model
from tsarank_engine.rank.scoring import score_pairs

KINDS = {  # op name -> kind; the rest of the wall time is "elementwise and the rest"
    "mkldnn::_linear_pointwise": "float32 products (oneDNN)",
    "aten::mm": "other products (torch: the bfloat16 linears)",
    "aten::addmm": "other products (torch: the bfloat16 linears)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (SDPA)",
    "aten::_scaled_dot_product_attention_math": "attention (SDPA)",
}
REST = "elementwise ops (norms, RoPE, SwiGLU, residual adds, casts) and the rest"


def every_product_bf16(model: nn.Module) -> nn.Module:
    """The mixed model with the linears it keeps in float32 on the CPU (all but the head) cast to bfloat16."""
    for module in model.model.modules():
        if isinstance(module, nn.Linear):
            module.to(torch.bfloat16)
    return model


def profiled(model: nn.Module, pairs: list) -> dict[str, float]:
    """Seconds of wall time and of self CPU time per kind while `model` scores `pairs`."""
    score_pairs(model, pairs[:16])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        score_pairs(model, pairs)
        wall = time.perf_counter() - start
    seconds: dict[str, float] = {}
    for event in prof.key_averages():
        kind = KINDS.get(event.key)
        if kind:
            seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    seconds[REST] = wall - sum(seconds.values())
    seconds["in all (wall)"] = wall
    return seconds


@torch.inference_mode()
def product_rates(model: nn.Module, rows: int = 2048, reps: int = 10) -> dict[str, dict[str, float]]:
    """GFLOP/s of each distinct [out, in] shape of the decoder's linears on `rows` tokens, in float32 and in
    bfloat16, the best of `reps` timings."""
    rates = {}
    for shape in dict.fromkeys(tuple(m.weight.shape) for m in model.model.modules() if isinstance(m, nn.Linear)):
        x, w = torch.randn(rows, shape[1]), torch.randn(shape)
        rate = {"float32": product_tflops(linear, x, w, reps) * 1e3,
                "bfloat16": product_tflops(F.linear, x.bfloat16(), w.bfloat16(), reps) * 1e3}
        rate["ratio"] = rate["bfloat16"] / rate["float32"]
        rates[f"{shape[0]}x{shape[1]}"] = rate
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--pairs", type=int, default=200, help="the first N MS MARCO sample pairs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = model_dir_from(args)
    builder = PromptBuilder(Tokenizer.from_dir(model_dir))
    pairs = [builder.build(r["query"], r["document"]) for r in sample_rows(args.pairs)]
    variants = {
        "float32": lambda: load_model(model_dir),
        "mixed bfloat16 (as rerank runs it)": lambda: load_model(model_dir, torch.bfloat16, mixed=True),
        "mixed, every product bfloat16": lambda: every_product_bf16(load_model(model_dir, torch.bfloat16, mixed=True)),
    }
    results, rates = {}, None
    for name, build in variants.items():
        model = build().eval()
        results[name] = profiled(model, pairs)
        print(f"{name}: {results[name]['in all (wall)']:.1f} s", file=sys.stderr, flush=True)
        rates = rates or product_rates(model)  # the float32 model's shapes
        del model
    kinds = list(dict.fromkeys(KINDS.values())) + [REST, "in all (wall)"]
    machine, units = machine_name("cpu"), cpu_bf16_units()
    print(f"\n{machine} (bfloat16 units: {units}), {Path(model_dir).name}, {len(pairs)} pairs, "
          f"torch {torch.__version__}\n")
    print("| | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(f"{s.get(kind, 0.0):.2f} s" for s in results.values()) + " |")
    print("\n| product [out x in], 2,048 rows | float32 GFLOP/s | bfloat16 GFLOP/s | bfloat16 / float32 |\n"
          "|---|---|---|---|")
    for shape, rate in rates.items():
        print(f"| {shape} | {rate['float32']:.0f} | {rate['bfloat16']:.0f} | {rate['ratio']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "cpu_bf16_units": units, "model": Path(model_dir).name,
                                         "pairs": len(pairs), "torch": torch.__version__, "seconds": results,
                                         "products_gflop_per_s": rates}, indent=1) + "\n")


if __name__ == "__main__":
    main()
