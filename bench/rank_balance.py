"""How evenly a training step's work falls on the ranks, simulated with the real packer (no model runs).

    python bench/rank_balance.py [--pairs 256] [--max-tokens 16384] [--world 8] [--steps 50] [--seed 0] [--json OUT]

The paper's stage-1 shape: 256 (document, query) pairs a step in rows of 16,384 tokens over 8 GPUs. The pairs'
lengths are those of the MS MARCO sample (every passage of msmarco_groups.jsonl with its query, in the paper's
"Document: ... Query:" form, tokenized by the embedded default's tokenizer, at most 512 tokens), drawn with
replacement for each step. Two ways of giving a step to the ranks, side by side:

- rows dealt: the whole step packed into rows first, the rows dealt to the ranks (largest first, to the least
  loaded), a rank short of rows computing a zero-weight copy of one (the trainer before units were dealt);
- units dealt (Packer.pack_step, what the trainer does): the pairs dealt to the ranks balanced by tokens, each
  rank packing its own share into the same number of rows.

Per way: the max / mean of the ranks' real tokens (mean and worst over the steps) and the share of computed
tokens that are zero-weight copies.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from bench_common import SAMPLES
from tsarank_engine.model.builtin import BUILTIN_PREFIX, SMOLLM2, resolve_model_path
from tsarank_engine.data.packing import Packer, PackedRow, StepPart
from tsarank_engine.data.readers import TextPair
from tsarank_engine.data.sequences import CptBuilder
from tsarank_engine.data.tokenization import Tokenizer
from tsarank_engine.training.trainer import step_balance


def rows_dealt(rows: list[PackedRow], world: int) -> list[StepPart]:
    """The former way: rows dealt largest first to the least loaded rank; a rank short of rows repeats its own
    first, else the step's first."""
    load, dealt = [0] * world, [[] for _ in range(world)]
    for row in sorted(rows, key=lambda r: -r.num_tokens):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += row.num_tokens
        dealt[r].append(row)
    most = max(len(mine) for mine in dealt)
    return [StepPart(mine, most, (mine or rows)[0]) for mine in dealt]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256, help="pairs per step (the paper's 256)")
    parser.add_argument("--max-tokens", type=int, default=16_384, help="tokens per row")
    parser.add_argument("--world", type=int, default=8, help="ranks")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()

    tokenizer = Tokenizer.from_dir(resolve_model_path(BUILTIN_PREFIX + SMOLLM2))
    builder = CptBuilder(tokenizer, 512)
    pool = []
    for line in (SAMPLES / "msmarco_groups.jsonl").read_text().splitlines():
        if line.strip():
            group = json.loads(line)
            for passage in group["positive_passages"] + group["negative_passages"]:
                pool.append(builder.build(TextPair(f"Document: {passage['text']} Query:", group["query"])))
    packer = Packer(args.max_tokens)
    results = {}
    for way in ("rows dealt", "units dealt"):
        ratios, copied = [], []
        for step in range(args.steps):
            units = [pool[i] for i in np.random.default_rng([args.seed, step]).integers(len(pool), size=args.pairs)]
            parts = (rows_dealt(packer.pack_sequences(units), args.world) if way == "rows dealt"
                     else [packer.pack_step(units, args.world, rank) for rank in range(args.world)])
            stats = step_balance(parts)
            ratios.append(stats["rank_tokens_max_mean"])
            copied.append(stats["copied_token_share"])
        results[way] = {"max_mean_mean": statistics.mean(ratios), "max_mean_worst": max(ratios),
                        "copied_share_mean": statistics.mean(copied), "copied_share_worst": max(copied)}
    lengths = [len(s) for s in pool]
    print(f"{args.pairs} pairs a step ({len(pool)} sample pairs, {statistics.mean(lengths):.0f} tokens on average), "
          f"rows of {args.max_tokens:,}, {args.world} ranks, {args.steps} steps\n")
    print("| way | rank tokens max/mean (mean, worst) | zero-weight copies, share of computed tokens (mean, worst) |")
    print("|---|---|---|")
    for way, r in results.items():
        print(f"| {way} | {r['max_mean_mean']:.3f}, {r['max_mean_worst']:.3f} | "
              f"{100 * r['copied_share_mean']:.1f} %, {100 * r['copied_share_worst']:.1f} % |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "mean_tokens": statistics.mean(lengths), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
