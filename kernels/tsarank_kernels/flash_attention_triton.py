"""Triton flash attention over packed rows: causal inside each document, nothing across documents, GQA.

q [T, Hq, Dh], k and v [T, Hkv, Dh] hold the concatenated documents of a packed row; cu_seqlens [B + 1]
marks where each starts. Every program works inside one document: the grid is (blocks of the longest
document, documents, heads), and blocks past a document's end return at once. Softmax runs in base 2 with
the scale folded in; the forward saves the fp32 log-sum-exp (base 2, of the scaled scores) per query and head.
Backward: one kernel per K/V block accumulates dK and dV over every query head of its group and every later
query block (GQA reduced in registers, no atomics), another per query block accumulates dQ.
Each program moves its base pointers to its document and heads in int64 (a pack's token index times token
stride can pass 2^31 elements); offsets inside a document are int32, which the launchers check.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import config_target

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(base, offs, row_ok, stride_t, dims, dim_ok):
    """[rows, BLOCK_D] tile at in-document token offsets `offs` (int32) from a document's base pointer."""
    return tl.load(base + offs[:, None] * stride_t + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _document(CU, BLOCK: tl.constexpr):
    """(first token of this program's document as int64, its length, this program's first in-document row)."""
    doc = tl.program_id(1)
    start = tl.load(CU + doc)
    return start.to(tl.int64), tl.load(CU + doc + 1) - start, tl.program_id(0) * BLOCK


@triton.jit
def _probs(q, k, lse, offs_m, offs_n, m_ok, n_ok, qk_scale, PRECISION: tl.constexpr):
    """Backward tile of probabilities, recomputed from the saved log-sum-exp (0 where a key is not visible)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    visible = (offs_n[None, :] <= offs_m[:, None]) & m_ok[:, None] & n_ok[None, :]
    return tl.exp2(tl.where(visible, s - lse[:, None], float("-inf")))  # hidden keys never overflow


@triton.jit
def _delta_kernel(O, DO, DELTA, T, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta, HEAD_DIM,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """DELTA [Hq, T] fp32 = rowsum(dO * O): the softmax backward's correction, read by both backward kernels."""
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(O + rows[:, None] * stride_ot + head * stride_oh + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + head * stride_doh + dims[None, :], mask=mask, other=0.0)
    tl.store(DELTA + head * stride_delta + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < T)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, qk_scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_ot, stride_oh, stride_lse, HEAD_DIM,
                GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    first, length, m0 = _document(CU, BLOCK_M)
    if m0 >= length:
        return
    head = tl.program_id(2).to(tl.int64)
    kv_head = head // GROUP
    Q += first * stride_qt + head * stride_qh
    K += first * stride_kt + kv_head * stride_kh
    V += first * stride_vt + kv_head * stride_vh
    O += first * stride_ot + head * stride_oh
    LSE += head * stride_lse + first
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < length
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = _load_rows(Q, offs_m, m_ok, stride_qt, dims, dim_ok)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Key 0 is visible to every row of the first block, so m_i is finite after one iteration.
    for n0 in range(0, tl.minimum(length, m0 + BLOCK_M), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < length
        k = _load_rows(K, offs_n, n_ok, stride_kt, dims, dim_ok)
        v = _load_rows(V, offs_n, n_ok, stride_vt, dims, dim_ok)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + dims[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & dim_ok[None, :])
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, qk_scale, sm_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse, HEAD_DIM,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    first, length, n0 = _document(CU, BLOCK_N)
    if n0 >= length:
        return
    kv_head = tl.program_id(2).to(tl.int64)
    K += first * stride_kt + kv_head * stride_kh
    V += first * stride_vt + kv_head * stride_vh
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < length
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    k = _load_rows(K, offs_n, n_ok, stride_kt, dims, dim_ok)
    v = _load_rows(V, offs_n, n_ok, stride_vt, dims, dim_ok)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for g in range(GROUP):  # the query heads sharing this K/V head
        head = kv_head * GROUP + g
        Qh = Q + first * stride_qt + head * stride_qh
        DOh = DO + first * stride_dot + head * stride_doh
        LSEh = LSE + head * stride_lse + first
        DELTAh = DELTA + head * stride_lse + first
        for m0 in range(n0 // BLOCK_M * BLOCK_M, length, BLOCK_M):  # only queries at or after this block see it
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < length
            q = _load_rows(Qh, offs_m, m_ok, stride_qt, dims, dim_ok)
            do = _load_rows(DOh, offs_m, m_ok, stride_dot, dims, dim_ok)
            lse = tl.load(LSEh + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTAh + offs_m, mask=m_ok, other=0.0)
            p = _probs(q, k, lse, offs_m, offs_n, m_ok, n_ok, qk_scale, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])  # dS = P (dO V^T - delta)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    mask = n_ok[:, None] & dim_ok[None, :]
    DK += first * stride_dkt + kv_head * stride_dkh
    DV += first * stride_dvt + kv_head * stride_dvh
    tl.store(DK + offs_n[:, None] * stride_dkt + dims[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs_n[:, None] * stride_dvt + dims[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, qk_scale, sm_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh, stride_lse, HEAD_DIM,
                   GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    first, length, m0 = _document(CU, BLOCK_M)
    if m0 >= length:
        return
    head = tl.program_id(2).to(tl.int64)
    kv_head = head // GROUP
    Q += first * stride_qt + head * stride_qh
    DO += first * stride_dot + head * stride_doh
    K += first * stride_kt + kv_head * stride_kh
    V += first * stride_vt + kv_head * stride_vh
    DQ += first * stride_dqt + head * stride_dqh
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < length
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = _load_rows(Q, offs_m, m_ok, stride_qt, dims, dim_ok)
    do = _load_rows(DO, offs_m, m_ok, stride_dot, dims, dim_ok)
    lse = tl.load(LSE + head * stride_lse + first + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + head * stride_lse + first + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, tl.minimum(length, m0 + BLOCK_M), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < length
        k = _load_rows(K, offs_n, n_ok, stride_kt, dims, dim_ok)
        v = _load_rows(V, offs_n, n_ok, stride_vt, dims, dim_ok)
        p = _probs(q, k, lse, offs_m, offs_n, m_ok, n_ok, qk_scale, PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + offs_m[:, None] * stride_dqt + dims[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & dim_ok[None, :])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass; the interpreter takes small blocks so that tests cross
# several. On CUDA by head dim (up to 64, up to 128): each compiles for sm_90 with HGMMA and without spills;
# float32 (exact products on the CUDA cores, no tensor cores) takes smaller tiles, which fit its registers.
CONFIGS = {
    "interpreter": {"fwd": (16, 16, 1, 1), "dkdv": (16, 16, 1, 1), "dq": (16, 16, 1, 1)},
    "cuda": {
        64: {"fwd": (128, 64, 8, 3), "dkdv": (64, 64, 8, 2), "dq": (64, 64, 8, 2)},
        128: {"fwd": (128, 64, 8, 3), "dkdv": (64, 64, 8, 2), "dq": (64, 64, 8, 2)},
    },
    "cuda-fp32": {
        64: {"fwd": (32, 32, 4, 2), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 4, 1)},
        128: {"fwd": (16, 32, 4, 1), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 8, 1)},
    },
}

DELTA_BLOCK = {"interpreter": 16, "cuda": 64}  # tokens per program of the delta kernel


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays exact; half inputs use tensor cores


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16 on GPUs; the padding is masked


def _config(x: torch.Tensor, kernel: str) -> tuple[int, int, int, int]:
    if config_target(x) == "interpreter":
        return CONFIGS["interpreter"][kernel]
    target = "cuda-fp32" if x.dtype == torch.float32 else "cuda"
    return CONFIGS[target][64 if x.shape[-1] <= 64 else 128][kernel]


def triton_attention_forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float):
    """(out [T, Hq, Dh] in q's dtype, lse [Hq, T] fp32 in base 2 of the scaled scores)."""
    t, hq, dh = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(hq, t, dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = _config(q, "fwd")
    grid = (triton.cdiv(max_seqlen, block_m), cu_seqlens.numel() - 1, hq)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, scale * LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1), lse.stride(0), dh,
        GROUP=hq // k.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(dh),
        PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    return out, lse


def triton_attention_backward(q, k, v, out, lse, d_out, cu_seqlens, max_seqlen: int, scale: float):
    """(dq, dk, dv) in the inputs' dtypes; dk and dv already summed over each K/V head's query heads."""
    t, hq, dh = q.shape
    hkv = k.shape[1]
    delta = torch.empty_like(lse)
    block_t = DELTA_BLOCK[config_target(q)]
    _delta_kernel[(triton.cdiv(t, block_t), hq)](
        out, d_out, delta, t, out.stride(0), out.stride(1), d_out.stride(0), d_out.stride(1), delta.stride(0), dh,
        BLOCK_T=block_t, BLOCK_D=_block_d(dh),
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(GROUP=hq // hkv, BLOCK_D=_block_d(dh), PRECISION=_precision(q.dtype))
    docs = cu_seqlens.numel() - 1
    block_m, block_n, warps, stages = _config(q, "dkdv")
    _bwd_dkdv_kernel[(triton.cdiv(max_seqlen, block_n), docs, hkv)](
        q, k, v, d_out, lse, delta, dk, dv, cu_seqlens, scale * LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), d_out.stride(0),
        d_out.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), dh,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
    )
    block_m, block_n, warps, stages = _config(q, "dq")
    _bwd_dq_kernel[(triton.cdiv(max_seqlen, block_m), docs, hq)](
        q, k, v, d_out, lse, delta, dq, cu_seqlens, scale * LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), d_out.stride(0),
        d_out.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), dh,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
    )
    return dq, dk, dv
