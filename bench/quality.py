"""Ranking quality: what each stage of the paper's recipe buys, at small scale, with the engine's commands alone.

    python bench/quality.py [--device cpu|cuda] [--seeds 0 1 2] [--work runs/quality] [--json OUT.json]
                            [--systems zero-shot stage2 stage1+2 no-dp no-gen] [--lrs 3e-5 1e-4 3e-4]
                            [--lr LR --include EARLIER.json]   # other seeds later, with a recorded tuning

The protocol (BENCHMARKS.md, "Ranking quality", fixed before any run):
- Data: the paper's 100 MS MARCO sample queries (tsarank_engine/sample_data/rankinggpt/msmarco_groups.jsonl),
  each with its positives (relevance 1) and up to 65 hard negatives, written as BEIR files, TREC qrels and a
  first-stage run listing each query's candidates.
- Split: the queries sorted by numeric id; every fifth (positions 4, 9, ..., 99) is a test query (20), the
  other 80 train. Among the 80 (in the same order) every fifth is a validation query (16) and 64 fit the
  models while the learning rate is chosen. The test queries are used only for the final table.
- Systems: zero-shot SmolLM2-135M-Instruct; stage 2 only (from SmolLM2, SmolLM2 the reference); stage 1 then
  stage 2 (the paper's recipe); and stage 1 then stage 2 without L_dp (w_dp = 0) and without L_gen (w_gen = 0).
  Stage 1 trains on `tsarank-engine pairs` of the training queries' positives (recipes/quality/cpt.toml);
  stage 2 on `tsarank-engine groups` of the training queries, 7 hard negatives each (seeded by the run's
  seed; recipes/quality/sft.toml: groups of 8, top 15 of 30 blocks, one epoch).
- The learning rate of stage 2: each of --lrs trains "stage 2 only" on the 64 fit queries (seed 0); the one
  with the best nDCG@10 on the 16 validation queries is used for every system and seed.
- Measure: each test query's candidates (its positives and negatives) reranked by `tsarank-engine rerank`
  (the paper's evaluation prompt), MRR@10 and nDCG@10 by `tsarank-engine eval` over the 20 test queries;
  per system the mean and sample standard deviation over the seeds (zero-shot has no seed), with training
  time and peak memory.

Every step is a CLI call in a subprocess; results are kept in --work, so a run cut short continues where it
stopped when started again. Seeds can be run apart: `--lr` (the lr an earlier tuning chose) skips the tuning,
and `--include` adds an earlier run's records (--json) to the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import SAMPLES, machine_name

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "quality"
SYSTEMS = ("zero-shot", "stage2", "stage1+2", "no-dp", "no-gen")
# (starts from stage 1, w_gen, w_dp) of each trained system
STAGE2 = {"stage2": (False, 1.0, 1.0), "stage1+2": (True, 1.0, 1.0), "no-dp": (True, 1.0, 0.0),
          "no-gen": (True, 0.0, 1.0)}
METRICS = "RR@10,nDCG@10"
NEGATIVES = 7  # groups of 8


def cli(*args: str, log: Path) -> tuple[float, float]:
    """Run a tsarank-engine command; its stderr goes to `log`; returns its wall time and CPU time (user +
    system: what it computed, less sensitive than the wall time to other work on the machine); failures stop
    the bench."""
    start, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "a", encoding="utf-8") as err:
        err.write(f"$ tsarank-engine {' '.join(args)}\n")
        err.flush()
        proc = subprocess.run([sys.executable, "-m", "tsarank_engine.cli", *args], stdout=subprocess.PIPE,
                              stderr=err, text=True)
    if proc.returncode:
        sys.exit(f"tsarank-engine {args[0]} failed (exit {proc.returncode}); see {log}")
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime


def split(query_ids: list[str]) -> dict[str, list[str]]:
    """The protocol's split: test = every fifth query by numeric id; of the rest, val = every fifth."""
    ordered = sorted(query_ids, key=int)
    train = [q for i, q in enumerate(ordered) if i % 5 != 4]
    return {"test": [q for i, q in enumerate(ordered) if i % 5 == 4], "train": train,
            "val": [q for i, q in enumerate(train) if i % 5 == 4], "fit": [q for i, q in enumerate(train) if i % 5 != 4]}


def write_collection(work: Path) -> None:
    """BEIR corpus and queries, and per split the qrels and a first-stage run of its queries' candidates."""
    groups = [json.loads(line) for line in (SAMPLES / "msmarco_groups.jsonl").read_text().splitlines() if line.strip()]
    corpus: dict[str, str] = {}
    with open(work / "queries.jsonl", "w", encoding="utf-8") as f:
        for g in groups:
            f.write(json.dumps({"_id": str(g["query_id"]), "text": g["query"]}) + "\n")
            for p in g["positive_passages"] + g["negative_passages"]:
                corpus.setdefault(str(p["docid"]), p["text"])
    with open(work / "corpus.jsonl", "w", encoding="utf-8") as f:
        for docid, text in corpus.items():
            f.write(json.dumps({"_id": docid, "text": text}) + "\n")
    splits = split([str(g["query_id"]) for g in groups])
    by_id = {str(g["query_id"]): g for g in groups}
    for name, qids in splits.items():
        with open(work / f"{name}.qrels", "w") as qrels, open(work / f"{name}.run", "w") as run:
            for q in qids:
                g = by_id[q]
                positives = [str(p["docid"]) for p in g["positive_passages"]]
                for d in positives:
                    qrels.write(f"{q} 0 {d} 1\n")
                # the candidates in a fixed order that says nothing of relevance: by document id
                candidates = sorted(set(positives) | {str(p["docid"]) for p in g["negative_passages"]}, key=int)
                for rank, d in enumerate(candidates, 1):
                    run.write(f"{q} Q0 {d} {rank} {-rank} sample\n")


def train(recipe: str, out: Path, overrides: dict[str, object], device: str, log: Path) -> dict:
    """Train a recipe (unless out/final exists); its wall time and peak memory, kept in out/bench.json."""
    record_path = out / "bench.json"
    if record_path.is_file() and (out / "final").is_dir():
        return json.loads(record_path.read_text())
    sets = [a for key, value in overrides.items() for a in ("--set", f"{key}={json.dumps(value)}")]
    seconds, cpu = cli("train", str(RECIPES / recipe), "--overwrite", "--device", device,
                       "--set", f"run.output_dir={json.dumps(str(out))}", *sets, log=log)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    record = {"train_s": round(seconds, 1), "train_cpu_s": round(cpu, 1), "steps": len(steps),
              "peak_mem_mb": max(s["peak_mem_mb"] for s in steps)}
    record_path.write_text(json.dumps(record) + "\n")
    return record


def evaluate(model: Path, work: Path, split_name: str, out: Path, device: str, log: Path) -> dict:
    """Rerank a split's candidates with `model` and evaluate (kept in out.json)."""
    result_path = out.with_suffix(".json")
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run = out.with_suffix(".run")
    seconds, _ = cli("rerank", "--model", str(model), "--run", str(work / f"{split_name}.run"),
                  "--queries", str(work / "queries.jsonl"), "--corpus", str(work / "corpus.jsonl"),
                  "--out", str(run), "--top-k", "1000", "--device", device, log=log)
    proc = subprocess.run([sys.executable, "-m", "tsarank_engine.cli", "eval", "--qrels",
                           str(work / f"{split_name}.qrels"), "--run", str(run), "--metrics", METRICS, "--json"],
                          capture_output=True, text=True, check=True)
    result = {**json.loads(proc.stdout), "rerank_s": round(seconds, 1)}
    result_path.write_text(json.dumps(result) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    parser.add_argument("--lr", type=float, help="use this stage-2 lr (one a recorded tuning chose): no tuning")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--include", type=Path, action="append", default=[],
                        help="records (--json) of an earlier run with the same lr, e.g. other seeds, for the table")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    write_collection(work)
    from tsarank_engine.model.builtin import BUILTIN_PREFIX, SMOLLM2, resolve_model_path

    base = Path(resolve_model_path(BUILTIN_PREFIX + SMOLLM2))
    started = time.perf_counter()

    # the learning rate of stage 2, on the held-out training queries only
    tuning = {} if args.lr is None else {args.lr: None}
    cli("groups", "--qrels", str(work / "fit.qrels"), "--run", str(work / "fit.run"), "--queries",
        str(work / "queries.jsonl"), "--corpus", str(work / "corpus.jsonl"), "--out", str(work / "fit-groups.jsonl"),
        "--negatives", str(NEGATIVES), "--seed", "0", log=log)
    for lr in args.lrs if args.lr is None else []:
        out = work / "tune" / f"lr{lr:g}"
        train("sft.toml", out, {"model.path": str(base), "data.path": str(work / "fit-groups.jsonl"),
                                "train.lr": lr, "run.seed": 0}, args.device, log)
        tuning[lr] = evaluate(out / "final", work, "val", out / "val", args.device, log)["nDCG@10"]
        print(f"lr {lr:g}: validation nDCG@10 {tuning[lr]:.4f}", file=sys.stderr)
    lr = args.lr if args.lr is not None else max(tuning, key=lambda k: (tuning[k], -k))  # ties: the smaller lr
    print(f"stage-2 lr {lr:g}", file=sys.stderr)

    cli("pairs", "--qrels", str(work / "train.qrels"), "--queries", str(work / "queries.jsonl"), "--corpus",
        str(work / "corpus.jsonl"), "--out", str(work / "pairs.jsonl"), log=log)
    records = []
    for seed in args.seeds:
        seed_dir = work / f"seed{seed}"
        seed_dir.mkdir(exist_ok=True)
        groups = seed_dir / "groups.jsonl"
        cli("groups", "--qrels", str(work / "train.qrels"), "--run", str(work / "train.run"), "--queries",
            str(work / "queries.jsonl"), "--corpus", str(work / "corpus.jsonl"), "--out", str(groups),
            "--negatives", str(NEGATIVES), "--seed", str(seed), log=log)
        stage1 = None
        for system in args.systems:
            if system == "zero-shot":
                if seed != args.seeds[0]:
                    continue  # no training, no seed
                result = evaluate(base, work, "test", work / "zero-shot-test", args.device, log)
                records.append({"system": system, "seed": None, **result})
                continue
            from_stage1, w_gen, w_dp = STAGE2[system]
            cost = {"train_s": 0.0, "train_cpu_s": 0.0, "peak_mem_mb": 0.0}
            start_model = base
            if from_stage1:
                stage1 = stage1 or train("cpt.toml", seed_dir / "cpt", {
                    "model.path": str(base), "data.path": str(work / "pairs.jsonl"), "run.seed": seed},
                    args.device, log)
                start_model = seed_dir / "cpt" / "final"
                cost = {key: stage1.get(key) for key in cost}
            out = seed_dir / system
            trained = train("sft.toml", out, {"model.path": str(start_model), "data.path": str(groups),
                                              "train.lr": lr, "run.seed": seed, "sft.w_gen": w_gen,
                                              "sft.w_dp": w_dp}, args.device, log)
            result = evaluate(out / "final", work, "test", out / "test", args.device, log)
            cpu = (cost["train_cpu_s"], trained.get("train_cpu_s"))  # absent from records made before it was kept
            records.append({"system": system, "seed": seed, **result,
                            "train_s": round(cost["train_s"] + trained["train_s"], 1),
                            "train_cpu_s": None if None in cpu else round(sum(cpu), 1),
                            "peak_mem_mb": max(cost["peak_mem_mb"], trained["peak_mem_mb"])})
            print(f"seed {seed} {system}: MRR@10 {result['RR@10']:.4f} nDCG@10 {result['nDCG@10']:.4f}",
                  file=sys.stderr)

    for path in args.include:
        earlier = json.loads(path.read_text())
        if earlier["lr"] != lr:
            sys.exit(f"{path}: its stage-2 lr {earlier['lr']:g} is not this run's {lr:g}")
        measured = {(r["system"], r["seed"]) for r in records}
        records += [r for r in earlier["records"] if (r["system"], r["seed"]) not in measured
                    and not (r["seed"] is None and any(m[1] is None for m in measured))]
        tuning = tuning if args.lr is None else earlier["tuning"]
    records.sort(key=lambda r: (SYSTEMS.index(r["system"]), -1 if r["seed"] is None else r["seed"]))
    machine = machine_name(args.device)
    chosen = ("chosen on validation: " + ", ".join(f"{float(k):g} -> {v:.4f}" for k, v in tuning.items())
              if all(v is not None for v in tuning.values()) else "given with --lr")
    print(f"\nRanking quality on the 20 test queries ({machine}; stage-2 lr {lr:g} {chosen})\n")
    print("| system | seeds | MRR@10 | nDCG@10 | training time (s) | training CPU time (s) | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|")
    for system in args.systems:
        rows = [r for r in records if r["system"] == system]

        def cell(key: str) -> str:
            values = [r[key] for r in rows]
            if len(values) < 2:
                return f"{values[0]:.4f}"
            return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

        seeds = ", ".join(str(r["seed"]) for r in rows if r["seed"] is not None) or "-"
        trained = "train_s" in rows[0]  # zero-shot trains nothing
        train_s = f"{statistics.mean(r['train_s'] for r in rows):.0f}" if trained else "-"
        timed = [r["train_cpu_s"] for r in rows if r.get("train_cpu_s") is not None]
        cpu_s = f"{statistics.mean(timed):.0f} ({len(timed)} of {len(rows)} runs)" if timed else "-"
        peak = f"{max(r['peak_mem_mb'] for r in rows):.0f}" if trained else "-"
        print(f"| {system} | {seeds} | {cell('RR@10')} | {cell('nDCG@10')} | {train_s} | {cpu_s} | {peak} |")
    print(f"\nwhole bench: {time.perf_counter() - started:.0f} s (steps already done in {work} are reused)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "device": args.device, "lr": lr, "tuning": tuning,
                                         "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
