"""The two stages' objectives on packed rows (DESIGN.md section 1), through the fused loss kernels.

Stage 1: next-token loss on the response tokens (and EOS) only, averaged over them; the LM head runs only at
those positions. Stage 2: L_rank + w_gen L_gen + w_dp L_dp from the ranking head, the reference (the frozen
stage-1 model) read at every position under no_grad; only the top K decoder blocks train.
"""

from __future__ import annotations

import torch

from tsarank_kernels.fused_linear import linear_logprob_kl
from tsarank_kernels.ranking_head import RankingLosses, ranking_head_loss

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
               w_gen: float = 1.0, w_dp: float = 1.0, impl: str | None = None) -> RankingLosses:
    """The stage-2 losses of a row of whole groups; without a reference (or with w_dp = 0) L_dp is 0."""
    hidden = hidden_states(model, row)
    ref_hidden = ref_weight = None
    if reference is not None and w_dp != 0:
        with torch.no_grad():
            ref_hidden, ref_weight = hidden_states(reference, row), reference.lm_head.weight
    return ranking_head_loss(hidden, model.lm_head.weight, row.ranking_batch(), ref_hidden, ref_weight,
                             tau=tau, w_gen=w_gen, w_dp=w_dp, impl=impl)


def train_top_blocks(model: CausalLM, top_k: int) -> list[str]:
    """Freeze everything but the top `top_k` decoder blocks (embeddings, final norm and head stay frozen, as in
    the paper); returns the names of the trainable parameters."""
    layers = model.model.layers
    if not 1 <= top_k <= len(layers):
        raise TsarankError(f"top_k must be between 1 and the {len(layers)} decoder blocks, got {top_k}")
    model.requires_grad_(False)
    layers[len(layers) - top_k:].requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]
