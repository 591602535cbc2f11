"""The decoder-kernel part of bench/kernel_ops.py, on CUDA: packed varlen causal GQA attention, and the block
ops (RMSNorm, RoPE, SwiGLU), forward and backward.

Block ops: the Triton path against the plain torch computation at the Qwen2.5-7B widths over 8,192 tokens,
ms and effective GB/s (the bytes each op must move: its inputs read and outputs written once).

Attention:
Rows of 8,192 tokens made of 170-token documents (the paper's stage-2 candidates; the row ends with a
32-token one) or of 512-token documents, at the Qwen2.5-0.5B (14 query heads, 2 KV heads, head dim 64) and
Qwen2.5-7B (28, 4, 128) head layouts, bf16. Implementations: `triton` (tsarank_kernels), `sdpa-padded`
(torch SDPA on the documents scattered into a padded batch, the padding not timed), `torch-varlen`
(torch.nn.attention.varlen, torch >= 2.10) and `flash-attn` (when installed). TFLOP/s counts the useful
work only, the same for every implementation: forward 4 * Dh * Hq * L(L+1)/2 per document (QK^T and PV
over the causal pairs), backward 2.5x that (five products instead of two).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

import tsarank_kernels.flash_attention_triton as triton_attention
from bench_common import cuda_median_ms
from tsarank_kernels.block_ops import rms_norm, rope, swiglu
from tsarank_kernels.flash_attention import varlen_attention

HEADS = {"qwen2.5-0.5b": (14, 2, 64), "qwen2.5-7b": (28, 4, 128)}
# Block shapes tried beside the library's CUDA choice (`triton-alt`): at head dim 64 longer K/V blocks (with
# short query blocks in dK/dV, the reverse in dQ), at 128 longer query blocks in dK/dV. Each compiles for
# sm_90 with HGMMA and without spills.
ALT_CONFIGS = {
    64: {"fwd": (128, 128, 8, 3), "dkdv": (32, 128, 8, 3), "dq": (128, 32, 8, 3)},
    128: {"fwd": (128, 64, 8, 3), "dkdv": (128, 64, 8, 2), "dq": (64, 64, 8, 2)},
}
ROW_TOKENS = 8192


def doc_lengths(doc: int) -> list[int]:
    lengths = [doc] * (ROW_TOKENS // doc)
    return lengths + ([ROW_TOKENS - sum(lengths)] if sum(lengths) < ROW_TOKENS else [])


def causal_flops(lengths: list[int], hq: int, dh: int) -> float:
    return 4.0 * dh * hq * sum(n * (n + 1) / 2 for n in lengths)


def _padded_sdpa(lengths, hq, hkv, dh, dtype, gen):
    """SDPA on [docs, H, Lmax, Dh] with a causal mask: right padding makes causal the whole mask."""
    b, longest = len(lengths), max(lengths)
    q, k, v = (torch.randn(b, h, longest, dh, generator=gen, device="cuda", dtype=dtype)
               for h in (hq, hkv, hkv))
    return (q, k, v), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:  # torch < 2.10
        raise RuntimeError(f"torch {torch.__version__} has no varlen attention") from err
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, causal, "enable_gqa" in params


def make_case(impl: str, lengths, hq, hkv, dh, dtype, gen):
    """(inputs requiring grad, function of them) for one implementation."""
    t, cu = sum(lengths), torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    longest, scale = max(lengths), dh**-0.5
    packed = [torch.randn(t, h, dh, generator=gen, device="cuda", dtype=dtype) for h in (hq, hkv, hkv)]
    if impl in ("triton", "triton-alt"):
        return packed, lambda q, k, v: varlen_attention(q, k, v, cu, longest, scale)
    if impl == "sdpa-padded":
        return _padded_sdpa(lengths, hq, hkv, dh, dtype, gen)
    if impl == "torch-varlen":
        varlen_attn, causal, gqa = _torch_varlen()
        if hq != hkv and not gqa:  # older signature: K/V repeated per query head beforehand, not timed
            packed = [packed[0]] + [x.repeat_interleave(hq // hkv, 1) for x in packed[1:]]
        extra = {"enable_gqa": True} if hq != hkv and gqa else {}
        return packed, lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest, **causal, **extra)
    if impl == "flash-attn":
        from flash_attn import flash_attn_varlen_func

        return packed, lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale,
                                                              causal=True)
    raise ValueError(impl)


def _time(fn, reps: int) -> float:
    fn()  # warm-up (and compilation)
    return cuda_median_ms(fn, reps)


def measure_attention(impl: str, lengths, hq, hkv, dh, reps: int) -> tuple[float, float]:
    """(forward ms, backward ms) in bf16."""
    if impl == "triton-alt":
        library = triton_attention.CONFIGS["cuda"]
        triton_attention.CONFIGS["cuda"] = ALT_CONFIGS
        try:
            return measure_attention("triton", lengths, hq, hkv, dh, reps)
        finally:
            triton_attention.CONFIGS["cuda"] = library
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs, fn = make_case(impl, lengths, hq, hkv, dh, torch.bfloat16, gen)
    with torch.no_grad():
        fwd = _time(lambda: fn(*inputs), reps)
    inputs = [x.requires_grad_() for x in inputs]
    out = fn(*inputs)
    d_out = torch.randn_like(out)
    bwd = _time(lambda: torch.autograd.grad(out, inputs, d_out, retain_graph=True), reps)
    return fwd, bwd


def block_op_cases(gen):
    """(name, inputs, function of (impl, *inputs), bytes moved by forward, by backward) at Qwen2.5-7B widths."""
    t, d, ffn, hq, dh = ROW_TOKENS, 3584, 18944, 28, 128
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, w = torch.randn(t, d, generator=gen, **bf16), 1 + 0.1 * torch.randn(d, generator=gen, **bf16)
    q = torch.randn(t, hq, dh, generator=gen, **bf16)
    positions = torch.arange(t, device="cuda") % 170  # 170-token documents
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, dh, 2, device="cuda").float() / dh))
    gate, up = (torch.randn(t, ffn, generator=gen, **bf16) for _ in range(2))
    return [
        ("rms_norm", [x, w], lambda impl, x, w: rms_norm(x, w, 1e-6, impl=impl), 2 * t * d * 2, 3 * t * d * 2),
        ("rope", [q], lambda impl, q: rope(q, positions, inv_freq, impl=impl), 2 * q.numel() * 2, 2 * q.numel() * 2),
        ("swiglu", [gate, up], lambda impl, g, u: swiglu(g, u, impl=impl), 3 * t * ffn * 2, 5 * t * ffn * 2),
    ]


def run_block_ops(device_name: str, reps: int, records: list, save) -> None:
    print("\n| block op | impl | shape | fwd ms | fwd GB/s | bwd ms | bwd GB/s | vs torch fwd / bwd |\n"
          "|---|---|---|---|---|---|---|---|")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, inputs, fn, fwd_bytes, bwd_bytes in block_op_cases(gen):
        shape = " x ".join(str(tuple(x.shape)) for x in inputs) + " bf16"
        base = None
        for impl in ("torch", "triton"):
            with torch.no_grad():
                fwd = _time(lambda: fn(impl, *inputs), reps)
            leaves = [x.detach().requires_grad_() for x in inputs]
            out = fn(impl, *leaves)
            d_out = torch.randn_like(out)
            bwd = _time(lambda: torch.autograd.grad(out, leaves, d_out, retain_graph=True), reps)
            base = base or (fwd, bwd)
            for op, ms, moved in ((f"{name}-fwd", fwd, fwd_bytes), (f"{name}-bwd", bwd, bwd_bytes)):
                records.append({"op": op, "impl": impl, "device": device_name, "shape": shape, "ms": ms,
                                "peak_mb": None, "gb_per_s": moved / ms / 1e6})
            print(f"| {name} | {impl} | {shape} | {fwd:.3f} | {fwd_bytes / fwd / 1e6:.0f} | {bwd:.3f} | "
                  f"{bwd_bytes / bwd / 1e6:.0f} | {base[0] / fwd:.2f}x / {base[1] / bwd:.2f}x |", flush=True)
            save()


def run(device_name: str, reps: int, records: list, save) -> None:
    impls = ["torch-varlen", "triton", "triton-alt", "sdpa-padded"]  # the baseline first: the ratios refer to it
    try:
        import flash_attn  # noqa: F401

        impls.append("flash-attn")
    except ImportError:
        print("flash-attn is not installed: not measured")
    print("\n| attention | impl | shape | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | vs torch-varlen fwd / bwd |\n"
          "|---|---|---|---|---|---|---|---|")
    for model, (hq, hkv, dh) in HEADS.items():
        for doc in (170, 512):
            lengths = doc_lengths(doc)
            flops = causal_flops(lengths, hq, dh)
            shape = f"{model} docs of {doc}, T={ROW_TOKENS}, Hq={hq} Hkv={hkv} Dh={dh}"
            results = {}
            for impl in impls:
                try:
                    fwd, bwd = measure_attention(impl, lengths, hq, hkv, dh, reps)
                except Exception as err:  # one failing implementation must not hide the others
                    print(f"| attention | {impl} | {shape} | failed: {type(err).__name__}: {str(err)[:200]} | | | | |")
                    continue
                results[impl] = (fwd, bwd)
                for op, ms, factor in (("attention-fwd", fwd, 1.0), ("attention-bwd", bwd, 2.5)):
                    records.append({"op": op, "impl": impl, "device": device_name, "shape": shape, "ms": ms,
                                    "peak_mb": None, "tflops": factor * flops / ms / 1e9})
                base = results.get("torch-varlen")
                ratio = f"{base[0] / fwd:.2f}x / {base[1] / bwd:.2f}x" if base else ""
                print(f"| attention | {impl} | {shape} | {fwd:.3f} | {flops / fwd / 1e9:.0f} | {bwd:.3f} | "
                      f"{2.5 * flops / bwd / 1e9:.0f} | {ratio} |", flush=True)
                save()
