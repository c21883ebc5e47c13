"""GateSkip (Laitenberger et al. 2025): residual gates on every attention and MLP branch; at inference the
tokens with the lowest gate values skip the branch under a per-branch budget.

Shape legend: B batch, T tokens, D hidden_size, K kept tokens per row, N kept tokens in the batch.

Per branch f in {attn, mlp} of layer l, with normed input h = Norm(x) (spec: ../shared/papers/gateskip.md):
    g = sigmoid(gate(h.detach()))      # (B, T, D) vector gate (or (B, T, 1) scalar, or low-rank)
    s = mean_d g                       # (B, T) token importance, known *before* the branch runs
    keep = s > quantile_q(s over the pool)   # pool: valid tokens, PAD and EOS excluded (always run)
    x = x + scatter(g * f(h[keep]))    # skipped tokens: identity on the residual stream
Training adds lambda * mean over branches of mean(g^2) and ramps q from 0 to 0.2 (the hook below).

Real savings: kept tokens are gathered before q_proj / o_proj / attention and before the MLP, so compute
falls with the budget. Skipped tokens still run k_proj / v_proj and write K/V to the cache (the
"compute" K/V policy, the spec's recommended default), so later tokens can still attend to them.

Our extensions (not in the paper): `scope="sequence"` ranks within each sequence (batch-independent
outputs); `mode="threshold"` applies per-branch thresholds calibrated at budget q (`calibrate`), so
decoding with batch 1, where the quantile pool collapses, still skips; `protect_bos`; a low-rank gate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from dyndepth.core import flops
from dyndepth.core.layers import ForwardContext
from dyndepth.core.routing import (
    SelectRule,
    gather_flat,
    gather_padded,
    linear_ramp,
    pack,
    pack_padded,
    quantile_threshold,
    scatter_add,
    scatter_padded_add,
    select,
)
from dyndepth.methods.common import make_config, method_dict, override_config

BRANCHES = ("attn", "mlp")


@dataclass
class GateSkipConfig:
    gate: str = "vector"  # vector (paper) | scalar | lowrank (ours)
    rank: int = 16  # lowrank gate width
    shared: bool = False  # one attention gate and one MLP gate for all layers (paper ablation)
    detach_input: bool = True  # the gate reads a detached copy of the branch input (official code)
    budget: float = 0.0  # q: fraction of pool tokens each branch skips
    scope: str = "batch"  # ranking pool: "batch" (paper) | "sequence" (ours: batch-independent)
    mode: str = "quantile"  # quantile (paper) | threshold (calibrated per branch; decoding)
    protect_bos: bool = False  # never skip position 0 (the spec's recommendation; off = paper)
    kv_policy: str = "compute"  # K/V of tokens skipping attention: "compute" (default) | "copy_prev" (experimental)
    penalty: float = 1.0  # lambda on mean(g^2), averaged over branches (paper jobs use 1.0)
    init_bias: float = 5.0  # sigmoid(5) = 0.993: the fine-tune starts from the unmodified model
    init_std: float = 0.01
    ramp_start: float = 0.0  # training budget ramp (paper: 0 -> 0.2 over the whole run)
    ramp_end: float = 0.2
    ramp_steps: int = 0  # 0: the run's total steps
    calibrated_budget: float | None = None  # the budget `calibrate` computed layer.gateskip.tau for

    def __post_init__(self) -> None:
        checks = (("gate", ("vector", "scalar", "lowrank")), ("scope", ("batch", "sequence")),
                  ("mode", ("quantile", "threshold")), ("kv_policy", ("compute", "copy_prev")))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"gateskip.{name}={getattr(self, name)!r} is not one of {allowed}.")
        if not 0.0 <= self.budget < 1.0:
            raise ValueError(f"gateskip.budget={self.budget} must lie in [0, 1).")


class Gate(nn.Module):
    """sigmoid(W h + b): (..., D) -> (..., D) for vector, (..., 1) for scalar; low-rank W = up @ down."""

    def __init__(self, dim: int, cfg: GateSkipConfig) -> None:
        super().__init__()
        out = 1 if cfg.gate == "scalar" else dim
        if cfg.gate == "lowrank":
            self.down = nn.Linear(dim, cfg.rank, bias=False)
            self.proj = nn.Linear(cfg.rank, dim)
        else:
            self.down = None
            self.proj = nn.Linear(dim, out)
        for p in self.parameters():
            nn.init.normal_(p, std=cfg.init_std)
        nn.init.constant_(self.proj.bias, cfg.init_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(h if self.down is None else self.down(h)))


class LayerGates(nn.Module):
    """The parameters GateSkip adds to one layer: `model.layers.{i}.gateskip.{attn,mlp}_gate.*`, plus the
    calibrated thresholds `tau` (attn, mlp) for threshold mode."""

    def __init__(self, dim: int, cfg: GateSkipConfig) -> None:
        super().__init__()
        self.attn_gate = Gate(dim, cfg)
        self.mlp_gate = Gate(dim, cfg)
        self.register_buffer("tau", torch.zeros(2))


class GateSkip:
    """The method: `apply(layer, x, ctx, slot)` replaces a layer's forward. Attach with `attach_gateskip`."""

    name = "gateskip"

    def __init__(self, cfg: GateSkipConfig, eos_token_ids: list[int], shared_gates: LayerGates | None = None) -> None:
        self.cfg = cfg
        self.eos_token_ids = eos_token_ids
        self.shared_gates = shared_gates  # cfg.shared: layer 0's gates serve every layer
        self.calibration: dict | None = None  # while `calibrate` runs: (slot, branch) -> [tau per batch]

    def num_slots(self, config) -> int:
        return config.num_hidden_layers

    # ---- per forward ----
    def begin(self, input_ids: torch.Tensor, ctx: ForwardContext) -> None:
        pool = torch.ones_like(input_ids, dtype=torch.bool) if ctx.valid is None else ctx.valid.clone()
        if self.eos_token_ids:  # EOS is never skipped nor counted (official code)
            pool &= ~torch.isin(input_ids, torch.tensor(self.eos_token_ids, device=input_ids.device))
        if self.cfg.protect_bos:
            pool &= ctx.positions != 0
        ctx.method = {"pool": pool, "g2": [], "masks": {}}
        if self.cfg.kv_policy == "copy_prev":
            ctx.kv_hook = functools.partial(self._copy_prev_kv, ctx)

    def end(self, ctx: ForwardContext, config) -> None:
        m = ctx.method
        if m["g2"]:  # training forwards: the L2 gate penalty, averaged over branches
            penalty = torch.stack(m["g2"]).mean()
            ctx.stats["gateskip/gate_sq"] = penalty.detach()
            if self.cfg.penalty:
                ctx.losses.append(self.cfg.penalty * penalty)
        run = self.executed(ctx)
        pool_n = m["pool"].sum().clamp(min=1)
        for branch in BRANCHES:  # the paper's metric: fraction of skipped (token, branch) pairs
            ctx.stats[f"gateskip/{branch}_skipped"] = 1 - run[branch].sum() / (pool_n * run[branch].shape[0])
        ctx.stats["gateskip/flops"] = self.flops(ctx, config, run)

    # ---- per layer ----
    def apply(self, layer, x: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        gates = self.gates(layer)
        h = layer.input_layernorm(x)  # (B, T, D)
        g = gates.attn_gate(h.detach() if self.cfg.detach_input else h)  # (B, T, D) or (B, T, 1)
        keep = self.keep(g, ctx, slot, "attn", gates.tau[0])
        if keep is None:
            x = x + g * layer.self_attn(h, ctx, slot)
        elif bool(keep.all(1).any()):  # a row keeps every token (always so when decoding one token per
            # row): packing saves no query work, so run densely and zero what was skipped
            x = x + (g * keep[..., None]) * layer.self_attn(h, ctx, slot)
        else:
            _, _, valid_BK, idx_BK = pack_padded(keep[..., None], keep)  # only the per-row indices are used
            y_BKD = layer.self_attn(h, ctx, slot, q_idx_BK=idx_BK, q_valid_BK=valid_BK)  # K/V for all tokens
            if idx_BK.shape[1]:
                x = scatter_padded_add(x, gather_padded(g, idx_BK) * y_BKD, idx_BK, valid_BK)

        h = layer.post_attention_layernorm(x)
        g = gates.mlp_gate(h.detach() if self.cfg.detach_input else h)
        keep = self.keep(g, ctx, slot, "mlp", gates.tau[1])
        if keep is None:
            return x + g * layer.mlp_branch(h, ctx)
        h_ND, idx_N = pack(h, keep)
        if idx_N.numel() == 0:  # every token skipped this branch
            return x
        return scatter_add(x, gather_flat(g, idx_N) * layer.mlp_branch(h_ND, ctx), idx_N)

    @staticmethod
    def _copy_prev_kv(ctx: ForwardContext, slot: int, k: torch.Tensor, v: torch.Tensor):
        """kv_policy="copy_prev" (experimental; the paper's stated behaviour, fragile in its code): a token
        that skips attention at layer l takes the K/V it had at layer l - 1 instead of projecting its
        unchanged residual with layer l's weights. Layer 0 keeps its own. No compute is saved by this."""
        m = ctx.method
        keep, prev = m["masks"].get((slot, "attn")), m.get("prev_kv")
        if keep is not None and prev is not None:
            copy = ~keep[..., None, None]  # (B, T, 1, 1)
            k, v = torch.where(copy, prev[0], k), torch.where(copy, prev[1], v)
        m["prev_kv"] = (k, v)
        return k, v

    def gates(self, layer) -> LayerGates:
        return self.shared_gates if self.shared_gates is not None else layer.gateskip

    def keep(self, g: torch.Tensor, ctx: ForwardContext, slot: int, branch: str, tau: torch.Tensor):
        """KEEP mask (B, T), or None when nothing can be skipped (the dense path)."""
        m = ctx.method
        if ctx.collect_aux:
            m["g2"].append(g.pow(2).mean())
        s_BT = g.detach().mean(-1).float()  # importance
        pool = m["pool"]
        if self.calibration is not None:
            tau_batch = quantile_threshold(s_BT, pool, self.cfg.budget, "batch").reshape(())
            self.calibration.setdefault((slot, branch), []).append(tau_batch)
        if self.cfg.mode == "threshold":
            keep = (s_BT > tau) | ~pool
        elif self.cfg.budget <= 0:
            keep = None
        else:
            keep = select(s_BT, pool, SelectRule(kind="quantile", scope=self.cfg.scope, q=self.cfg.budget,
                                                 pad_policy="keep"))
        m["masks"][(slot, branch)] = keep
        return keep

    @staticmethod
    def executed(ctx: ForwardContext) -> dict[str, torch.Tensor]:
        """Per branch, the pool tokens that ran it in each layer: (L, B, T) bool."""
        m = ctx.method
        pool = m["pool"]
        return {branch: torch.stack([pool if keep is None else keep & pool
                                     for (_, b), keep in m["masks"].items() if b == branch])
                for branch in BRANCHES}

    def flops(self, ctx: ForwardContext, config, run: dict[str, torch.Tensor]) -> torch.Tensor:
        """FLOPs that actually ran in this forward (pool tokens): gates and K/V projections for all, q/o,
        attention scores and MLP for kept tokens. Keys per kept query = its position + 1 (causal context)."""
        pool = ctx.method["pool"]
        L = run["attn"].shape[0]
        D = config.hidden_size
        gate = {"vector": flops.gate_flops(config, "vector"), "scalar": flops.gate_flops(config, "scalar"),
                "lowrank": 4 * D * self.cfg.rank}[self.cfg.gate]
        n_pool = pool.sum().double()
        attn_run, mlp_run = run["attn"].double(), run["mlp"].double()  # (L, B, T)
        keys = (attn_run * (ctx.positions + 1).double()).sum()
        mlp_per_layer = torch.tensor([flops.mlp_flops(config, i) for i in range(L)], dtype=torch.float64,
                                     device=pool.device)
        return (L * n_pool * (flops.kv_flops(config) + 2 * gate) + attn_run.sum() * flops.q_o_flops(config)
                + keys * flops.attn_score_flops(config, 1) + (mlp_run.sum((1, 2)) * mlp_per_layer).sum())

    def override(self, **fields):
        """Temporarily change config fields (budget, mode, ...): `with method.override(budget=0.3): ...`."""
        return override_config(self.cfg, self, **fields)

    def decoding(self, budget: float):
        """Context for cached generation at `budget`: threshold mode with the calibrated thresholds."""
        if budget > 0 and self.cfg.calibrated_budget != budget:
            raise ValueError(f"GateSkip thresholds are calibrated for budget {self.cfg.calibrated_budget}, not "
                             f"{budget}; run dyndepth.methods.calibrate(model, batches, budget={budget}) first.")
        return self.override(budget=budget, mode="threshold" if budget > 0 else "quantile")

    def to_dict(self) -> dict:
        return method_dict(self.name, self.cfg)


def attach_gateskip(model, cfg: GateSkipConfig | dict | None = None) -> GateSkip:
    """Add gates to every layer of `model` (a CausalLM) and route its forward through GateSkip."""
    cfg = make_config(GateSkipConfig, cfg)
    ref = model.lm_head.weight
    layers = model.model.layers if not cfg.shared else model.model.layers[:1]
    for layer in layers:
        layer.gateskip = LayerGates(model.config.hidden_size, cfg).to(device=ref.device, dtype=ref.dtype)
    shared = model.model.layers[0].gateskip if cfg.shared else None
    method = GateSkip(cfg, model.config.eos_token_ids, shared)
    model.method = method
    return method


@torch.no_grad()
def calibrate(model, batches, budget: float) -> torch.Tensor:
    """Per-branch thresholds (L, 2) at budget q: the mean over calibration batches of each branch's
    batch-pool quantile. Stored in `layer.gateskip.tau`; used in `mode="threshold"` (e.g. decoding)."""
    method: GateSkip = model.method
    was_training = model.training
    model.eval()
    method.calibration = {}
    try:
        with method.override(budget=budget, mode="quantile"):
            for batch in batches:
                ids, mask = batch if isinstance(batch, tuple) else (batch, None)
                model(ids, attention_mask=mask)
        taus = method.calibration
    finally:
        method.calibration = None
        model.train(was_training)
    table = torch.zeros(model.config.num_hidden_layers, 2)
    for (slot, branch), values in taus.items():
        table[slot, BRANCHES.index(branch)] = torch.stack(values).mean()
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer, "gateskip"):
            layer.gateskip.tau.copy_(table[i])
    method.cfg.calibrated_budget = budget
    return table


class GateSkipHook:
    """Trainer hook: ramps the skip budget from `ramp_start` to `ramp_end` over `ramp_steps` (0: the run)."""

    name = "gateskip"  # logged metrics are prefixed with it: gateskip/budget

    def __init__(self, method: GateSkip, total_steps: int) -> None:
        self.method = method
        self.steps = method.cfg.ramp_steps or total_steps
        self.method.cfg.budget = method.cfg.ramp_start

    def after_step(self, model, step: int, stats: dict, dist) -> dict:
        cfg = self.method.cfg
        cfg.budget = linear_ramp(step, cfg.ramp_start, cfg.ramp_end, self.steps)
        return {"budget": cfg.budget}

    def state_dict(self) -> dict:
        return {"budget": self.method.cfg.budget}

    def load_state_dict(self, state: dict) -> None:
        self.method.cfg.budget = state["budget"]
