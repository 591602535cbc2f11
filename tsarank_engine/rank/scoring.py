"""Query-likelihood scores: the mean log-probability of the query tokens given the document prompt.

Sequences are sorted by length and packed into rows of at most `batch_tokens` tokens (no padding between
them; on the CPU filler documents round a row up for oneDNN), and the LM head runs only at the positions that
predict a query token, through the fused linear log-prob op (tsarank_kernels.fused_linear: a chunk of rows'
logits at a time, never the [tokens, vocab] logits whole), its logits in fp32 also for a half-precision model
(accumulated in fp32 and not rounded to bf16 before the log-softmax: rounding SmolLM2's 49,152 logits moves a
score by up to 0.02 on the same hidden states, and the rank loss's tau = 0.001 multiplies a score's error a
thousandfold).
"""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import torch

from tsarank_kernels.dense import INFERENCE_ROW_QUANTUM, onednn_applies
from tsarank_kernels.fused_linear import linear_logprob_kl

from ..data.prompting import PromptedPair
from ..model.decoder import CausalLM

# Tokens per packed row when none is given. On the CPU, rows of 2,048 tokens keep a block's largest activation
# under glibc's ceiling for mmap'd allocations, so freed buffers are reused (BENCHMARKS.md, "Measurements
# behind the defaults"). On CUDA longer rows keep the GPU busy.
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "cuda": 8192}
# Pairs prompted and scored together by `score`, `rerank` and Ranker.score_pairs: enough to pack rows of like
# lengths, few enough that memory stays flat on any number of pairs.
CHUNK_PAIRS = 4096
T = TypeVar("T")


def chunks(items: Iterable[T], size: int = CHUNK_PAIRS) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last may be shorter), read as they are needed."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def pack_by_length(pairs: list[PromptedPair], batch_tokens: int) -> list[list[int]]:
    """Indices of `pairs` grouped into rows of at most `batch_tokens` tokens, shortest first.

    Not training's first-fit-decreasing packer (data/packing.py): that one fills rows best, with whole groups of any
    lengths together; scoring has no groups to keep whole and gains more from rows of like lengths, since the
    CPU's attention (SDPA) pads each document of a row to the row's longest and the filler documents may be no
    longer than it.

    A sequence longer than `batch_tokens` gets a row of its own.
    """
    rows: list[list[int]] = []
    used = batch_tokens
    for i in sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids)):
        n = len(pairs[i].input_ids)
        if used + n > batch_tokens:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


@torch.inference_mode()
def score_row(model: CausalLM, pairs: list[PromptedPair]) -> torch.Tensor:
    """fp32 [len(pairs)] query-likelihood scores of sequences run together as one packed row."""
    weight = model.lm_head.weight
    device = weight.device
    lengths = [len(p.input_ids) for p in pairs]
    # For oneDNN's linears (tsarank_kernels.dense.linear) the row is filled to a multiple of its quantum with
    # documents of token 0, none longer than the row's longest (attention pads to that), scored by nobody. The head
    # tells where the decoder has float32 products on the CPU: a float32 model and the mixed path (q/k/v) have a
    # float32 head; under FSDP it is the root's gathered copy, in training's compute dtype, while the blocks'
    # parameters are still sharded float32 until their forward gathers them.
    filler = -sum(lengths) % INFERENCE_ROW_QUANTUM if onednn_applies(weight, weight) else 0
    input_ids = torch.tensor([t for p in pairs for t in p.input_ids] + [0] * filler, device=device)
    longest = max(lengths)
    lengths += [longest] * (filler // longest) + ([filler % longest] if filler % longest else [])
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths), 0)
    hidden = model(input_ids, cu_seqlens=cu_seqlens.to(device))

    # Token j of a sequence is predicted at j - 1; query tokens are j >= source_len.
    targets, owner = [], []
    for k, (p, start) in enumerate(zip(pairs, cu_seqlens.tolist())):
        targets.extend(range(start + p.source_len, start + len(p.input_ids)))
        owner.extend([k] * p.num_query_tokens)
    targets_t = torch.tensor(targets, device=device)
    owner_t = torch.tensor(owner, device=device)
    # the head's product in the weight's dtype (a mixed model's hidden states are float32; its head is half
    # precision on CUDA only), its logits in fp32
    token_logp, _, _ = linear_logprob_kl(hidden[targets_t - 1].to(weight.dtype), weight, input_ids[targets_t])
    totals = torch.zeros(len(pairs), device=device).index_add_(0, owner_t, token_logp)
    counts = torch.tensor([p.num_query_tokens for p in pairs], device=device)
    return (totals / counts).cpu()


def score_pairs(model: CausalLM, pairs: list[PromptedPair], batch_tokens: int | None = None) -> list[float]:
    """Scores of `pairs`, in their order; rows of `batch_tokens` (default: DEFAULT_BATCH_TOKENS for the model's
    device)."""
    if batch_tokens is None:
        batch_tokens = DEFAULT_BATCH_TOKENS.get(model.lm_head.weight.device.type, 8192)
    scores = [0.0] * len(pairs)
    for row in pack_by_length(pairs, batch_tokens):
        for i, s in zip(row, score_row(model, [pairs[i] for i in row]).tolist()):
            scores[i] = s
    return scores
