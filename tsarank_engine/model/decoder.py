"""The decoder: one hand-written LLaMA/Mistral/Qwen2/Qwen3 causal LM over packed rows.

Module and parameter names mirror the Hugging Face layout (`model.layers.3.self_attn.q_proj.weight`), so
checkpoints load and export without a name map. Internally every forward runs on packed tokens
[T, D] with document boundaries; a padded batch is unpadded on the way in and re-padded on the way out.
The model is built from its config alone; which kernels run (use_kernels) and activation checkpointing
(Block.checkpointing) are applied afterwards by whoever runs it: the loader, the trainer.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tsarank_kernels.block_ops import rms_norm, rope, swiglu
from tsarank_kernels.dense import linear

from ..choices import BLOCK_OPS
from ..errors import TsarankError
from .attention import AttentionBackend, PackedLayout, get_attention_backend
from .config import ModelConfig, RopeConfig


def block_ops_impl(setting: str, x: torch.Tensor) -> str:
    """The path of the small block ops (RMSNorm, RoPE, SwiGLU) for tensors like x: "auto" runs Triton on CUDA."""
    return ("triton" if x.is_cuda else "torch") if setting == "auto" else setting


class Linear(nn.Linear):
    """nn.Linear whose product may run on oneDNN when scoring on the CPU (tsarank_kernels.dense.linear). Its input
    is cast to the weight's dtype: in a mixed-precision model (loading.load_model's `mixed`) the float32 residual
    stream meets half-precision products."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x.to(self.weight.dtype), self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.block_ops = eps, "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype (the order transformers uses, so bf16 rounds alike).
        return rms_norm(x, self.weight, self.eps, impl=block_ops_impl(self.block_ops, x))


def rope_inv_freq(rope: RopeConfig, head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 [head_dim / 2] rotation frequencies, with linear or llama3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        context = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        slowed = inv_freq / rope.factor
        blend = (context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - blend) * slowed + blend * inv_freq
        out = torch.where(wavelen > context / rope.low_freq_factor, slowed, inv_freq)
        middle = (wavelen >= context / rope.high_freq_factor) & (wavelen <= context / rope.low_freq_factor)
        return torch.where(middle, blended, out)
    return inv_freq


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hq, hkv, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = Linear(d, hq * dh, bias=config.qkv_bias)
        self.k_proj = Linear(d, hkv * dh, bias=config.qkv_bias)
        self.v_proj = Linear(d, hkv * dh, bias=config.qkv_bias)
        self.o_proj = Linear(hq * dh, d, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(dh, config.rms_norm_eps)
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, dh
        self.backend: AttentionBackend = get_attention_backend("auto")
        self.block_ops = "auto"

    def forward(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                layout: PackedLayout) -> torch.Tensor:
        t = x.shape[0]
        x = x.to(self.q_proj.weight.dtype)  # once for the three products (a mixed model's residual is float32)
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # float32 norm weights (a mixed model) would promote q and k past v
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        impl = block_ops_impl(self.block_ops, x)
        q, k = rope(q, positions, inv_freq, impl=impl), rope(k, positions, inv_freq, impl=impl)
        out = self.backend(q, k, v, layout, self.head_dim**-0.5)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.block_ops = "auto"
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = block_ops_impl(self.block_ops, x)
        x = x.to(self.gate_proj.weight.dtype)  # once for both products
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), impl=impl))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.checkpointing = False  # recompute the block's activations in backward instead of keeping them

    def forward(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                layout: PackedLayout) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            # Inside forward, so that a sharding wrapper's hooks around the block stay outside the recompute.
            return checkpoint(self._forward, x, positions, inv_freq, layout, use_reentrant=False)
        return self._forward(x, positions, inv_freq, layout)

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                 layout: PackedLayout) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, inv_freq, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Embeddings, blocks and final norm: token ids [T] -> final hidden states [T, D]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # No random init: weights come from a checkpoint, and on the meta device (where load_model builds
        # the model) nn.Embedding's normal_ init would pull in torch's compiler stack, ~150 MB and seconds.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The residual stream's dtype; None: the embedding's (the model's own, as training runs it). Scoring's
        # mixed precision sets float32 (loading.load_model's `mixed`, training's [eval]): the norms then run on
        # float32 states and each linear casts its input to its weight's dtype.
        self.residual_dtype: torch.dtype | None = None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        return self.top(self.trunk(input_ids, position_ids, layout, 0), position_ids, layout, 0)

    def trunk(self, input_ids: torch.Tensor, position_ids: torch.Tensor, layout: PackedLayout,
              num_layers: int) -> torch.Tensor:
        """The embeddings and the first num_layers blocks (a trunk a reference model may share)."""
        window = self.config.sliding_window
        if window is not None and layout.max_seqlen > window:
            raise TsarankError(
                f"a document of {layout.max_seqlen} tokens exceeds the checkpoint's sliding window ({window}); "
                "sliding-window attention is not implemented"
            )
        x = self.embed_tokens(input_ids)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        return self._blocks(x, position_ids, layout, 0, num_layers)

    def top(self, x: torch.Tensor, position_ids: torch.Tensor, layout: PackedLayout, first_layer: int) -> torch.Tensor:
        """The blocks from first_layer on, applied to the states after the trunk, and the final norm."""
        return self.norm(self._blocks(x, position_ids, layout, first_layer, len(self.layers)))

    def _blocks(self, x, position_ids, layout, first: int, stop: int) -> torch.Tensor:
        inv_freq = rope_inv_freq(self.config.rope, self.config.head_dim, x.device)
        for layer in self.layers[first:stop]:
            x = layer(x, position_ids, inv_freq, layout)
        return x


class CausalLM(nn.Module):
    """Decoder plus LM head. `forward` returns final hidden states; `logits` applies the head.

    Keeping the head separate lets callers compute it only where a loss or score needs it.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states for a packed row or a padded batch.

        Packed: input_ids [T], cu_seqlens int [num_docs + 1] -> [T, D]; position_ids [T] default to each
        token's offset in its document. Padded: input_ids [B, L], attention_mask [B, L] (1 = real token;
        left or right padding, real tokens contiguous) -> [B, L, D] with zeros at padding; positions count
        from 0 at each row's first real token unless position_ids [B, L] are given. The engine's own paths
        pack; the padded form is for users of `load_model` holding transformers-style batches (and is what the
        parity tests compare with transformers).
        """
        if cu_seqlens is not None:
            if input_ids.dim() != 1 or attention_mask is not None:
                raise TsarankError("a packed row takes 1-D input_ids and cu_seqlens, and no attention_mask")
            layout = PackedLayout.from_cu_seqlens(cu_seqlens, input_ids.numel())
            positions = layout.offsets if position_ids is None else position_ids
            return self.model(input_ids, positions, layout)
        if input_ids.dim() != 2:
            raise TsarankError(f"a padded batch takes input_ids [batch, length], got shape {tuple(input_ids.shape)}")
        keep, layout = _unpad(input_ids, attention_mask)
        positions = layout.offsets if position_ids is None else position_ids.reshape(-1)[keep]
        hidden = self.model(input_ids.reshape(-1)[keep], positions, layout)
        out = hidden.new_zeros(input_ids.numel(), hidden.shape[-1])
        out[keep] = hidden
        return out.view(*input_ids.shape, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def use_kernels(model: CausalLM, attention: str = "auto", block_ops: str = "auto") -> CausalLM:
    """Choose the model's kernels: the attention backend ("auto", "flash_attn", "torch_varlen", "triton",
    "sdpa") and the path of the block ops RMSNorm, RoPE, SwiGLU ("auto": Triton on CUDA, torch elsewhere;
    "torch"; "triton"). Returns the model."""
    if block_ops not in BLOCK_OPS:
        raise TsarankError(f"unknown block ops setting {block_ops!r}; choose from {', '.join(BLOCK_OPS)}")
    backend = get_attention_backend(attention)
    for module in model.modules():
        if isinstance(module, (RMSNorm, Attention, MLP)):
            module.block_ops = block_ops
        if isinstance(module, Attention):
            module.backend = backend
    return model


def _unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, PackedLayout]:
    """Flat indices of the real tokens of a padded batch and the layout of its rows as documents."""
    length = input_ids.shape[1]
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    elif attention_mask.shape != input_ids.shape:
        raise TsarankError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    else:
        mask = attention_mask.bool()
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise TsarankError(f"attention_mask row {int((lengths == 0).nonzero()[0])} has no real token")
    idx = torch.arange(length, device=mask.device)
    first = torch.where(mask, idx, length).min(1).values
    contiguous = (idx >= first[:, None]) & (idx < (first + lengths)[:, None])
    if not bool((contiguous == mask).all()):
        bad = int((contiguous != mask).any(1).nonzero()[0])
        raise TsarankError(f"attention_mask row {bad} has padding between real tokens")
    keep = mask.reshape(-1).nonzero().squeeze(1)
    return keep, PackedLayout.from_lengths(lengths.tolist(), mask.device)
