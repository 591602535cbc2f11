"""A few steps of each training stage end to end, through `tsarank-engine train`, on a random model of a shape.

    python bench/train_steps.py [--shape qwen2.5-0.5b] [--device cuda] [--steps 4] [--group-size 48]
                                [--layers N] [--json OUT.json]

What the next GPU that is lent should run once: the recipe path a user takes (recipe, data stream with its
background prefetch, FSDP2 in one process, the default attention, the Triton ranking head on CUDA, bf16 by
default there, checkpoint and export), on a randomly initialised model of the shape (bench/model_shapes.py) with the
sample BPE tokenizer. Stage 1: pairs of the MS MARCO sample, 128 a step on CUDA (8 on the CPU); stage 2: one
group of --group-size candidates a step from the stage-1 model, the top half of the blocks trained, and the same
with LoRA rank 16 on those blocks (sft-lora: the adapted base as its own reference, the merged export). Per stage:
each step's time, peak memory and loss from metrics.jsonl, and the median step time after the first.
--layers keeps that many blocks (a smaller model of the same widths, for a quick run on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import SAMPLES, machine_name
from model_shapes import CONFIGS, write_random_checkpoint
from throughput import write_cpt_pairs


def train(recipe: Path, out: Path, device: str) -> list[dict]:
    """`tsarank-engine train RECIPE` (whose run.output_dir is `out`); the steps of its metrics.jsonl."""
    proc = subprocess.run([sys.executable, "-m", "tsarank_engine.cli", "train", str(recipe), "--device", device],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"tsarank-engine train {recipe.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(CONFIGS), default="qwen2.5-0.5b")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=48)
    parser.add_argument("--pairs-per-step", type=int, help="stage 1 (default: 128 on CUDA, 8 on the CPU)")
    parser.add_argument("--layers", type=int, help="keep this many decoder blocks (default: the shape's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = dict(CONFIGS[args.shape])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    pairs = args.pairs_per_step or (128 if args.device == "cuda" else 8)

    with tempfile.TemporaryDirectory(prefix="tsarank-train-steps-") as tmp:
        work = Path(tmp)
        model = write_random_checkpoint(config, work / "model")
        write_cpt_pairs(work / "pairs.jsonl")
        stages = {
            "cpt": f'[run]\nstage = "cpt"\noutput_dir = "{work / "cpt"}"\n[model]\npath = "{model}"\n'
                   f'[data]\npath = "{work / "pairs.jsonl"}"\nmax_tokens = 16384\n'
                   f"[train]\nmax_steps = {args.steps}\nbatch_size = {pairs}\nlr = 5e-5\n",
            "sft": f'[run]\nstage = "sft"\noutput_dir = "{work / "sft"}"\n[model]\npath = "{work / "cpt" / "final"}"\n'
                   f'[data]\npath = "{SAMPLES / "msmarco_groups.jsonl"}"\nmax_tokens = 16384\n'
                   f"[train]\nmax_steps = {args.steps}\nbatch_size = 1\nlr = 3e-5\n"
                   f"[sft]\ngroup_size = {args.group_size}\n"
                   f"trainable_top_blocks = {max(1, config['num_hidden_layers'] // 2)}\n",
        }
        # stage 2 again with LoRA on the same blocks: the base (bf16) as its own reference, fp32 adapters
        sft_out = f'output_dir = "{work / "sft"}"'
        stages["sft-lora"] = (stages["sft"].replace(sft_out, f'output_dir = "{work / "sft-lora"}"')
                              + "[lora]\nrank = 16\nalpha = 32.0\n")
        records = []
        for stage, text in stages.items():
            recipe = work / f"{stage}.toml"
            recipe.write_text(text)
            steps = train(recipe, work / stage, args.device)
            later = [s["step_time_s"] for s in steps[1:]] or [steps[0]["step_time_s"]]
            records.append({"stage": stage, "shape": args.shape, "layers": config["num_hidden_layers"],
                            "device": args.device, "machine": machine_name(args.device),
                            "units_per_step": pairs if stage == "cpt" else 1,
                            "group_size": args.group_size if stage != "cpt" else None,
                            "median_step_s": statistics.median(later),
                            "peak_mem_mb": max(s["peak_mem_mb"] for s in steps),
                            "tokens_per_step": statistics.median(s["tokens"] for s in steps),
                            "steps": [{k: s[k] for k in ("step", "loss", "step_time_s", "peak_mem_mb", "tokens")}
                                      for s in steps]})
            r = records[-1]
            print(f"{stage}: {len(steps)} steps, median {r['median_step_s']:.3f} s/step after the first, "
                  f"peak {r['peak_mem_mb']:.0f} MB, {r['tokens_per_step']:.0f} tokens a step, losses "
                  + ", ".join(f"{s['loss']:.4f}" for s in steps), file=sys.stderr)
            if args.json:  # after each stage: a run cut short by a time limit keeps what it measured
                args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
