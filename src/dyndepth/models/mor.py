"""Mixture-of-Recursions baseline: a middle-cycle recursive stack whose tokens choose how many recursions they run.

Bae et al. 2025, "Mixture-of-Recursions: Learning Dynamic Recursive Depths for Adaptive Token-Level Computation"
(raymin0223/mixture_of_recursions). What we take from the paper / code and what is ours is in docs/baselines.md.
Shape legend: B batch, T tokens, K tokens of a recursion (per row, padded), D hidden_size, R recursions.

    x = first(embed(ids))                                 # unshared layer(s)
    for r in range(R):                                    # the same C layers at every recursion
        keep = route(x, r)                                # which tokens run recursion r (a subset of r - 1's)
        y = block(x[keep])                                # C decoder layers on the kept tokens only: they attend to
        x[keep] = x[keep] + w[keep] * y                   #   each other, and only they write K/V at these slots
    logits = lm_head(norm(last(x)))                       # unshared layer(s)
Routers (`router_type`):
- "expert" (expert-choice): at recursion r a Linear(D -> 1) scores the tokens; training keeps the top
  capacity[r] * T of the tokens kept at r - 1 (T: the row's real tokens; hierarchical filtering; non-causal),
  w = alpha * sigmoid(score), and a BCE loss teaches sigmoid(score) > 0.5 to predict that choice; evaluation and
  decoding keep a token iff sigmoid(score) > 0.5 (the causal inference path), so prefill + decode equals the
  evaluation forward. With `causal_path="aux_router"` (MoR's other variant) a separate small MLP per recursion,
  trained by that BCE on the detached stream, makes the inference decision instead, and the router itself gets no BCE.
- "token" (token-choice): before the first recursion a Linear(D -> R) gives each token a softmax over depths; it
  runs recursions 0..argmax (causal), w = the chosen probability, and a Switch-style loss balances the depths.
KV cache: recursion-wise caching: every (layer, recursion) is a slot and only the tokens that ran it wrote K/V
there, so a token attends at recursion r to the earlier tokens that also reached r.

The layers are the decoder's `DecoderLayer` (HF Llama / Qwen3 names); the routing runs inside each layer call
through the model's built-in `RecursionRouting` (the layer's method slot, as MoD does), on a sub-context of the
kept tokens (`ForwardContext.subset`) through the layer's own `block`, so the ledger counts what ran.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dyndepth.config import ConfigError, ModelConfig, check_above_zero, check_at_least, check_fields, check_rope_scaling
from dyndepth.core import flops
from dyndepth.core.cache import KVCache
from dyndepth.core.context import ForwardContext
from dyndepth.core.method import MethodOutput, check_knobs
from dyndepth.core.routing import capacity, gather_padded, pack_indices, scatter_padded_add
from dyndepth.models import native
from dyndepth.models.forward import DecoderOutput, Trace, dense_flops_stat, make_context, run_schedule
from dyndepth.models.huginn import stack_schedule
from dyndepth.models.moe import load_balancing_loss, router_stats
from dyndepth.models.qwen3 import DecoderLayer, DecoderModel
from dyndepth.models.registry import ModelSpec, register_model

ROUTERS = ("expert", "token")
CAUSAL_PATHS = ("aux_loss", "aux_router")


@dataclass
class MoRConfig:
    model_type: str = "mor"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None
    n_layers_first: int = 1  # unshared layers before the recursions (middle-cycle sharing)
    n_layers_in_recursion: int = 2  # C: the shared block
    n_layers_last: int = 1  # unshared layers after
    num_recursions: int = 3  # R
    router_type: str = "expert"  # expert (expert-choice) | token (token-choice)
    capacity: list[float] | None = None  # expert-choice: fraction of T per recursion; None -> (R - r) / R
    router_alpha: float = 0.1  # expert-choice: w = alpha * sigmoid(score)
    router_aux_loss_coef: float = 0.1  # expert: BCE of the causal predictor (> 0); token: the depth-balancing loss
    causal_path: str = "aux_loss"  # expert: aux_loss (the router predicts its own top-k) | aux_router (an MLP does)
    aux_router_hidden: int | None = None  # the auxiliary router's hidden width; None -> hidden_size // 2
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    num_experts = 0  # dense layers (read by DecoderLayer and core/flops.py); not a config field

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.model_type != "mor":
            raise ConfigError(f"MoRConfig.model_type must be 'mor', got {self.model_type!r}.")
        check_at_least(self, "model", ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads", "max_position_embeddings", "head_dim",
                                       "n_layers_in_recursion", "num_recursions"))
        check_at_least(self, "model", ("n_layers_first", "n_layers_last", "router_alpha", "router_aux_loss_coef",
                                       "aux_router_hidden"), low=0)
        check_above_zero(self, "model", ("rms_norm_eps", "rope_theta"))
        check_at_least(self, "model", ("initializer_range",), low=0)
        check_rope_scaling(self.rope_scaling)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:  # (the first forward failed on a size mismatch in the rotary embedding)
            raise ConfigError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}.")
        if self.router_type not in ROUTERS:
            raise ConfigError(f"MoRConfig.router_type={self.router_type!r} is not one of {ROUTERS}.")
        if self.causal_path not in CAUSAL_PATHS:
            raise ConfigError(f"MoRConfig.causal_path={self.causal_path!r} is not one of {CAUSAL_PATHS}.")
        if self.causal_path == "aux_router" and self.router_type != "expert":
            raise ConfigError("MoRConfig.causal_path='aux_router' is for expert-choice routing (token-choice is "
                              "causal already); set router_type='expert' or causal_path='aux_loss'.")
        if self.router_type == "expert" and self.router_aux_loss_coef == 0:
            # the BCE is all that teaches the causal rule (sigmoid(score) > 0.5, or the auxiliary router's) to match
            # training's top-k: without it evaluation and decoding would keep arbitrary tokens
            raise ConfigError("MoRConfig.router_aux_loss_coef=0 with expert-choice routing leaves the rule that routes "
                              "evaluation and decoding untrained (its BCE loss is off); set router_aux_loss_coef > 0 "
                              "(default 0.1) or router_type='token'.")
        self.aux_router_hidden = self.aux_router_hidden or self.hidden_size // 2
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads}).")
        R = self.num_recursions
        balanced = [(R - r) / R for r in range(R)]
        if self.capacity is None:
            self.capacity = balanced
        elif self.router_type == "token" and (len(self.capacity) != R or
                                              any(abs(c - b) > 1e-9 for c, b in zip(self.capacity, balanced))):
            raise ConfigError(f"MoRConfig.capacity={self.capacity}: capacity is expert-choice's; token-choice routing "
                              "gives each token the depth its router picks, and its nominal FLOPs assume balanced "
                              f"depths {balanced}. Leave capacity out with router_type='token'.")
        if len(self.capacity) != R or any(not 0 < c <= 1 for c in self.capacity) or \
                any(b > a for a, b in zip(self.capacity, self.capacity[1:])):
            raise ConfigError(f"MoRConfig.capacity={self.capacity} must hold {R} non-increasing fractions in (0, 1].")

    @property
    def num_layers(self) -> int:
        return self.n_layers_first + self.n_layers_in_recursion + self.n_layers_last

    @property
    def num_hidden_layers(self) -> int:
        """Layer applications of a forward (one KV-cache slot each)."""
        return self.n_layers_first + self.num_recursions * self.n_layers_in_recursion + self.n_layers_last

    def is_moe_layer(self, layer: int) -> bool:
        return False

    def num_params(self) -> int:
        """Parameter count from the shapes alone (equals the model's; tested)."""
        D, H, N, G, F_ = self.hidden_size, self.head_dim, self.num_attention_heads, self.num_key_value_heads, \
            self.intermediate_size
        attn = D * H * (2 * N + 2 * G) + (2 * H if self.qk_norm else 0) + (H * (N + 2 * G) + D
                                                                            if self.attention_bias else 0)
        mlp = 3 * D * F_ + (2 * F_ + D if self.mlp_bias else 0)
        routers = D * self.num_recursions  # R Linear(D -> 1), or one Linear(D -> R)
        if self.causal_path == "aux_router":  # R MLPs D -> hidden -> 1
            routers += self.num_recursions * (D + 1) * self.aux_router_hidden
        embed = self.vocab_size * D * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * D) + D + routers + embed

    eos_token_ids = ModelConfig.eos_token_ids
    to_dict = ModelConfig.to_dict
    from_dict = classmethod(ModelConfig.from_dict.__func__)


@dataclass
class RecursionState:
    """Per forward (`ctx.state`): routing decisions and what the recursions' last layers combine, by recursion."""

    valid: torch.Tensor  # (B, T)
    topk: bool  # training-style top-k routing (expert-choice without a cache in training)
    keep: dict = field(default_factory=dict)  # r -> (B, T) bool: tokens that run recursion r
    weight: dict = field(default_factory=dict)  # r -> (B, T) gate w
    packed: dict = field(default_factory=dict)  # r -> (idx_BK, valid_BK)
    start: dict = field(default_factory=dict)  # r -> (B, T, D) the stream entering recursion r
    losses: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    depth: torch.Tensor | None = None  # (B, T) token-choice: last recursion each token runs (-1 for PAD)
    gate: torch.Tensor | None = None  # (B, T) token-choice: the chosen depth's probability


class RecursionRouting:
    """MoR's routing, in the layer's method slot: unshared layers run plainly; a shared layer at recursion r runs on
    the tokens routed to r. Built by the model (not attachable, no runtime knobs)."""

    name = "mor"

    def __init__(self, config: MoRConfig, routers: nn.ModuleList, aux_routers: nn.ModuleList | None = None) -> None:
        self.config, self.routers, self.aux_routers = config, routers, aux_routers
        F_, C = config.n_layers_first, config.n_layers_in_recursion
        self.step_of = {}  # slot -> (recursion, index in the block)
        for app in stack_schedule(F_, C, config.n_layers_last, config.num_recursions):
            if F_ <= app.layer < F_ + C:
                self.step_of[app.slot] = (app.step, app.layer - F_)

    # The Method protocol's remaining members: MoR has no runtime knobs, no extra slots and no trainer hooks.
    def configure(self, config) -> None:
        raise ValueError("MoR's routing is part of the model; change MoRConfig instead.")

    def extra_slots(self, num_slots: int) -> int:
        return 0

    def knobs(self) -> dict:
        return {}

    def override(self, **knobs):
        check_knobs(self.name, (), knobs)
        return contextlib.nullcontext(self)

    decoding = override

    def recording(self, recorder):
        raise ValueError("MoR has no thresholds to calibrate: its routers decide each token's depth by its own score "
                         "in evaluation and decoding; `dyndepth calibrate` is for GateSkip (budget=...) and MoD "
                         "(capacity=...).")

    def set_thresholds(self, thresholds: dict, knobs: dict) -> None:
        self.recording(None)

    def trainer_hooks(self, total_steps: int) -> list:
        return []

    def lookahead(self) -> str:
        return ""  # evaluation and decoding keep a token by its own score (top-k ranks training forwards only)

    def untrained_parameters(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        return {"name": self.name}

    # ---- per forward ----
    def begin(self, input_ids: torch.Tensor, ctx: ForwardContext) -> RecursionState:
        topk = self.config.router_type == "expert" and ctx.training and ctx.cache is None
        if ctx.cache is not None:  # a recursion slot holds the tokens that ran it only: a position sent again whose
            # new token stops earlier would keep the old token's entry there (KVCache.rewrite_from, as MoD's and DND's)
            ctx.cache.rewrite_from(ctx.positions, ctx.valid, sorted(self.step_of))
        return RecursionState(ctx.valid_or_all, topk)

    def end(self, ctx: ForwardContext) -> MethodOutput:
        st: RecursionState = ctx.state
        out = MethodOutput(losses=list(st.losses), stats=dict(st.stats))
        n = st.valid.sum().clamp(min=1)
        for r in sorted(st.keep):
            out.stats[f"mor/tokens_r{r}"] = (st.keep[r] & st.valid).sum() / n
        return out

    def layer_forward(self, layer, x_BTD: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        if slot not in self.step_of:
            return layer.block(x_BTD, ctx, slot)
        r, j = self.step_of[slot]
        st: RecursionState = ctx.state
        if j == 0:
            self._route(x_BTD, ctx, slot, r)
        idx_BK, valid_BK = st.packed[r]
        if idx_BK.shape[1] == 0:  # no token of the batch runs this recursion
            return x_BTD
        y_BKD = layer.block(gather_padded(x_BTD, idx_BK), ctx.subset(idx_BK, valid_BK), slot)  # (B, K, D)
        if j < self.config.n_layers_in_recursion - 1:  # inside the recursion: the kept tokens' stream moves on
            return scatter_padded_add(x_BTD, y_BKD - gather_padded(x_BTD, idx_BK), idx_BK, valid_BK)
        w_BK = gather_padded(st.weight[r], idx_BK)[..., None]  # (B, K, 1)
        return scatter_padded_add(st.start[r], w_BK * y_BKD, idx_BK, valid_BK)  # x + w * block(x), kept tokens

    def _route(self, x_BTD: torch.Tensor, ctx: ForwardContext, slot: int, r: int) -> None:
        """Decide which tokens run recursion r and their gates (ctx.state), recording the router's FLOPs."""
        st: RecursionState = ctx.state
        cfg, (B, T, D) = self.config, x_BTD.shape
        pool = st.valid if r == 0 else st.keep[r - 1]
        st.start[r] = x_BTD
        if cfg.router_type == "token":
            if r == 0:
                self._choose_depths(x_BTD, ctx, slot)
            keep = st.keep[r] = st.depth >= r
            st.weight[r] = st.gate
        else:
            score = self.routers[r](x_BTD).squeeze(-1).float()  # (B, T)
            if ctx.ledger.enabled:
                ctx.ledger.add(slot, "router", executed=B * T * 2 * D, ideal=pool.sum() * 2 * D)
            logit = score  # what decides causally: the router itself, or the auxiliary router
            if self.aux_routers is not None:
                logit = self.aux_routers[r](x_BTD.detach()).squeeze(-1).float()  # no gradient into the stream
                cost = aux_router_flops(cfg)
                if ctx.ledger.enabled:
                    ctx.ledger.add(slot, "router", executed=B * T * cost, ideal=pool.sum() * cost)
            if st.topk:  # k of each row's real tokens (c x the padded width kept all of a half-padded row's)
                k_B1 = (cfg.capacity[r] * st.valid.sum(1, keepdim=True).double() - 1e-6).ceil()  # `capacity`'s rule
                order = torch.argsort(score.detach().masked_fill(~pool, float("-inf")), dim=1, descending=True,
                                      stable=True)  # ties: the earlier token first
                rank = torch.argsort(order, dim=1)  # (B, T) rank of each token in its row
                keep = (rank < k_B1) & pool
                w = pool.float()
                bce = F.binary_cross_entropy_with_logits(logit, keep.float(), weight=w, reduction="sum")
                st.losses.append(cfg.router_aux_loss_coef * bce / w.sum().clamp(min=1))
                st.stats[f"mor/router_acc_r{r}"] = (((logit > 0) == keep) & pool).sum() / pool.sum().clamp(min=1)
            else:  # the causal inference path
                keep = (logit > 0) & pool
            st.keep[r] = keep
            st.weight[r] = (cfg.router_alpha * torch.sigmoid(score)).to(x_BTD.dtype)
        size = capacity(cfg.capacity[r], T) if st.topk else None  # static K in training, no host sync
        idx_BK, valid_BK = pack_indices(keep, size)
        st.packed[r] = (idx_BK, valid_BK)

    def _choose_depths(self, x_BTD: torch.Tensor, ctx: ForwardContext, slot: int) -> None:
        """Token-choice: each token's recursion count (argmax of a softmax over R depths) and gate."""
        st: RecursionState = ctx.state
        R, (B, T, D) = self.config.num_recursions, x_BTD.shape
        probs = F.softmax(self.routers[0](x_BTD).float(), dim=-1)  # (B, T, R)
        if ctx.ledger.enabled:
            ctx.ledger.add(slot, "router", executed=B * T * 2 * D * R, ideal=st.valid.sum() * 2 * D * R)
        gate, depth = probs.max(-1)  # (B, T)
        st.depth = torch.where(st.valid, depth, -1)
        st.gate = gate.to(x_BTD.dtype)
        if ctx.training and self.config.router_aux_loss_coef:
            stats = router_stats(probs.reshape(-1, R), depth.reshape(-1, 1), st.valid.reshape(-1))
            balance = load_balancing_loss([stats], R)
            st.losses.append(self.config.router_aux_loss_coef * balance)
            st.stats["mor/balance_loss"] = balance.detach()


def aux_router_flops(config: MoRConfig) -> int:
    """Per token scored by an auxiliary router: Linear(D -> hidden) and Linear(hidden -> 1)."""
    return 2 * (config.hidden_size + 1) * config.aux_router_hidden


def flops_at(config: MoRConfig, T: int, counts: list) -> float:
    """Analytic (ideal) FLOPs of one sequence of T tokens of which counts[r] run recursion r: the unshared layers
    on every token, recursion r's C layers on counts[r] tokens attending causally to each other, the routers
    (expert-choice: on the tokens kept at r - 1; token-choice: once on every token) and the lm_head."""
    per = flops.q_o_flops(config) + flops.kv_flops(config) + flops.mlp_flops(config, 0)
    n_plain = config.n_layers_first + config.n_layers_last
    total = n_plain * (T * per + flops.attn_score_flops(config, flops.causal_attended_keys(T)))
    for k in counts:
        attn = flops.attn_score_flops(config, flops.causal_attended_keys(k))
        total += config.n_layers_in_recursion * (k * per + attn)
    if config.router_type == "token":
        total += T * 2 * config.hidden_size * config.num_recursions
    else:
        per_router = 2 * config.hidden_size + (aux_router_flops(config) if config.causal_path == "aux_router" else 0)
        total += sum([T] + list(counts[:-1])) * per_router
    return total + T * flops.lm_head_flops(config)


def nominal_forward_flops(config: MoRConfig, T: int, B: int = 1, lm_head: bool = True) -> int:
    """FLOPs of B sequences of T tokens at the nominal capacity: expert-choice's training top-k (capacity[r] * T
    tokens run recursion r), token-choice at balanced depths (the same default fractions (R - r) / R)."""
    counts = [capacity(c, T) for c in config.capacity]
    return B * int(flops_at(config, T, counts) - (0 if lm_head else T * flops.lm_head_flops(config)))


class MoRLM(nn.Module):
    """`model(input_ids, attention_mask)` -> DecoderOutput; `generate`; `save_pretrained`."""

    # shared with the other families that have no HF class (models/native.py)
    architecture = "MoRForCausalLM"
    generate = native.generate
    save_pretrained = native.save_pretrained
    pretrained_config = native.pretrained_config
    num_params = native.num_params
    hf_state_dict = native.disk_state_dict

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, [DecoderLayer(config, i) for i in range(config.num_layers)])
        D, R = config.hidden_size, config.num_recursions
        if config.router_type == "expert":
            self.routers = nn.ModuleList(nn.Linear(D, 1, bias=False) for _ in range(R))
        else:
            self.routers = nn.ModuleList([nn.Linear(D, R, bias=False)])
        self.aux_routers = None
        if config.causal_path == "aux_router":
            H = config.aux_router_hidden
            self.aux_routers = nn.ModuleList(nn.Sequential(nn.Linear(D, H, bias=False), nn.SiLU(),
                                                           nn.Linear(H, 1, bias=False)) for _ in range(R))
        native.add_lm_head_and_init(self, zero_biases=True)
        self.method = RecursionRouting(config, self.routers, self.aux_routers)

    @property
    def schedule(self):
        cfg = self.config
        return stack_schedule(cfg.n_layers_first, cfg.n_layers_in_recursion, cfg.n_layers_last, cfg.num_recursions)

    def num_slots(self) -> int:
        return len(self.schedule)

    make_context = make_context

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None, num_logits: int | None = None,
                doc_ids: torch.Tensor | None = None, trace: Trace | None = None) -> DecoderOutput:
        return run_schedule(self, input_ids, attention_mask, positions, cache, num_logits, doc_ids, trace)

    def init_state(self, ctx: ForwardContext) -> None:
        return None

    def finish(self, ctx: ForwardContext, head_ideal) -> tuple[list[torch.Tensor], dict]:
        """flops/dense: every token through every recursion (the routing's saving is ideal / dense)."""
        n = len(self.schedule)
        per_token = n * (flops.q_o_flops(self.config) + flops.kv_flops(self.config) + flops.mlp_flops(self.config, 0))
        return [], dense_flops_stat(ctx, self.config, per_token, n, head_ideal)

    def flops_at(self, T: int, counts: list) -> float:
        """Analytic (ideal) FLOPs of one sequence of T tokens of which counts[r] run recursion r."""
        return flops_at(self.config, T, counts)

    def forward_flops(self, T: int, B: int = 1, context: int | None = None, lm_head: bool = True) -> int:
        """Analytic FLOPs at the routing's nominal capacity (`nominal_forward_flops`); actual forwards route by
        data: `out.stats["flops/ideal"]` has what ran."""
        if context:
            raise ValueError("MoR's FLOPs after cached tokens depend on the routing; read out.stats['flops/ideal'].")
        return nominal_forward_flops(self.config, T, B, lm_head)

    def train_flops_per_token(self, seq_len: int) -> float:
        return 3 * self.forward_flops(seq_len) / seq_len

    def trainer_hooks(self, total_steps: int) -> list:
        return []


PRESETS = {
    "mor-tiny": {"model_type": "mor", "vocab_size": 264, "hidden_size": 128, "intermediate_size": 384,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_recursions": 3,
                 "max_position_embeddings": 1024},
}

register_model(("mor",), ModelSpec(MoRConfig, MoRLM, native.config_reader(MoRConfig)), presets=PRESETS)
