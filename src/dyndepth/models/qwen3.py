"""The decoder: Qwen3 dense, Qwen3-MoE and Llama in one module, with HF parameter names.

Shape legend: B batch, T tokens, D hidden_size, V vocab, L layers.

Data flow (see DESIGN.md): embed -> for each layer: x + attn(norm x), then x + mlp(norm x) -> norm ->
lm_head. A layer exposes `attn_branch` and `mlp_branch` separately; both take normed input and leave
the residual add to the caller, so methods can gate, skip or repeat a branch without redefining it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dyndepth.config import ModelConfig
from dyndepth.core.cache import KVCache
from dyndepth.core.layers import Attention, ForwardContext, RMSNorm, RotaryEmbedding, SwiGLU, causal_mask
from dyndepth.models.moe import SparseMoE, load_balancing_loss


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (B, T, V), or (B, num_logits, V)
    aux_loss: torch.Tensor  # scalar, already weighted; zero when there is none
    stats: dict = field(default_factory=dict)  # detached scalars for logging


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def attn_branch(self, h_BTD: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        return self.self_attn(h_BTD, ctx, slot)

    def mlp_branch(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """(..., D) -> (..., D). A MoE layer routes exactly the tokens it is given."""
        if isinstance(self.mlp, SparseMoE):
            valid = ctx.valid if ctx.valid is not None and ctx.valid.shape == h.shape[:-1] else None
            return self.mlp(h, valid, ctx.aux if ctx.collect_aux else None)
        return self.mlp(h)

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        x_BTD = x_BTD + self.attn_branch(self.input_layernorm(x_BTD), ctx, slot)
        return x_BTD + self.mlp_branch(self.post_attention_layernorm(x_BTD), ctx)


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    """`model(input_ids, attention_mask)` -> DecoderOutput; `generate`; `save_pretrained`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # An adaptive-depth method (a plain object, see dyndepth.methods) that replaces each layer's
        # forward with its own `apply`; its parameters live in the layers (`model.layers.{i}.<name>`).
        self.method = None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def make_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     positions: torch.Tensor | None, cache: KVCache | None,
                     doc_ids: torch.Tensor | None = None) -> ForwardContext:
        B, T = input_ids.shape
        valid = None if attention_mask is None else attention_mask.bool()
        given_positions = positions is not None
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a KV cache: the caller owns positions.")
            if valid is None:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
            else:  # left padding: real tokens count from 0, as HF generate does
                positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        dtype = self.model.embed_tokens.weight.dtype
        if torch.is_autocast_enabled(input_ids.device.type):
            dtype = torch.get_autocast_dtype(input_ids.device.type)
        cos, sin = self.model.rotary_emb(positions, dtype)  # (B, T, H)
        attn_mask = None  # None: SDPA's causal fast path, exact when positions are 0..T-1 with no padding
        if cache is None:
            if valid is not None or doc_ids is not None or (given_positions and not _is_arange(positions)):
                attn_mask = causal_mask(positions, positions, valid, valid, doc_ids)  # (B, 1, T, T)
        elif doc_ids is not None:
            raise ValueError("doc_ids (intra-document masking) is for cache-free training forwards.")
        return ForwardContext(positions, valid, cos, sin, attn_mask, cache, doc_ids, collect_aux=self.training)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        num_logits: int | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """input_ids (B, T); attention_mask (B, T) with 1 for real tokens; positions (B, T).

        `num_logits` keeps only the last n positions' logits (generation needs 1), which saves the
        lm_head over the whole prompt. `doc_ids` (B, T) restricts attention to the token's own
        document in a packed training row (positions then restart at each document).
        """
        ctx = self.make_context(input_ids, attention_mask, positions, cache, doc_ids)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        method = self.method
        if method is not None:
            method.begin(input_ids, ctx)
        for slot, layer in enumerate(self.model.layers):
            x = layer(x, ctx, slot) if method is None else method.apply(layer, x, ctx, slot)
        if method is not None:
            method.end(ctx, self.config)
        if num_logits is not None:
            x = x[:, -num_logits:]
        logits = self.lm_head(self.model.norm(x))  # (B, T, V)
        aux_loss = logits.new_zeros((), dtype=torch.float32) + sum(ctx.losses)
        stats = dict(ctx.stats)
        if ctx.aux and self.config.num_experts:
            balance = load_balancing_loss(ctx.aux, self.config.num_experts)
            aux_loss = aux_loss + self.config.router_aux_loss_coef * balance
            stats["moe/balance_loss"] = balance.detach()
        return DecoderOutput(logits, aux_loss, stats)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, **kwargs) -> torch.Tensor:
        """Prompt plus new tokens (B, T + n). See `dyndepth.generation.generate` for every option."""
        from dyndepth.generation import generate

        return generate(self, input_ids, max_new_tokens, attention_mask=attention_mask,
                        temperature=temperature, **kwargs)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write config.json + model.safetensors that `transformers.AutoModelForCausalLM` loads."""
        from dyndepth.interop.hf import save_pretrained

        return save_pretrained(self, path, dtype=dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _is_arange(positions: torch.Tensor) -> bool:
    """True when positions are 0..T-1 in every row (so SDPA's causal fast path is exact)."""
    T = positions.shape[1]
    return bool((positions == torch.arange(T, device=positions.device)).all())
