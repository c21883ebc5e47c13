"""Huginn-style depth-recurrent baseline: prelude, a recurrent block looped r times, coda.

Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth Approach"
(seal-rg/recurrent-pretraining, `raven_modeling_minimal.py`). What we take from that code and what is ours is in
docs/baselines.md. Shape legend: B batch, T tokens, D hidden_size, V vocab, P / C / K prelude, recurrent-block and
coda layers, R recurrence steps.

    e = prelude(embed(ids))                       # P sandwich layers, applied once
    s = 0                                          # the recurrent state (Huginn draws it at random; ours: zeros)
    for r in range(R):                            # the same C layers at every step
        s = core_block(adapter([s, e]))           # input injection: Linear(2D -> D) of the state and e
    logits = lm_head(norm(coda(recurrent_norm(s))))
Each layer is a sandwich block, x = n2(x + attn(n1 x)); x = n4(x + mlp(n3 x)). In training R is drawn per forward
(Huginn's Poisson-lognormal sampler around `mean_recurrence`) and only the last `mean_backprop_depth` steps take
gradients; at evaluation R = `mean_recurrence` (or `override(steps=n)`).

The model is a schedule on the shared core (models/forward.py): application (layer, slot, step) with one KV-cache
slot per application (P + R C + K), so the loop, the cache and generation are the decoder's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dyndepth.config import ConfigError, ModelConfig, check_above_zero, check_at_least, check_fields, check_rope_scaling
from dyndepth.core import flops
from dyndepth.core.cache import KVCache
from dyndepth.core.context import ForwardContext
from dyndepth.core.layers import Attention, RMSNorm, SwiGLU
from dyndepth.models import native
from dyndepth.models.forward import Application, DecoderOutput, Trace, dense_flops_stat, make_context, run_schedule
from dyndepth.models.qwen3 import DecoderModel
from dyndepth.models.registry import ModelSpec, register_model

SAMPLER_SIGMA = 0.5  # Huginn's log-normal sigma of the recurrence sampler


@dataclass
class HuginnConfig:
    model_type: str = "huginn"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    # Huginn's own names for the three stacks (raven_config): 2 / 4 / 2 in its public model.
    n_layers_in_prelude: int = 2
    n_layers_in_recurrent_block: int = 4
    n_layers_in_coda: int = 2
    mean_recurrence: int = 4  # R at evaluation; the sampler's mean in training (Huginn: 32)
    mean_backprop_depth: int = 2  # steps that take gradients in training (Huginn: 8)
    sample_recurrence: bool = True  # draw R per training forward (False: R = mean_recurrence, all with grad)
    # The decoder's fields (names as HF Qwen3).
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    qk_norm: bool = False  # Huginn has none
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    num_experts = 0  # dense layers (read by core/flops.py); a class attribute, not a config field

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.model_type != "huginn":
            raise ConfigError(f"HuginnConfig.model_type must be 'huginn', got {self.model_type!r}.")
        check_at_least(self, "model", ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads", "max_position_embeddings", "head_dim",
                                       "n_layers_in_recurrent_block", "mean_recurrence", "mean_backprop_depth"))
        check_at_least(self, "model", ("n_layers_in_prelude", "n_layers_in_coda"), low=0)
        check_above_zero(self, "model", ("rms_norm_eps", "rope_theta"))
        check_at_least(self, "model", ("initializer_range",), low=0)
        check_rope_scaling(self.rope_scaling)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads}).")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}.")

    @property
    def num_layers(self) -> int:
        """Distinct layers: prelude + recurrent block + coda."""
        return self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda

    @property
    def num_hidden_layers(self) -> int:
        """Layer applications of an evaluation forward (one KV-cache slot each): P + R C + K."""
        return self.n_layers_in_prelude + self.mean_recurrence * self.n_layers_in_recurrent_block + \
            self.n_layers_in_coda

    def is_moe_layer(self, layer: int) -> bool:
        return False

    def num_params(self) -> int:
        """Parameter count from the shapes alone (equals the model's; tested)."""
        D, H, N, G = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads
        attn = D * H * (2 * N + 2 * G) + (2 * H if self.qk_norm else 0)
        attn += H * (N + 2 * G) + D if self.attention_bias else 0  # q, k, v and o biases
        layer = attn + 3 * D * self.intermediate_size + 4 * D
        extra = 2 * D * D + D + (D if self.n_layers_in_coda else 0)  # adapter, final norm, recurrent_norm
        return self.num_layers * layer + extra + self.vocab_size * D * (1 if self.tie_word_embeddings else 2)

    eos_token_ids = ModelConfig.eos_token_ids
    to_dict = ModelConfig.to_dict
    from_dict = classmethod(ModelConfig.from_dict.__func__)


@dataclass
class RecurrenceState:
    """What one forward keeps besides the residual stream (`ctx.model_state`)."""

    steps: int  # recurrence steps of this forward
    step_of: dict  # slot -> recurrence step
    embed: torch.Tensor | None = None  # (B, T, D) the prelude's output, injected at every step


class SandwichLayer(nn.Module):
    """x = n2(x + attn(n1 x)); x = n4(x + mlp(n3 x)) (Huginn's sandwich block; Gemma-2's norm names). The first
    layer of the recurrent block also holds the input-injection `adapter`, the first coda layer `recurrent_norm`
    (the norm of the final state; Huginn reuses its final norm there)."""

    def __init__(self, config: HuginnConfig, index: int) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        P, C = config.n_layers_in_prelude, config.n_layers_in_recurrent_block
        self.role = "prelude" if index < P else "core" if index < P + C else "coda"
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.mlp = SwiGLU(D, config.intermediate_size)
        self.post_feedforward_layernorm = RMSNorm(D, eps)
        self.mlp_flops = flops.mlp_flops(config, index)  # per token
        self.adapter_flops = flops.adapter_flops(config)
        self.adapter = nn.Linear(2 * D, D, bias=False) if index == P else None
        self.recurrent_norm = RMSNorm(D, eps) if index == P + C else None

    def block(self, x_BTD: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        x_BTD = self.post_attention_layernorm(x_BTD + self.self_attn(self.input_layernorm(x_BTD), ctx, slot))
        h = self.pre_feedforward_layernorm(x_BTD)
        if ctx.ledger.enabled:
            rows = h.shape[0] * h.shape[1]
            n = rows if ctx.valid is None else ctx.valid.sum()
            ctx.ledger.add(slot, "mlp", executed=rows * self.mlp_flops, ideal=n * self.mlp_flops, tokens=n)
        return self.post_feedforward_layernorm(x_BTD + self.mlp(h))

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        st: RecurrenceState = ctx.model_state
        if self.recurrent_norm is not None:
            x_BTD = self.recurrent_norm(x_BTD)
        if self.role != "core":
            return self.block(x_BTD, ctx, slot)
        if self.adapter is not None:
            if st.step_of[slot] == 0:  # x is the prelude's output; the state starts at zero
                st.embed, x_BTD = x_BTD, torch.zeros_like(x_BTD)
            x_BTD = self.adapter(torch.cat([x_BTD, st.embed], -1))  # (B, T, 2D) -> (B, T, D)
            if ctx.ledger.enabled:
                B, T, _ = x_BTD.shape
                n = B * T if ctx.valid is None else ctx.valid.sum()
                ctx.ledger.add(slot, "adapter", executed=B * T * self.adapter_flops, ideal=n * self.adapter_flops)
        return self.block(x_BTD, ctx, slot)


def schedule_for(config: HuginnConfig, steps: int, no_grad: int = 0) -> list[Application]:
    """Prelude layers once, the recurrent block `steps` times (the first `no_grad` without gradients), coda once;
    one KV-cache slot per application."""
    return stack_schedule(config.n_layers_in_prelude, config.n_layers_in_recurrent_block, config.n_layers_in_coda,
                          steps, no_grad)


def stack_schedule(P: int, C: int, K: int, steps: int, no_grad: int = 0) -> list[Application]:
    """Layers 0..P-1 once, layers P..P+C-1 at steps 0..steps-1 (steps < `no_grad` without gradients), the last K
    layers once; slot = application index (also Mixture-of-Recursions' middle-cycle stack, models/mor.py)."""
    apps = [Application(i, i) for i in range(P)]
    apps += [Application(P + j, P + r * C + j, r, grad=r >= no_grad) for r in range(steps) for j in range(C)]
    return apps + [Application(P + C + i, P + steps * C + i) for i in range(K)]


def forward_flops_for(config: HuginnConfig, T: int, B: int = 1, context: int | None = None, lm_head: bool = True,
                      steps: int | None = None) -> int:
    """Analytic FLOPs of a forward with `steps` recurrences (default mean_recurrence), core/flops.py conventions:
    the layers of the schedule plus the adapter at every step."""
    steps = config.mean_recurrence if steps is None else steps
    layers = [a.layer for a in schedule_for(config, steps)]
    return flops.forward_flops(config, T, B, context, lm_head, layers) + B * T * steps * flops.adapter_flops(config)


def sample_steps(config: HuginnConfig, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Huginn's training sampler at this config's means: (steps without grad, steps with grad)."""
    return sample_recurrence(config.mean_recurrence, config.mean_backprop_depth, generator)


def sample_recurrence(mean: int, backprop_depth: int, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Huginn's training sampler: rate ~ LogNormal(log(mean) - sigma^2 / 2, sigma), p = Poisson(rate) + 1 (so
    E[p] = mean + 1); p steps, of which the last min(p, backprop_depth) take gradients (backprop_depth 0: all p).
    Returns (steps without grad, steps with grad)."""
    mu = math.log(max(mean, 1)) - SAMPLER_SIGMA**2 / 2
    rate = torch.empty(1).log_normal_(mu, SAMPLER_SIGMA, generator=generator)
    return split_steps(int(torch.poisson(rate, generator=generator)) + 1, backprop_depth)


def split_steps(steps: int, backprop_depth: int) -> tuple[int, int]:
    """(steps without grad, steps with grad) of a forward of `steps` recurrences: the last min(steps,
    backprop_depth) take gradients (backprop_depth 0: all of them)."""
    k = min(backprop_depth, steps) if backprop_depth else steps
    return steps - k, k


def recurrence_pmf(mean: int, tail: float = 1e-12):
    """(p, P(p)) of the sampler's step count, p = 1, 2, ... until the remaining mass is below `tail`:
    P(p) = E_rate[Poisson(p - 1; rate)] by 64-point Gauss-Hermite quadrature over the log-normal rate."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)  # for the standard normal z
    weights = weights / weights.sum()
    rates = np.exp(math.log(max(mean, 1)) - SAMPLER_SIGMA**2 / 2 + SAMPLER_SIGMA * nodes)
    mass, n = 0.0, 0
    while mass < 1 - tail and n < 100 * max(mean, 1) + 100:
        prob = float((weights * np.exp(n * np.log(rates) - rates - math.lgamma(n + 1))).sum())  # P(Poisson = n)
        mass, n = mass + prob, n + 1
        yield n, prob


def average_over_draws(mean: int, backprop_depth: int, cost) -> float:
    """The expectation of cost(steps without grad, steps with grad) over the sampler's distribution (a per-forward
    figure such as training FLOPs, which is not linear in the draw)."""
    total = mass = 0.0
    for p, prob in recurrence_pmf(mean):
        total, mass = total + prob * cost(*split_steps(p, backprop_depth)), mass + prob
    return total / mass


def max_recurrence(mean: int, tail: float = 1e-6) -> int:
    """The sampler's step count that draws exceed with probability below `tail` (1 in a million forwards)."""
    return max(p for p, _ in recurrence_pmf(mean, tail))


def nth_draw(counter: torch.Tensor) -> torch.Generator:
    """The generator of training draw number `counter` (a long buffer saved with the weights; incremented here).
    Seeded by the draw's index, not the global RNG: every rank draws the same recurrence count (DDP and FSDP
    ranks must run the same layer calls) and a resumed run continues the sequence."""
    i = int(counter)
    counter.add_(1)
    return torch.Generator().manual_seed(1_000_003 * i + 12_345)


class HuginnLM(nn.Module):
    """`model(input_ids, attention_mask)` -> DecoderOutput; `generate`; `save_pretrained`; `override(steps=n)`."""

    # shared with the other families that have no HF class (models/native.py)
    architecture = "HuginnForCausalLM"
    generate = native.generate
    save_pretrained = native.save_pretrained
    pretrained_config = native.pretrained_config
    num_params = native.num_params
    hf_state_dict = native.disk_state_dict

    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, [SandwichLayer(config, i) for i in range(config.num_layers)])
        native.add_lm_head_and_init(self)
        self.method = None  # runs without an adaptive-depth method
        self.steps: int | None = None  # recurrence steps at evaluation (None: mean_recurrence)
        # Training draws so far (`nth_draw`: every rank draws the same counts; a resumed run continues them).
        self.register_buffer("recurrence_draws", torch.zeros((), dtype=torch.long))
        self._sampled: tuple[int, int] | None = None  # (no-grad, grad) steps of the training forward running

    @property
    def num_steps(self) -> int:
        if self._sampled is not None:
            return sum(self._sampled)
        return self.config.mean_recurrence if self.steps is None else self.steps

    @property
    def schedule(self) -> list[Application]:
        """Prelude layers once, the recurrent block num_steps times, coda once; one slot per application."""
        return schedule_for(self.config, self.num_steps, self._sampled[0] if self._sampled is not None else 0)

    def num_slots(self) -> int:
        return len(self.schedule)

    def knobs(self) -> dict:
        return {"steps": self.num_steps}

    @contextmanager
    def override(self, **knobs):
        """Temporarily run `steps` recurrences at evaluation (Huginn's test-time compute knob)."""
        unknown = sorted(set(knobs) - {"steps"})
        if unknown:
            raise ValueError(f"Huginn has no knob {unknown[0]!r}; its knob is 'steps'.")
        steps = native.checked_steps(knobs.get("steps"))
        old, self.steps = self.steps, steps
        try:
            yield self
        finally:
            self.steps = old

    make_context = make_context

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None, num_logits: int | None = None,
                doc_ids: torch.Tensor | None = None, trace: Trace | None = None) -> DecoderOutput:
        """As `CausalLM.forward`. A training forward draws its recurrence count (sample_recurrence)."""
        if self.training and self.config.sample_recurrence and cache is None:
            self._sampled = self.draw_steps()
        try:
            return run_schedule(self, input_ids, attention_mask, positions, cache, num_logits, doc_ids, trace)
        finally:
            self._sampled = None

    def draw_steps(self) -> tuple[int, int]:
        """(steps without grad, steps with grad) of a training forward: Huginn's sampler (`sample_steps`), the
        draw numbered `recurrence_draws` (then incremented)."""
        return sample_steps(self.config, nth_draw(self.recurrence_draws))

    def init_state(self, ctx: ForwardContext) -> RecurrenceState:
        return RecurrenceState(self.num_steps, {a.slot: a.step for a in self.schedule})

    def finish(self, ctx: ForwardContext, head_ideal) -> tuple[list[torch.Tensor], dict]:
        apps = self.schedule
        per_token = sum(flops.q_o_flops(self.config) + flops.kv_flops(self.config) + flops.mlp_flops(self.config, 0)
                        for _ in apps) + self.num_steps * flops.adapter_flops(self.config)
        stats = dense_flops_stat(ctx, self.config, per_token, len(apps), head_ideal)
        return [], {**stats, "huginn/steps": torch.tensor(float(self.num_steps))}

    def forward_flops(self, T: int, B: int = 1, context: int | None = None, lm_head: bool = True) -> int:
        """Analytic FLOPs of an evaluation forward (num_steps recurrences), core/flops.py conventions."""
        return forward_flops_for(self.config, T, B, context, lm_head, self.num_steps)

    def max_applications(self) -> int:
        """Layer applications of the longest forward training runs (with the sampler: its 1 - 1e-6 quantile), for
        sizing compile caches."""
        cfg = self.config
        steps = max_recurrence(cfg.mean_recurrence) if cfg.sample_recurrence else cfg.mean_recurrence
        return len(schedule_for(cfg, max(steps, self.num_steps)))

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: the forward plus a backward (2 x forward) of all but the steps that run
        without grad; with sample_recurrence, averaged over the sampler's draws (`average_over_draws`), else
        the steps a training forward runs now (mean_recurrence, or the `steps` knob set by `override`), all with
        grad."""
        cfg = self.config

        def cost(no_grad: int, grad: int) -> float:
            fwd = forward_flops_for(cfg, seq_len, steps=no_grad + grad)
            early = forward_flops_for(cfg, seq_len, steps=no_grad) - forward_flops_for(cfg, seq_len, steps=0)
            return (3 * fwd - 2 * early) / seq_len

        if cfg.sample_recurrence:
            return average_over_draws(cfg.mean_recurrence, cfg.mean_backprop_depth, cost)
        return cost(0, self.num_steps)

    def trainer_hooks(self, total_steps: int) -> list:
        return []


PRESETS = {
    "huginn-tiny": {"model_type": "huginn", "vocab_size": 264, "hidden_size": 96, "intermediate_size": 256,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "mean_recurrence": 4,
                    "mean_backprop_depth": 2, "max_position_embeddings": 1024},
}

register_model(("huginn",), ModelSpec(HuginnConfig, HuginnLM, native.config_reader(HuginnConfig)), presets=PRESETS)
