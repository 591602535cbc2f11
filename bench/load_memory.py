"""Peak resident memory while loading a checkpoint, relative to the loaded model's size.

    python bench/load_memory.py [--model DIR] [--dtype float32 --dtype bfloat16] [--reader engine --reader safe_open]
                                [--json OUT.json]
    python bench/load_memory.py [--model DIR] --nproc 1 2 4 [--json OUT.json]

Each dtype is measured in a fresh process: right after the imports the kernel's peak-RSS mark is reset
(/proc/self/clear_refs), the model is loaded on the CPU, and the growth of the peak over the RSS before
loading is divided by the bytes of the loaded parameters. Linux only.

--nproc N: the trainer's loading (training/build.py's build_objective: the model built on the meta device, sharded by
FSDP2, each process reading only its own rows) in N gloo processes under torchrun, float32 stage 1. Each
process's baseline is its RSS once the process group is up and FSDP's code loaded (by sharding one small
layer on the meta device), before anything of the model exists; the
record gives the largest process's baseline and peak, and the largest growth as a share of the model's bytes,
against the target 1/N + 0.1.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from tsarank_engine.model.builtin import BUILTIN_PREFIX, SMOLLM2, resolve_model_path

# /proc/self/status in bytes: VmRSS now, VmHWM the peak since the mark was last reset (clear_refs 5)
_STATUS = r"""
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
"""

_CHILD = _STATUS + r"""
import json, sys
import torch
from tsarank_engine.model.loading import load_model

before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
if sys.argv[3] == "engine":
    model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
else:  # the same model filled through the safetensors package's own reader (safe_open, memory-mapped)
    from pathlib import Path
    from safetensors import safe_open
    from tsarank_engine.model.decoder import CausalLM
    from tsarank_engine.model.config import ModelConfig
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_dir(sys.argv[1]))
    model.to_empty(device="cpu").to(getattr(torch, sys.argv[2]))
    params = dict(model.named_parameters())
    for path in sorted(Path(sys.argv[1]).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in params:
                    params[name].data.copy_(f.get_tensor(name))
    model.tie_weights()
peak = status("VmHWM")
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"reader": sys.argv[3], "dtype": sys.argv[2], "model_mb": size / 2**20, "peak_growth_mb": (peak - before) / 2**20,
                  "ratio": (peak - before) / size}))
"""


_SHARDED_CHILD = _STATUS + r"""
import json, os, sys
import torch, torch.distributed as dist
from tsarank_engine.distributed import start_processes
from tsarank_engine.recipe import DataSettings, ModelSettings, Recipe, RunSettings, TrainSettings
from tsarank_engine.training.build import build_objective

processes = start_processes("cpu")
from torch.distributed.fsdp import fully_shard
with torch.device("meta"):  # the code FSDP loads on first use, before the baseline: an empty process has it
    fully_shard(torch.nn.Linear(8, 8))
recipe = Recipe(run=RunSettings(stage="cpt"), model=ModelSettings(path=sys.argv[1]), data=DataSettings(path="-"),
                train=TrainSettings(batch_size=1, lr=1e-4))
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
objective, _ = build_objective(recipe, processes, torch.float32)
peak = status("VmHWM")
size = sum(p.numel() * p.element_size() for p in objective.parameters())  # the whole model's, sharded or not
mine = torch.tensor([before, peak], dtype=torch.float64)
every = [torch.zeros_like(mine) for _ in range(processes.world_size)]
dist.all_gather(every, mine)
if processes.is_main:
    print(json.dumps({"per_process": [[b / 2**20, p / 2**20] for b, p in (t.tolist() for t in every)], "model_mb": size / 2**20}),
          flush=True)
dist.barrier()
os._exit(0)  # not a finalized interpreter: see DESIGN.md, "Environment facts", on gloo at exit
"""


def measure_sharded(model_dir: str, nproc: int) -> dict:
    script = Path(tempfile.mkdtemp()) / "sharded_load.py"
    script.write_text(_SHARDED_CHILD)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          str(nproc), str(script), model_dir], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"measuring {nproc} processes failed:\n{out.stderr[-3000:]}")
    found = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    growth = max(peak - base for base, peak in found["per_process"])
    return {"nproc": nproc, "model_mb": found["model_mb"], "baseline_mb": max(b for b, _ in found["per_process"]),
            "peak_rss_mb": max(p for _, p in found["per_process"]), "growth_mb": growth,
            "growth_share": growth / found["model_mb"], "target_share": 1 / nproc + 0.1}


def measure(model_dir: str, dtype: str, reader: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, model_dir, dtype, reader], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"measuring {dtype} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUILTIN_PREFIX + SMOLLM2,
                        help="checkpoint directory (default: the builtin SmolLM2-135M)")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reader", action="append", choices=["engine", "safe_open"],
                        help="the engine's reader (default), and/or the safetensors package's safe_open, to compare")
    parser.add_argument("--nproc", type=int, nargs="+", help="the trainer's sharded loading in these many processes")
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args()
    args.model = resolve_model_path(args.model)
    files = sorted(Path(args.model).glob("*.safetensors"))
    on_disk = sum(f.stat().st_size for f in files) / 2**20
    machine = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.machine())
    if args.nproc:
        records = [measure_sharded(args.model, n) | {"machine": machine, "checkpoint_mb": on_disk} for n in args.nproc]
        print(f"checkpoint: {args.model} ({on_disk:.0f} MB of safetensors), float32, training.build.build_objective\n")
        print(f"machine: {machine}\n\n| processes | model MB | largest baseline MB | largest peak RSS MB | "
              "largest growth MB | growth / model | target (1/N + 0.1) |\n|---|---|---|---|---|---|---|")
        for r in records:
            print(f"| {r['nproc']} | {r['model_mb']:.0f} | {r['baseline_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['growth_mb']:.0f} | {r['growth_share']:.2f} | {r['target_share']:.2f} |")
        if args.json:
            args.json.write_text(json.dumps(records, indent=2) + "\n")
        return
    records = [measure(args.model, dtype, reader) | {"machine": machine, "checkpoint_mb": on_disk}
               for reader in args.reader or ["engine"] for dtype in args.dtype or ["float32", "bfloat16"]]
    print(f"checkpoint: {args.model} ({on_disk:.0f} MB of safetensors)\n")
    print(f"machine: {machine}\n\n| reader | dtype | model MB | peak RSS growth MB | ratio |\n|---|---|---|---|---|")
    for r in records:
        print(f"| {r['reader']} | {r['dtype']} | {r['model_mb']:.0f} | {r['peak_growth_mb']:.0f} | {r['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
