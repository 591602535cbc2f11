"""bench/compile_check.py: every project kernel is reached by its launcher drive, and the checks catch a kernel
whose matrix products miss the tensor cores (exact fp32 products excepted) and one that asks for more shared
memory than a block may have.
Compiling runs in a subprocess without TRITON_INTERPRET (under it @triton.jit builds interpreter functions)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

TOYS = '''
import triton
import triton.language as tl


@triton.jit
def toy_dot_kernel(A, B, C, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    r = tl.arange(0, BLOCK)
    a = tl.load(A + r[:, None] * BLOCK + r[None, :])
    b = tl.load(B + r[:, None] * BLOCK + r[None, :])
    tl.store(C + r[:, None] * BLOCK + r[None, :], tl.dot(a, b, input_precision=PRECISION))


@triton.jit
def toy_matmul_kernel(A, B, C, K, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k in range(0, K, BLOCK):  # pipelined: num_stages copies of both tiles in shared memory
        a = tl.load(A + r[:, None] * K + k + r[None, :])
        b = tl.load(B + (k + r[:, None]) * BLOCK + r[None, :])
        acc += tl.dot(a, b)
    tl.store(C + r[:, None] * BLOCK + r[None, :], acc)
'''

DRIVER = '''
import json, sys
sys.path[:0] = [{bench!r}, {toys!r}]
import compile_check as C

toy = lambda block, dtype, precision, stages, warps=4: C.Variant(
    "toys", "toy_dot_kernel", {{"A": "*" + dtype, "B": "*" + dtype, "C": "*fp32", "BLOCK": "constexpr",
                               "PRECISION": "constexpr"}},
    {{"BLOCK": block, "PRECISION": precision}}, [0, 1, 2], {{"num_warps": warps, "num_stages": stages}})
# 128 x 128 bf16 tiles of A and B in 6 stages: 5 x 64 KiB of shared memory, past the 227 KiB of a block
huge = C.Variant("toys", "toy_matmul_kernel", {{"A": "*bf16", "B": "*bf16", "C": "*fp32", "K": "i32",
                                                "BLOCK": "constexpr"}}, {{"BLOCK": 128}}, [0, 1, 2, 3],
                 {{"num_warps": 8, "num_stages": 6}})
out = {{}}
for name, variant in {{"bf16": toy(64, "bf16", "tf32", 3), "fp32-ieee": toy(64, "fp32", "ieee", 3),
                       "bf16-2-warps": toy(64, "bf16", "tf32", 3, warps=2), "huge": huge}}.items():
    record = C.compile_variant(variant, 90)
    out[name] = {{"record": record, "problems": C.problems(record, has_dot=True)}}
print(json.dumps(out))
'''


def _run(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_project_kernel_is_driven_by_its_launcher(tmp_path):
    out = _run(f"""
        import json, sys
        sys.path.insert(0, {str(BENCH)!r})
        import torch
        import compile_check as C
        launched = sorted({{fn.__name__ for fn, _, _ in C.drive_launchers("qwen2.5-0.5b", torch.bfloat16)}})
        print(json.dumps({{"launched": launched, "kernels": {{k: v[1] for k, v in C.project_kernels().items()}}}}))
    """, tmp_path)
    kernels = out["kernels"]
    assert sorted(kernels) == out["launched"] and len(kernels) == 11
    assert "_load_rows" not in kernels and "_probs" not in kernels  # helpers, compiled inside their callers
    assert kernels["_fwd_kernel"] and kernels["_bwd_dq_kernel"] and not kernels["_rms_norm_fwd_kernel"]


@pytest.mark.slow
def test_compile_check_flags_missed_tensor_cores_and_oversized_shared_memory(tmp_path):
    (tmp_path / "toys.py").write_text(TOYS)
    out = _run(DRIVER.format(bench=str(BENCH), toys=str(tmp_path)), tmp_path)
    assert out["bf16"]["problems"] == [] and out["bf16"]["record"]["hgmma"] > 0
    # exact fp32 products (what the kernels ask for in float32) do not use the tensor cores, by design
    assert out["fp32-ieee"]["record"]["hgmma"] == 0
    assert not any("HGMMA" in p for p in out["fp32-ieee"]["problems"]), out["fp32-ieee"]
    # two warps are less than a warpgroup: the product misses HGMMA, and the check says so
    assert out["bf16-2-warps"]["record"]["hgmma"] == 0, out["bf16-2-warps"]
    assert any("no HGMMA" in p for p in out["bf16-2-warps"]["problems"])
    huge = out["huge"]
    assert any("shared memory" in p for p in huge["problems"]) or "error" in huge["record"], huge
