"""Time and peak memory of the fused loss ops against the plain computation, forward + backward.

    python bench/kernel_ops.py --device cpu|cuda [--shape smollm2 qwen2.5-0.5b qwen2.5-7b] [--tokens N]
        [--ops ...] [--impls ...] [--chunk-rows N] [--profile] [--json OUT.json]

Ops: `logprobs` (target log-probs, op 1), `kl` (KL to a reference, op 3) and `ranking_head` (L_rank + L_gen +
L_dp, op 4), each timed as forward + backward into the hidden states (the paper freezes the LM head).
Implementations: `reference` (eager, full logits), `torch` (chunked), `triton` (CUDA only) and `compile`
(torch.compile of the reference, CUDA only, ranking_head only: compiling every op costs minutes).
Tokens default to one SFT group: 48 candidates x 170 tokens. On CUDA a `matmul-floor` record times the three
logits-sized cuBLAS products (model and reference logits, dh) alone: no single-pass implementation can beat
it. ms is the median of the timed repetitions after a warm-up; peak_mb is the peak of live tensor memory the op allocates beyond its inputs (CUDA: the
allocator's peak; CPU: bench/live_bytes.py, which misses operators' internal temporaries).
Records: op, impl, device, shape, ms, peak_mb, chunk_rows. On CUDA, `attention` adds the packed varlen attention
against torch's kernels (records with `tflops`) and `block_ops` RMSNorm, RoPE and SwiGLU against plain torch
(records with `gb_per_s`); both in bench/kernel_ops_decoder.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import kernel_ops_decoder
from bench_common import cuda_median_ms
from live_bytes import LiveBytes
from tsarank_kernels.fused_linear import linear_logprob_kl
from tsarank_kernels.layout import GroupLayout, RankingBatch
from tsarank_kernels.ranking_head import ranking_head_loss

SHAPES = {"smollm2": (49_152, 576), "qwen2.5-0.5b": (151_936, 896), "qwen2.5-7b": (151_936, 3_584)}
GROUP, SEQ, QUERY = 48, 170, 10  # candidates per query, tokens per candidate, query tokens per candidate


def make_inputs(v: int, d: int, n: int, device: str, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, d, generator=g).to(device, dtype)
    w = (torch.randn(v, d, generator=g) * d**-0.5).to(device, dtype)
    hr = (h.float() + 0.1 * torch.randn(n, d, generator=g).to(device)).to(dtype)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    cand = torch.full((n,), -1, dtype=torch.long)
    candidates = n // SEQ
    for c in range(candidates):  # the last QUERY positions of each candidate predict its query tokens
        cand[c * SEQ + SEQ - QUERY - 1 : c * SEQ + SEQ - 1] = c
    groups = max(1, candidates // GROUP)
    offsets = torch.linspace(0, candidates, groups + 1).long()
    gen = torch.zeros(n, dtype=torch.bool)
    for q in range(groups):
        gen[int(offsets[q]) * SEQ : (int(offsets[q]) + 1) * SEQ - 1] = True
    batch = RankingBatch(t, GroupLayout(cand.to(device), offsets.to(device)), gen.to(device), torch.ones(n, dtype=torch.bool, device=device))
    return h, w, hr, batch


def step_fn(op: str, impl: str, w, hr, batch, chunk_rows: int | None):
    """A function of the hidden states doing one forward + backward of `op` with `impl`."""
    lib_impl = "reference" if impl in ("reference", "compile") else impl
    rows = chunk_rows if lib_impl != "reference" else None

    def loss(h):
        if op == "ranking_head":
            return ranking_head_loss(h, w, batch, hr, w, impl=lib_impl, chunk_rows=rows).loss
        ref = (hr, w) if op == "kl" else (None, None)
        logp, _, kl = linear_logprob_kl(h, w, batch.targets, *ref, impl=lib_impl, chunk_rows=rows)
        return (kl if op == "kl" else logp).sum()

    compiled = torch.compile(loss) if impl == "compile" else loss

    def step(h):
        h = h.detach().requires_grad_()
        compiled(h).backward()
        return h.grad

    return step


def matmul_floor_ms(h, w, reps: int) -> float:
    """The three logits-sized products a single-pass ranking head cannot avoid (model and reference logits,
    dh = dz W), timed alone with cuBLAS on the full batch: the floor for any chunked implementation."""
    z = h @ w.T

    def products() -> None:
        torch.mm(h, w.T, out=z)
        torch.mm(h, w.T, out=z)
        z @ w

    products()  # warm-up
    return cuda_median_ms(products, reps)


def kernel_table(step, h) -> str:
    """The CUDA kernels of one step by self time: where a path's time goes beyond the products."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(h)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=14)


def measure(step, h, device: str, reps: int) -> tuple[float, float]:
    step(h)  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = cuda_median_ms(lambda: step(h), reps)
        return ms, (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(h)
        times.append((time.perf_counter() - t0) * 1e3)
    with LiveBytes() as mode:
        step(h)
    return statistics.median(times), mode.peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=GROUP * SEQ)
    parser.add_argument("--ops", nargs="+", default=["logprobs", "kl", "ranking_head", "attention", "block_ops"],
                        choices=["logprobs", "kl", "ranking_head", "attention", "block_ops"],
                        help="attention and block_ops (RMSNorm, RoPE, SwiGLU): CUDA only")
    parser.add_argument("--impls", nargs="+", help="default: reference torch, and on CUDA also triton compile")
    parser.add_argument("--chunk-rows", type=int, help="rows per logits chunk of the torch and triton paths "
                        "(default: the library's choice)")
    parser.add_argument("--profile", action="store_true", help="CUDA: print the kernel times of one step of each "
                        "chunked ranking head")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 10 on CUDA, 2 on the CPU)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shapes = args.shape or (["smollm2"] if args.device == "cpu" else ["qwen2.5-0.5b", "qwen2.5-7b"])
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    reps = args.reps or (10 if args.device == "cuda" else 2)
    impls = args.impls or ["reference", "torch"] + (["triton", "compile"] if args.device == "cuda" else [])
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    records = []

    def save() -> None:  # after every record, so that a run cut short keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(records, indent=2) + "\n")

    print(f"device: {name}, dtype: {str(dtype)[6:]}, tokens: {args.tokens}\n")
    print("| op | impl | shape (V, D) | ms | peak MB | time vs reference | memory vs reference |\n|---|---|---|---|---|---|---|")
    loss_ops = [op for op in args.ops if op not in ("attention", "block_ops")]
    for shape in shapes if loss_ops else []:
        v, d = SHAPES[shape]
        h, w, hr, batch = make_inputs(v, d, args.tokens, args.device, dtype)
        for op in loss_ops:
            base = None
            for impl in impls:
                if impl == "compile" and op != "ranking_head":
                    continue
                step = step_fn(op, impl, w, hr, batch, args.chunk_rows)
                ms, peak = measure(step, h, args.device, reps)
                base = base or (ms, peak)
                records.append({"op": op, "impl": impl, "device": name, "shape": f"{shape} V={v} D={d} N={args.tokens}",
                                "ms": ms, "peak_mb": peak, "chunk_rows": args.chunk_rows})
                print(f"| {op} | {impl} | {shape} ({v}, {d}) | {ms:.1f} | {peak:.0f} | "
                      f"{base[0] / ms:.2f}x | {peak / base[1]:.3f}x |", flush=True)
                save()
                if args.profile and args.device == "cuda" and op == "ranking_head" and impl in ("torch", "triton"):
                    print(f"\n{impl} ranking head, {shape}, one step:\n{kernel_table(step, h)}", flush=True)
        if args.device == "cuda" and "ranking_head" in args.ops:
            floor = matmul_floor_ms(h, w, reps)
            records.append({"op": "ranking_head", "impl": "matmul-floor", "device": name,
                            "shape": f"{shape} V={v} D={d} N={args.tokens}", "ms": floor, "peak_mb": None})
            print(f"| (three cuBLAS products alone) | matmul-floor | {shape} ({v}, {d}) | {floor:.1f} | | | |")
            save()
        del h, w, hr, batch
    if "attention" in args.ops and args.device == "cuda":
        kernel_ops_decoder.run(name, reps, records, save)
    if "block_ops" in args.ops and args.device == "cuda":
        kernel_ops_decoder.run_block_ops(name, reps, records, save)


if __name__ == "__main__":
    main()
