"""Mixture-of-Depths (Raposo et al. 2024): a router picks, per sequence, the top c*T tokens that run a whole
block (attention + MLP); the others pass the block unchanged on the residual stream.

Shape legend: B batch, T tokens, D hidden_size, K routed tokens per row (padded to a static or longest count).

Per routed block l, with block input x (the residual stream, not normed, as in the paper):
    r = router(x)                              # (B, T) one scalar per token, Linear(D -> 1, no bias)
    keep = top-k of r per sequence, k = ceil(c * T)   # PAD never selected; ties to the earlier token
    x_i = x_i + w(r_i) * (block(x_S)_i - x_i)  # i in keep; S = the kept tokens of i's sequence
The block runs on the kept tokens only: queries, keys and values all come from S, causal by original
positions, so compute (projections, attention, MLP) falls with c. w(r) = r (paper: the router weight scales
the block output, which is how the router gets gradients); `scale_by_router=False` uses w = 1, and with
c = 1.0 that is exactly the base model (the neutral setting).

Causal inference: top-k over a sequence looks ahead. Each routed block also has a small predictor MLP
(D -> hidden -> 1) reading a detached x, trained with BCE to predict membership in the top-k (paper's second
method); `mode="predictor"` routes a token iff its predictor logit > 0. `mode="router_threshold"` routes iff
r > a threshold calibrated (`calibrate_mod`) as the (1 - c)-quantile of router scores. A forward with a KV
cache never uses top-k: in mode "topk" it uses `decode_mode` (default "predictor"), so the full forward to
compare decoding against is the one in that mode. KV cache: only routed tokens write K/V at a routed slot
(their positions are invalid for later queries there); dense slots are the plain layer.

Inferred where the paper is silent (our choices): routed blocks are layers i with i % every == offset
(default every=2, offset=1: layer 0 dense, then every other layer); the predictor's hidden width (D // 4),
activation (SiLU) and input (x, like the router); `router_act="sigmoid"` (w = sigmoid(r), ours, gentler for
retrofits where w = r ~ 0 at init removes the routed blocks). Retrofits may anneal the capacity from 1.0
(`anneal_period`, GateSkip spec's MoD baseline: c + (1 - c) / (step / 1500 + 1)) via `MoDHook`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dyndepth.core import flops
from dyndepth.core.layers import ForwardContext, causal_mask
from dyndepth.core.routing import (
    SelectRule,
    capacity,
    capacity_anneal,
    gather_padded,
    pack_padded,
    quantile_threshold,
    scatter_padded_add,
    select,
)
from dyndepth.methods.common import make_config, method_dict, override_config

MODES = ("topk", "predictor", "router_threshold")


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
    calibrated_capacity: float | None = None  # the capacity `calibrate_mod` computed thresholds for

    def __post_init__(self) -> None:
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


class LayerMoD(nn.Module):
    """Parameters MoD adds to a routed layer: `model.layers.{i}.mod.{router,predictor,threshold}`."""

    def __init__(self, dim: int, cfg: MoDConfig) -> None:
        super().__init__()
        self.router = nn.Linear(dim, 1, bias=False)
        self.predictor = Predictor(dim, cfg.predictor_hidden or max(1, dim // 4))
        self.register_buffer("threshold", torch.zeros(()))  # router_threshold mode (see calibrate_mod)
        for p in self.parameters():
            nn.init.normal_(p, std=cfg.init_std)


class MoD:
    """The method: routed layers run on the chosen tokens only; the others are plain. See `attach_mod`."""

    name = "mod"

    def __init__(self, cfg: MoDConfig, routed: list[int]) -> None:
        self.cfg = cfg
        self.routed = frozenset(routed)
        self.anneal_capacity: float | None = None  # set by MoDHook while annealing; else cfg.capacity
        self.calibration: dict | None = None  # while `calibrate_mod` runs: slot -> [threshold per batch]

    @property
    def capacity(self) -> float:
        return self.cfg.capacity if self.anneal_capacity is None else self.anneal_capacity

    def num_slots(self, config) -> int:
        return config.num_hidden_layers

    # ---- per forward ----
    def begin(self, input_ids: torch.Tensor, ctx: ForwardContext) -> None:
        mode = self.cfg.decode_mode if self.cfg.mode == "topk" and ctx.cache is not None else self.cfg.mode
        if mode == "router_threshold" and self.cfg.calibrated_capacity is None:
            raise ValueError("mod mode 'router_threshold' needs calibrated thresholds; run "
                             "dyndepth.methods.calibrate_mod(model, batches) first, or use mode='predictor'.")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if ctx.valid is None else ctx.valid
        ctx.method = {"mode": mode, "valid": valid, "slots": {}, "bce": [], "acc": []}

    def end(self, ctx: ForwardContext, config) -> None:
        m = ctx.method
        if m["bce"]:
            bce = torch.stack(m["bce"]).mean()
            ctx.stats["mod/predictor_loss"] = bce.detach()
            ctx.stats["mod/predictor_acc"] = torch.stack(m["acc"]).mean()
            if self.cfg.predictor_loss_weight:
                ctx.losses.append(self.cfg.predictor_loss_weight * bce)
        routed = [run for slot, (run, _, _) in m["slots"].items() if slot in self.routed]
        if routed:
            n_valid = m["valid"].sum() * len(routed)
            ctx.stats["mod/routed_fraction"] = torch.stack(routed).sum() / n_valid.clamp(min=1)
        ctx.stats["mod/flops"] = self.flops(ctx, config)

    # ---- per layer ----
    def apply(self, layer, x: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        m = ctx.method
        if slot not in self.routed:
            keys = ((ctx.positions + 1) * m["valid"]).sum()  # causal context of every valid token
            m["slots"][slot] = (m["valid"].sum(), keys, False)
            return layer(x, ctx, slot)
        r_BT = layer.mod.router(x).squeeze(-1)  # (B, T)
        keep_BT, predicted = self.route(layer.mod, x, r_BT, ctx, slot)
        size = capacity(self.capacity, x.shape[1]) if m["mode"] == "topk" else None  # static k: no sync
        x_BKD, pos_BK, valid_BK, idx_BK = pack_padded(x, keep_BT, ctx.positions, size)
        if idx_BK.shape[1] == 0:  # no token of the batch is routed (predictor / threshold modes)
            m["slots"][slot] = (keep_BT.sum(), keep_BT.sum(), predicted)
            return x
        sub = self.sub_context(ctx, idx_BK, pos_BK, valid_BK)
        a_BKD = layer.attn_branch(layer.input_layernorm(x_BKD), sub, slot)  # keys/values: routed tokens only
        d_BKD = a_BKD + layer.mlp_branch(layer.post_attention_layernorm(x_BKD + a_BKD), sub)  # block(x) - x
        if self.cfg.scale_by_router:
            w_BT = r_BT if self.cfg.router_act == "identity" else torch.sigmoid(r_BT)
            d_BKD = gather_padded(w_BT, idx_BK)[..., None] * d_BKD  # (B, K, D)
        m["slots"][slot] = (keep_BT.sum(), self.attended_keys(sub, slot, pos_BK, valid_BK), predicted)
        return scatter_padded_add(x, d_BKD, idx_BK, valid_BK)

    def route(self, mod: LayerMoD, x: torch.Tensor, r_BT: torch.Tensor, ctx: ForwardContext, slot: int):
        """KEEP mask (B, T) for this routed layer, and whether the predictor ran. Trains the predictor."""
        m = ctx.method
        mode, valid, score_BT = m["mode"], m["valid"], r_BT.detach().float()
        train_pred = mode == "topk" and ctx.collect_aux and self.cfg.predictor_loss_weight > 0
        run_pred = mode == "predictor" or train_pred
        logit_BT = mod.predictor(x.detach()).squeeze(-1).float() if run_pred else None  # (B, T)
        if self.calibration is not None:
            tau = quantile_threshold(score_BT, valid, 1.0 - self.capacity, "batch").reshape(())
            self.calibration.setdefault(slot, []).append(tau)
        if mode == "topk":
            keep = select(score_BT, valid, SelectRule(kind="topk", fraction=self.capacity, static_k=True))
        elif mode == "predictor":
            keep = (logit_BT.detach() > 0) & valid
        else:
            keep = (score_BT > mod.threshold) & valid
        if train_pred:  # BCE on valid tokens; targets are the (non-differentiable) top-k decisions
            target, w = keep.float(), valid.float()
            bce = F.binary_cross_entropy_with_logits(logit_BT, target, weight=w, reduction="sum")
            m["bce"].append(bce / w.sum().clamp(min=1))
            m["acc"].append((((logit_BT.detach() > 0) == keep) & valid).sum() / w.sum().clamp(min=1))
        return keep, logit_BT is not None

    @staticmethod
    def sub_context(ctx: ForwardContext, idx_BK, pos_BK, valid_BK) -> ForwardContext:
        """The context of the routed tokens alone: their positions, rotary rows and a causal mask among
        them (cache-free), so the layer's own branches run unchanged on (B, K, D). A cache gets the
        routed tokens' K/V only (PAD entries of the padded rows go to the scratch column)."""
        cos, sin = gather_padded(ctx.cos, idx_BK), gather_padded(ctx.sin, idx_BK)  # (B, K, H)
        mask = None
        if ctx.cache is None:
            doc_BK = None if ctx.doc_ids is None else ctx.doc_ids.gather(1, idx_BK)
            mask = causal_mask(pos_BK, pos_BK, valid_BK, valid_BK, doc_BK)  # (B, 1, K, K)
        return ForwardContext(pos_BK, valid_BK, cos, sin, mask, ctx.cache, collect_aux=ctx.collect_aux,
                              aux=ctx.aux)

    @staticmethod
    def attended_keys(sub: ForwardContext, slot: int, pos_BK, valid_BK) -> torch.Tensor:
        """(query, key) pairs the routed queries attended: visible routed keys, from the cache if any."""
        if sub.cache is None:
            return (sub.attn_mask[:, 0] & valid_BK[..., None]).sum()
        S = sub.cache.length
        k_valid_BS = sub.cache.valid[slot, :, :S]  # (B, S), after this call's writes
        k_pos = torch.arange(S, device=pos_BK.device)
        seen = k_valid_BS[:, None, :] & (k_pos <= pos_BK[..., None])  # (B, K, S)
        return (seen & valid_BK[..., None]).sum()

    def flops(self, ctx: ForwardContext, config) -> torch.Tensor:
        """FLOPs that ran in the decoder layers (lm_head excluded, as GateSkip's count): per token that ran
        a layer, k/v/q/o projections and the MLP; attention per (query, key) pair attended; the router
        (D -> 1) for every valid token at a routed layer, and the predictor where it ran."""
        m = ctx.method
        n_valid = m["valid"].sum().double()
        D = config.hidden_size
        hid = self.cfg.predictor_hidden or max(1, D // 4)
        total = torch.zeros((), dtype=torch.float64, device=n_valid.device)
        for slot, (n_run, keys, predicted) in m["slots"].items():
            n_run = n_run.double()
            per_token = flops.kv_flops(config) + flops.q_o_flops(config) + flops.mlp_flops(config, slot)
            total = total + n_run * per_token
            total = total + flops.attn_score_flops(config, keys.double())
            if slot in self.routed:
                total = total + n_valid * flops.gate_flops(config, "scalar")
                total = total + (n_valid * (2 * D * hid + 2 * hid) if predicted else 0)
        return total

    def override(self, **fields):
        """Temporarily change config fields: `with method.override(mode="predictor"): ...`."""
        return override_config(self.cfg, self, **fields)

    def to_dict(self) -> dict:
        return method_dict(self.name, self.cfg)


def attach_mod(model, cfg: MoDConfig | dict | None = None) -> MoD:
    """Add a router and predictor to every routed layer of `model` (a CausalLM, fresh or pretrained)."""
    cfg = make_config(MoDConfig, cfg)
    routed = cfg.routed_layers(model.config.num_hidden_layers)
    if not routed:
        raise ValueError(f"mod.every={cfg.every}, offset={cfg.offset} routes none of the "
                         f"{model.config.num_hidden_layers} layers; use every=1 or a smaller offset.")
    ref = model.lm_head.weight
    for i in routed:
        mod = LayerMoD(model.config.hidden_size, cfg)
        model.model.layers[i].mod = mod.to(device=ref.device, dtype=ref.dtype)
    method = MoD(cfg, routed)
    model.method = method
    return method


@torch.no_grad()
def calibrate_mod(model, batches) -> torch.Tensor:
    """Router thresholds (one per routed layer) for `mode="router_threshold"`: the mean over calibration
    batches of the (1 - capacity)-quantile of valid tokens' router scores under top-k routing."""
    method: MoD = model.method
    was_training = model.training
    model.eval()
    method.calibration = {}
    try:
        with method.override(mode="topk"):
            for batch in batches:
                ids, mask = batch if isinstance(batch, tuple) else (batch, None)
                model(ids, attention_mask=mask)
        taus = method.calibration
    finally:
        method.calibration = None
        model.train(was_training)
    table = torch.stack([torch.stack(taus[slot]).mean() for slot in sorted(method.routed)])
    for slot, tau in zip(sorted(method.routed), table):
        model.model.layers[slot].mod.threshold.copy_(tau)
    method.cfg.calibrated_capacity = method.capacity
    return table


class MoDHook:
    """Trainer hook: anneals the capacity from 1.0 toward c when `anneal_period > 0` (else a no-op)."""

    def __init__(self, method: MoD, total_steps: int) -> None:
        self.method = method
        if method.cfg.anneal_period > 0:
            method.anneal_capacity = capacity_anneal(0, method.cfg.capacity, method.cfg.anneal_period)

    def after_step(self, model, step: int, stats: dict, dist) -> dict:
        cfg = self.method.cfg
        if cfg.anneal_period > 0:
            self.method.anneal_capacity = capacity_anneal(step, cfg.capacity, cfg.anneal_period)
        return {"capacity": self.method.capacity}

    def state_dict(self) -> dict:
        return {"capacity": self.method.anneal_capacity}

    def load_state_dict(self, state: dict) -> None:
        self.method.anneal_capacity = state["capacity"]
