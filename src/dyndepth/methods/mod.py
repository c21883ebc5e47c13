"""Mixture-of-Depths (Raposo et al. 2024): a router picks, per sequence, the top c*T tokens that run a whole
block (attention + MLP); the others pass the block unchanged on the residual stream.

Shape legend: B batch, T tokens, D hidden_size, K routed tokens per row (padded to a static or longest count).

Per routed block l, with block input x (the residual stream, not normed, as in the paper):
    r = router(x)                              # (B, T) one scalar per token, Linear(D -> 1, no bias)
    keep = top-k of r per sequence, k = ceil(c * T)   # T: the row's real tokens; PAD never selected; ties: earlier
    x_i = x_i + w(r_i) * (block(x_S)_i - x_i)  # i in keep; S = the kept tokens of i's sequence
The block runs on the kept tokens only: queries, keys and values all come from S, causal by original
positions, so compute (projections, attention, MLP) falls with c. w(r) = r (paper: the router weight scales
the block output, which is how the router gets gradients); `scale_by_router=False` uses w = 1, and with
c = 1.0 that is exactly the base model (the neutral setting).

Causal inference: top-k over a sequence looks ahead. Each routed block also has a small predictor MLP
(D -> hidden -> 1) reading a detached x, trained with BCE to predict membership in the top-k (paper's second
method); `mode="predictor"` routes a token iff its predictor logit > 0. `mode="router_threshold"` routes iff
r > a threshold calibrated (`calibrate(model, batches)`) to keep the top c of router scores. A forward with a KV
cache never uses top-k: in mode "topk" it uses `decode_mode` (default "predictor"), so the full forward to
compare decoding against is the one in that mode. KV cache: only routed tokens write K/V at a routed slot
(their positions are invalid for later queries there); dense slots are the plain layer.

Inferred where the paper is silent (our choices): routed blocks are layers i with i % every == offset
(default every=2, offset=1: layer 0 dense, then every other layer); the predictor's hidden width (D // 4),
activation (SiLU) and input (x, like the router); `router_act="sigmoid"` (w = sigmoid(r), ours, gentler for
retrofits where w = r ~ 0 at init removes the routed blocks). Retrofits may anneal the capacity from 1.0
(`anneal_period`, GateSkip spec's MoD baseline: c + (1 - c) / (step / 1500 + 1)) via `MoDHook`.

Runtime knobs: `capacity` (the anneal hook moves it; the config keeps what was attached) and `mode`.
The routed block runs inside the layer call on a sub-context of the routed tokens (`ctx.subset`), through
the layer's own branch functions, so its work is counted in the forward's ledger like any layer's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dyndepth.config import check_at_least, check_fields
from dyndepth.core.context import ForwardContext
from dyndepth.core.layers import apply_keeping_float32, linear_float32
from dyndepth.core.method import MethodOutput, ThresholdRecorder, check_knobs
from dyndepth.core.routing import (
    SelectRule,
    capacity,
    capacity_anneal,
    gather_padded,
    pack_padded,
    scatter_padded_add,
    select,
)
from dyndepth.methods.common import (
    budget_ppm,
    check_attachable,
    check_calibrated,
    check_structural,
    drop_calibration,
    make_config,
    method_dict,
    override_knobs,
)

MODES = ("topk", "predictor", "router_threshold")
STRUCTURAL = ("every", "offset", "predictor_hidden")  # fields that shape parameters: fixed once attached


@dataclass
class MoDConfig:
    capacity: float = 0.125  # c: fraction of each sequence's tokens that run a routed block
    every: int = 2  # route layers i with i % every == offset % every
    offset: int = 1
    mode: str = "topk"  # topk (training; non-causal) | predictor | router_threshold (causal inference)
    decode_mode: str = "predictor"  # used instead of "topk" by forwards with a KV cache
    scale_by_router: bool = True  # multiply the block's output by w(r) (paper); False: w = 1
    router_act: str = "identity"  # w(r) = r (paper) | sigmoid(r) (ours)
    predictor_hidden: int = 0  # 0: hidden_size // 4
    predictor_loss_weight: float = 1.0  # BCE weight, training forwards in topk mode only
    anneal_period: float = 0.0  # > 0: MoDHook anneals capacity c + (1 - c) / (step / period + 1)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check_fields(self, "mod", ValueError)
        check_at_least(self, "mod", ("predictor_hidden", "predictor_loss_weight", "anneal_period",
                                     "init_std"), low=0, error=ValueError)
        checks = (("mode", MODES), ("decode_mode", MODES[1:]), ("router_act", ("identity", "sigmoid")))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"mod.{name}={getattr(self, name)!r} is not one of {allowed}.")
        if not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"mod.capacity={self.capacity} must lie in (0, 1] (fraction of tokens routed).")
        if self.every < 1:
            raise ValueError(f"mod.every={self.every} must be >= 1 (1 routes every layer).")

    def routed_layers(self, num_layers: int) -> list[int]:
        return [i for i in range(num_layers) if i % self.every == self.offset % self.every]


class Predictor(nn.Module):
    """Causal router stand-in: (..., D) -> (..., 1) logit that the token is in its sequence's top-k."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))

    def flops_per_token(self) -> int:
        return 2 * self.fc1.in_features * self.fc1.out_features + 2 * self.fc2.in_features


class LayerMoD(nn.Module):
    """Parameters MoD adds to a routed layer: `model.layers.{i}.mod.{router,predictor}`, plus the buffers
    `threshold` (router_threshold mode; float32 whatever the model's dtype) and `threshold_capacity_ppm`
    (the capacity it was calibrated at, parts per million; -1: none)."""

    def __init__(self, dim: int, cfg: MoDConfig) -> None:
        super().__init__()
        self.router = nn.Linear(dim, 1, bias=False)
        self.predictor = Predictor(dim, cfg.predictor_hidden or max(1, dim // 4))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_capacity_ppm", torch.full((), -1, dtype=torch.long))
        for p in self.parameters():
            nn.init.normal_(p, std=cfg.init_std)

    float32_buffers = ("threshold",)
    _apply = apply_keeping_float32


@dataclass
class MoDState:
    mode: str  # the routing mode of this forward (topk becomes decode_mode with a cache)
    valid: torch.Tensor  # (B, T)
    routed: dict = field(default_factory=dict)  # slot -> KEEP mask (B, T) of a routed layer
    bce: list = field(default_factory=list)  # predictor losses (training)
    acc: list = field(default_factory=list)


class MoD:
    """The method: routed layers run on the chosen tokens only; the others are plain. See `attach_mod`."""

    name = "mod"

    def __init__(self, config: MoDConfig, routed: list[int]) -> None:
        self.routed = frozenset(routed)
        self.recorder: ThresholdRecorder | None = None  # set while `calibrate` records thresholds
        self._checked: tuple | None = None  # the capacity and threshold buffers a forward last found calibrated
        self._decoder = None  # the model's DecoderModel (thresholds live in its layers)
        self.configure(config)

    def configure(self, config: MoDConfig) -> None:
        """Adopt a new config (training options); runtime knobs reset to its values."""
        check_structural(self.name, getattr(self, "config", None), config, STRUCTURAL)
        self.config = config
        self.capacity, self.mode = config.capacity, config.mode

    def extra_slots(self, num_slots: int) -> int:
        return 0

    # ---- runtime knobs ----
    def knobs(self) -> dict:
        return {"capacity": self.capacity, "mode": self.mode}

    def _check(self, knobs: dict) -> None:
        check_knobs(self.name, ("capacity", "mode"), knobs)
        if "capacity" in knobs and not 0.0 < knobs["capacity"] <= 1.0:
            raise ValueError(f"mod capacity={knobs['capacity']} must lie in (0, 1].")
        if knobs.get("mode", "topk") not in MODES:
            raise ValueError(f"mod mode={knobs['mode']!r} is not one of {MODES}.")

    @contextlib.contextmanager
    def override(self, **knobs):
        """Runtime knobs for the scope; mode 'router_threshold' checks its thresholds on entry (an eval found out
        only at its first scoring forward)."""
        with override_knobs(self, self._check, **knobs):
            self._check_calibrated(self.mode)
            yield self

    @contextlib.contextmanager
    def decoding(self, **knobs):
        """Cached decoding: top-k mode routes with `decode_mode` whenever a cache is given; its thresholds are checked
        on entry (not at the first forward, after a CLI has echoed the prompt)."""
        with self.override(**knobs):  # (which checks a threshold mode)
            mode = self.config.decode_mode if self.mode == "topk" else self.mode
            if "capacity" in knobs and mode == "predictor":  # (generate ran at any capacity as at 1.0, silently)
                raise ValueError(f"mod capacity={knobs['capacity']} does not reach decoding in predictor mode (it "
                                 "routes a token whenever its predictor says so); decode at a capacity with "
                                 f"mode=router_threshold, after calibrate(model, batches, capacity={knobs['capacity']}).")
            if self.mode == "topk":
                self._check_calibrated(self.config.decode_mode)
            yield self

    def recording(self, recorder: ThresholdRecorder):
        return override_knobs(self, lambda knobs: None, recorder=recorder, mode="topk")

    def set_thresholds(self, thresholds: dict, knobs: dict) -> None:
        for slot in sorted(self.routed):
            mod = self._decoder.layers[slot].mod
            mod.threshold.copy_(thresholds[slot])
            mod.threshold_capacity_ppm.fill_(budget_ppm(knobs.get("capacity", self.capacity)))

    def trainer_hooks(self, total_steps: int) -> list:
        return [MoDHook(self, total_steps)]

    def lookahead(self) -> str:
        if self.mode != "topk" or self.capacity >= 1:
            return ""
        return ("MoD's mode=topk keeps the top capacity x T tokens of each row, later ones included (mode=predictor, "
                "the paper's causal routing, or router_threshold decides each token alone)")

    def untrained_parameters(self) -> list[str]:
        """The router when its weight does not scale the block (w = 1: selection alone gives it no gradient), the
        predictor when no BCE trains it (mode "topk" with predictor_loss_weight > 0 does)."""
        idle = [] if self.config.scale_by_router else ["model.layers.*.mod.router.*"]
        if not (self.mode == "topk" and self.config.predictor_loss_weight > 0):
            idle.append("model.layers.*.mod.predictor.*")
        return idle

    def to_dict(self) -> dict:
        return method_dict(self.name, self.config)

    def bind(self, model) -> None:
        self._decoder = model.model

    # ---- per forward ----
    def begin(self, input_ids: torch.Tensor, ctx: ForwardContext) -> MoDState:
        mode = self.config.decode_mode if self.mode == "topk" and ctx.cache is not None else self.mode
        if mode == "router_threshold" and not torch.compiler.is_compiling():
            self._check_calibrated_once()
        if ctx.cache is not None:  # the routed slots hold the routed tokens only
            ctx.cache.rewrite_from(ctx.positions, ctx.valid, sorted(self.routed))
        return MoDState(mode=mode, valid=ctx.valid_or_all)

    def _check_calibrated(self, mode: str) -> None:
        if mode == "router_threshold":
            check_calibrated([self._decoder.layers[s].mod.threshold_capacity_ppm for s in self.routed], self.capacity,
                             "capacity", f"mode 'router_threshold' at capacity {self.capacity}", "MoD",
                             ", or use mode='predictor'")

    def _check_calibrated_once(self) -> None:
        """router_threshold mode set by the config (or any way around `override`, which checks): the first forward
        checks the calibration, and again only when the capacity or a threshold buffer changes, so a decode step reads
        no stored capacity back (a host sync per routed layer, and a graph break in a compiled step), as GateSkip's."""
        ppm = [self._decoder.layers[s].mod.threshold_capacity_ppm for s in sorted(self.routed)]
        key = (self.capacity, *((id(p), p._version) for p in ppm))
        if key != self._checked:
            self._check_calibrated("router_threshold")
            self._checked = key

    def end(self, ctx: ForwardContext) -> MethodOutput:
        st: MoDState = ctx.state
        out = MethodOutput()
        if st.bce:
            bce = torch.stack(st.bce).mean()
            out.stats["mod/predictor_loss"] = bce.detach()
            out.stats["mod/predictor_acc"] = torch.stack(st.acc).mean()
            if self.config.predictor_loss_weight:
                out.losses.append(self.config.predictor_loss_weight * bce)
        if st.routed:
            n_valid = st.valid.sum() * len(st.routed)
            routed = sum((keep & st.valid).sum() for keep in st.routed.values())
            out.stats["mod/routed_fraction"] = routed / n_valid.clamp(min=1)
        return out

    # ---- per layer ----
    def layer_forward(self, layer, x: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        if slot not in self.routed:
            return layer.block(x, ctx, slot)
        st: MoDState = ctx.state
        B, T, D = x.shape
        r_BT = linear_float32(layer.mod.router, x).squeeze(-1)  # (B, T) float32, as GateSkip's gates and DND's router:
        # a bfloat16 score ties whole runs of tokens, which top-k then ranked by position
        if ctx.ledger.enabled:
            ctx.ledger.add(slot, "router", executed=B * T * 2 * D, ideal=st.valid.sum() * 2 * D)
        keep_BT = self._route(layer.mod, x, r_BT, ctx, slot)
        st.routed[slot] = keep_BT
        size = capacity(self.capacity, T) if st.mode == "topk" else None  # static k: no host sync
        x_BKD, _, valid_BK, idx_BK = pack_padded(x, keep_BT, ctx.positions, size)
        if idx_BK.shape[1] == 0:  # no token of the batch is routed (predictor / threshold modes)
            return x
        sub = ctx.subset(idx_BK, valid_BK)  # the routed tokens attend to each other only
        a_BKD = layer.attn_branch(layer.input_layernorm(x_BKD), sub, slot)
        d_BKD = a_BKD + layer.mlp_branch(layer.post_attention_layernorm(x_BKD + a_BKD), sub, slot)  # block(x) - x
        if self.config.scale_by_router:
            w_BT = r_BT if self.config.router_act == "identity" else torch.sigmoid(r_BT)
            d_BKD = gather_padded(w_BT, idx_BK)[..., None].to(d_BKD.dtype) * d_BKD  # (B, K, D)
        return scatter_padded_add(x, d_BKD, idx_BK, valid_BK)

    def _route(self, mod: LayerMoD, x: torch.Tensor, r_BT: torch.Tensor, ctx: ForwardContext, slot: int):
        """KEEP mask (B, T) for this routed layer. Trains the predictor in training forwards."""
        st: MoDState = ctx.state
        mode, valid, score_BT = st.mode, st.valid, r_BT.detach()
        train_pred = mode == "topk" and ctx.training and self.config.predictor_loss_weight > 0
        logit_BT = None
        if mode == "predictor" or train_pred:
            logit_BT = mod.predictor(x.detach()).squeeze(-1).float()  # (B, T)
            B, T = valid.shape
            cost = mod.predictor.flops_per_token()
            if ctx.ledger.enabled:
                ctx.ledger.add(slot, "router", executed=B * T * cost, ideal=valid.sum() * cost)
        if self.recorder is not None:
            self.recorder.record(slot, score_BT, valid, 1.0 - self.capacity)
        if mode == "topk":  # k of each row's real tokens (a padded row took c x the batch's width: all of them at
            # c = 0.5 and half padding); an unpadded batch's static k needs no per-row count
            keep = select(score_BT, valid, SelectRule(kind="topk", fraction=self.capacity,
                                                      static_k=ctx.valid is None))
        elif mode == "predictor":
            keep = (logit_BT.detach() > 0) & valid
        else:
            keep = (score_BT > mod.threshold) & valid
        if train_pred:  # BCE on valid tokens; targets are the (non-differentiable) top-k decisions
            target, w = keep.float(), valid.float()
            bce = F.binary_cross_entropy_with_logits(logit_BT, target, weight=w, reduction="sum")
            st.bce.append(bce / w.sum().clamp(min=1))
            st.acc.append((((logit_BT.detach() > 0) == keep) & valid).sum() / w.sum().clamp(min=1))
        return keep


def attach_mod(model, cfg: MoDConfig | dict | None = None) -> MoD:
    """Add a router and predictor to every routed layer of `model` (a CausalLM, fresh or pretrained)."""
    cfg = make_config(MoDConfig, cfg)
    layers = check_attachable(model, "mod")
    routed = cfg.routed_layers(len(layers))
    if not routed:
        raise ValueError(f"mod.every={cfg.every}, offset={cfg.offset} routes none of the "
                         f"{len(layers)} layers; use every=1 or a smaller offset.")
    ref = model.model.embed_tokens.weight  # (the lm_head may be a QuantLinear, which has no .weight)
    for i in routed:
        layers[i].mod = LayerMoD(model.config.hidden_size, cfg).to(device=ref.device, dtype=ref.dtype)
    method = MoD(cfg, routed)
    method.bind(model)
    model.method = method
    return method


class MoDHook:
    """Trainer hook: anneals the capacity knob from 1.0 toward c when `anneal_period > 0` (else a no-op)."""

    name = "mod"

    def __init__(self, method: MoD, total_steps: int) -> None:
        if method.mode != "topk":  # (a layer whose tokens all pass leaves its router without a gradient: DDP stops)
            raise ValueError(f"mod mode={method.mode!r} is an inference mode (each token decides alone, so a step may "
                             "route no token of a layer and train nothing there): train with mode='topk' (the paper), "
                             "then decode with decode_mode, or calibrate for router_threshold.")
        self.method = method
        self.calibration_dropped = False  # (after the first step: see after_step)
        if method.config.anneal_period > 0:
            method.capacity = capacity_anneal(0, method.config.capacity, method.config.anneal_period)

    def after_step(self, model, step: int, stats: dict, dist) -> dict:
        """Logs the capacity this step trained at, then sets the next step's."""
        cfg, ran = self.method.config, self.method.capacity
        if not self.calibration_dropped:  # the step moved the routers: router_threshold's thresholds are stale
            layers = self.method._decoder.layers
            drop_calibration([layers[s].mod.threshold_capacity_ppm for s in self.method.routed], "capacity", "MoD",
                             getattr(dist, "is_main", True))
            self.calibration_dropped = True
        if cfg.anneal_period > 0:
            self.method.capacity = capacity_anneal(step, cfg.capacity, cfg.anneal_period)
        return {"capacity": ran}

    def state_dict(self) -> dict:
        return {"capacity": self.method.capacity}

    def load_state_dict(self, state: dict) -> None:
        self.method.capacity = state["capacity"]
