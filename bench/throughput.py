"""Training and reranking speed and memory of the engine against the paper's way (DESIGN.md, "Performance: what is measured"), side by side.

    python bench/throughput.py [--device cpu|cuda] [--model DIR | --shape qwen2.5-0.5b|qwen2.5-1.5b|qwen2.5-7b|llama2-7b]
        [--stage cpt|sft|rerank|all] [--systems engine,engine-ac,engine-prepacked,baseline] [--lora RANK]
        [--steps 3] [--warmup 1] [--json OUT.json]

--model: a checkpoint (default: the builtin SmolLM2-135M). --shape: a randomly initialised model of that
architecture (bench/model_shapes.py; bf16 weights, a BPE tokenizer trained on the sample texts), nothing downloaded.
Each (stage, system) runs in its own process, so that its peak memory is its own: on the CPU the peak resident
set of that process (ru_maxrss, model loading included), on CUDA torch's peak allocation. Every system sees the
same units in the same order; reported is the median over `--steps` measured steps after `--warmup`.
- cpt (stage 1): `--pairs-per-step` (document, query) pairs of the MS MARCO sample per optimizer step. engine:
  the trainer's step (packed rows, LM head only at loss positions). baseline: what the paper's pretrain script
  computes: a transformers model, padded micro-batches of `--baseline-micro-batch` accumulated into one step,
  full-vocabulary cross-entropy on the response tokens, AdamW (on CUDA fp32 weights under bf16 autocast, as the
  Hugging Face Trainer's bf16 mode). Reported: tokens/s and MFU.
- sft (stage 2): one query group of `--group-size` candidates per step, the top half of the blocks trainable,
  the stage-1 reference = the same checkpoint, loaded separately. engine: the trainer's step (fused ranking
  head, shared frozen trunk); engine-ac the same with activation checkpointing. baseline: the paper's sft
  script: a transformers model and a separate transformers reference, the group padded to its longest
  candidate, full-vocabulary log-softmax for both, L_rank + L_gen + L_dp written out, AdamW. Reported: groups/s.
- `--lora RANK` (stage 2): adds engine-lora, the engine's step with LoRA adapters of that rank (alpha 2 x rank,
  no dropout, on q, k, v, o, gate, up, down) on the same trained blocks, the base model as the reference; and
  prints the memory one GPU would need for stage 2 with and without LoRA on this model and on Qwen2.5-7B
  (bench/memory_estimate.py: the model built on the meta device by the trainer's code, activations by formula).
- engine-prepacked (both training stages): the engine's step on rows packed before the timed steps, against
  engine, whose steps are read, tokenized and packed in a background thread during the previous step, as the
  trainer's are: the data path's cost on the step is their difference.
- rerank: `--rerank-pairs` pairs per step with the paper's evaluation prompt. engine: `tsarank-engine rerank`'s
  scoring (bench/rerank.py); baseline: the paper's eval loop with transformers (padded batches of 8, full logits).
  Reported: pairs/s.

MFU (stage 1) = model FLOPs per step / step seconds / peak FLOP/s, the same model FLOPs for both systems:
3 x the forward's, which for a sequence of L tokens with R loss positions (response and EOS) is
2 L N + 2 R D V + 2 n_layers H_q d_head L (L + 1), N the decoder's matrix parameters (q, k, v, o, gate, up,
down), D x V the LM head (counted where the loss reads it), the last term causal attention within the
document. Padding and logits nobody reads are not model FLOPs. Peak: PEAK_TFLOPS for the card (dense bf16);
on the CPU a ceiling measured in the same run, before and after the systems, the best float32 product of two
2048 x 2048 matrices through torch and through oneDNN (cpu_peak_tflops); --peak-tflops overrides. A system that runs out of memory is
recorded with no value and the error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import memory_estimate
from bench_common import SAMPLES, machine_name
from rerank import sample_rows
from model_shapes import CONFIGS, model_config, write_random_checkpoint
from tsarank_engine.model.config import ModelConfig

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's data sheets, by device-name prefix.
PEAK_TFLOPS = {"NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0, "NVIDIA H100": 989.4, "NVIDIA H200 NVL": 835.0,
               "NVIDIA H200": 989.4, "NVIDIA A100": 312.0}
UNITS = {"cpt": "tokens/s", "sft": "groups/s", "rerank": "pairs/s"}


def cpu_peak_tflops(size: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """The CPU's ceiling measured now, in this run: the best TFLOP/s of a product of two [size, size] matrices in
    `dtype`; in float32 through torch (MKL) and through oneDNN (what the engine's head and scoring's linears use),
    in bfloat16 through torch (oneDNN, on the CPU's AVX512-BF16 or AMX units where it has them). A nominal cores x
    clock x FMA width understates what these products reach (157 against 190-220 GFLOP/s in float32 on the 2-core
    dev machine), which overstates MFU."""
    from tsarank_kernels.dense import matmul_nt

    def best(product) -> float:
        return product_tflops(product, torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype),
                              reps)

    ceilings = {"torch.mm": best(lambda a, b: torch.mm(a, b.T))}
    if dtype == torch.float32:
        ceilings["oneDNN"] = best(matmul_nt)
    name = max(ceilings, key=ceilings.get)
    shown = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in ceilings.items())
    kind = str(dtype).removeprefix("torch.")
    return ceilings[name], f"measured: best {kind} product of [{size}, {size}] matrices ({shown} GFLOP/s)"


def product_tflops(product, a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    """The best TFLOP/s of `reps` timings of product(a, b) = a [M, K] @ b [N, K]^T, after a warm-up (where oneDNN
    builds its primitive)."""
    product(a, b)
    seconds = min(_timed(lambda: product(a, b)) for _ in range(reps))
    return 2 * a.shape[0] * b.shape[0] * a.shape[1] / seconds / 1e12


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_tflops(device: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from) for this device; None for an unknown card."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        prefix = max((p for p in PEAK_TFLOPS if name.startswith(p)), key=len, default=None)
        return (PEAK_TFLOPS[prefix], f"{prefix} dense bf16 data sheet") if prefix else (None, f"unknown card {name}")
    return cpu_peak_tflops()


def forward_flops(config, length: int, loss_positions: int) -> float:
    """Model FLOPs of one forward over a sequence (see the module docstring)."""
    c = config
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    matrix_params = c.num_layers * (2 * c.hidden_size * q_width + 2 * c.hidden_size * kv_width
                                    + 3 * c.hidden_size * c.intermediate_size)
    attention = 2 * c.num_layers * q_width * length * (length + 1)
    return 2 * length * matrix_params + 2 * loss_positions * c.hidden_size * c.vocab_size + attention


def cpt_step_flops(config, sequences) -> float:
    return 3 * sum(forward_flops(config, len(s), len(s) - s.target_start) for s in sequences)


def write_cpt_pairs(path: Path) -> None:
    """Stage-1 pairs from the MS MARCO sample: each passage with its query, as {"document", "query"} lines."""
    with open(path, "w", encoding="utf-8") as out:
        for row in sample_rows():
            out.write(json.dumps({"document": row["document"], "query": row["query"]}) + "\n")


def recipe_for(args, stage: str, checkpointing: bool = False, lora: bool = False):
    from tsarank_engine.recipe import (DataSettings, LoraSettings, ModelSettings, Recipe, RunSettings, SftSettings,
                                       TrainSettings)

    n_blocks = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
    data = SAMPLES / "msmarco_groups.jsonl" if stage == "sft" else Path(args.work) / "cpt_pairs.jsonl"
    return Recipe(
        run=RunSettings(stage=stage, output_dir="/nonexistent", seed=0),
        model=ModelSettings(path=args.model),
        data=DataSettings(path=str(data), max_tokens=args.max_tokens),
        train=TrainSettings(max_steps=args.warmup + args.steps, batch_size=1 if stage == "sft" else args.pairs_per_step,
                            lr=3e-5 if stage == "sft" else 5e-5, activation_checkpointing=checkpointing),
        sft=SftSettings(group_size=args.group_size, trainable_top_blocks=n_blocks // 2),
        lora=LoraSettings(rank=args.lora, alpha=2.0 * args.lora) if lora else LoraSettings(),
    )


def stream_for(recipe, tokenizer):
    from tsarank_engine.training.stream import recipe_stream
    from tsarank_engine.model.config import ModelConfig

    return recipe_stream(recipe, tokenizer, ModelConfig.from_dir(recipe.model.path).family)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PrePacked:
    """Steps made beforehand, given out as the trainer's prefetcher gives them."""

    def __init__(self, steps: list):
        self.steps = steps

    def next_step(self, world: int, rank: int):
        return self.steps.pop(0)

    def close(self) -> None:
        pass


def run_engine(args, stage: str, device: torch.device, checkpointing: bool, prepacked: bool = False,
               lora: bool = False) -> dict:
    from tsarank_engine.data.stream import Prefetcher
    from tsarank_engine.distributed import start_processes, stop_processes
    from tsarank_engine.model.config import ModelConfig
    from tsarank_engine.data.tokenization import Tokenizer
    from tsarank_engine.devices import tune_cpu
    from tsarank_engine.training.build import build_objective, compute_dtype, make_optimizer
    from tsarank_engine.training.trainer import train_step

    recipe = recipe_for(args, stage, checkpointing, lora)
    processes = start_processes(device.type)
    tune_cpu(processes.device)
    try:
        dtype = compute_dtype(recipe, processes.device)
        tokenizer = Tokenizer.from_dir(recipe.model.path)
        stream = stream_for(recipe, tokenizer)
        twin = stream_for(recipe, tokenizer)  # the same units, for counting model FLOPs
        config = ModelConfig.from_dir(recipe.model.path)
        objective, _ = build_objective(recipe, processes, dtype)
        optimizer = make_optimizer(objective, recipe)
        count = args.warmup + args.steps
        # engine: the trainer's way, the next steps read, tokenized and packed in a background thread meanwhile;
        # engine-prepacked: every step's rows made before the first is timed (what the data path would cost
        # on the step is the difference)
        steps = PrePacked([stream.next_step(1) for _ in range(count)]) if prepacked else Prefetcher(stream, 1, 0, count)
        seconds, tokens, losses, flops = [], [], [], []
        with contextlib.closing(steps):
            for _ in range(count):
                synchronize(processes.device)
                start = time.perf_counter()
                record = train_step(objective, optimizer, steps, processes, stage, 1.0)
                synchronize(processes.device)
                seconds.append(time.perf_counter() - start)
                tokens.append(record["tokens"])
                losses.append(record["loss"])
                units = twin.next_window_units()
                flops.append(cpt_step_flops(config, units) if stage == "cpt" else None)
    finally:
        stop_processes()
    w = args.warmup
    return {"seconds": seconds[w:], "tokens": tokens[w:], "flops": flops[w:], "loss": losses}


def run_baseline(args, stage: str, device: torch.device) -> dict:
    import transformers

    from tsarank_engine.model.config import ModelConfig
    from tsarank_engine.data.tokenization import Tokenizer

    recipe = recipe_for(args, stage)
    tokenizer = Tokenizer.from_dir(args.model)
    stream = stream_for(recipe, tokenizer)  # the units the engine's steps see, left unpacked
    steps = [stream.next_window_units() for _ in range(args.warmup + args.steps)]
    config = ModelConfig.from_dir(args.model)
    # fp32 weights under bf16 autocast on CUDA: the Hugging Face Trainer's bf16 mode.
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    if stage == "sft":
        ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        reference = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=ref_dtype).to(device).eval()
        reference.requires_grad_(False)
        model.requires_grad_(False)
        layers = model.model.layers
        layers[len(layers) - recipe.sft.trainable_top_blocks:].requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.train.lr)
    seconds, tokens, losses, flops = [], [], [], []
    for step in steps:
        synchronize(device)
        start = time.perf_counter()
        if stage == "sft":
            sequences = [c for group in step for c in group.candidates]
            ids, mask = padded(sequences, device)
            with autocast:
                loss = plain_sft_loss(model, reference, ids, mask, sequences, recipe.sft.tau)
            loss.backward()
            total = float(loss)
        else:
            sequences, total = step, 0.0
            weights = sum(len(s) - s.target_start for s in sequences)
            for i in range(0, len(sequences), args.baseline_micro_batch):  # gradient accumulation
                micro = sequences[i:i + args.baseline_micro_batch]
                ids, mask = padded(micro, device)
                with autocast:
                    loss = plain_cpt_loss(model, ids, mask, micro) * (sum(len(s) - s.target_start for s in micro)
                                                                       / weights)
                loss.backward()
                total += float(loss)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(s) for s in sequences))
        losses.append(total)
        flops.append(cpt_step_flops(config, sequences) if stage == "cpt" else None)
    w = args.warmup
    return {"seconds": seconds[w:], "tokens": tokens[w:], "flops": flops[w:], "loss": losses}


def run_rerank(args, system: str, device: torch.device) -> dict:
    """Scoring of --rerank-pairs pairs per step, the engine's (bench/rerank.py) or the paper's loop."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = sample_rows(args.rerank_pairs * (args.warmup + args.steps))
    steps = [rows[i:i + args.rerank_pairs] for i in range(0, len(rows), args.rerank_pairs)]
    if system == "baseline":
        import transformers

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from paper_reference import paper_scores, paper_sequences

        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()

        def score(step):
            sequences = paper_sequences(hf_tokenizer, step)
            return paper_scores(hf_model, sequences, batch_size=8), sum(len(ids) for ids, _ in sequences)
    else:
        from tsarank_engine.data.prompting import PromptBuilder
        from tsarank_engine.rank.scoring import score_pairs
        from tsarank_engine.data.tokenization import Tokenizer
        from tsarank_engine.model.loading import load_model

        builder = PromptBuilder(Tokenizer.from_dir(args.model))
        model = load_model(args.model, dtype=dtype, device=device).eval()

        def score(step):
            prompted = [p for r in step for p in builder.build_many(r["query"], [r["document"]])]
            return score_pairs(model, prompted), sum(len(p.input_ids) for p in prompted)
    seconds, tokens = [], []
    for step in steps:
        synchronize(device)
        start = time.perf_counter()
        _, n_tokens = score(step)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        tokens.append(n_tokens)
    w = args.warmup
    return {"seconds": seconds[w:], "tokens": tokens[w:], "units": [len(s) for s in steps[w:]]}


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
    try:
        if stage == "rerank":
            result = run_rerank(args, system, device)
        elif system == "baseline":
            result = run_baseline(args, stage, device)
        else:
            result = run_engine(args, stage, device, checkpointing=system == "engine-ac",
                                prepacked=system == "engine-prepacked", lora=system == "engine-lora")
    except torch.OutOfMemoryError as e:
        result = {"error": f"out of memory: {str(e).splitlines()[0]}"}
    from tsarank_engine.training.trainer import peak_memory_mb

    result["peak_mb"] = peak_memory_mb(device)
    print("RESULT " + json.dumps(result))


def record_for(args, stage: str, system: str, r: dict, model: str, machine: str, peak: float | None) -> dict:
    record = {"stage": stage, "system": system, "device": args.device, "machine": machine, "model": model,
              "metric": UNITS[stage], "value": None, "peak_mb": round(r["peak_mb"]), "peak_tflops": peak}
    if "error" in r:
        return record | {"error": r["error"]}
    step_s = statistics.median(r["seconds"])
    tokens = statistics.median(r["tokens"])
    units = {"cpt": tokens, "sft": 1, "rerank": statistics.median(r.get("units") or [0])}[stage]
    per_step = {"cpt": args.pairs_per_step, "sft": 1, "rerank": units}[stage]  # pairs, groups or pairs a step
    record.update(value=units / step_s, step_s=step_s, tokens_per_s=tokens / step_s,
                  tokens_per_unit=tokens / per_step if per_step else None)
    if stage == "cpt":
        flops = statistics.median(r["flops"])
        record.update(model_tflops=flops / step_s / 1e12, mfu=flops / step_s / 1e12 / peak if peak else None)
    if stage == "sft":
        record["group_size"] = args.group_size
    if "loss" in r:
        record["losses"] = r["loss"]
    return record


def print_table(records: list[dict], header: str) -> None:
    print(f"\n{header}\n")
    print("| stage | system | tokens per pair or group | metric | value | s/step | tokens/s | MFU | peak MB | "
          "engine/baseline speed | memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        base = next((b for b in records if b["stage"] == r["stage"] and b["system"] == "baseline"), None)
        compare = base is not None and r["system"] != "baseline" and r["value"] and base["value"]
        speed = f"{r['value'] / base['value']:.2f}x" if compare else ""
        memory = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if compare else ""
        if r["value"] is None:
            print(f"| {r['stage']} | {r['system']} | | {r['metric']} | {r['error']} | | | | {r['peak_mb']} | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        per_unit = f"{r['tokens_per_unit']:.0f}" if r.get("tokens_per_unit") else ""
        print(f"| {r['stage']} | {r['system']} | {per_unit} | {r['metric']} | {r['value']:.4g} | {r['step_s']:.3f} | "
              f"{r['tokens_per_s']:.0f} | {mfu} | {r['peak_mb']} | {speed} | {memory} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="checkpoint directory (default: the builtin SmolLM2-135M)")
    source.add_argument("--shape", choices=list(CONFIGS), help="a randomly initialised model of this architecture")
    parser.add_argument("--stage", choices=["cpt", "sft", "rerank", "all"], default="all")
    parser.add_argument("--systems", default="engine,engine-ac,baseline",
                        help="engine, engine-ac (activation checkpointing; training stages), engine-prepacked (rows "
                             "packed before the timed steps; training stages) and/or baseline")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="stage 2: also measure engine-lora (LoRA of this rank on the trained blocks) and print "
                             "the memory estimates with and without LoRA")
    parser.add_argument("--group-size", type=int, default=48)
    parser.add_argument("--pairs-per-step", type=int, help="stage 1 (default: 8 on the CPU, 128 on CUDA)")
    parser.add_argument("--baseline-micro-batch", type=int, default=16, help="stage 1 baseline's padded batch")
    parser.add_argument("--rerank-pairs", type=int,
                        help="pairs per reranking step (default: 100, a query's top 100, on the CPU; 1024 on CUDA)")
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU (default: see above)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per (stage, system) process")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.pairs_per_step = args.pairs_per_step or (128 if cuda else 8)
    args.rerank_pairs = args.rerank_pairs or (1024 if cuda else 100)
    if args.child:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="tsarank-throughput-"))
    try:
        if args.shape:
            print(f"writing a random {args.shape} checkpoint ...", file=sys.stderr)
            args.model = str(write_random_checkpoint(CONFIGS[args.shape], work / args.shape))
            model_name = f"{args.shape} (random weights)"
        else:
            if args.model is None:
                from tsarank_engine.model.builtin import BUILTIN_PREFIX, SMOLLM2, resolve_model_path

                args.model = resolve_model_path(BUILTIN_PREFIX + SMOLLM2)
            model_name = Path(args.model).name
        write_cpt_pairs(work / "cpt_pairs.jsonl")
        measure(args, work, model_name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path, model_name: str) -> None:
    """Run every (stage, system) and print the table; --json is rewritten after each, so a run cut short (a
    time limit on a lent GPU) keeps what it measured."""
    machine = machine_name(args.device)
    peak, peak_source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else peak_tflops(args.device)
    records, failed = [], []
    shared = ["--device", args.device, "--model", args.model, "--work", str(work), "--group-size", args.group_size,
              "--pairs-per-step", args.pairs_per_step, "--baseline-micro-batch", args.baseline_micro_batch,
              "--rerank-pairs", args.rerank_pairs, "--max-tokens", args.max_tokens, "--steps", args.steps,
              "--warmup", args.warmup, "--lora", args.lora]
    for stage in (["cpt", "sft", "rerank"] if args.stage == "all" else [args.stage]):
        training_only = ("engine-ac", "engine-prepacked")
        systems = [s for s in args.systems.split(",") if not (stage == "rerank" and s in training_only)]
        if args.lora and stage == "sft":
            systems.append("engine-lora")
        for system in systems:
            command = [sys.executable, __file__, *map(str, shared), "--child", f"{stage}:{system}"]
            try:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                result = json.loads(line[len("RESULT "):]) if proc.returncode == 0 and line else None
            except subprocess.TimeoutExpired:
                proc, result = None, {"error": f"over --timeout {args.timeout:.0f} s", "peak_mb": 0}
            if result is None:
                failed.append(f"{stage}/{system} failed:\n{proc.stderr[-3000:]}")
                print(failed[-1], file=sys.stderr)
                result = {"error": f"exit {proc.returncode}", "peak_mb": 0}
            records.append(record_for(args, stage, system, result, model_name, machine, peak)
                           | {"peak_source": peak_source})
            if args.json:
                args.json.write_text(json.dumps(records, indent=1) + "\n")
            r = records[-1]
            shown = f"{r['value']:.4g} {r['metric']}" if r["value"] is not None else r["error"]
            print(f"{stage}/{system}: {shown}, peak {r['peak_mb']} MB", file=sys.stderr)
    if args.device == "cpu" and not args.peak_tflops:
        # measured again after the systems: a shared machine's speed drifts, and a ceiling caught at a slow moment
        # would overstate MFU; the best of the two is the ceiling
        after, after_source = cpu_peak_tflops()
        if after > peak:
            peak, peak_source = after, after_source + ", after the systems"
        for r in records:
            r.update(peak_tflops=peak, peak_source=peak_source)
            if r.get("model_tflops") is not None:
                r["mfu"] = r["model_tflops"] / peak
        if args.json:
            args.json.write_text(json.dumps(records, indent=1) + "\n")
    print_table(records, f"{machine}, {model_name}; MFU against {peak and f'{peak:.3g}'} TFLOP/s ({peak_source})")
    if args.lora:
        estimates = [memory_estimate.print_comparison(config, name, blocks, args.lora, args.max_tokens)
                     for config, name, blocks in (
                         (ModelConfig.from_dir(args.model), model_name, recipe_for(args, "sft").sft.trainable_top_blocks),
                         (model_config("qwen2.5-7b"), "Qwen2.5-7B", 14))]  # recipes/paper/qwen2.5-7b-sft.toml's
        if args.json:
            args.json.write_text(json.dumps({"measured": records, "memory_estimates": estimates}, indent=1) + "\n")
    if failed:
        sys.exit(f"{len(failed)} of {len(records)} measurements failed (above)")


if __name__ == "__main__":
    main()
