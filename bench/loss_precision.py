"""Would scoring's float32 islands help training's bfloat16 losses? The stage-2 listwise loss L_rank (the paper's:
-log softmax(exp(s) / tau) at the positive, tau the recipes' default 0.001) of sample groups, from the scores of
three forwards of one model: float32 (the reference), all-bfloat16 (what training's FSDP bf16 compute runs: every
parameter gathered in bf16, the residual stream and norms in bf16) and scoring's mixed path (products in bf16; the
residual stream, norms and logits in float32).

    python bench/loss_precision.py [--model DIR] [--groups 20] [--negatives 7] [--json OUT.json]

Groups: the first --groups of the MS MARCO sample with --negatives negatives or more, each its first positive and
first --negatives negatives (the paper's groups of 8), prompted as scoring prompts them. Reports per precision the
largest and mean |score difference| from float32 and the mean and largest |L_rank difference| per group; the
forward only (the backward multiplies the same softmax's error).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench_common import SAMPLES, machine_name

from tsarank_engine.data.prompting import PromptBuilder
from tsarank_engine.data.tokenization import Tokenizer
from tsarank_engine.model.builtin import BUILTIN_PREFIX, SMOLLM2, resolve_model_path
from tsarank_engine.model.loading import load_model
from tsarank_engine.rank.scoring import score_pairs
from tsarank_engine.recipe import SftSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the builtin SmolLM2-135M)")
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--negatives", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = args.model or resolve_model_path(BUILTIN_PREFIX + SMOLLM2)
    tau = SftSettings().tau
    groups = [g for g in map(json.loads, (SAMPLES / "msmarco_groups.jsonl").read_text().splitlines())
              if len(g["negative_passages"]) >= args.negatives][:args.groups]
    builder = PromptBuilder(Tokenizer.from_dir(model_dir))
    pairs = [builder.build(g["query"], p["text"]) for g in groups
             for p in g["positive_passages"][:1] + g["negative_passages"][:args.negatives]]
    size = 1 + args.negatives
    forwards = {"float32": load_model(model_dir), "all-bfloat16": load_model(model_dir, torch.bfloat16),
                "mixed": load_model(model_dir, torch.bfloat16, mixed=True)}
    scores = {name: torch.tensor(score_pairs(model.eval(), pairs), dtype=torch.float64).view(-1, size)
              for name, model in forwards.items()}
    losses = {name: -torch.log_softmax(s.exp() / tau, dim=1)[:, 0] for name, s in scores.items()}
    records = []
    for name in ("all-bfloat16", "mixed"):
        score_error, loss_error = (scores[name] - scores["float32"]).abs(), (losses[name] - losses["float32"]).abs()
        records.append({"forward": name, "model": Path(model_dir).name, "machine": machine_name("cpu"),
                        "groups": len(groups), "group_size": size, "tau": tau,
                        "score_diff_max": score_error.max().item(), "score_diff_mean": score_error.mean().item(),
                        "loss_diff_max": loss_error.max().item(), "loss_diff_mean": loss_error.mean().item(),
                        "loss_float32_mean": losses["float32"].mean().item()})
    print(f"{records[0]['machine']}, {records[0]['model']}, {len(groups)} groups of {size}, tau {tau}; "
          f"float32 L_rank mean {records[0]['loss_float32_mean']:.3f}\n")
    print("| forward | max / mean abs score difference | max / mean abs L_rank difference per group |\n|---|---|---|")
    for r in records:
        print(f"| {r['forward']} | {r['score_diff_max']:.4f} / {r['score_diff_mean']:.4f} | "
              f"{r['loss_diff_max']:.3f} / {r['loss_diff_mean']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
