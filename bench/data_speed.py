"""Tokens/s of the whole training-data pipeline: read, sample, tokenize, pack (tsarank_engine.data.stream).

    python bench/data_speed.py [--tokenizer DIR] [--cpt-rows 200000] [--sft-groups 2000] [--world 64] [--steps 10]
        [--json OUT.json]

The paper's sample files repeated to the given sizes (stage 1: text pairs; stage 2: query groups of 48
candidates, each group a few thousand tokens) are streamed once through PackedStream, as training reads
them: seeded order, window by window. tokens/s counts the real tokens of the rows produced, over wall time
on this machine. Packing efficiency is reported beside it: real tokens over max_tokens slots per row, and
for stage 2 also padding each group to its longest candidate (what the paper's scripts do).
Then, per training step of the paper's shape on --world ranks, what each rank's data thread spends: reading and
tokenizing the step's window, packing its own share, and packing every rank's share (what each rank did before).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from bench_common import SAMPLES
from tsarank_engine.model.builtin import BUILTIN_PREFIX, SMOLLM2, resolve_model_path
from tsarank_engine.data.stream import PackedStream
from tsarank_engine.data.packing import Packer
from tsarank_engine.data.sequences import CptBuilder, GroupBuilder
from tsarank_engine.data.tokenization import Tokenizer



def repeated(source: Path, rows: int, out: Path) -> Path:
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    with open(out, "w") as f:
        for i in range(rows):
            f.write(lines[i % len(lines)] + "\n")
    return out


def measure(path: Path, kind: str, tokenizer: Tokenizer, max_tokens: int, rows_in_file: int) -> dict:
    units = CptBuilder(tokenizer, min(512, max_tokens)) if kind == "cpt" else GroupBuilder(tokenizer)
    stream = PackedStream(path, units, Packer(max_tokens), seed=0)
    tokens = rows = 0
    padded_slots = 0
    start = time.perf_counter()
    for row in stream.epoch():  # one pass over the file
        tokens += row.num_tokens
        rows += 1
        if kind == "sft":  # the same groups padded to their longest candidate
            cu = row.cu_seqlens.tolist()
            lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
            offsets = row.group.group_offsets.tolist()
            padded_slots += sum((hi - lo) * max(lengths[lo:hi]) for lo, hi in zip(offsets[:-1], offsets[1:]))
    seconds = time.perf_counter() - start
    record = {"stage": kind, "rows_in_file": rows_in_file, "packed_rows": rows, "tokens": tokens,
              "seconds": seconds, "tokens_per_s": tokens / seconds, "max_tokens": max_tokens,
              "packed_efficiency": tokens / (rows * max_tokens), "machine": platform.processor() or platform.machine()}
    if kind == "sft":
        record["padded_efficiency"] = tokens / padded_slots
    return record


def measure_step(path: Path, kind: str, tokenizer: Tokenizer, max_tokens: int, units_per_step: int, world: int,
                 steps: int) -> dict:
    """Per training step, what each rank's data thread does: read and tokenize the step's window (every rank: the
    dealing needs every unit's length), then pack its own share (Packer.pack_step); beside it, packing every
    rank's share, which each rank did before it packed only its own. Seconds per step, medians over `steps`."""
    units = CptBuilder(tokenizer, min(512, max_tokens)) if kind == "cpt" else GroupBuilder(tokenizer)
    packer = Packer(max_tokens)
    stream = PackedStream(path, units, packer, seed=0, window=units_per_step)
    read, own, every = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        window = stream.next_window_units()
        read.append(time.perf_counter() - start)
        start = time.perf_counter()
        packer.pack_step(window, world, 0)
        own.append(time.perf_counter() - start)
        start = time.perf_counter()
        for rank in range(world):
            packer.pack_step(window, world, rank)
        every.append(time.perf_counter() - start)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"stage": kind, "units_per_step": units_per_step, "world": world, "steps": steps,
            "read_tokenize_s": median(read), "pack_own_share_s": median(own), "pack_every_share_s": median(every)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=BUILTIN_PREFIX + SMOLLM2,
                        help="a checkpoint directory with tokenizer.json (default: the builtin SmolLM2-135M's)")
    parser.add_argument("--cpt-rows", type=int, default=200_000)
    parser.add_argument("--sft-groups", type=int, default=2_000)
    parser.add_argument("--cpt-max-tokens", type=int, default=8192)
    parser.add_argument("--sft-max-tokens", type=int, default=16384)
    parser.add_argument("--world", type=int, default=64, help="ranks, for the per-step split")
    parser.add_argument("--steps", type=int, default=10, help="steps measured for the per-step split")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(resolve_model_path(args.tokenizer))
    records = []
    print("| stage | rows in file | tokens | seconds | tokens/s | packed efficiency | padded efficiency |\n"
          "|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, source, rows, max_tokens in (
            ("cpt", SAMPLES / "text_pairs.jsonl", args.cpt_rows, args.cpt_max_tokens),
            ("sft", SAMPLES / "msmarco_groups.jsonl", args.sft_groups, args.sft_max_tokens),
        ):
            path = repeated(source, rows, Path(tmp) / f"{kind}.jsonl")
            r = measure(path, kind, tokenizer, max_tokens, rows)
            records.append(r)
            print(f"| {kind} | {rows:,} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['packed_efficiency']:.3f} | {r.get('padded_efficiency', float('nan')):.3f} |", flush=True)
        # the paper's steps: 256 pairs (stage 1), one group of 48 per rank (stage 2)
        print(f"\nPer step on each of {args.world} ranks (median of {args.steps}):\n"
              "| stage | units a step | read + tokenize the window, s | pack own share, s | pack every share, s |\n"
              "|---|---|---|---|---|")
        for kind, units_per_step, max_tokens in (("cpt", 256, args.cpt_max_tokens),
                                                 ("sft", args.world, args.sft_max_tokens)):
            r = measure_step(Path(tmp) / f"{kind}.jsonl", kind, tokenizer, max_tokens, units_per_step, args.world,
                             args.steps)
            records.append(r)
            print(f"| {kind} | {units_per_step} | {r['read_tokenize_s']:.3f} | {r['pack_own_share_s']:.4f} | "
                  f"{r['pack_every_share_s']:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
