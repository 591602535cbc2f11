"""The GPU memory one process would need for stage 2, full training of the top blocks against LoRA on them.

The model is built on the meta device by the code the trainer builds it with (CausalLM, then
train_top_blocks or lora.add_adapters), so that parameter counts, dtypes and which parameters train are the
trainer's; nothing is allocated. What is not a parameter is a formula, stated with each term:
- parameters: the model as the trainer holds it (full training: float32 masters of every weight; LoRA: the
  frozen base in the compute dtype, the adapters in float32) and the frozen reference's own top blocks
  (full training; with LoRA the base is the reference);
- gradients and AdamW's two moments: float32, for the trained parameters only;
- FSDP's gathered compute copies: the root unit (embeddings, head) and two blocks (one in use, one prefetched)
  in the compute dtype;
- activations with checkpointing, for a row of `row_tokens` tokens: each trained block's input kept, plus one
  block's own activations while it is recomputed (for T tokens: norms' inputs and outputs, q, k, v, the
  attention output and its log-sum-exp, the residual, gate, up and their product), plus, with LoRA, the adapters'
  rank-wide products (and with dropout each adapter's dropped input and mask);
- the fused ranking head: its fp32 logits chunks (model and reference; the gradient is formed in place) and
  float32 final states and their gradient for the row.
"""

from __future__ import annotations

import torch

from tsarank_engine.model.decoder import CausalLM
from tsarank_engine.model.lora import TARGETS, add_adapters
from tsarank_engine.model.config import ModelConfig
from tsarank_engine.training.objectives import train_top_blocks, trained_blocks
from tsarank_engine.recipe import LoraSettings
from tsarank_kernels.fused_linear import CHUNK_BYTES

GIB = 2**30


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def stage2_memory(config: ModelConfig, top_blocks: int, lora: LoraSettings | None, row_tokens: int,
                  dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """GiB per term (and "total") for one process holding the whole model (one GPU)."""
    with torch.device("meta"):
        lm = CausalLM(config)
        if lora:
            lm.to(dtype)
            add_adapters(lm, lora, trained_blocks(lm, top_blocks))
        else:
            train_top_blocks(lm, top_blocks)
    trained = [p for p in lm.parameters() if p.requires_grad]
    half = dtype.itemsize
    blocks = lm.model.layers
    block_numel = sum(p.numel() for p in blocks[-1].parameters())
    root_numel = sum(p.numel() for n, p in lm.named_parameters() if not n.startswith("model.layers."))
    reference = 0 if lora else top_blocks * block_numel * half
    d, t = config.hidden_size, row_tokens
    q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    block_activations = t * ((5 * d + 2 * q_width + 2 * kv_width + 3 * config.intermediate_size) * half
                             + config.num_heads * 4)
    if lora:  # each adapter's rank-wide product; with dropout, its dropped input (and the mask) too
        inputs = {"q": d, "k": d, "v": d, "o": q_width, "gate": d, "up": d, "down": config.intermediate_size}
        dropped = half + 1 if lora.dropout else 0
        block_activations += t * sum(inputs[name] * dropped + lora.rank * half for name in lora.targets)
    head_chunk = 2 * CHUNK_BYTES["cuda"]["triton"]  # the model's and the reference's logits chunks
    terms = {
        "parameters": _bytes(lm.parameters()) + reference,
        "gradients": _bytes(trained),
        "optimizer state": 2 * 4 * sum(p.numel() for p in trained),
        "gathered compute copies": (root_numel + 2 * block_numel) * half,
        "activations (checkpointing)": top_blocks * t * d * half + block_activations,
        "ranking head": head_chunk + 2 * t * d * 4,
    }
    gib = {name: value / GIB for name, value in terms.items()}
    gib["total"] = sum(gib.values())
    gib["trained parameters (M)"] = sum(p.numel() for p in trained) / 1e6
    return gib


def print_comparison(config: ModelConfig, name: str, top_blocks: int, rank: int, row_tokens: int) -> dict:
    """The table of both estimates (GiB); returns them."""
    full = stage2_memory(config, top_blocks, None, row_tokens)
    lora = stage2_memory(config, top_blocks, LoraSettings(rank=rank, alpha=2.0 * rank), row_tokens)
    print(f"\nEstimated memory of one GPU, stage 2 on {name} (bf16 compute, top {top_blocks} of "
          f"{config.num_layers} blocks trained, activation checkpointing, a row of {row_tokens:,} tokens; "
          f"LoRA rank {rank} on {', '.join(TARGETS)}, no dropout):\n")
    print("| term | full training (GiB) | LoRA (GiB) |")
    print("|---|---|---|")
    for term in full:
        print(f"| {term} | {full[term]:.2f} | {lora[term]:.2f} |")
    return {"model": name, "trained_blocks": top_blocks, "lora_rank": rank, "row_tokens": row_tokens,
            "full": full, "lora": lora}
