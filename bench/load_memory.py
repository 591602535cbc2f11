"""Peak resident memory while loading a checkpoint, relative to the loaded model's size.

    python bench/load_memory.py [--model DIR] [--dtype float32 --dtype bfloat16] [--reader engine --reader safe_open]
                                [--json OUT.json]

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
if sys.argv[3] == "engine":
    model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
else:  # the same model filled through the safetensors package's own reader (safe_open, memory-mapped)
    from pathlib import Path
    from safetensors import safe_open
    from tsarank_engine.decoder import CausalLM
    from tsarank_engine.model_config import ModelConfig
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
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args()
    args.model = resolve_model_path(args.model)
    files = sorted(Path(args.model).glob("*.safetensors"))
    on_disk = sum(f.stat().st_size for f in files) / 2**20
    machine = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.machine())
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
