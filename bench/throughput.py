"""Training speed and memory of the engine against the paper's way (DESIGN.md section 7), side by side.

    python bench/throughput.py [--device cpu|cuda] [--model DIR] [--stage cpt|sft|all] [--group-size 48]
        [--steps 3] [--warmup 1] [--json OUT.json]

Each (stage, system) runs in its own process, so that its peak memory is its own: on the CPU the peak
resident set of that process (ru_maxrss, model loading included), on CUDA torch's peak allocation.
- sft (stage 2): one query group of `--group-size` candidates per optimizer step, the top half of the blocks
  trainable, the stage-1 reference = the same checkpoint, loaded separately. engine: the trainer's own step
  (packed rows, fused ranking head, shared frozen trunk, FSDP2 over one process); engine-ac the same with
  activation checkpointing. baseline: what the paper's
  sft script computes: a transformers model and a separate transformers reference, the group padded to its
  longest candidate, full-vocabulary log-softmax for both, L_rank + L_gen + L_dp written out, AdamW.
- cpt (stage 1): `--pairs-per-step` text pairs per step. engine: the trainer's step; baseline: transformers,
  padded batch, full-vocabulary cross-entropy on the response tokens.
The same units (same sampling seed) go to both systems. Reported: median seconds per step over `--steps`
measured steps after `--warmup`, units/s and tokens/s, peak memory, and the ratio engine/baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from timing import machine_name

SAMPLES = Path(__file__).resolve().parents[1] / "tsarank_engine" / "sample_data" / "rankinggpt"


def recipe_for(args, stage: str, checkpointing: bool = False):
    from tsarank_engine.recipe import Recipe, RunSettings, ModelSettings, DataSettings, TrainSettings, SftSettings

    model = args.model
    n_blocks = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    data = str(SAMPLES / ("msmarco_groups.jsonl" if stage == "sft" else "text_pairs.jsonl"))
    return Recipe(
        run=RunSettings(stage=stage, output_dir="/nonexistent", seed=0),
        model=ModelSettings(path=model),
        data=DataSettings(path=data, max_tokens=args.max_tokens),
        train=TrainSettings(max_steps=args.warmup + args.steps, batch_size=1 if stage == "sft" else args.pairs_per_step,
                            lr=3e-5 if stage == "sft" else 5e-5, activation_checkpointing=checkpointing),
        sft=SftSettings(group_size=args.group_size, trainable_top_blocks=n_blocks // 2),
    )


def stream_for(args, recipe, tokenizer):
    from tsarank_engine.data_stream import PackedStream

    return PackedStream(recipe.data.path, recipe.run.stage, tokenizer, recipe.data.max_tokens, seed=0,
                        window=recipe.train.batch_size, group_size=args.group_size)


def run_engine(args, stage: str, device: torch.device, checkpointing: bool) -> dict:
    from tsarank_engine.distributed import start_processes, stop_processes
    from tsarank_engine.tokenization import Tokenizer
    from tsarank_engine.trainer import build_objective, compute_dtype, make_optimizer, train_step, tune_cpu_allocator

    recipe = recipe_for(args, stage, checkpointing)
    processes = start_processes(device.type)
    tune_cpu_allocator(processes.device)
    try:
        dtype = compute_dtype(recipe, processes.device)
        tokenizer = Tokenizer.from_dir(recipe.model.path)
        stream = stream_for(args, recipe, tokenizer)
        objective, _ = build_objective(recipe, processes, dtype)
        optimizer = make_optimizer(objective, recipe)
        records = [train_step(objective, optimizer, stream, processes, stage, 1.0)
                   for _ in range(args.warmup + args.steps)]
    finally:
        stop_processes()
    measured = records[args.warmup:]
    return {"seconds": [r["step_time_s"] for r in measured], "tokens": [r["tokens"] for r in measured],
            "loss": [r["loss"] for r in records]}


def run_baseline(args, stage: str, device: torch.device) -> dict:
    import transformers

    from tsarank_engine.tokenization import Tokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    recipe = recipe_for(args, stage)
    tokenizer = Tokenizer.from_dir(args.model)
    stream = stream_for(args, recipe, tokenizer)  # the units the engine's steps see, left unpacked
    steps = [stream.next_window_units() for _ in range(args.warmup + args.steps)]
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    if stage == "sft":
        reference = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        reference.requires_grad_(False)
        model.requires_grad_(False)
        layers = model.model.layers
        layers[len(layers) - recipe.sft.trainable_top_blocks:].requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.train.lr)
    seconds, tokens, losses = [], [], []
    for step in steps:
        sequences = [c for g in step for c in g.candidates] if stage == "sft" else step
        start = time.perf_counter()
        ids, mask = padded(sequences, device)
        if stage == "sft":
            loss = plain_sft_loss(model, reference, ids, mask, sequences, recipe.sft.tau)
        else:
            loss = plain_cpt_loss(model, ids, mask, sequences)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(s) for s in sequences))
        losses.append(float(loss))
    return {"seconds": seconds[args.warmup:], "tokens": tokens[args.warmup:], "loss": losses}


def padded(sequences, device):
    longest = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s.input_ids)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def next_token_logprobs(logits, ids):
    """[B, L-1]: log p(token j+1 | up to j), and the full log-softmax [B, L-1, V]."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return logp.gather(2, ids[:, 1:, None]).squeeze(2), logp


def plain_sft_loss(model, reference, ids, mask, sequences, tau):
    picked, logp = next_token_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids)
    with torch.no_grad():
        _, ref = next_token_logprobs(reference(input_ids=ids, attention_mask=mask).logits, ids)
    real = mask[:, 1:].bool()
    scores = torch.stack([picked[i, s.target_start - 1:len(s) - 1].mean() for i, s in enumerate(sequences)])
    l_rank = torch.nn.functional.cross_entropy((torch.exp(scores) / tau)[None], torch.zeros(1, dtype=torch.long,
                                                                                             device=ids.device))
    l_gen = -picked[0, :len(sequences[0]) - 1].mean()
    kl = (ref.exp() * (ref - logp)).sum(-1)
    l_dp = kl[real].mean()
    return l_rank + l_gen + l_dp


def plain_cpt_loss(model, ids, mask, sequences):
    picked, _ = next_token_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids)
    counted = torch.zeros_like(picked, dtype=torch.bool)
    for i, s in enumerate(sequences):
        counted[i, s.target_start - 1:len(s) - 1] = True
    return -picked[counted].mean()


def child(args) -> None:
    device = torch.device(args.device)
    stage, system = args.child.split(":")
    if system == "baseline":
        result = run_baseline(args, stage, device)
    else:
        result = run_engine(args, stage, device, checkpointing=system == "engine-ac")
    from tsarank_engine.trainer import peak_memory_mb

    result["peak_mb"] = peak_memory_mb(device)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the builtin SmolLM2-135M)")
    parser.add_argument("--stage", choices=["cpt", "sft", "all"], default="all")
    parser.add_argument("--systems", default="engine,engine-ac,baseline",
                        help="engine, engine-ac (activation checkpointing) and/or baseline")
    parser.add_argument("--group-size", type=int, default=48)
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from tsarank_engine.builtin_models import BUILTIN_PREFIX, SMOLLM2, resolve_model_path

        args.model = resolve_model_path(BUILTIN_PREFIX + SMOLLM2)
    if args.child:
        child(args)
        return
    machine = machine_name(args.device)
    records = []
    for stage in (["cpt", "sft"] if args.stage == "all" else [args.stage]):
        for system in args.systems.split(","):
            argv = [a for a in sys.argv[1:]]
            proc = subprocess.run([sys.executable, __file__, *argv, "--model", args.model, "--child", f"{stage}:{system}"],
                                  capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{stage}/{system} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            step_s = statistics.median(r["seconds"])
            per_step_units = 1 if stage == "sft" else args.pairs_per_step
            records.append({"stage": stage, "system": system, "device": args.device, "machine": machine,
                            "model": Path(args.model).name, "group_size": args.group_size if stage == "sft" else None,
                            "metric": "groups/s" if stage == "sft" else "sequences/s",
                            "value": per_step_units / step_s, "step_s": step_s,
                            "tokens_per_s": statistics.median(r["tokens"]) / step_s, "peak_mb": round(r["peak_mb"]),
                            "losses": r["loss"]})
            print(f"{stage}/{system}: {step_s:.2f} s/step, peak {r['peak_mb']:.0f} MB", file=sys.stderr)
    print(f"\n{machine}, {Path(args.model).name}\n")
    print("| stage | system | metric | value | s/step | tokens/s | peak MB | engine/baseline speed | memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        base = next((b for b in records if b["stage"] == r["stage"] and b["system"] == "baseline"), None)
        ratio = f"{r['value'] / base['value']:.2f}x" if base and r["system"] != "baseline" else ""
        mem = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base and r["system"] != "baseline" else ""
        print(f"| {r['stage']} | {r['system']} | {r['metric']} | {r['value']:.4f} | {r['step_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_mb']} | {ratio} | {mem} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
