"""The decoder: Qwen3 dense, Qwen3-MoE, Qwen2 (Qwen2.5), Llama and Mistral in one module, with HF parameter names.

Shape legend: B batch, T tokens, D hidden_size, V vocab, L layers.

Data flow (see docs/design.md): embed -> for each application (layer, slot) of the model's schedule:
x = layer(x, ctx, slot) -> norm -> lm_head. The layer call is the unit of dispatch: a plain layer runs
`block` (x + attn(norm x), then x + mlp(norm x)); with an adaptive-depth method attached, the layer hands
the call to `method.layer_forward`, which gates, skips or repeats the layer's branches (`attn_branch`,
`mlp_branch`, `block`) inside that same call, so FSDP2, activation checkpointing and compile, applied per
layer, cover the method too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dyndepth.config import PRESETS as DECODER_PRESETS
from dyndepth.config import SUPPORTED_MODEL_TYPES, ModelConfig
from dyndepth.core import flops
from dyndepth.core.cache import KVCache
from dyndepth.core.context import ForwardContext
from dyndepth.core.layers import Attention, RMSNorm, RotaryEmbedding, SwiGLU, cast_state, float32_keys
from dyndepth.core.method import Method
from dyndepth.devices import resolve_dtype
from dyndepth.models import hf_layout
from dyndepth.models.forward import Application, DecoderOutput, Trace, dense_flops_stat, make_context, run_schedule
from dyndepth.models.moe import SparseMoE, load_balancing_loss
from dyndepth.models.registry import ModelSpec, register_model
from dyndepth.safetensors_io import write_pretrained


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
        self.mlp_flops = flops.mlp_flops(config, layer_idx)  # per token (the layer keeps its kind if renumbered)
        self.expert_flops = flops.expert_flops(config) if config.is_moe_layer(layer_idx) else 0  # per expert run

    def attn_branch(self, h_BTD: torch.Tensor, ctx: ForwardContext, slot: int, q_idx_BK: torch.Tensor | None = None,
                    q_valid_BK: torch.Tensor | None = None, ideal_q_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Attention on normed input; queries from every token or from a per-row subset (see Attention)."""
        return self.self_attn(h_BTD, ctx, slot, q_idx_BK, q_valid_BK, ideal_q_BT)

    def mlp_branch(self, h: torch.Tensor, ctx: ForwardContext, slot: int,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) -> (..., D) on normed input. `valid` (...) marks the rows that are real tokens (default:
        `ctx.valid` when the shapes match, else every row): they count in the ideal FLOPs and, for a MoE
        layer, in the balancing statistics. A MoE layer routes exactly the rows it is given."""
        if valid is None and ctx.valid is not None and ctx.valid.shape == h.shape[:-1]:
            valid = ctx.valid
        if ctx.ledger.enabled:
            rows = h.numel() // h.shape[-1]
            n_valid = rows if valid is None else valid.sum()
            executed = self.mlp_flops
            if isinstance(self.mlp, SparseMoE):  # all E experts, not K, on a traced step's every-expert path
                K = self.mlp.top_k
                run = self.mlp.experts.experts_per_token(h.reshape(rows, -1), K, ctx.traced_decode)
                executed += (run - K) * self.expert_flops
            ctx.ledger.add(slot, "mlp", executed=rows * executed, ideal=n_valid * self.mlp_flops, tokens=n_valid)
        if isinstance(self.mlp, SparseMoE):
            return self.mlp(h, valid, ctx.aux if ctx.training else None, ctx.traced_decode)
        return self.mlp(h)

    def block(self, x_BTD: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        """The plain layer: x + attn(norm x), then + mlp(norm x)."""
        x_BTD = x_BTD + self.attn_branch(self.input_layernorm(x_BTD), ctx, slot)
        return x_BTD + self.mlp_branch(self.post_attention_layernorm(x_BTD), ctx, slot)

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        if ctx.method is None:
            return self.block(x_BTD, ctx, slot)
        return ctx.method.layer_forward(self, x_BTD, ctx, slot)


class DecoderModel(nn.Module):
    """Embedding, layers, final norm and rotary tables. `layers` replaces the decoder layers (a depth-recurrent
    family passes its shared group, models/dreamer.py)."""

    def __init__(self, config: ModelConfig, layers: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if layers is None:
            layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(layers)
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
        # The adaptive-depth method (dyndepth.methods), or None. Its parameters live in the layers
        # (`model.layers.{i}.<name>`); every layer call hands over to it (DecoderLayer.forward).
        self.method: Method | None = None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def schedule(self) -> list[Application]:
        """Which layer runs at which step with which cache slot: each layer once, slot = layer index."""
        return [Application(i, i) for i in range(len(self.model.layers))]

    def num_slots(self) -> int:
        """KV-cache slots a forward writes: one per application, plus the method's extra slots."""
        n = len(self.schedule)
        return n + (self.method.extra_slots(n) if self.method is not None else 0)

    def make_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     positions: torch.Tensor | None, cache: KVCache | None,
                     doc_ids: torch.Tensor | None = None) -> ForwardContext:
        return make_context(self, input_ids, attention_mask, positions, cache, doc_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None, num_logits: int | None = None,
                doc_ids: torch.Tensor | None = None, trace: Trace | None = None) -> DecoderOutput:
        """input_ids (B, T); attention_mask (B, T) with 1 for real tokens; positions (B, T).

        `num_logits` keeps only the last n positions' logits (generation needs 1), which saves the
        lm_head over the whole prompt. `doc_ids` (B, T) restricts attention to the token's own
        document in a packed training row (positions then restart at each document). `trace` keeps
        the residual streams and the context (see Trace). The loop is `models.forward.run_schedule`.
        """
        return run_schedule(self, input_ids, attention_mask, positions, cache, num_logits, doc_ids, trace)

    def init_state(self, ctx: ForwardContext) -> None:
        """The decoder keeps no per-forward state of its own (see models/forward.py)."""
        return None

    def finish(self, ctx: ForwardContext, head_ideal) -> tuple[list[torch.Tensor], dict]:
        """After the layers: the MoE balancing loss (training; a loss unless output_router_logits is false, as in
        transformers, always a statistic) and flops/dense, what the plain model would need for the same tokens (valid
        ones, their causal keys, the logits computed)."""
        losses, stats = [], {}
        if ctx.aux and self.config.num_experts:
            balance = load_balancing_loss(ctx.aux, self.config.num_experts)
            if self.config.output_router_logits is not False:
                losses.append(self.config.router_aux_loss_coef * balance)
            stats["moe/balance_loss"] = balance.detach()
        layers = [app.layer for app in self.schedule]
        linear = flops.q_o_flops(self.config) + flops.kv_flops(self.config)
        per_token = sum(linear + flops.mlp_flops(self.config, i) for i in layers)  # matmuls of each application
        stats.update(dense_flops_stat(ctx, self.config, per_token, len(layers), head_ideal))
        return losses, stats

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x trainable + 4 x frozen matmul parameters + 12 x L x N x H x T.

        A trainable matmul parameter costs 2 FLOPs forward, 2 for the input gradient and 2 for the weight
        gradient; a frozen one has no weight gradient (4). That is exact when gradients flow through the frozen
        weight to a trainable one below it; frozen layers with nothing trainable beneath them need no backward
        at all (2), so there the count is high. Attention adds 12 x L x N x H x T (forward 4, backward 8,
        non-causal). The input embedding is a lookup, not a matmul, and is left out unless tied to lm_head, as are
        parameters of fewer than 2 dimensions (norm weights, biases: elementwise); MoE
        experts count with their top-k fraction; each layer counts once per application of the schedule, and a
        method's model-level module (`model.<method name>`, GateSkip's shared gates) once per layer call.
        """
        cfg = self.config
        uses = [0] * len(self.model.layers)
        for app in self.schedule:
            uses[app.layer] += 1
        shared = f"model.{self.method.name}." if self.method is not None else None  # run by every layer call
        total = 0.0
        for name, p in self.named_parameters():  # tied weights are listed once
            if name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings or p.dim() < 2:
                continue  # (< 2 dims: norm weights, biases, DND's beta: elementwise, no matmul)
            frac = cfg.num_experts_per_tok / cfg.num_experts if ".mlp.experts." in name and cfg.num_experts else 1.0
            times = uses[int(name.split(".")[2])] if name.startswith("model.layers.") else \
                len(self.schedule) if shared and name.startswith(shared) else 1
            total += p.numel() * frac * times * (6 if p.requires_grad else 4)
        return total + 12 * len(self.schedule) * cfg.num_attention_heads * cfg.head_dim * seq_len

    def trainer_hooks(self, total_steps: int) -> list:
        """The decoder has no controller of its own (a method brings its hooks)."""
        return []

    def forward_flops(self, T: int, B: int = 1, context: int | None = None, lm_head: bool = True) -> int:
        """Analytic FLOPs of a plain forward of B sequences of T tokens (core/flops.py), by the schedule."""
        return flops.forward_flops(self.config, T, B, context, lm_head, [a.layer for a in self.schedule])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 temperature: float = 0.0, **kwargs) -> torch.Tensor:
        """Prompt plus new tokens (B, T + n). See `dyndepth.generation.generate` for every option."""
        from dyndepth.generation import generate

        return generate(self, input_ids, max_new_tokens, attention_mask=attention_mask,
                        temperature=temperature, **kwargs)

    def hf_state_dict(self, dtype: torch.dtype | None = None, plain: bool = False) -> dict[str, torch.Tensor]:
        """The state dict in the on-disk HF layout: tied lm_head dropped, experts split per expert; `plain`: without
        the method's tensors (every key with a `.<method name>.` part, e.g. `model.layers.0.gateskip.tau`)."""
        state = cast_state(self.state_dict(), dtype, float32_keys(self))  # thresholds stay float32
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if plain and self.method is not None:
            state = {k: v for k, v in state.items() if f".{self.method.name}." not in f".{k}"}
        return hf_layout.split_experts(state)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None,
                        max_shard_bytes: int = 5 * 2**30, plain: bool = False) -> Path:
        """Write config.json + safetensors that `transformers.AutoModelForCausalLM` loads, and the loaded checkpoint's
        generation_config.json. A method, if any, is recorded under `dyndepth_method`: transformers loads such a
        folder as the plain base model (it reports the method's tensors as unexpected and keeps `dyndepth_method` in
        its config, so a folder it saves again has the entry without the tensors), whose outputs differ; so does a
        variant its classes lack (qk_norm off the family's, a Qwen3 MLP bias, a Llama with experts), which
        `dyndepth.from_pretrained` loads back exactly. `plain=True` leaves the method out (its tensors and the
        config entry): the base weights alone, for transformers, with the base's outputs (not the method's).
        dtype: a torch dtype or its name."""
        dtype = resolve_dtype(dtype)  # ("bfloat16" reached tensor.to as a device name: "Invalid device string")
        return write_pretrained(self.hf_state_dict(dtype, plain), self.pretrained_config(dtype, plain), path,
                                max_shard_bytes, getattr(self, "generation_config", None))

    def pretrained_config(self, dtype: torch.dtype | None = None, plain: bool = False) -> dict:
        """The config.json `save_pretrained` writes: HF's fields, and the method under `dyndepth_method` (not
        `plain`)."""
        hf_config = hf_layout.config_to_hf(self.config, dtype or next(self.parameters()).dtype)
        if self.method is not None and not plain:
            hf_config["dyndepth_method"] = self.method.to_dict()
        return hf_config

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


register_model(SUPPORTED_MODEL_TYPES,
               ModelSpec(ModelConfig, CausalLM, hf_layout.config_from_hf, hf_layout.stack_experts),
               presets=DECODER_PRESETS)
