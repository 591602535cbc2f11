"""Tokens/s of the whole training-data pipeline: read, sample, tokenize, pack (tsarank_engine.data_stream).

    python bench/data.py [--tokenizer DIR] [--cpt-rows 200000] [--sft-groups 2000] [--json OUT.json]

The paper's sample files repeated to the given sizes (stage 1: text pairs; stage 2: query groups of 48
candidates, each group a few thousand tokens) are streamed once through PackedStream, as training reads
them: seeded order, window by window. tokens/s counts the real tokens of the rows produced, over wall time
on this machine. Packing efficiency is reported beside it: real tokens over max_tokens slots per row, and
for stage 2 also padding each group to its longest candidate (what the paper's scripts do).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from tsarank_engine.builtin_models import BUILTIN_PREFIX, SMOLLM2, resolve_model_path
from tsarank_engine.data_stream import PackedStream
from tsarank_engine.packing import Packer
from tsarank_engine.sequences import CptBuilder, GroupBuilder
from tsarank_engine.tokenization import Tokenizer

SAMPLES = Path(__file__).resolve().parents[1] / "tsarank_engine" / "sample_data" / "rankinggpt"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=BUILTIN_PREFIX + SMOLLM2,
                        help="a checkpoint directory with tokenizer.json (default: the builtin SmolLM2-135M's)")
    parser.add_argument("--cpt-rows", type=int, default=200_000)
    parser.add_argument("--sft-groups", type=int, default=2_000)
    parser.add_argument("--cpt-max-tokens", type=int, default=8192)
    parser.add_argument("--sft-max-tokens", type=int, default=16384)
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
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
