"""The two stages' objectives on packed rows (DESIGN.md section 1), through the fused loss kernels.

Stage 1: next-token loss on the response tokens (and EOS) only, averaged over them; the LM head runs only at
those positions. Stage 2: L_rank + w_gen L_gen + w_dp L_dp from the ranking head, the reference (the frozen
stage-1 model) read at every position under no_grad; only the top K decoder blocks train.
Shared frozen trunk: when the model's bottom blocks (and embeddings) are frozen and equal to the reference's
(shared_trunk_layers finds how many), they run once, under no_grad, and only the top blocks run twice.
"""

from __future__ import annotations

import torch

from tsarank_kernels.fused_linear import linear_logprob_kl
from tsarank_kernels.ranking_head import RankingLosses, ranking_head_loss

from .attention import PackedLayout
from .decoder import CausalLM
from .errors import TsarankError
from .packing import PackedRow


def hidden_states(model: CausalLM, row: PackedRow) -> torch.Tensor:
    return model(row.input_ids, position_ids=row.position_ids, cu_seqlens=row.cu_seqlens)


def cpt_loss(model: CausalLM, row: PackedRow, impl: str | None = None) -> torch.Tensor:
    """Mean next-token loss over the positions that predict a response token or the EOS."""
    hidden = hidden_states(model, row)
    positions = row.loss_mask.nonzero().squeeze(1)
    if positions.numel() == 0:
        raise TsarankError("the row has no response tokens to learn")
    logp, _, _ = linear_logprob_kl(hidden[positions], model.lm_head.weight, row.targets[positions], impl=impl)
    return -logp.mean()


def sft_losses(model: CausalLM, reference: CausalLM | None, row: PackedRow, tau: float = 0.001,
               w_gen: float = 1.0, w_dp: float = 1.0, impl: str | None = None,
               shared_layers: int = 0) -> RankingLosses:
    """The stage-2 losses of a row of whole groups; without a reference (or with w_dp = 0) L_dp is 0.
    shared_layers > 0 runs that many bottom blocks once for model and reference (see shared_trunk_layers)."""
    use_reference = reference is not None and w_dp != 0
    layout = PackedLayout.from_cu_seqlens(row.cu_seqlens, row.num_tokens)
    positions = row.position_ids
    if use_reference and shared_layers:
        with torch.no_grad():
            trunk = model.model.trunk(row.input_ids, positions, layout, shared_layers)
            ref_hidden = reference.model.top(trunk, positions, layout, shared_layers)
        hidden = model.model.top(trunk, positions, layout, shared_layers)
    else:
        hidden = model.model(row.input_ids, positions, layout)
        ref_hidden = None
        if use_reference:
            with torch.no_grad():
                ref_hidden = reference.model(row.input_ids, positions, layout)
    ref_weight = reference.lm_head.weight if use_reference else None
    return ranking_head_loss(hidden, model.lm_head.weight, row.ranking_batch(), ref_hidden, ref_weight,
                             tau=tau, w_gen=w_gen, w_dp=w_dp, impl=impl)


@torch.no_grad()
def shared_trunk_layers(model: CausalLM, reference: CausalLM) -> int:
    """How many bottom blocks model and reference can share: the embeddings and those blocks must be frozen
    in the model and equal to the reference's (checked once, before training; they stay so while frozen)."""
    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        pairs = zip(a.parameters(), b.parameters())
        return all(not p.requires_grad and p.shape == q.shape and torch.equal(p, q) for p, q in pairs)

    if not same(model.model.embed_tokens, reference.model.embed_tokens):
        return 0
    shared = 0
    for mine, theirs in zip(model.model.layers, reference.model.layers):
        if not same(mine, theirs):
            break
        shared += 1
    return min(shared, len(model.model.layers) - 1)  # the top block is the model's own


def train_top_blocks(model: CausalLM, top_k: int) -> list[str]:
    """Freeze everything but the top `top_k` decoder blocks (embeddings, final norm and head stay frozen, as in
    the paper); returns the names of the trainable parameters."""
    layers = model.model.layers
    if not 1 <= top_k <= len(layers):
        raise TsarankError(f"top_k must be between 1 and the {len(layers)} decoder blocks, got {top_k}")
    model.requires_grad_(False)
    layers[len(layers) - top_k:].requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]
