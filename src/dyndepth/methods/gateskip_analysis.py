"""GateSkip analysis: where the gates put importance, what gets skipped, and whether position 0 (BOS) acts
as an anchor (spec section 4.5: the learned gates give BOS high importance, so it is almost never skipped).

Shape legend: B batch, T tokens, D hidden_size, L layers, P positions, Q quantile levels.

Importance is the GateSkip token score s = mean_d g (B, T); importances and skip decisions come from the
method's own per-forward state (`GateSkipState.scores` / `.keep`), read after an ordinary model forward
with a `Trace` (`trace_forward`), so the analysis runs exactly the forward the model runs.

Counting: importance statistics cover valid (non-PAD) tokens; skip fractions are over the ranking pool
(valid, not EOS, not protected BOS), as GateSkip's own `gateskip/{branch}_skipped` stats are.
The plotting helpers import matplotlib lazily and draw on a `Figure` (Agg), never touching pyplot state.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dyndepth.core.batch import split_batch
from dyndepth.methods.gateskip import BRANCHES, GateSkip, GateSkipState
from dyndepth.models.qwen3 import Trace

QUANTILE_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class ForwardTrace:
    """One traced forward. importance / keep are keyed by (slot, branch); keep None means nothing skipped."""

    valid: torch.Tensor  # (B, T) bool, False for PAD
    positions: torch.Tensor  # (B, T)
    pool: torch.Tensor | None = None  # (B, T) GateSkip ranking pool; None without GateSkip
    importance: dict = field(default_factory=dict)  # (slot, branch) -> s (B, T) float32
    keep: dict = field(default_factory=dict)  # (slot, branch) -> keep (B, T) bool | None
    streams: list = field(default_factory=list)  # residual stream before layer 0, after each layer: (B, T, D)


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode and no_grad for the block; the previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@torch.no_grad()
def trace_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  streams: bool = False) -> ForwardTrace:
    """One model forward with a `Trace`: gate importances and skip masks (GateSkip) and, with `streams=True`,
    the residual stream around every layer."""
    trace = Trace(keep_streams=streams)
    model(input_ids, attention_mask=attention_mask, trace=trace)
    ctx = trace.ctx
    out = ForwardTrace(valid=ctx.valid_or_all, positions=ctx.positions, streams=trace.streams)
    if isinstance(model.method, GateSkip):
        state: GateSkipState = ctx.state
        out.pool, out.importance, out.keep = state.pool, dict(state.scores), dict(state.keep)
    return out


def _require_gateskip(model) -> GateSkip:
    method = model.method
    if isinstance(method, GateSkip):
        return method
    raise ValueError("this analysis needs a GateSkip model: call dyndepth.methods.attach_gateskip(model) "
                     f"first (model.method is {type(method).__name__}).")


def _budget(method: GateSkip, budget: float | None):
    return contextlib.nullcontext() if budget is None else method.override(budget=budget)


# ----------------------------------------------------------------------------------------- statistics

@dataclass
class GateStats:
    """Per layer and branch (index 0 attn, 1 mlp) statistics of the token importance s = mean_d g."""

    budget: float
    quantile_levels: tuple[float, ...]
    mean: torch.Tensor  # (L, 2) over valid tokens
    std: torch.Tensor  # (L, 2)
    quantiles: torch.Tensor  # (L, 2, Q)
    skipped: torch.Tensor  # (L, 2) fraction of pool tokens skipped
    position_mean: torch.Tensor  # (L, 2, P) mean importance at each position (0 where no token)
    position_count: torch.Tensor  # (P,) valid tokens seen at each position
    pos0_skipped: torch.Tensor  # (L, 2) fraction of position-0 tokens skipped
    pos0_percentile: torch.Tensor  # (L, 2) mean over rows: share of the row's other tokens below position 0
    num_tokens: int

    def summary(self) -> dict:
        """Plain floats per `layer{i}/{branch}/...` for logs and JSON."""
        out = {}
        for i in range(self.mean.shape[0]):
            for b, branch in enumerate(BRANCHES):
                key = f"layer{i}/{branch}"
                out[f"{key}/mean"] = float(self.mean[i, b])
                out[f"{key}/std"] = float(self.std[i, b])
                out[f"{key}/skipped"] = float(self.skipped[i, b])
        return out


def _pos0_rows(valid_BT: torch.Tensor, pos_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Position-0 tokens (B, T), the other valid tokens (B, T), and rows holding both (B,)."""
    first_BT = valid_BT & (pos_BT == 0)
    others_BT = valid_BT & ~first_BT
    return first_BT, others_BT, first_BT.any(1) & others_BT.any(1)


def _pos0_percentile(s_BT: torch.Tensor, valid_BT: torch.Tensor, pos_BT: torch.Tensor) -> float:
    """Sum over rows of the share of the row's other valid tokens with lower importance than position 0."""
    first_BT, others_BT, rows_B = _pos0_rows(valid_BT, pos_BT)
    s0_B = (s_BT * first_BT).sum(1) / first_BT.sum(1).clamp(min=1)  # (B,)
    below_B = ((s_BT < s0_B[:, None]) & others_BT).sum(1) / others_BT.sum(1).clamp(min=1)  # (B,)
    return float(below_B[rows_B].sum())


def quantiles(values: torch.Tensor, levels: tuple[float, ...]) -> torch.Tensor:
    """torch.quantile's linear interpolation of `values` (N,) at `levels`, (Q,), for any N: torch.quantile refuses
    more than 2**24 values ("input tensor is too large"), which stopped statistics over ~17M tokens at the end."""
    sorted_N = values.sort().values
    pos_Q = torch.tensor(levels, dtype=torch.float64) * (len(sorted_N) - 1)
    lo_Q, hi_Q = pos_Q.floor().long(), pos_Q.ceil().long()
    frac_Q = (pos_Q - lo_Q).to(sorted_N.dtype)
    return torch.lerp(sorted_N[lo_Q], sorted_N[hi_Q], frac_Q)


class _StatsAccumulator:
    """Running sums over traced forwards, turned into a GateStats by `finish`."""

    def __init__(self, num_layers: int) -> None:
        L = num_layers
        self.values: dict[int, list] = {k: [] for k in range(2 * L)}  # 2 * slot + branch -> s of valid tokens
        self.skipped, self.pool_n = torch.zeros(L, 2), torch.zeros(L, 2)
        self.pos0_skipped, self.pos0_n = torch.zeros(L, 2), 0
        self.pct_sum, self.pct_rows = torch.zeros(L, 2), 0
        self.pos_sums: list[torch.Tensor] = []  # per batch (L, 2, P_batch)
        self.pos_counts: list[torch.Tensor] = []  # per batch (P_batch,)

    def add(self, tr: ForwardTrace) -> None:
        L = self.skipped.shape[0]
        pos_V = tr.positions[tr.valid].cpu()  # (V,) positions of the valid tokens
        P = int(pos_V.max()) + 1 if pos_V.numel() else 1
        sums = torch.zeros(L, 2, P)
        first_BT = tr.valid & (tr.positions == 0)
        for (slot, branch), s_BT in tr.importance.items():
            b = BRANCHES.index(branch)
            s_V = s_BT[tr.valid].cpu()
            self.values[2 * slot + b].append(s_V)
            sums[slot, b].index_add_(0, pos_V, s_V)
            keep = tr.keep[(slot, branch)]
            skip_BT = torch.zeros_like(tr.valid) if keep is None else ~keep & tr.valid
            self.skipped[slot, b] += float((skip_BT & tr.pool).sum())
            self.pool_n[slot, b] += float(tr.pool.sum())
            self.pos0_skipped[slot, b] += float((skip_BT & first_BT).sum())
            self.pct_sum[slot, b] += _pos0_percentile(s_BT, tr.valid, tr.positions)
        self.pos0_n += int(first_BT.sum())
        self.pct_rows += int(_pos0_rows(tr.valid, tr.positions)[2].sum())
        self.pos_sums.append(sums)
        self.pos_counts.append(torch.bincount(pos_V, minlength=P).float())

    def finish(self, budget: float, levels: tuple[float, ...]) -> GateStats:
        L = self.skipped.shape[0]
        P = max(c.shape[0] for c in self.pos_counts)
        pos_sum = sum(F.pad(s, (0, P - s.shape[-1])) for s in self.pos_sums)  # (L, 2, P)
        pos_count = sum(F.pad(c, (0, P - c.shape[0])) for c in self.pos_counts)  # (P,)
        flat = [torch.cat(self.values[k]) for k in range(2 * L)]
        return GateStats(
            budget=budget, quantile_levels=tuple(levels),
            mean=torch.stack([v.mean() for v in flat]).view(L, 2),
            std=torch.stack([v.std(unbiased=False) for v in flat]).view(L, 2),
            quantiles=torch.stack([quantiles(v, levels) for v in flat]).view(L, 2, -1),
            skipped=self.skipped / self.pool_n.clamp(min=1),
            position_mean=pos_sum / pos_count.clamp(min=1),
            position_count=pos_count,
            pos0_skipped=self.pos0_skipped / max(self.pos0_n, 1),
            pos0_percentile=self.pct_sum / max(self.pct_rows, 1),
            num_tokens=int(flat[0].numel()),
        )


@torch.no_grad()
def collect_gate_stats(model, batches, budget: float | None = None,
                       quantile_levels: tuple[float, ...] = QUANTILE_LEVELS) -> GateStats:
    """Gate statistics over `batches` (any form `core.batch.split_batch` takes) at the method's
    current budget, or at `budget` when given."""
    method = _require_gateskip(model)
    acc = _StatsAccumulator(model.config.num_hidden_layers)
    with eval_mode(model), _budget(method, budget):
        for batch in batches:
            acc.add(trace_forward(model, *split_batch(batch)))
    if not acc.pos_counts:
        raise ValueError("collect_gate_stats got no batches; pass a list of token id tensors (B, T).")
    if any(not v for v in acc.values.values()):
        raise ValueError("collect_gate_stats saw no valid tokens; check the attention masks.")
    return acc.finish(method.budget if budget is None else budget, quantile_levels)


# ----------------------------------------------------------------------------------------- BOS anchors

@dataclass
class BosReport:
    """Does position 0 get systematically higher importance than the rest? Numbers only; (L, 2) tensors."""

    budget: float
    protect_bos: bool  # True: position 0 is outside the pool, so "never skipped" holds by construction
    pos0_importance: torch.Tensor  # (L, 2) mean importance at position 0
    rest_importance: torch.Tensor  # (L, 2) mean importance at positions >= 1
    pos0_percentile: torch.Tensor  # (L, 2) share of a row's other tokens with lower importance (1.0: top)
    pos0_skipped: torch.Tensor  # (L, 2) fraction of position-0 tokens skipped
    mean_pos0: float
    mean_rest: float
    branches_never_skipped: float  # fraction of (layer, branch) pairs that never skipped position 0
    layers_never_skipped: float  # fraction of layers where neither branch ever skipped position 0

    def summary(self) -> dict:
        return {"budget": self.budget, "protect_bos": self.protect_bos, "mean_pos0": self.mean_pos0,
                "mean_rest": self.mean_rest, "pos0_percentile": float(self.pos0_percentile.mean()),
                "branches_never_skipped": self.branches_never_skipped,
                "layers_never_skipped": self.layers_never_skipped}


def bos_anchor_report(model, batches, budget: float | None = None) -> BosReport:
    """Position 0's importance against the other tokens', and how often each branch skips it."""
    stats = collect_gate_stats(model, batches, budget)
    count_P = stats.position_count
    if count_P.numel() < 2 or count_P[0] == 0:
        raise ValueError("bos_anchor_report needs rows with a position-0 token and at least one more token.")
    rest = (stats.position_mean[..., 1:] * count_P[1:]).sum(-1) / count_P[1:].sum()  # (L, 2)
    never = stats.pos0_skipped == 0  # (L, 2)
    return BosReport(
        budget=stats.budget, protect_bos=_require_gateskip(model).config.protect_bos,
        pos0_importance=stats.position_mean[..., 0], rest_importance=rest,
        pos0_percentile=stats.pos0_percentile, pos0_skipped=stats.pos0_skipped,
        mean_pos0=float(stats.position_mean[..., 0].mean()), mean_rest=float(rest.mean()),
        branches_never_skipped=float(never.float().mean()),
        layers_never_skipped=float(never.all(-1).float().mean()),
    )


# ----------------------------------------------------------------------------------------- per token

def token_trace(model, tokenizer, text: str, add_bos: bool, budget: float | None):
    """Token strings, skipped (T, L, 2) bool and importance (T, L, 2) for one text."""
    method = _require_gateskip(model)
    ids = tokenizer.encode(text, add_bos=add_bos)
    if not ids:
        raise ValueError("the text encodes to no tokens; pass a non-empty text.")
    device = model.model.embed_tokens.weight.device
    with eval_mode(model), _budget(method, budget):
        tr = trace_forward(model, torch.tensor([ids], device=device))
    L, T = model.config.num_hidden_layers, len(ids)
    skipped, importance = torch.zeros(T, L, 2, dtype=torch.bool), torch.zeros(T, L, 2)
    for (slot, branch), s_BT in tr.importance.items():
        b = BRANCHES.index(branch)
        importance[:, slot, b] = s_BT[0].cpu()
        keep = tr.keep[(slot, branch)]
        if keep is not None:
            skipped[:, slot, b] = ~keep[0].cpu()
    tokens = [tokenizer.decode([i], skip_special=False) for i in ids]
    return tokens, skipped, importance


def skipped_tokens(model, tokenizer, text: str, add_bos: bool = True,
                   budget: float | None = None) -> list[tuple[str, torch.Tensor]]:
    """[(token string, skipped (L, 2) bool)] for every token of `text`: True where the layer's branch
    (0 attn, 1 mlp) skipped the token at the current budget (or `budget`)."""
    tokens, skipped, _ = token_trace(model, tokenizer, text, add_bos, budget)
    return list(zip(tokens, skipped.unbind(0)))
