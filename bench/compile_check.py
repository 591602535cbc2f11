"""Every Triton kernel of the project compiled for Hopper (sm_90) and Ampere (sm_80), on a machine without a GPU.

    python bench/compile_check.py [--arch 90 80] [--shape qwen2.5-0.5b ...] [--kernels NAME ...] [--jobs N]
        [--json OUT.json]

What is compiled is what the kernels' own launchers would launch: each Triton launcher in tsarank_kernels runs
on meta tensors (which take the launchers' CUDA configurations, tsarank_kernels/launch.py) at the model
shapes of bench/model_shapes.py, in bf16, fp16 and fp32 (training in float32 on CUDA runs the same kernels),
with Triton's launch replaced by a recorder. A block size, warp count or stage count changed in a launcher or
its CONFIGS is therefore checked without being listed here, and every @triton.jit kernel of tsarank_kernels
must turn up among the recorded launches (helpers called from other kernels excepted), so a new kernel cannot
be missed either.

Each distinct variant (kernel, argument types, constexprs, warps, stages) is compiled with
triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)), with Triton's default specialisation
(pointers 16-byte aligned, integers equal to 1 made constant, multiples of 16 marked divisible), in a fresh
Triton cache. Spill bytes are ptxas's own count for that build (Triton prints ptxas's log when
TRITON_DUMP_PTXAS_LOG=1); the cubin is read with the cuobjdump and nvdisasm shipped in the triton wheel:
registers per thread, stack frame (which libdevice's sin/cos use without spilling), the shared memory Triton
requests at launch, and the count of HGMMA (wgmma) instructions.

Exit status 1, naming kernel and configuration, when a variant does not compile, needs more shared memory
than the architecture gives a block, spills (unless listed in ALLOWED_SPILLS with the reason), or, on sm_90,
contains matrix products (tl.dot) that did not become HGMMA (fp32 products excepted: the kernels keep them exact,
input_precision "ieee", which the tensor cores do not do).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets, not the interpreter
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas's statistics (spill stores) printed for every build

import argparse
import concurrent.futures
import contextlib
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tsarank_kernels  # noqa: E402
from model_shapes import CONFIGS, model_config  # noqa: E402
from tsarank_kernels.block_ops_triton import triton_rms_norm_backward, triton_rms_norm_forward, triton_rope, triton_swiglu  # noqa: E402
from tsarank_kernels.flash_attention_triton import triton_attention_backward, triton_attention_forward  # noqa: E402
from tsarank_kernels.fused_linear import default_chunk_rows  # noqa: E402
from tsarank_kernels.fused_linear_triton import triton_softmax_chunk  # noqa: E402
from tsarank_kernels.rank_loss_triton import triton_rank_loss  # noqa: E402

# Largest shared memory one block may use (opt-in maximum): H100/H200 227 KiB, A100 163 KiB.
SHARED_LIMIT = {90: 232_448, 80: 166_912}
# (kernel, config substring, arch) -> why spilling is accepted there.
ALLOWED_SPILLS: dict[tuple[str, str, int], str] = {
    ("_rope_kernel", "", 80): (
        "4-20 bytes at 64-96 registers, so not register pressure: the sm_80 builds keep libdevice's sin/cos "
        "as calls with a stack frame (the sm_90 builds of the same blocks have no spill). Their slow path is for "
        "arguments past 1e5 radians, beyond any position x frequency."),
    **{("_bwd_dkdv_kernel", "BLOCK_D=128 PRECISION=tf32", arch): (
        "head dim 128: 16-48 bytes at 255 registers (Triton 3.9's ptxas). These blocks timed fastest on an H200 "
        "against bench/kernel_ops_decoder.py's ALT_CONFIGS; trading the spill for smaller blocks has to be timed on "
        "a GPU.") for arch in (90, 80)},
    ("_fwd_kernel", "BLOCK_D=128 PRECISION=ieee", 90): (
        "float32 (exact products on the CUDA cores), head dim 128, sm_90: 100 bytes at 255 registers with the "
        "smallest tiles tried (16 x 32; 32 x 32 and 64 x 32 spill 100-770 bytes with 4 or 8 warps, 1 or 2 stages), "
        "while sm_80 builds the same blocks without. float32 training on CUDA is not the bf16 default; untimed."),
}
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64"}
TOKENS = 1_024  # the row the launchers see: long enough for every block size, documents of 170 tokens
DOC = 170
GROUP = 48  # stage-2 candidates per query (the paper's G)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass
class Variant:
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: list
    options: dict
    shapes: list = field(default_factory=list)

    @property
    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.signature, self.constexprs, self.options], sort_keys=True)

    @property
    def config(self) -> str:
        types = sorted({t[1:] for t in self.signature.values() if t.startswith("*") and t[1:] in ("bf16", "fp16")})
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs.items())
        opts = f"w{self.options.get('num_warps', 4)} s{self.options.get('num_stages', 3)}"
        return " ".join(filter(None, ["/".join(types) or "fp32", consts, opts]))


@contextlib.contextmanager
def recorded_launches(into: list):
    """Replace `kernel[grid](...)` by recording (kernel, args, kwargs); nothing runs."""
    original = JITFunction.__getitem__
    JITFunction.__getitem__ = lambda fn, grid: lambda *args, **kwargs: into.append((fn, args, kwargs))
    try:
        yield
    finally:
        JITFunction.__getitem__ = original


def variant_of(fn: JITFunction, args: tuple, kwargs: dict) -> Variant:
    """The compile inputs for one recorded launch, specialised as Triton specialises a launch by default."""
    bound = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    signature, constexprs, attrs = {}, {}, []
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = bound[name]
        if param.is_constexpr or value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs.append(i)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs.append(i)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__} not handled")
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return Variant(fn.__module__, fn.__name__, signature, constexprs, attrs, options)


def drive_launchers(shape: str, dtype: torch.dtype) -> list[tuple]:
    """Run every Triton launcher once at this model shape on meta tensors; return the recorded launches."""
    cfg = model_config(shape)
    meta = dict(device="meta")
    t, d, hq, hkv, dh = TOKENS, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    launches: list[tuple] = []
    with recorded_launches(launches):
        q = torch.empty(t, hq, dh, dtype=dtype, **meta)
        k, v = (torch.empty(t, hkv, dh, dtype=dtype, **meta) for _ in range(2))
        cu = torch.empty(t // DOC + 2, dtype=torch.int32, **meta)
        out, lse = triton_attention_forward(q, k, v, cu, DOC, dh**-0.5)
        triton_attention_backward(q, k, v, out, lse, out, cu, DOC, dh**-0.5)

        x, w = torch.empty(t, d, dtype=dtype, **meta), torch.empty(d, dtype=dtype, **meta)
        y, rstd = triton_rms_norm_forward(x, w, cfg.rms_norm_eps)
        triton_rms_norm_backward(x, w, rstd, y)
        positions = torch.empty(t, dtype=torch.int64, **meta)
        inv_freq = torch.empty(dh // 2, dtype=torch.float32, **meta)
        for heads in (q, k):
            triton_rope(heads, positions, inv_freq, 1.0)
        gate = torch.empty(t, cfg.intermediate_size, dtype=dtype, **meta)
        triton_swiglu(gate, gate)
        triton_swiglu(gate, gate, gate)

        rows = default_chunk_rows(cfg.vocab_size, dtype, torch.device("cuda"), "triton")
        z = torch.empty(rows, cfg.vocab_size, dtype=torch.float32, **meta)  # the head's logits are fp32 in any dtype
        targets = torch.empty(rows, dtype=torch.int64, **meta)
        stats = torch.empty(4, rows, dtype=torch.float32, **meta)
        g = torch.empty(rows, dtype=torch.float32, **meta)
        # what chunked_forward / chunked_backward call: statistics only, statistics and dz, dz only
        for ref in (None, z):
            for find_stats, write_dz in ((True, False), (True, True), (False, True)):
                triton_softmax_chunk(z, ref, targets, stats, g if write_dz else None,
                                     g if write_dz and ref is not None else None, find_stats)

        n = GROUP * DOC
        for teacher in (None, torch.empty(GROUP, dtype=torch.float32, **meta)):  # without and with distillation
            triton_rank_loss(torch.empty(n, dtype=torch.float32, **meta), torch.empty(n, dtype=torch.int64, **meta),
                             torch.empty(2, dtype=torch.int64, **meta), torch.empty(1, dtype=torch.int64, **meta),
                             GROUP, GROUP, 0.001, teacher)
    return launches


def project_kernels() -> dict[str, tuple[JITFunction, bool]]:
    """Every @triton.jit function of tsarank_kernels that is launched (not only called from another kernel):
    name -> (function, whether it or a helper it calls has matrix products)."""
    found = {}
    for info in pkgutil.iter_modules(tsarank_kernels.__path__):
        module = importlib.import_module(f"tsarank_kernels.{info.name}")
        jitted = {n: f for n, f in vars(module).items() if isinstance(f, JITFunction) and f.__module__ == module.__name__}
        sources = {n: inspect.getsource(f.fn) for n, f in jitted.items()}
        for name, fn in jitted.items():
            called = any(re.search(rf"\b{name}\(", src) for other, src in sources.items() if other != name)
            if called:
                continue
            uses = [name] + [h for h in jitted if h != name and re.search(rf"\b{h}\(", sources[name])]
            found[name] = (fn, any("tl.dot(" in sources[u] for u in uses))
    return found


@contextlib.contextmanager
def stdout_into(path: Path):
    """Send this process's stdout (file descriptor 1) to `path`: Triton prints ptxas's log there."""
    sys.stdout.flush()
    saved = os.dup(1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compile one variant for sm_<arch>; spills from ptxas's own log of that build (a stack frame alone can be
    libdevice's sin/cos argument reduction), the rest from the cubin."""
    record = {"kernel": variant.kernel, "config": variant.config, "arch": arch, "shapes": variant.shapes}
    fn = getattr(importlib.import_module(variant.module), variant.kernel)
    attrs = {(i,): [["tt.divisibility", 16]] for i in variant.attrs}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "ptxas.log"
        try:
            with stdout_into(log):
                compiled = triton.compile(ASTSource(fn, variant.signature, variant.constexprs, attrs),
                                          target=GPUTarget("cuda", arch, 32), options=variant.options)
        except Exception as err:  # noqa: BLE001 - any compiler failure is the finding
            text = str(err).strip()
            return record | {"error": f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"}
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log.read_text())]
        if not spills:
            raise RuntimeError(f"{variant.kernel}: no ptxas log (is TRITON_DUMP_PTXAS_LOG honoured by this Triton?)")
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(BIN / "nvdisasm"), str(cubin)], capture_output=True, text=True, check=True).stdout
    resources = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return record | {
        "regs": int(resources["REG"]),
        "spill_bytes": sum(spills),
        "stack_bytes": int(resources["STACK"]),
        "shared_bytes": max(int(compiled.metadata.shared), int(resources["SHARED"])),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
    }


def problems(record: dict, has_dot: bool) -> list[str]:
    where = f"{record['kernel']} [{record['config']}] sm_{record['arch']}"
    if "error" in record:
        return [f"{where}: does not compile: {record['error']}"]
    found = []
    if record["shared_bytes"] > SHARED_LIMIT[record["arch"]]:
        found.append(f"{where}: needs {record['shared_bytes']} bytes of shared memory, the limit is "
                     f"{SHARED_LIMIT[record['arch']]}")
    allowed = any(k == record["kernel"] and c in record["config"] and a == record["arch"] for k, c, a in ALLOWED_SPILLS)
    if record["spill_bytes"] and not allowed:
        found.append(f"{where}: spills {record['spill_bytes']} bytes")
    if record["arch"] == 90 and has_dot and record["hgmma"] == 0 and "PRECISION=ieee" not in record["config"]:
        found.append(f"{where}: has matrix products but no HGMMA instruction")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--shape", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--kernels", nargs="+", help="only these kernels (all by default; for quick iteration)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    start = time.perf_counter()

    variants: dict[str, Variant] = {}
    for shape in args.shape:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for fn, call_args, kwargs in drive_launchers(shape, dtype):
                v = variant_of(fn, call_args, kwargs)
                v = variants.setdefault(v.key, v)
                if shape not in v.shapes:
                    v.shapes.append(shape)
    kernels = project_kernels()
    failures = [f"{name}: a Triton kernel that no launcher driven here launches; drive it in drive_launchers"
                for name in sorted(set(kernels) - {v.kernel for v in variants.values()})]

    if args.kernels:
        unknown = set(args.kernels) - set(kernels)
        if unknown:
            sys.exit(f"unknown kernels {sorted(unknown)}; the project's: {', '.join(sorted(kernels))}")
        variants = {k: v for k, v in variants.items() if v.kernel in args.kernels}
    jobs = [(v, arch) for v in variants.values() for arch in args.arch]
    print(f"compiling {len(variants)} variants of {len(kernels)} kernels for sm_{', sm_'.join(map(str, args.arch))}"
          f" ({len(jobs)} builds, {args.jobs} processes)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a cached kernel would skip ptxas and its log
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            records = list(pool.map(compile_variant, *zip(*jobs)))
    for record in records:
        failures += problems(record, kernels[record["kernel"]][1])

    print("| kernel | config | arch | regs | spill bytes | stack bytes | shared bytes | HGMMA | shapes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(records, key=lambda r: (r["kernel"], r["config"], -r["arch"])):
        if "error" in r:
            print(f"| {r['kernel']} | {r['config']} | sm_{r['arch']} | does not compile | | | | | |")
            continue
        print(f"| {r['kernel']} | {r['config']} | sm_{r['arch']} | {r['regs']} | {r['spill_bytes']} | "
              f"{r['stack_bytes']} | {r['shared_bytes']} | {r['hgmma']} | {', '.join(r['shapes'])} |")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\n{len(records)} builds in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if failures:
        print("\n".join(["FAILED:"] + failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
