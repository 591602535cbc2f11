"""The two stages' objectives on packed rows (DESIGN.md, "The method"), through the fused loss kernels.

Stage 1: next-token loss on the response tokens (and EOS) only, their weighted mean (the row's loss weights);
the LM head runs only at those positions. Stage 2: L_rank + w_gen L_gen + w_dp L_dp (+ w_kd L_kd, distillation from
teacher scores) from the ranking head, the reference (the frozen stage-1 model) read at every position under no_grad;
only the top K decoder blocks train.
Shared frozen trunk: when the model's bottom blocks (and embeddings) are frozen and equal to the reference's
(sharing_with_reference finds how many), they run once, under no_grad, and only the top blocks run twice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from tsarank_kernels.fused_linear import linear_logprob_kl
from tsarank_kernels.ranking_head import LossSettings, RankingLosses, ranking_head_loss

from ..data.packing import PackedRow
from ..errors import TsarankError
from ..model.attention import PackedLayout
from ..model.decoder import CausalLM
from ..model.lora import adapters_off, has_adapters


def hidden_states(model: CausalLM, row: PackedRow) -> torch.Tensor:
    return model(row.input_ids, position_ids=row.position_ids, cu_seqlens=row.cu_seqlens)


def cpt_loss(model: CausalLM, row: PackedRow, impl: str | None = None) -> torch.Tensor:
    """Next-token loss over the positions that predict a response token or the EOS: their mean weighted by
    row.loss_weight."""
    hidden = hidden_states(model, row)
    positions = row.loss_mask.nonzero().squeeze(1)
    if positions.numel() == 0:
        raise TsarankError("the row has no response tokens to learn")
    logp, _, _ = linear_logprob_kl(hidden[positions], model.lm_head.weight, row.targets[positions], impl=impl)
    weight = row.loss_weight[positions]
    return -(logp * weight).sum() / weight.sum()


def sft_losses(model: CausalLM, reference: CausalLM | None, row: PackedRow, settings: LossSettings = LossSettings(),
               impl: str | None = None, shared_layers: int = 0) -> RankingLosses:
    """The stage-2 losses of a row of whole groups; without a reference (or with w_dp = 0) L_dp is 0; w_kd > 0
    needs the row's teacher scores. shared_layers > 0 runs that many bottom blocks once for model and reference
    (see sharing_with_reference). The reference runs with its LoRA adapters off: a model with adapters may be its
    own reference."""
    use_reference = reference is not None and settings.w_dp != 0
    layout = PackedLayout.from_cu_seqlens(row.cu_seqlens, row.num_tokens)
    positions = row.position_ids
    if use_reference and shared_layers:
        with torch.no_grad():
            trunk = model.model.trunk(row.input_ids, positions, layout, shared_layers)
            with adapters_off(reference):
                ref_hidden = reference.model.top(trunk, positions, layout, shared_layers)
        hidden = model.model.top(trunk, positions, layout, shared_layers)
    else:
        hidden = model.model(row.input_ids, positions, layout)
        ref_hidden = None
        if use_reference:
            with torch.no_grad(), adapters_off(reference):
                ref_hidden = reference.model(row.input_ids, positions, layout)
    ref_weight = reference.lm_head.weight if use_reference else None
    return ranking_head_loss(hidden, model.lm_head.weight, row.ranking_batch(), ref_hidden, ref_weight, settings,
                             impl=impl)


@torch.no_grad()
def sharing_with_reference(model: CausalLM, equal: Callable[[list[str]], bool]) -> tuple[int, bool]:
    """(how many bottom blocks, whether the LM head) model and reference can share: frozen in the model and
    holding the same values in both, as `equal` says of a list of the model's parameter names (it compares
    the two checkpoints; under torchrun every process calls it alike). Blocks are shared only with the
    embeddings, and the top block is the model's own."""
    named = dict(model.named_parameters())  # a tied head appears as the embedding

    def shareable(prefix: str) -> bool:
        names = [n for n in named if n.startswith(prefix)]
        return all(not named[n].requires_grad for n in names) and equal(names)

    head = "model.embed_tokens." if model.config.tie_word_embeddings else "lm_head."
    share_head = shareable(head)
    shared = 0
    if shareable("model.embed_tokens."):
        while shared < len(model.model.layers) - 1 and shareable(f"model.layers.{shared}."):
            shared += 1
    return shared, share_head


def trained_blocks(model: CausalLM, top_k: int | None) -> list[int]:
    """The indices of the decoder blocks that train (or carry LoRA adapters): the top `top_k` (stage 2), all
    when None (stage 1)."""
    n = len(model.model.layers)
    if top_k is not None and not 1 <= top_k <= n:
        raise TsarankError(f"sft.trainable_top_blocks must be between 1 and the {n} decoder blocks, got {top_k}")
    return list(range(0 if top_k is None else n - top_k, n))


def train_top_blocks(model: CausalLM, top_k: int) -> list[str]:
    """Freeze everything but the top `top_k` decoder blocks (embeddings, final norm and head stay frozen, as in
    the paper); returns the names of the trainable parameters."""
    blocks = trained_blocks(model, top_k)
    model.requires_grad_(False)
    for i in blocks:
        model.model.layers[i].requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


@dataclass(frozen=True)
class RowShare:
    """The part of a step's loss one row carries: its fraction of the step's loss weight (stage 1: of the
    response tokens' weights; stage 2: of the groups, of L_gen's and of L_dp's weights), so that the step's loss
    is the weighted mean over the whole step however its rows fall. All zero for a row a rank runs only to keep
    in step."""
    loss: float = 0.0  # stage 1: of the loss's weight
    dp: float = 0.0  # stage 2: of L_dp's weight
    groups: float = 0.0  # stage 2: of the groups (L_rank and L_kd are means over groups)
    gen: float = 0.0  # stage 2: of L_gen's weight


_SHARED = {"cpt": ("loss",), "sft": ("dp", "groups", "gen")}  # RowShare's fields each stage fills, row_weights' order


def row_weights(row: PackedRow, stage: str) -> tuple[float, ...]:
    """The loss weights a row carries, in _SHARED's order: stage 1 (the loss's,); stage 2 (L_dp's, its groups,
    L_gen's)."""
    if stage == "cpt":
        return (float(row.loss_weight.sum()),)
    return float(row.kl_weight.sum()), float(row.group.group_offsets.numel() - 1), float(row.gen_weight.sum())


def weight_totals(rows: list[PackedRow], stage: str) -> list[float]:
    """The rows' loss weights summed: a step's totals, or one rank's part of them (the trainer sums the parts
    over the ranks)."""
    per_row = [row_weights(row, stage) for row in rows]
    return [sum(weights[k] for weights in per_row) for k in range(len(_SHARED[stage]))]


def row_shares(rows: list[PackedRow], stage: str, totals: list[float] | None = None) -> list[RowShare]:
    """Each row's share of the step's loss: its loss weights over the step's totals (by default the rows' own:
    a step run in one place)."""
    totals = totals or weight_totals(rows, stage)
    return [RowShare(**{name: w / total for name, w, total in zip(_SHARED[stage], row_weights(row, stage), totals)})
            for row in rows]


class TrainingObjective(nn.Module):
    """The model in training and its loss on one packed row. It is the root unit FSDP wraps, so whatever the
    loss reads (the LM head's weight too) is gathered inside its forward. The stage-2 reference is not a
    submodule: frozen, in the compute dtype, sharded apart (distributed.shard), never saved; with a shared trunk
    its bottom blocks, which would never run, are dropped, and with share_head it reads the model's LM head.
    reference = lm (a model with LoRA adapters on its stage-1 weights) makes the base model, adapters off, the
    reference: nothing is copied."""

    def __init__(self, lm: CausalLM, stage: str, reference: CausalLM | None = None,
                 losses: LossSettings = LossSettings(), shared_layers: int = 0, impl: str | None = None,
                 share_head: bool = False):
        super().__init__()
        if stage not in ("cpt", "sft"):
            raise TsarankError(f"unknown stage {stage!r}; choose cpt or sft")
        self.lm, self.stage, self.impl = lm, stage, impl
        self.losses, self.shared_layers = losses, shared_layers
        if reference is lm:
            if not has_adapters(lm):
                raise TsarankError("a model is its own reference only through LoRA adapters, switched off")
        elif reference is not None and shared_layers:
            for i in range(shared_layers):
                reference.model.layers[i] = nn.Identity()
            reference.model.embed_tokens = lm.model.embed_tokens  # equal, and the reference never embeds
        if reference is not None and reference is not lm and share_head:  # one head for both
            reference.lm_head = lm.lm_head
        self._reference = (reference,)

    def forward(self, row: PackedRow, share: RowShare) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the row's part of the step's loss, to backpropagate; the step metrics' parts, detached)."""
        if self.stage == "cpt":
            loss = cpt_loss(self.lm, row, self.impl) * share.loss
            return loss, {"loss": loss.detach()}
        # The ranking head backpropagates multiples of its total only: scale the part weights so that
        # share.groups x its total is this row's share of L_rank + w_gen L_gen + w_dp L_dp + w_kd L_kd over the
        # step (L_kd, a mean over groups as L_rank is, keeps its weight).
        settings = self.losses
        if share.groups:
            settings = replace(settings, w_gen=settings.w_gen * share.gen / share.groups,
                               w_dp=settings.w_dp * share.dp / share.groups)
        losses = sft_losses(self.lm, self._reference[0], row, settings, impl=self.impl,
                            shared_layers=self.shared_layers)
        loss = losses.loss * share.groups
        parts = {"loss": loss.detach(), "l_rank": losses.l_rank.detach() * share.groups,
                 "l_gen": losses.l_gen.detach() * share.gen, "l_dp": losses.l_dp.detach() * share.dp}
        if self.losses.w_kd > 0:
            parts["l_kd"] = losses.l_kd.detach() * share.groups
        return loss, parts
