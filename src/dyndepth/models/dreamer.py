"""Dreamer: a depth-recurrent LM that mixes sequence, depth and sparse expert attention in one shared layer.

Knupp et al. 2026, "Depth-Recurrent Attention Mixtures" (arXiv:2601.21582); what we implement and the choices
the paper leaves open are in docs/methods.md. Shape legend: B batch, T tokens, D hidden_size, V vocab,
E experts, R recurrence steps.

The model is a schedule on the shared core (models/forward.py): embed -> the group of `layers_per_group`
layers applied at steps 0..R-1, application (step r, layer g) with KV-cache slot r * layers_per_group + g
-> norm -> lm_head. The loop, the cache and generation are the decoder's; the layer is in dreamer_layer.py.

    model = DreamerLM(DreamerConfig(hidden_size=256, num_recurrences=8, num_experts=64, num_experts_per_tok=4))
    out = model(ids)                      # logits, aux_loss, stats["dreamer/expert_diversity"], flops/*
    with model.override(steps=12, exit_kl=1e-3):   # ours: more steps than trained, per-token exit
        model.generate(prompt, 64)
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dyndepth.config import ConfigError, ModelConfig, check_above_zero, check_at_least, check_fields, check_rope_scaling
from dyndepth.core import flops
from dyndepth.core.cache import KVCache
from dyndepth.core.context import ForwardContext
from dyndepth.models import native
from dyndepth.models.dreamer_layer import DepthState, DreamerLayer, rename_old_sandwich_norms
from dyndepth.models.forward import Application, DecoderOutput, Trace, dense_flops_stat, make_context, run_schedule
from dyndepth.models.huginn import average_over_draws, max_recurrence, nth_draw, sample_recurrence, split_steps
from dyndepth.models.moe import EXPERT_ACTS, load_balancing_loss
from dyndepth.models.qwen3 import DecoderModel
from dyndepth.models.registry import ModelSpec, register_model

DA_MODES = ("separate", "merged_softmax", "none")
EA_ENCODINGS = ("learned", "rope", "none")
DA_ENCODINGS = ("rope", "learned")


@dataclass
class DreamerConfig:
    model_type: str = "dreamer"
    vocab_size: int = 32000
    hidden_size: int = 512  # width D
    num_attention_heads: int = 8  # sequence attention
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    num_recurrences: int = 8  # R: steps of the shared group (depth, free in parameters)
    layers_per_group: int = 1  # distinct layers applied in turn at every step (MoEUT-style grouping)
    # Depth attention: each token over its own states entering steps 0..r, RoPE over the step index.
    da_mode: str = "separate"  # separate | merged_softmax (one softmax with SA) | none
    da_num_heads: int | None = None  # None -> num_attention_heads; width = da_num_heads * da_head_dim
    da_head_dim: int | None = None  # None -> head_dim
    da_include_self: bool = False  # also attend to the query state itself (sequential DA: the state after SA)
    da_parallel: bool = False  # DA reads the step's input next to SA instead of SA's output (that input is entry r)
    da_step_encoding: str = "rope"  # how DA's q / k / v know the step: rope (over the step index) | learned (R, D)
    da_rope_theta: float = 10000.0  # RoPE base over steps (also the router's, with ea_depth_encoding="rope")
    # Training memory (ours): recompute depth attention (projections, q/k norms, per-entry products) in backward
    # instead of saving it: 12% less step memory at dreamer-bench for 7-11% more step time (docs/design.md).
    # Redundant under the trainer's activation_checkpointing, which recomputes the whole layer anyway.
    da_recompute: bool = False
    # Sparse expert attention in the FFN slot; num_experts = 0 gives a dense SwiGLU FFN of intermediate_size.
    num_experts: int = 64  # E (parameters, free in FLOPs)
    num_experts_per_tok: int = 4  # k (FLOPs)
    moe_intermediate_size: int = 128  # expert width F
    expert_act: str = "swiglu"  # expert body: swiglu, down(silu(gate x) * up x) | gelu, down(gelu(up x))
    intermediate_size: int | None = None  # dense FFN width (num_experts = 0); None -> 3 * hidden_size
    norm_topk_prob: bool = True  # renormalize the k gates to sum to 1 (False: MoEUT's sigma-MoE)
    ea_depth_encoding: str = "learned"  # step signal in the router query: learned | rope | none
    ea_bias_update_rate: float = 1e-3  # gamma of the balancing-bias sign update (trainer hook)
    ea_aux_loss_coef: float = 0.0  # optional Switch-style balancing loss on normalized sigmoid scores
    ea_entropy_coef: float = 0.0  # MoEUT's regularizer: - entropy of the mean softmax(scores) per sequence
    ea_z_loss_coef: float = 0.0  # the spec's optional router z-loss (ST-MoE): mean logsumexp(scores)^2, running tokens
    # Optional per-step encoding of sequence attention's input (the spec's SA option): a learned (R, D) vector,
    # zero-init, added to the normed input SA projects from at step r (steps past R reuse the last); off: SA is
    # the same at every step and learns the step from the state alone.
    sa_step_encoding: bool = False
    # SwitchHead sequence attention (models/switchhead.py; MoEUT's): E expert value and output projections per
    # head, K of them per token and head. 0 experts: the standard attention.
    attn_num_experts: int = 0
    attn_experts_per_tok: int = 2
    attn_entropy_coef: float = 0.001  # the entropy regularizer on both routers (MoEUT's attention coefficient)
    # Optional extras the spec names (off by default).
    sandwich_norm: bool = False  # RMSNorm on each sub-block's output
    # The spec's optional stability gate: a learned scalar on each sub-block's output (after its sandwich norm),
    # initialised to this value (small: each step starts close to the identity); None: no gate.
    sub_block_gate: float | None = None
    # Randomised recurrence in training (the spec's optional Huginn-style sampler; off: every training forward runs
    # num_recurrences steps): each training forward draws p ~ Poisson(LogNormal(log R - sigma^2 / 2, sigma)) + 1
    # steps (E[p] = R + 1, models/huginn.sample_recurrence); evaluation and generation run num_recurrences.
    sample_recurrence: bool = False
    # Truncated backprop through depth (Huginn's mean_backprop_depth): only the last k steps of a training forward
    # take gradients, the earlier ones run under no_grad (their depth-memory entries too, but the embedding's, which
    # carries the embedding's gradient; without separate DA, input_injection must carry it). 0: every step.
    backprop_depth: int = 0
    input_injection: bool = False  # re-add the embedding at every step after the first
    # The decoder's fields (names as HF Qwen3).
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    qk_norm: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.model_type != "dreamer":
            raise ConfigError(f"DreamerConfig.model_type must be 'dreamer', got {self.model_type!r}.")
        check_at_least(self, "model", ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                       "num_recurrences", "layers_per_group", "max_position_embeddings",
                                       "da_num_heads", "da_head_dim", "head_dim"))
        check_at_least(self, "model", ("intermediate_size", "num_experts", "attn_num_experts", "ea_bias_update_rate",
                                       "ea_aux_loss_coef", "ea_entropy_coef", "ea_z_loss_coef", "attn_entropy_coef"),
                       low=0)
        if self.num_experts:
            check_at_least(self, "model", ("moe_intermediate_size",), what=" with experts")
        check_above_zero(self, "model", ("rms_norm_eps", "rope_theta", "da_rope_theta"))
        check_at_least(self, "model", ("initializer_range",), low=0)
        check_rope_scaling(self.rope_scaling)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.da_num_heads = self.num_attention_heads if self.da_num_heads is None else self.da_num_heads
        self.da_head_dim = self.head_dim if self.da_head_dim is None else self.da_head_dim
        if self.intermediate_size is None:
            self.intermediate_size = 3 * self.hidden_size
        if not self.num_experts:
            check_at_least(self, "model", ("intermediate_size",), what=" (the dense FFN's width, num_experts = 0)")
        for name, allowed in (("da_mode", DA_MODES), ("ea_depth_encoding", EA_ENCODINGS),
                              ("da_step_encoding", DA_ENCODINGS), ("expert_act", EXPERT_ACTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"DreamerConfig.{name}={getattr(self, name)!r} is not one of {allowed}.")
        if self.backprop_depth < 0:
            raise ConfigError(f"DreamerConfig.backprop_depth must be >= 0 (0: backprop through every step), got "
                              f"{self.backprop_depth}.")
        if self.backprop_depth and self.da_mode != "separate" and not self.input_injection:
            raise ConfigError("backprop_depth (truncated backprop) needs a path from the embedding to the steps that "
                              "train: separate depth attention (its step-0 entry) or input_injection=True; with "
                              f"da_mode={self.da_mode!r} set input_injection=True or backprop_depth=0.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads}).")
        rotated = ["head_dim", "hidden_size"] + (["da_head_dim"] if self.da_mode == "separate" else [])
        odd = {name: getattr(self, name) for name in rotated if getattr(self, name) % 2}
        if odd:
            raise ConfigError(f"DreamerConfig {odd} must be even: RoPE rotates pairs of channels (head_dim defaults to "
                              "hidden_size // num_attention_heads, da_head_dim to head_dim); set even values.")
        if self.attn_num_experts and not 1 <= self.attn_experts_per_tok <= self.attn_num_experts:
            raise ConfigError(f"attn_experts_per_tok ({self.attn_experts_per_tok}) must be in 1..attn_num_experts "
                              f"({self.attn_num_experts}).")
        if self.attn_num_experts and self.attention_bias:
            raise ConfigError("SwitchHead attention (attn_num_experts > 0) has no biases; set attention_bias = false.")
        if self.da_include_self and self.da_parallel and self.da_mode == "separate":
            # the parallel query is the step's input, whose k/v are memory entry r already: "self" would be that entry
            # a second time (identical key and value), doubling its softmax weight instead of adding a state
            raise ConfigError("da_include_self adds the query state to depth attention's memory, but with "
                              "da_parallel=True the query is the step's input, already the memory's last entry (it "
                              "would count twice); set da_include_self=False (parallel DA sees its own state anyway) "
                              "or da_parallel=False.")
        if self.da_step_encoding != "rope" and self.da_mode != "separate":
            raise ConfigError(f"da_step_encoding={self.da_step_encoding!r} encodes separate depth attention's steps; "
                              f"da_mode={self.da_mode!r} has none: set da_mode='separate' or keep 'rope'.")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                              f"({self.num_experts}).")
        if self.num_experts and self.num_experts_per_tok == 1 and self.norm_topk_prob:
            raise ConfigError("num_experts_per_tok = 1 with norm_topk_prob = true renormalizes the one gate to 1, so "
                              "the router gets no gradient and never learns; set norm_topk_prob = false (the gate is "
                              "then the sigmoid score) or num_experts_per_tok >= 2.")

    @property
    def num_hidden_layers(self) -> int:
        """Layer applications of a forward (R * layers_per_group): one KV-cache slot each."""
        return self.num_recurrences * self.layers_per_group

    def num_params(self) -> int:
        """Parameter count from the shapes alone (equals the model's; tests/models/test_moeut.py)."""
        D, H, N, G = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        attn = D * H * (2 * N + 2 * G) + (2 * H if self.qk_norm else 0) + (H * (N + 2 * G) + D
                                                                            if self.attention_bias else 0)
        if self.attn_num_experts:  # q, k; value and output routers and experts (E per head) instead of v, o
            E = self.attn_num_experts
            attn = D * H * (N + G) + (2 * H if self.qk_norm else 0) + D * E * (G + N) + E * D * H * (G + N)
        layer = attn + 2 * D + (2 * D if self.sandwich_norm else 0)  # sandwich: SA's and the FFN's post-norms
        layer += 0 if self.sub_block_gate is None else 3 if self.da_mode == "separate" else 2  # a scalar per sub-block
        layer += self.num_recurrences * D if self.sa_step_encoding else 0
        if self.da_mode == "separate":
            width = self.da_num_heads * self.da_head_dim
            layer += D + 4 * D * width + (2 * self.da_head_dim if self.qk_norm else 0)
            layer += D if self.sandwich_norm else 0  # DA's post-norm
            layer += self.num_recurrences * D if self.da_step_encoding == "learned" else 0
        if self.num_experts:
            E = self.num_experts
            layer += E * D + flops.EXPERT_MATRICES[self.expert_act] * E * D * self.moe_intermediate_size
            layer += self.num_recurrences * D if self.ea_depth_encoding == "learned" else 0
        else:
            layer += 3 * D * self.intermediate_size
        return self.layers_per_group * layer + D + self.vocab_size * D * (1 if self.tie_word_embeddings else 2)

    # The decoder config's own rules, shared rather than inherited: eos ids as a list, dict round trip.
    eos_token_ids = ModelConfig.eos_token_ids
    to_dict = ModelConfig.to_dict
    from_dict = classmethod(ModelConfig.from_dict.__func__)


class DreamerLM(nn.Module):
    """`model(input_ids, attention_mask)` -> DecoderOutput; `generate`; `save_pretrained`; `override(steps=,
    exit_kl=)` for the inference-time knobs (ours: recurrence steps, per-token exit)."""

    # shared with the other families that have no HF class (models/native.py)
    architecture = "DreamerForCausalLM"
    generate = native.generate
    save_pretrained = native.save_pretrained
    pretrained_config = native.pretrained_config
    num_params = native.num_params
    hf_state_dict = native.disk_state_dict

    KNOBS = ("steps", "exit_kl")

    def __init__(self, config: DreamerConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, [DreamerLayer(config, g) for g in range(config.layers_per_group)])
        native.add_lm_head_and_init(self)
        self.method = None  # the shared forward's method slot: Dreamer runs without one
        self.steps: int | None = None  # recurrence steps at inference (None: num_recurrences)
        self.exit_kl: float | None = None  # per-token exit threshold in nats (None: off)
        if config.sample_recurrence:  # training draws so far (huginn.nth_draw), saved with the weights
            self.register_buffer("recurrence_draws", torch.zeros((), dtype=torch.long))
        self._register_load_state_dict_pre_hook(_draws_across_the_sampler_switch, with_module=True)
        self._train_steps: tuple[int, int] | None = None  # (no-grad, grad) steps of the training forward running

    # ------------------------------------------------------------------------------ the schedule
    @property
    def num_steps(self) -> int:
        if self._train_steps is not None:
            return sum(self._train_steps)
        return self.config.num_recurrences if self.steps is None else self.steps

    @property
    def schedule(self) -> list[Application]:
        """Layer g at step r, cache slot r * G + g: the shared group applied num_steps times (in a training forward
        with truncated backprop, the first steps without gradients)."""
        G = self.config.layers_per_group
        no_grad = 0 if self._train_steps is None else self._train_steps[0]
        return [Application(g, r * G + g, r, grad=r >= no_grad) for r in range(self.num_steps) for g in range(G)]

    def num_slots(self) -> int:
        return len(self.schedule)

    def knobs(self) -> dict:
        return {"steps": self.num_steps, "exit_kl": self.exit_kl}

    @contextmanager
    def override(self, **knobs):
        """Temporarily set inference knobs: `steps` (recurrences, any >= 1; training ran num_recurrences, or drew
        around it with sample_recurrence) and `exit_kl` (per-token exit threshold in nats, None for off; inference
        only)."""
        unknown = sorted(set(knobs) - set(self.KNOBS))
        if unknown:
            raise ValueError(f"Dreamer has no knob {unknown[0]!r}; its knobs are {list(self.KNOBS)}.")
        if "steps" in knobs:
            knobs["steps"] = native.checked_steps(knobs["steps"])
        kl = knobs.get("exit_kl")
        if kl is not None and (not isinstance(kl, numbers.Real) or isinstance(kl, bool) or not kl >= 0):
            raise ValueError(f"exit_kl must be a threshold in nats >= 0, or None for no exit; got {kl!r}.")
        old = {"steps": self.steps, "exit_kl": self.exit_kl}
        for k, v in knobs.items():
            setattr(self, k, v)
        try:
            yield self
        finally:
            self.steps, self.exit_kl = old["steps"], old["exit_kl"]

    # ------------------------------------------------------------------------------ forward
    make_context = make_context  # the decoder's (models.forward.make_context), as a bound method

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None, num_logits: int | None = None,
                doc_ids: torch.Tensor | None = None, trace: Trace | None = None) -> DecoderOutput:
        """As `CausalLM.forward` (input_ids (B, T), attention_mask (B, T), positions, cache, num_logits, doc_ids,
        trace); the loop is `models.forward.run_schedule`."""
        if self.exit_kl is not None and self.training and cache is None:  # (a cached forward decodes: make_context)
            raise ValueError("per-token exit (exit_kl) is an inference knob; call model.eval() first.")
        if self.training and cache is None:
            self._train_steps = self.training_steps()
        try:
            return run_schedule(self, input_ids, attention_mask, positions, cache, num_logits, doc_ids, trace)
        finally:
            self._train_steps = None

    def training_steps(self) -> tuple[int, int] | None:
        """(steps without grad, steps with grad) of a training forward: a draw of the sampler (sample_recurrence,
        draw number `recurrence_draws`, then incremented), or num_recurrences (the `steps` knob when set) split
        by backprop_depth; None when every step takes gradients at the usual count."""
        cfg = self.config
        if cfg.sample_recurrence:
            return sample_recurrence(cfg.num_recurrences, cfg.backprop_depth, nth_draw(self.recurrence_draws))
        split = split_steps(self.num_steps, cfg.backprop_depth)
        return split if split[0] else None

    def init_state(self, ctx: ForwardContext) -> DepthState:
        """The per-forward depth memory (dropped with the context: a decode step starts it afresh)."""
        G = self.config.layers_per_group
        st = DepthState([[] for _ in range(G)], [[] for _ in range(G)], exit_kl=self.exit_kl, steps=self.num_steps,
                        collect=ctx.cache is None)
        st.embedding_entry_grad = self._train_steps is not None and self._train_steps[0] > 0 and torch.is_grad_enabled()
        if self.exit_kl is not None:
            st.active = torch.ones(ctx.positions.shape, dtype=torch.bool, device=ctx.positions.device)  # (B, T)
            st.depth = torch.zeros(ctx.positions.shape, device=ctx.positions.device)
            st.exit_head = lambda x: self.lm_head(self.model.norm(x))
        return st

    def finish(self, ctx: ForwardContext, head_ideal) -> tuple[list[torch.Tensor], dict]:
        """Losses (the optional balancing loss) and statistics: expert diversity (both definitions), per-step
        expert usage and hidden-state change (full forwards: `DepthState.collect`), average depth, and flops/dense
        (every token, every step)."""
        st: DepthState = ctx.model_state
        cfg, losses, stats = self.config, [], {}
        if st.aux and cfg.ea_aux_loss_coef:
            balance = load_balancing_loss(st.aux, cfg.num_experts)
            losses.append(cfg.ea_aux_loss_coef * balance)
            stats["dreamer/balance_loss"] = balance.detach()
        G, valid = cfg.layers_per_group, ctx.valid_or_all
        # MoEUT's regularizers, per layer of the group over its own applications (a[g::G]), summed over layers
        if st.sel_logits and cfg.ea_entropy_coef:
            reg = sum(entropy_regularizer(torch.stack(st.sel_logits[g::G]), valid) for g in range(G))
            losses.append(cfg.ea_entropy_coef * reg)
            stats["dreamer/entropy_reg"] = reg.detach()
        if st.z_losses and cfg.ea_z_loss_coef:  # mean over the applications
            z = torch.stack(st.z_losses).mean()
            losses.append(cfg.ea_z_loss_coef * z)
            stats["dreamer/z_loss"] = z.detach()
        if st.attn_sel_logits and cfg.attn_entropy_coef:
            reg = sum(entropy_regularizer(*per_head(torch.stack(side[g::G]), valid))
                      for side in zip(*st.attn_sel_logits) for g in range(G))  # value side, output side
            losses.append(cfg.attn_entropy_coef * reg)
            stats["dreamer/attn_entropy_reg"] = reg.detach()
        slots = [a.slot for a in self.schedule]
        if cfg.num_experts and st.collect:
            stats.update(expert_stats(st, slots, valid, cfg, self.num_steps, ctx.training))
        if st.change:  # eval forwards
            stats["dreamer/state_change"] = torch.stack([st.change[s] for s in slots])  # (R * G,)
        if ctx.ledger.enabled:  # (statistics nobody reads in `generate`, see core.accounting)
            depth = valid.float() * self.num_steps if st.depth is None else st.depth * valid
            stats["dreamer/avg_depth"] = depth.sum() / valid.sum().clamp(min=1)
        per_token = sum(flops.q_o_flops(cfg) + flops.kv_flops(cfg) + flops.depth_attn_flops(cfg, a.step)
                        + flops.expert_attn_flops(cfg) for a in self.schedule)
        stats.update(dense_flops_stat(ctx, cfg, per_token, len(slots), head_ideal))
        return losses, stats

    def forward_flops(self, T: int, B: int = 1, context: int | None = None, lm_head: bool = True) -> int:
        """Analytic FLOPs of a plain forward (core/flops.py), at the current number of steps."""
        return flops.recurrent_forward_flops(self.config, T, B, context, lm_head, self.num_steps)

    def max_applications(self) -> int:
        """Layer applications of the longest forward training runs (with the sampler: its 1 - 1e-6 quantile), for
        sizing compile caches."""
        cfg = self.config
        steps = max_recurrence(cfg.num_recurrences) if cfg.sample_recurrence else cfg.num_recurrences
        return cfg.layers_per_group * max(steps, self.num_steps)

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token for MFU: the forward plus a backward of 2 x the forward of the steps that take
        gradients (backprop_depth), causal attention, plus SwitchHead's router recomputation for its regularizer
        (forward only on steps without gradients). With sample_recurrence, averaged over the sampler's draws; else
        the steps a training forward runs now (num_recurrences, or the `steps` knob set by `override`)."""
        cfg, G = self.config, self.config.layers_per_group
        router = flops.switchhead_router_flops(cfg) if cfg.attn_num_experts and cfg.attn_entropy_coef else 0

        def cost(no_grad: int, grad: int) -> float:
            fwd = flops.recurrent_forward_flops(cfg, seq_len, steps=no_grad + grad)
            early = flops.recurrent_forward_flops(cfg, seq_len, lm_head=False, steps=no_grad)  # steps 0..no_grad-1
            return (3 * fwd - 2 * early) / seq_len + G * router * (3 * (no_grad + grad) - 2 * no_grad)

        if cfg.sample_recurrence:
            return average_over_draws(cfg.num_recurrences, cfg.backprop_depth, cost)
        return cost(*split_steps(self.num_steps, cfg.backprop_depth))  # (`training_steps`' count)

    def trainer_hooks(self, total_steps: int) -> list:
        """The balancing-bias controller (DeepSeek-V3 style), when the model has experts."""
        return [ExpertBiasHook()] if self.config.num_experts and self.config.ea_bias_update_rate else []


def _draws_across_the_sampler_switch(model: DreamerLM, state: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: weights load whether or not the checkpoint's run sampled its depth. A model
    without the sampler drops the draw counter (evaluation never draws); one with it counts from 0 where the
    checkpoint has none."""
    key = f"{prefix}recurrence_draws"
    if not model.config.sample_recurrence:
        state.pop(key, None)
    elif key not in state:
        state[key] = torch.zeros((), dtype=torch.long)


def expert_stats(st: DepthState, slots: list[int], valid: torch.Tensor, cfg: DreamerConfig, steps: int,
                 training: bool = False) -> dict:
    """Expert-selection statistics of one forward, over valid tokens.

    dreamer/expert_diversity (definition a): distinct experts a token selected over the steps it ran, divided by
      the most it could select there, min(k * steps, E) (under exit, its own steps); mean over layers of the group
      and tokens.
    dreamer/expert_set_entropy (definition b, evaluation forwards without a cache, so not decode steps): per step,
      the entropy (nats) of the distribution of selected top-k sets over the batch's tokens that ran the step (not
      those that exited); mean over steps. exp() of it is the effective number of distinct sets. Over a corpus (the
      spec's definition), `eval.dreamer.SetCounts` pools dreamer/expert_sets (A, N, K): each token's sorted set at
      each application, -1 for tokens that did not run it.
    dreamer/expert_usage (R * G, E): selections per expert at each application; left out of training forwards
      with a drawn step count (its shape would change between micro-batches).
    dreamer/expert_load (G, E): selections per expert of each layer of the group over its applications (the
      balancing hook's load).
    """
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    n = valid.sum().clamp(min=1)
    valid_N = valid.reshape(-1)
    ran_N = torch.full(valid_N.shape, steps, device=valid.device) if st.depth is None else st.depth.reshape(-1)
    most_N = (k * ran_N).clamp(min=1, max=E)  # (B*T,) the most a token could select (an exited one ran fewer steps)
    ratio = torch.stack([(seen.sum(-1) / most_N * valid_N).sum() for seen in st.visited.values()])  # (G,)
    usage = torch.stack([st.usage[s] for s in slots])  # (R * G, E)
    G = cfg.layers_per_group
    out = {"dreamer/expert_diversity": ratio.mean() / n,
           "dreamer/expert_load": usage.reshape(-1, G, E).sum(0)}  # (G, E)
    if not (cfg.sample_recurrence and training):
        out["dreamer/expert_usage"] = usage
    if st.set_ids:  # one unique over (application, sorted set) rows of the valid tokens
        ids = torch.stack([st.set_ids[s] for s in slots])  # (A, N, K)
        A, N, _ = ids.shape
        app = torch.arange(A, device=ids.device)[:, None, None].expand(A, N, 1)
        ran = valid_N & (ids[..., 0] >= 0)  # (A, N): valid tokens that ran the application (-1: exited)
        rows, counts = torch.unique(torch.cat([app, ids], -1)[ran], dim=0, return_counts=True)
        a, counts = rows[:, 0], counts.float()
        ran_A = torch.zeros(A, device=ids.device).index_add_(0, a, counts)  # (A,) tokens that ran each application
        p = counts / ran_A[a]
        entropy = torch.zeros(A, device=ids.device).index_add_(0, a, -p * p.log())  # (A,) nats
        out["dreamer/expert_set_entropy"] = entropy.sum() / (ran_A > 0).sum().clamp(min=1)  # over applications run
        out["dreamer/expert_sets"] = ids.masked_fill(~ran[..., None], -1)  # (A, N, K): the corpus-level entropy's
    return out


def entropy_regularizer(logits_ABTE: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """MoEUT's sigma-MoE regularizer: per sequence, the negative entropy of the mean of softmax(router scores)
    over its valid tokens and every layer application (A); mean over sequences. Minimising it spreads the
    selection over the experts."""
    logp = F.log_softmax(logits_ABTE.float(), dim=-1)  # (A, B, T, E)
    A = logp.shape[0]
    rows = valid_BT.any(-1)  # (B,) sequences with a valid token
    logp = logp.masked_fill(~valid_BT[None, :, :, None], float("-inf")).transpose(0, 1).flatten(1, 2)  # (B, A*T, E)
    log_mean = logp.logsumexp(1) - torch.log(A * valid_BT.sum(-1, keepdim=True).clamp(min=1).float())  # (B, E)
    neg_entropy = (log_mean.exp() * log_mean).nan_to_num(0.0).sum(-1)  # (B,)
    return (neg_entropy * rows).sum() / rows.sum().clamp(min=1)


def per_head(logits_ABTNE: torch.Tensor, valid_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SwitchHead's router scores (A, B, T, N heads, E) as (A, B*N, T, E) with validity (B*N, T): each head's router
    is regularized on its own, as MoEUT does (row b*N + n is head n of sequence b)."""
    A, B, T, N, E = logits_ABTNE.shape
    return logits_ABTNE.permute(0, 1, 3, 2, 4).reshape(A, B * N, T, E), valid_BT.repeat_interleave(N, 0)


class ExpertBiasHook:
    """After each optimizer step: b_e += gamma * sign(mean load - load_e) for every layer's experts, load counted
    over every (token, step) selection of the step's micro-batches (`dreamer/expert_load`), averaged over ranks
    first so every rank applies the same update (DeepSeek-V3's auxiliary-loss-free balancing). The biases are
    buffers, saved with the weights, so the hook itself has no state."""

    name = "dreamer_balance"

    def after_step(self, model: nn.Module, step: int, stats: dict, dist) -> dict | None:
        load = stats.get("dreamer/expert_load")
        if load is None:
            return None
        return update_expert_bias(model, dist.all_reduce_mean(load.detach().float().clone()))  # (G, E)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@torch.no_grad()
def update_expert_bias(model: DreamerLM, load_GE: torch.Tensor) -> dict:
    """One sign update of every layer's balancing bias from its load over its applications (G, E); returns the
    load imbalance (max / mean) before the update."""
    worst = 0.0
    for g, layer in enumerate(model.model.layers):
        load = load_GE[g].to(layer.mlp.expert_bias.device)  # (E,)
        layer.mlp.expert_bias += model.config.ea_bias_update_rate * torch.sign(load.mean() - load)
        worst = max(worst, float(load.max() / load.mean().clamp(min=1e-9)))
    return {"load_imbalance": worst}


# Presets. dreamer-tiny trains on 2 CPU cores in minutes (byte tokenizer: vocab 264); dreamer-bench is the shape of
# `bench dreamer` (the example); dreamer-small is the GPU recipe's (recipes/dreamer_small.toml).
PRESETS = {
    "dreamer-tiny": {"model_type": "dreamer", "vocab_size": 264, "hidden_size": 128, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "head_dim": 32, "num_recurrences": 4, "num_experts": 16,
                     "num_experts_per_tok": 2, "moe_intermediate_size": 96, "max_position_embeddings": 1024},
    "dreamer-bench": {"model_type": "dreamer", "vocab_size": 8192, "hidden_size": 256, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "head_dim": 64, "num_recurrences": 8, "num_experts": 64,
                      "num_experts_per_tok": 4, "moe_intermediate_size": 128, "max_position_embeddings": 2048},
    "dreamer-small": {"model_type": "dreamer", "vocab_size": 32768, "hidden_size": 768, "num_attention_heads": 12,
                      "num_key_value_heads": 4, "head_dim": 64, "num_recurrences": 12, "num_experts": 128,
                      "num_experts_per_tok": 8, "moe_intermediate_size": 192, "max_position_embeddings": 2048},
}

register_model(("dreamer",), ModelSpec(DreamerConfig, DreamerLM, native.config_reader(DreamerConfig),
                                       rename_old_sandwich_norms), presets=PRESETS)
