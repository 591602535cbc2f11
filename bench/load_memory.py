"""Peak resident memory while loading a checkpoint, relative to the loaded model's size.

    python bench/load_memory.py [--model DIR] [--dtype float32 --dtype bfloat16] [--json OUT.json]

Each dtype is measured in a fresh process: right after the imports the kernel's peak-RSS mark is reset
(/proc/self/clear_refs), the model is loaded on the CPU, and the growth of the peak over the RSS before
loading is divided by the bytes of the loaded parameters. Linux only.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from tsarank_engine.builtin_models import BUILTIN_PREFIX, SMOLLM2, resolve_model_path

_CHILD = r"""
import json, sys
import torch
from tsarank_engine.weights import load_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
peak = status("VmHWM")
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"dtype": sys.argv[2], "model_mb": size / 2**20, "peak_growth_mb": (peak - before) / 2**20,
                  "ratio": (peak - before) / size}))
"""


def measure(model_dir: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, model_dir, dtype], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"measuring {dtype} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUILTIN_PREFIX + SMOLLM2,
                        help="checkpoint directory (default: the builtin SmolLM2-135M)")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args()
    args.model = resolve_model_path(args.model)
    files = sorted(Path(args.model).glob("*.safetensors"))
    on_disk = sum(f.stat().st_size for f in files) / 2**20
    machine = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.machine())
    records = [measure(args.model, dtype) | {"machine": machine, "checkpoint_mb": on_disk}
               for dtype in args.dtype or ["float32", "bfloat16"]]
    print(f"checkpoint: {args.model} ({on_disk:.0f} MB of safetensors)\n")
    print(f"machine: {machine}\n\n| dtype | model MB | peak RSS growth MB | ratio |\n|---|---|---|---|")
    for r in records:
        print(f"| {r['dtype']} | {r['model_mb']:.0f} | {r['peak_growth_mb']:.0f} | {r['ratio']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
