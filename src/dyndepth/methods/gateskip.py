"""GateSkip (Laitenberger et al. 2025): residual gates on every attention and MLP branch; at inference the
tokens with the lowest gate values skip the branch under a per-branch budget.

Shape legend: B batch, T tokens, D hidden_size, K kept tokens per row, N kept tokens in the batch.

Per branch f in {attn, mlp} of layer l, with normed input h = Norm(x) (spec: ../shared/papers/gateskip.md):
    g = sigmoid(gate(h.detach()))      # (B, T, D) vector gate (or (B, T, 1) scalar, or low-rank), float32
    s = mean_d g                       # (B, T) token importance, known *before* the branch runs
    keep = all but the floor(q * n) lowest s of the pool   # pool: valid tokens, PAD and EOS excluded
    x = x + scatter(g * f(h[keep]))    # skipped tokens: identity on the residual stream
Training adds lambda * mean over branches of mean(g^2) and ramps q from 0 to 0.2 (GateSkipHook).

Precision: gate logits, importances and thresholds are always float32 (the gate's matmul runs in float32
even under bf16 autocast or with bf16 weights). Fresh gates (bias 5) give s ~ 0.993 for every token; in
bfloat16 those all tie, and a "s <= quantile" rule would skip every token. The rank rule of
`core.routing.select` skips exactly floor(q * n) tokens whatever the ties (the official training code's
`s <= sorted[floor(q n)]` skips one token more when the scores are distinct; docs/methods.md).

Real savings: kept tokens are gathered before q_proj / o_proj / attention and before the MLP, so compute
falls with the budget. Skipped tokens still run k_proj / v_proj and write K/V to the cache (the
"compute" K/V policy, the spec's recommended default), so later tokens can still attend to them. When
only some tokens keep a branch, `_packing_pays` chooses between running the kept tokens packed and
running the branch densely with a masked output (small decode batches, where a matmul over fewer rows
is no faster); `gateskip/packed` reports how often packing ran. Every FLOP is counted in the forward's
ledger, executed (what ran) and ideal (what the budget allows) separately.

Our extensions (not in the paper): `scope="sequence"` ranks within each sequence (batch-independent
outputs); `mode="threshold"` applies per-branch thresholds calibrated at budget q (`calibrate`), so
decoding with batch 1, where the quantile pool collapses, still skips; `protect_bos`; a low-rank gate.
Paper ablations: `skip_branches="attn"` / `"mlp"` (only one branch type skips, at twice the budget, as
the paper does), `skip_unit="layer"` (the MLP follows the attention gate's decision: whole-layer skipping,
the paper's pruning job), `shared=True` (one gate pair for all layers; thresholds stay per layer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from dyndepth.config import check_at_least, check_fields
from dyndepth.core.context import ForwardContext
from dyndepth.core.layers import apply_keeping_float32, linear_float32
from dyndepth.core.method import MethodOutput, ThresholdRecorder, check_knobs
from dyndepth.core.routing import (
    SelectRule,
    gather_flat,
    gather_padded,
    linear_ramp,
    pack,
    pack_indices,
    scatter_add,
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

BRANCHES = ("attn", "mlp")
WHOLE_SKIP_CHANCE = 0.01  # auto path: read a call's kept count when every pool token skips with at least this chance
STRUCTURAL = ("gate", "rank", "shared")  # fields that shape parameters: fixed once attached
MODES = ("quantile", "threshold")
PATHS = ("auto", "packed", "dense")


@dataclass
class GateSkipConfig:
    gate: str = "vector"  # vector (paper) | scalar | lowrank (ours)
    rank: int = 16  # lowrank gate width
    shared: bool = False  # one attention gate and one MLP gate for all layers (paper ablation)
    detach_input: bool = True  # the gate reads a detached copy of the branch input (official code)
    budget: float = 0.0  # q: fraction of pool tokens each branch skips (the default runtime knob)
    scope: str = "batch"  # ranking pool: "batch" (paper) | "sequence" (ours: batch-independent)
    mode: str = "quantile"  # quantile (paper: rank rule) | threshold (calibrated per branch; decoding)
    protect_bos: bool = False  # never skip position 0 (the spec's recommendation; off = paper)
    kv_policy: str = "compute"  # K/V of tokens skipping attention: "compute" (default) | "copy_prev" (experimental)
    skip_branches: str = "both"  # both | attn | mlp: which branch type skips (one type: at twice the budget)
    skip_unit: str = "branch"  # branch | layer: the MLP follows the attention gate's decision (whole layer)
    penalty: float = 1.0  # lambda on mean(g^2), averaged over branches (paper jobs use 1.0)
    init_bias: float = 5.0  # sigmoid(5) = 0.993: the fine-tune starts from the unmodified model
    init_std: float = 0.01
    ramp_start: float = 0.0  # training budget ramp (paper: 0 -> 0.2 over the whole run; start > end ramps down)
    ramp_end: float = 0.2
    ramp_steps: int = 0  # 0: the run's total steps
    path: str = "auto"  # auto | packed | dense: how a branch runs when only some tokens keep it
    pack_min_skipped: int = 16  # auto: pack only when at least this many tokens of the call skip (CPU-measured)
    pack_min_fraction: float = 0.2  # ... and at least this share of them (prefill at 15% skipped: packing lost 0-8%)

    def __post_init__(self) -> None:
        checks = (("gate", ("vector", "scalar", "lowrank")), ("scope", ("batch", "sequence")), ("mode", MODES),
                  ("kv_policy", ("compute", "copy_prev")), ("skip_branches", ("both", "attn", "mlp")),
                  ("skip_unit", ("branch", "layer")), ("path", PATHS))
        for name, allowed in checks:  # (before the type checks: `--set method.path=none` reads None)
            if getattr(self, name) not in allowed:
                raise ValueError(f"gateskip.{name}={getattr(self, name)!r} is not one of {allowed}.")
        check_fields(self, "gateskip", ValueError)
        for name in ("budget", "ramp_start", "ramp_end"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"gateskip.{name}={getattr(self, name)} must lie in [0, 1).")
        if self.skip_unit == "layer" and self.skip_branches != "both":
            raise ValueError("gateskip.skip_unit='layer' skips whole layers; it needs skip_branches='both'.")
        check_at_least(self, "gateskip", ("rank", "pack_min_skipped"), error=ValueError)
        check_at_least(self, "gateskip", ("ramp_steps", "penalty", "init_std"), low=0, error=ValueError)
        single_branch_budget(self.skip_branches, self.budget)  # (the ramp's: where training starts, GateSkipHook)
        if not 0.0 <= self.pack_min_fraction <= 1.0:
            raise ValueError(f"gateskip.pack_min_fraction={self.pack_min_fraction} must lie in [0, 1].")


def single_branch_budget(skip_branches: str, budget: float, name: str = "budget") -> None:
    """With one branch type skipping, the budget doubles (the paper's ablation at equal total skips): a budget of 0.5
    or more would skip that branch for every token, which the [0, 1) rule is there to prevent."""
    if skip_branches != "both" and budget >= 0.5:
        raise ValueError(f"gateskip {name}={budget} with skip_branches={skip_branches!r} skips that branch at twice "
                         "the budget, so every token would skip it; use a value below 0.5.")


class Gate(nn.Module):
    """sigmoid(W h + b) in float32: (..., D) -> (..., D) for vector, (..., 1) for scalar; low-rank W = proj @ down.

    Init: W ~ N(0, init_std), b = init_bias (the paper). The low-rank gate's `down` starts at N(0, 1/D) so
    down(h) has unit scale and `proj` (std init_std) gets a useful gradient from the first step; with both
    factors at std 0.01 the product and both gradients would start near zero."""

    def __init__(self, dim: int, cfg: GateSkipConfig) -> None:
        super().__init__()
        out = 1 if cfg.gate == "scalar" else dim
        self.down = nn.Linear(dim, cfg.rank, bias=False) if cfg.gate == "lowrank" else None
        self.proj = nn.Linear(cfg.rank if self.down is not None else dim, out)
        nn.init.normal_(self.proj.weight, std=cfg.init_std)
        nn.init.constant_(self.proj.bias, cfg.init_bias)
        if self.down is not None:
            nn.init.normal_(self.down.weight, std=dim ** -0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h if self.down is None else linear_float32(self.down, h)  # (..., r)
        return torch.sigmoid(linear_float32(self.proj, x))  # float32

    def flops_per_token(self) -> int:
        return sum(2 * m.in_features * m.out_features for m in (self.down, self.proj) if m is not None)


class BranchGates(nn.Module):
    """An attention gate and an MLP gate: `model.layers.{i}.gateskip.{attn,mlp}_gate.*`, or, with
    `shared=True`, one pair for the whole model at `model.gateskip.{attn,mlp}_gate.*`."""

    def __init__(self, dim: int, cfg: GateSkipConfig) -> None:
        super().__init__()
        self.attn_gate = Gate(dim, cfg)
        self.mlp_gate = Gate(dim, cfg)


class LayerGates(nn.Module):
    """What GateSkip adds to one layer: its gates (unless shared) and, always per layer and branch, the
    thresholds `tau` (attn, mlp; float32 whatever the model's dtype) calibrated for decoding at the budget
    `tau_budget_ppm` (parts per million; -1: not calibrated)."""

    def __init__(self, dim: int, cfg: GateSkipConfig) -> None:
        super().__init__()
        if not cfg.shared:
            self.attn_gate = Gate(dim, cfg)
            self.mlp_gate = Gate(dim, cfg)
        self.register_buffer("tau", torch.zeros(2))
        self.register_buffer("tau_budget_ppm", torch.full((), -1, dtype=torch.long))

    float32_buffers = ("tau",)
    _apply = apply_keeping_float32


@dataclass
class GateSkipState:
    """One forward's routing, read by `end`, the analysis tools (via `Trace`) and the tests."""

    pool: torch.Tensor  # (B, T) ranking pool: valid, not EOS, not a protected BOS
    always: torch.Tensor  # (B, T) valid tokens outside the pool: they run every branch
    valid: torch.Tensor  # (B, T) real tokens (PAD False)
    n_pool: int | torch.Tensor  # pool tokens and ...
    n_always: int | torch.Tensor  # ... valid tokens outside it (host numbers: the skip statistics need no tensor
    # work; 0-dim tensors in a `traced` forward)
    traced: bool = False  # a decode step torch.compile traces: no host reads (see `begin`, `_run_path`)
    keep: dict = field(default_factory=dict)  # (slot, branch) -> (B, T) bool over valid tokens | None (all ran)
    scores: dict = field(default_factory=dict)  # (slot, branch) -> importance s (B, T) float32
    gate_sq: list = field(default_factory=list)  # mean(g^2) per branch call (training forwards)
    calls: dict = field(default_factory=lambda: dict.fromkeys(BRANCHES, 0))  # routed branch calls
    packed: int = 0  # branch calls that ran packed ...
    masked: int = 0  # ... and densely with a masked output (partially kept, or not counted: see `_run_path`)
    prev_kv: dict = field(default_factory=dict)  # copy_prev: slot -> its K/V, for the next slot


class GateSkip:
    """The method (see the module docstring). Attach with `attach_gateskip`; runtime knobs: budget, mode, path."""

    name = "gateskip"

    def __init__(self, config: GateSkipConfig, eos_token_ids: list[int], shared: BranchGates | None) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.shared = shared
        self.recorder: ThresholdRecorder | None = None  # set while `calibrate` records thresholds
        self._model = None  # the model: its decoder's layers hold the thresholds, its generation_config may name the
        # EOS (see `bind`, `_eos_ids`)
        self._checked: tuple | None = None  # the budget and threshold buffers a forward last found calibrated
        self.configure(config)

    def configure(self, config: GateSkipConfig) -> None:
        """Adopt a new config (training options); runtime knobs reset to its values."""
        check_structural(self.name, getattr(self, "config", None), config, STRUCTURAL)
        self.config = config
        self.budget, self.mode, self.path = config.budget, config.mode, config.path  # runtime knobs

    def extra_slots(self, num_slots: int) -> int:
        return 0

    # ---- runtime knobs ----
    def knobs(self) -> dict:
        return {"budget": self.budget, "mode": self.mode, "path": self.path}

    def _check(self, knobs: dict) -> None:
        check_knobs(self.name, ("budget", "mode", "path"), knobs)
        if "budget" in knobs and not 0.0 <= knobs["budget"] < 1.0:
            raise ValueError(f"gateskip budget={knobs['budget']} must lie in [0, 1).")
        if "budget" in knobs:
            single_branch_budget(self.config.skip_branches, knobs["budget"])
        if knobs.get("mode", "quantile") not in MODES or knobs.get("path", "auto") not in PATHS:
            raise ValueError(f"gateskip mode must be one of {MODES} and path one of {PATHS}, got {knobs}.")
        budget, mode = knobs.get("budget", self.budget), knobs.get("mode", self.mode)
        if mode == "threshold" and budget > 0 and ("budget" in knobs or "mode" in knobs):
            self._check_calibrated(budget)

    def _check_calibrated(self, budget: float) -> None:
        """Threshold mode skips by the thresholds `calibrate` stored: they must be the budget's (they were used
        whatever the budget asked, so `mode=threshold, budget=0.5` skipped what a 0.3 calibration said)."""
        check_calibrated([g.tau_budget_ppm for g in self.layer_gates], budget, "budget",
                         f"threshold mode at budget {budget}", "GateSkip")

    def _check_calibrated_once(self) -> None:
        """Threshold mode set by the config (or any way around `override`, which checks): the first forward checks
        the calibration, and again only when the budget or a threshold buffer changes, so decoding reads no host
        value per step. Uncalibrated thresholds are 0: every token ran while the budget said otherwise."""
        key = (self.budget, *((id(g.tau_budget_ppm), g.tau_budget_ppm._version) for g in self.layer_gates))
        if key != self._checked:
            self._check_calibrated(self.budget)
            self._checked = key

    def override(self, **knobs):
        """Temporarily change runtime knobs: `with method.override(budget=0.3): model(ids)`."""
        return override_knobs(self, self._check, **knobs)

    def decoding(self, budget: float | None = None, **knobs):
        """Cached generation at `budget`: threshold mode with the thresholds `calibrate` stored for it (checked).
        Without a budget, the current knobs (a checkpoint's saved ones), checked the same way, as MoD's does."""
        if budget is None:
            return self.override(**{"budget": self.budget, "mode": self.mode, **knobs})
        knobs.setdefault("mode", "threshold" if isinstance(budget, (int, float)) and budget > 0 else "quantile")
        return self.override(budget=budget, **knobs)

    def recording(self, recorder: ThresholdRecorder):
        """While active, every branch records its importances and the budget's rank threshold."""
        return override_knobs(self, lambda knobs: None, recorder=recorder, mode="quantile")

    def set_thresholds(self, thresholds: dict, knobs: dict) -> None:
        budget = knobs.get("budget", self.budget)
        for slot, gates in enumerate(self.layer_gates):
            for b, branch in enumerate(BRANCHES):
                if (slot, branch) in thresholds:
                    gates.tau[b] = thresholds[(slot, branch)]
            gates.tau_budget_ppm.fill_(budget_ppm(budget))

    def trainer_hooks(self, total_steps: int) -> list:
        return [GateSkipHook(self, total_steps)]

    def lookahead(self) -> str:
        if self.mode == "threshold" or self.budget == 0:
            return ""
        pool = "the whole batch's tokens" if self.config.scope == "batch" else "each row's tokens"
        return (f"GateSkip's quantile mode ranks {pool}, later ones included (mode=threshold, with thresholds from "
                "`dyndepth calibrate`, decides each token alone)")

    def untrained_parameters(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        return method_dict(self.name, self.config)

    # ---- per forward ----
    def begin(self, input_ids: torch.Tensor, ctx: ForwardContext) -> GateSkipState:
        if self.mode == "threshold" and self.budget > 0 and not torch.compiler.is_compiling():
            self._check_calibrated_once()
        valid = ctx.valid_or_all
        pool = valid.clone()
        eos_ids = self._eos_ids()
        if eos_ids:  # EOS is never skipped nor counted (official code)
            pool &= ~torch.isin(input_ids, torch.tensor(eos_ids, device=input_ids.device))
        if self.config.protect_bos:
            pool &= ctx.positions != 0
        if self.config.kv_policy == "copy_prev":
            ctx.kv_hook = functools.partial(self._copy_prev_kv, ctx)
        always = valid & ~pool
        if ctx.traced_decode:  # counts stay on the device (one graph, no host sync)
            return GateSkipState(pool=pool, always=always, valid=valid, n_pool=pool.sum(), n_always=always.sum(),
                                 traced=True)
        return GateSkipState(pool=pool, always=always, valid=valid, n_pool=int(pool.sum()), n_always=int(always.sum()))

    def end(self, ctx: ForwardContext) -> MethodOutput:
        st: GateSkipState = ctx.state
        out = MethodOutput()
        if st.gate_sq:  # training forwards: the L2 gate penalty, averaged over branches
            penalty = torch.stack(st.gate_sq).mean()
            out.stats["gateskip/gate_sq"] = penalty.detach()
            if self.config.penalty:
                out.losses.append(self.config.penalty * penalty)
        if not ctx.ledger.enabled:  # `generate` (core.accounting): nobody reads a decode step's statistics
            return out
        for branch in BRANCHES:  # the paper's metric: fraction of skipped (token, branch) pairs of the pool
            pairs = (st.n_pool.clamp(min=1) if st.traced else max(st.n_pool, 1)) * max(st.calls[branch], 1)
            out.stats[f"gateskip/{branch}_skipped"] = self._skipped(st, branch) / pairs
        if st.packed + st.masked:
            out.stats["gateskip/packed"] = st.packed / (st.packed + st.masked)
        return out

    @staticmethod
    def _skipped(st: GateSkipState, branch: str):
        """Pool tokens that skipped `branch` over the forward's calls, from the KEEP masks once per forward: a
        0-dim tensor (no host sync: a decode step reads no count it does not need), or 0."""
        masks = [keep for (_, b), keep in st.keep.items() if b == branch and keep is not None]
        if not masks:
            return 0
        return len(masks) * (st.n_pool + st.n_always) - torch.stack(masks).sum()  # kept: valid tokens only

    # ---- per layer ----
    def layer_forward(self, layer, x: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        gates = self.shared if self.shared is not None else layer.gateskip
        h = layer.input_layernorm(x)  # (B, T, D)
        g, keep = self._route(gates.attn_gate, h, ctx, slot, "attn", layer.gateskip.tau[0])
        x = self._attn(layer, x, h, g, keep, ctx, slot)
        h = layer.post_attention_layernorm(x)
        tied = ctx.state.keep[(slot, "attn")] if self.config.skip_unit == "layer" else None
        g, keep = self._route(gates.mlp_gate, h, ctx, slot, "mlp", layer.gateskip.tau[1], tied)
        return self._mlp(layer, x, h, g, keep, ctx, slot)

    def _route(self, gate: Gate, h: torch.Tensor, ctx: ForwardContext, slot: int, branch: str,
               tau: torch.Tensor, tied: torch.Tensor | None = None):
        """Gate values g (B, T, D | 1) float32 and the KEEP mask (B, T) | None (None: every token runs)."""
        st: GateSkipState = ctx.state
        g = gate(h.detach() if self.config.detach_input else h)  # (B, T, D | 1) float32
        B, T = h.shape[:2]
        per_token = gate.flops_per_token()
        ctx.ledger.add(slot, "gate", executed=B * T * per_token, ideal=(st.n_pool + st.n_always) * per_token)
        if ctx.training:  # over real tokens: a padded batch's padding (data.packing="documents") has no gate to train
            sq_BT = g.pow(2).mean(-1)  # (B, T)
            st.gate_sq.append(sq_BT.mean() if ctx.valid is None else
                              (sq_BT * st.valid).sum() / max(1, st.n_pool + st.n_always))
        s_BT = g.detach().mean(-1)  # (B, T) importance, float32
        st.scores[(slot, branch)] = s_BT
        q = self._branch_budget(branch)
        if self.recorder is not None and q > 0:
            self.recorder.record((slot, branch), s_BT, st.pool, q)
        if tied is not None:
            keep = tied
        elif q <= 0:
            keep = None
        elif self.mode == "threshold":
            keep = s_BT > tau  # pool: by threshold; EOS runs; PAD does not
            if st.traced or st.n_pool != keep.numel():
                keep = torch.where(st.pool, keep, st.valid)
        else:
            rule = SelectRule(kind="quantile", scope=self.config.scope, q=q, pad_policy="drop")
            keep = select(s_BT, st.pool, rule) | st.always
        st.keep[(slot, branch)] = keep
        st.calls[branch] += 1
        return g, keep

    def _branch_budget(self, branch: str) -> float:
        """The budget this branch type skips at: q, or 2q when only this branch type skips (q < 0.5 then)."""
        only = self.config.skip_branches
        if only == "both":
            return self.budget
        return 2 * self.budget if only == branch else 0.0

    def _run_path(self, keep: torch.Tensor, st: GateSkipState, branch: str) -> str:
        """"all" (every token keeps), "none", "packed" or "dense" (masked output) for a KEEP mask.

        Under `path="auto"` a call reads its kept count (one host sync) only when the count can change the path:
        when the budget's expected skips (PAD included) could make packing pay, or when every pool token may skip at
        once (chance q^n_pool >= `WHOLE_SKIP_CHANCE`: batch-1 and small-batch decoding, where skipping the branch
        outright is the saving). Otherwise (a batched decode step of 8 rows at q <= 0.5, say) it runs densely with
        a masked output and makes no sync, which a GPU's launch queue would pay for. A forward torch.compile
        traces as a decode step (`st.traced`: one token per row with a cache, CUDA graphs on a GPU) never reads a
        count under "auto" or "dense": it runs every partially kept branch densely with a masked output, one graph
        whatever the gates decide (a whole skip computes the branch and adds nothing; the output is the same).
        `path="packed"` needs the count, so such a step breaks the graph there. The path counts behind
        `gateskip/packed` are Python-side: in a compiled step they are taken while dynamo traces it, not on each replay.
        """
        n = keep.numel()
        if (st.traced and self.path != "packed") or \
                (self.path == "auto" and not self._worth_counting(n, st, self._branch_budget(branch))):
            st.masked += 1
            return "dense"
        n_keep = int(keep.sum())  # one host sync per branch call
        if n_keep == n:
            return "all"
        if n_keep == 0:
            return "none"
        path = self.path if self.path != "auto" else ("packed" if self._packing_pays(n - n_keep, n) else "dense")
        st.packed += path == "packed"
        st.masked += path == "dense"
        return path

    def _worth_counting(self, n: int, st: GateSkipState, q: float) -> bool:
        """Whether a call of n tokens at branch budget q could run other than dense-masked (see `_run_path`)."""
        outside = n - st.n_pool - st.n_always  # PAD: never runs
        if self._packing_pays(outside + q * st.n_pool, n):
            return True
        # a whole skip: by thresholds, each token on its own; by quantile, exactly floor(q n) < n skip: never
        return self.mode == "threshold" and st.n_always == 0 and q ** st.n_pool >= WHOLE_SKIP_CHANCE

    def _packing_pays(self, skipped: float, n: int) -> bool:
        """The cost rule (measured; docs/methods.md): a matmul over fewer rows is faster only once enough rows
        are dropped to beat the gather / scatter of packing, in count (small decode batches are weight-bound) and
        in share (a long prefill with few tokens skipped gains less than packing costs); below that, run densely
        and mask the output."""
        return skipped >= self.config.pack_min_skipped and skipped >= self.config.pack_min_fraction * n

    @staticmethod
    def _masked(g: torch.Tensor, keep: torch.Tensor | None, path: str) -> torch.Tensor:
        """The gate values a densely run branch's output is scaled by: zero for the tokens that skip it."""
        return g if path == "all" else g * keep[..., None]

    def _attn(self, layer, x, h, g, keep, ctx: ForwardContext, slot: int) -> torch.Tensor:
        path = "all" if keep is None else self._run_path(keep, ctx.state, "attn")
        if path in ("all", "dense"):  # x + g * attn(h), one fused op (decode steps are launch-bound)
            y = layer.attn_branch(h, ctx, slot, ideal_q_BT=keep if path == "dense" else None)
            return torch.addcmul(x, self._masked(g, keep, path).to(x.dtype), y)
        idx_BK, valid_BK = pack_indices(keep)  # (B, K): K = 0 when no token keeps (K/V still written)
        y_BKD = layer.attn_branch(h, ctx, slot, q_idx_BK=idx_BK, q_valid_BK=valid_BK)
        if path == "none":
            return x
        return scatter_padded_add(x, gather_padded(g, idx_BK).to(x.dtype) * y_BKD, idx_BK, valid_BK)

    def _mlp(self, layer, x, h, g, keep, ctx: ForwardContext, slot: int) -> torch.Tensor:
        path = "all" if keep is None else self._run_path(keep, ctx.state, "mlp")
        if path == "none":
            return x
        if path in ("all", "dense"):
            return torch.addcmul(x, self._masked(g, keep, path).to(x.dtype), layer.mlp_branch(h, ctx, slot, valid=keep))
        h_ND, idx_N = pack(h, keep)  # (N, D)
        y_ND = layer.mlp_branch(h_ND, ctx, slot, valid=torch.ones(idx_N.shape, dtype=torch.bool, device=x.device))
        return scatter_add(x, gather_flat(g, idx_N).to(x.dtype) * y_ND, idx_N)

    @staticmethod
    def _copy_prev_kv(ctx: ForwardContext, slot: int, k: torch.Tensor, v: torch.Tensor):
        """kv_policy="copy_prev" (experimental; the paper's stated behaviour, fragile in its code): a token
        that skips attention at layer l takes the K/V it had at layer l - 1 instead of projecting its
        unchanged residual with layer l's weights. Layer 0 keeps its own. No compute is saved by this.

        Keyed by slot, so activation checkpointing, which recomputes the layers last to first, gives each layer what
        its forward call read (one "previous K/V" made layer 0's recomputation copy layer L-1's). Without autograd
        an entry is dropped once read."""
        st: GateSkipState = ctx.state
        keep = st.keep.get((slot, "attn"))
        prev = st.prev_kv.get(slot - 1) if torch.is_grad_enabled() else st.prev_kv.pop(slot - 1, None)
        if keep is not None and prev is not None:
            copy = ~keep[..., None, None]  # (B, T, 1, 1)
            k, v = torch.where(copy, prev[0], k), torch.where(copy, prev[1], v)
        st.prev_kv[slot] = (k, v)
        return k, v

    def bind(self, model) -> None:
        """Remember the model: its decoder's layers hold the thresholds (set by `attach_gateskip`)."""
        self._model = model

    def _eos_ids(self) -> list[int]:
        """config.json's EOS ids, else generation_config.json's: a model trained from scratch names its tokenizer's
        EOS there only (train/run.py `_default_stops`), so its EOS tokens were ranked and skipped. Read at each
        forward: from_pretrained sets generation_config after attaching the checkpoint's method."""
        if self.eos_token_ids:
            return self.eos_token_ids
        eos = (getattr(self._model, "generation_config", None) or {}).get("eos_token_id")
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @property
    def layer_gates(self) -> list[LayerGates]:
        """Each layer's LayerGates (thresholds; gates unless shared), in layer order."""
        return [layer.gateskip for layer in self._model.model.layers]


def attach_gateskip(model, cfg: GateSkipConfig | dict | None = None) -> GateSkip:
    """Add gates to every layer of `model` (a decoder with `attn_branch` / `mlp_branch` layers) and make
    every layer call go through GateSkip."""
    cfg = make_config(GateSkipConfig, cfg)
    layers = check_attachable(model, "gateskip")
    ref = model.model.embed_tokens.weight  # (the lm_head may be a QuantLinear, which has no .weight)
    D = model.config.hidden_size
    shared = None
    if cfg.shared:  # at the model level, so FSDP2 keeps it in the root unit every layer call can read
        model.model.gateskip = shared = BranchGates(D, cfg).to(device=ref.device, dtype=ref.dtype)
    for layer in layers:
        layer.gateskip = LayerGates(D, cfg).to(device=ref.device, dtype=ref.dtype)
    method = GateSkip(cfg, model.config.eos_token_ids, shared)
    method.bind(model)
    model.method = method
    return method


class GateSkipHook:
    """Trainer hook: ramps the skip budget linearly from `ramp_start` (the first step) to `ramp_end` (step
    `ramp_steps`; 0: the run's last step) and holds it there (a one-step ramp trains at `ramp_end`). The budget is
    the method's runtime knob; the attached config is left as it was."""

    name = "gateskip"  # logged metrics are prefixed with it: gateskip/budget, the budget the logged step trained at

    def __init__(self, method: GateSkip, total_steps: int) -> None:
        if method.config.mode != "quantile":
            raise ValueError("gateskip mode='threshold' decodes with thresholds calibrated at one budget, and training "
                             "ramps the budget: train with mode='quantile' (the paper's rank rule), then calibrate "
                             "for decoding (dyndepth calibrate).")
        for name in ("ramp_start", "ramp_end"):  # (checked for training only: a checkpoint decodes at any budget)
            single_branch_budget(method.config.skip_branches, getattr(method.config, name), name)
        self.method = method
        self.span = (method.config.ramp_steps or total_steps) - 1  # steps from the first budget to the last
        self.origin = (0, method.config.ramp_start)  # (steps done, budget of the next step) the ramp starts from
        self.done = 0
        self.calibration_dropped = False  # (after the first step: see after_step)
        self.method.budget = self._ramp(0)

    def _ramp(self, done: int) -> float:
        """The budget of the step after `done` steps: linear from `origin` to `ramp_end` at the span's end."""
        (s0, b0), end = self.origin, self.method.config.ramp_end
        return linear_ramp(done - s0, b0, end, self.span - s0)

    def after_step(self, model, step: int, stats: dict, dist) -> dict:
        """Logs the budget step `step` (1-based) trained at, then sets the next step's."""
        ran, self.done = self.method.budget, step
        if not self.calibration_dropped:  # the step moved the gates: decoding thresholds fitted before it are stale
            drop_calibration([g.tau_budget_ppm for g in self.method.layer_gates], "budget", "GateSkip",
                             getattr(dist, "is_main", True))
            self.calibration_dropped = True
        if self.origin is None:  # resumed from a state without its step: continue from here
            self.origin = (step - 1, ran)
        self.method.budget = self._ramp(step)
        return {"budget": ran}

    def state_dict(self) -> dict:
        return {"budget": self.method.budget, "step": self.done, "span": self.span}

    def load_state_dict(self, state: dict) -> None:
        """A resumed run ramps on from where it was to `ramp_end` at this run's last ramp step: on the same line
        (bit for bit) when the run is unchanged, and never back when it was extended."""
        self.method.budget, self.done = state["budget"], state.get("step", 0)
        if state.get("span") != self.span:  # extended or shortened (or saved before the span was): rebase
            self.origin = (self.done, state["budget"]) if "step" in state else None
