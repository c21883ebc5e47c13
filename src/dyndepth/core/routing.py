"""Token routing shared by every method: choose tokens (`select`), move them (`pack` / `scatter_add`,
`pack_padded` / `scatter_padded_add`), calibrate thresholds (`rank_threshold`), and budget schedules.
What ran is counted by `core/accounting.py`.

Shape legend: B batch, T tokens, D hidden_size, N kept tokens of the whole batch (flat), K kept tokens
per row (padded to the longest row, or to a static size).

Conventions
- `select` returns a KEEP mask (B, T) bool: True means the token runs the branch.
- `valid` (B, T) marks the ranking pool; False is PAD (GateSkip also passes EOS as False). Tokens outside
  the pool are never ranked and never use budget. `SelectRule.pad_policy` says what happens to them:
  "drop": never kept (Mixture-of-Depths, top-k capacity: PAD is never selected);
  "keep": always kept.
- Ties. Top-k: ties go to the earlier token (stable sort). Quantile: the rule skips exactly floor(q * n)
  pool tokens, the lowest scores; among equal scores the later token is skipped first. So a budget is met
  exactly even when every score is the same (fresh GateSkip gates in bfloat16), and the result never
  depends on float noise. Scores must be finite; rank them in float32.
- To protect a token (e.g. BOS), the caller forces its score: a large finite value for top-k; for the
  quantile rule, exclude it from `valid` with "keep".
- Host syncs: `select` never syncs. `pack` syncs (`nonzero`) unless `size` is given; `pack_padded` syncs
  (longest row) unless `size` is given. With a static size, tokens beyond it are silently dropped: pick a
  size no smaller than the possible count (a static top-k guarantees <= k per row).
- Indices are sorted ascending by construction (flat b*T + t for `pack`, column t for `pack_padded`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RULE_KINDS = ("topk", "quantile", "threshold")
SCOPES = ("sequence", "batch")
PAD_POLICIES = ("drop", "keep")


@dataclass
class SelectRule:
    """How `select` chooses tokens from scores (higher score = more important).

    kind "topk": keep k = ceil(fraction * n) tokens with the highest scores, n = pool size of the scope
      (a row for scope "sequence", the whole batch for "batch"). `static_k=True` uses n = T (or B*T) so k
      is a Python int and shapes never depend on data; rows with fewer pool tokens keep fewer.
    kind "quantile" (GateSkip): skip the floor(q * n) lowest-scoring pool tokens (ties: the later token first;
      the official training code's `s <= sorted[floor(q n)]` skips one more when the scores are distinct).
      q == 0, or a pool of <= 1 token when q < 1, skips nothing.
    kind "threshold": keep pool tokens with score > threshold (scope does not matter).
    """

    kind: str = "topk"
    scope: str = "sequence"
    fraction: float = 1.0  # topk: fraction of pool tokens to KEEP (capacity)
    q: float = 0.0  # quantile: fraction of pool tokens to SKIP
    threshold: float = 0.0  # threshold: keep if score > threshold
    pad_policy: str = "drop"  # tokens outside `valid`: "drop" (never kept) or "keep" (always kept)
    static_k: bool = False  # topk: k = ceil(fraction * T) per row (ceil(fraction * B * T) for batch scope)

    def __post_init__(self) -> None:
        for name, value, allowed in (("kind", self.kind, RULE_KINDS), ("scope", self.scope, SCOPES),
                                     ("pad_policy", self.pad_policy, PAD_POLICIES)):
            if value not in allowed:
                raise ValueError(f"SelectRule.{name}={value!r} is not supported; use one of {allowed}.")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"SelectRule.fraction={self.fraction} must lie in [0, 1] (fraction of tokens kept).")
        if not 0.0 <= self.q <= 1.0:
            raise ValueError(f"SelectRule.q={self.q} must lie in [0, 1] (fraction of tokens skipped).")


def capacity(fraction: float, n: int) -> int:
    """k = ceil(fraction * n), with a 1e-6 tolerance so float error never adds a token (0.7 * 10 -> 7)."""
    return max(0, math.ceil(fraction * n - 1e-6))


def _topk_keep(scores_RT: torch.Tensor, pool_RT: torch.Tensor, fraction: float,
               static_k: bool) -> torch.Tensor:
    """Rows R are independent pools; keep the k highest-scoring pool tokens of each row."""
    R, T = scores_RT.shape
    masked_RT = scores_RT.masked_fill(~pool_RT, float("-inf"))
    order_RT = torch.argsort(masked_RT, dim=1, descending=True, stable=True)  # ties: earlier token first
    ranks_RT = torch.arange(T, device=scores_RT.device).expand(R, T)
    rank_RT = torch.empty_like(order_RT).scatter_(1, order_RT, ranks_RT)  # rank of each token in its row
    if static_k:
        k = capacity(fraction, T)
        return (rank_RT < k) & pool_RT
    n_R1 = pool_RT.sum(1, keepdim=True).double()  # (R, 1)
    k_R1 = (fraction * n_R1 - 1e-6).ceil().clamp(min=0)  # same rule as `capacity`, on tensors
    return (rank_RT < k_R1) & pool_RT


def _rows(t_BT: torch.Tensor, scope: str) -> torch.Tensor:
    return t_BT.reshape(1, -1) if scope == "batch" else t_BT  # (R, T'): one row per ranking pool


def _skip_ranks(scores_RT: torch.Tensor, pool_RT: torch.Tensor) -> torch.Tensor:
    """Rank of every token in its row's pool by ascending score, ties: later token first (R, T).
    Tokens outside the pool rank after every pool token."""
    R, T = scores_RT.shape
    masked_RT = scores_RT.float().masked_fill(~pool_RT, float("inf")).flip(1)  # flipped: ties -> later first
    order_RT = torch.argsort(masked_RT, dim=1, stable=True)  # ascending
    ranks_RT = torch.arange(T, device=scores_RT.device).expand(R, T)
    return torch.empty_like(order_RT).scatter_(1, order_RT, ranks_RT).flip(1)


def _skip_count(pool_RT: torch.Tensor, q: float) -> torch.Tensor:
    """floor(q * n) per pool (R, 1), with a 1e-9 tolerance so float error never drops a token."""
    return torch.floor(q * pool_RT.sum(1, keepdim=True).double() + 1e-9)


def rank_threshold(scores_BT: torch.Tensor, valid_BT: torch.Tensor | None, q: float,
                   scope: str = "batch") -> torch.Tensor:
    """The score threshold that separates the floor(q * n) lowest pool scores from the rest, per pool:
    (B, 1) for scope "sequence", (1, 1) for "batch". It is the midpoint of the highest skipped and the lowest
    kept score (or the skipped one, when no float32 lies strictly between them), so `keep = score > tau` on
    the same scores skips exactly those tokens (when they are distinct); -inf when nothing is skipped. Used to
    calibrate thresholds for decoding."""
    pool_BT = torch.ones_like(scores_BT, dtype=torch.bool) if valid_BT is None else valid_BT.bool()
    scores_RT, pool_RT = _rows(scores_BT.float(), scope), _rows(pool_BT, scope)
    k_R1 = _skip_count(pool_RT, q).long()  # (R, 1)
    sorted_RT = scores_RT.masked_fill(~pool_RT, float("inf")).sort(dim=1).values  # ascending, pool first
    T = sorted_RT.shape[1]
    lo = sorted_RT.gather(1, (k_R1 - 1).clamp(0, T - 1))  # highest skipped
    hi = sorted_RT.gather(1, k_R1.clamp(0, T - 1))  # lowest kept
    tau_R1 = torch.where(k_R1 >= pool_RT.sum(1, keepdim=True), lo, threshold_between(lo, hi))
    return torch.where(k_R1 == 0, torch.full_like(tau_R1, float("-inf")), tau_R1)


def threshold_between(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """A threshold t with lo <= t < hi (lo < hi), so `score > t` drops lo and keeps hi: their midpoint, or lo when
    no float lies strictly between them. (lo + hi) / 2 rounds up to hi for adjacent floats and overflows to inf
    beyond half of float32's largest; lo / 2 + hi / 2 does not overflow."""
    mid = lo / 2 + hi / 2
    return torch.where(mid < hi, mid, lo)


def _quantile_keep(scores_BT: torch.Tensor, pool_BT: torch.Tensor, q: float, scope: str) -> torch.Tensor:
    if q == 0.0:
        return pool_BT.clone()
    scores_RT, pool_RT = _rows(scores_BT, scope), _rows(pool_BT, scope)
    skip_RT = (_skip_ranks(scores_RT, pool_RT) < _skip_count(pool_RT, q)) & pool_RT
    return (pool_RT & ~skip_RT).reshape(pool_BT.shape)


def select(scores_BT: torch.Tensor, valid_BT: torch.Tensor | None, rule: SelectRule) -> torch.Tensor:
    """KEEP mask (B, T) bool for `rule`; tokens outside `valid` follow `rule.pad_policy`. No host sync."""
    if scores_BT.dim() != 2:
        raise ValueError(f"select expects scores of shape (B, T), got {tuple(scores_BT.shape)}.")
    if valid_BT is not None and valid_BT.shape != scores_BT.shape:
        raise ValueError(f"valid {tuple(valid_BT.shape)} must match scores {tuple(scores_BT.shape)}.")
    pool_BT = torch.ones_like(scores_BT, dtype=torch.bool) if valid_BT is None else valid_BT.bool()
    if rule.kind == "threshold":
        keep_BT = pool_BT & (scores_BT.float() > rule.threshold)  # (16-bit scores rounded the threshold)
    elif rule.kind == "quantile":
        keep_BT = _quantile_keep(scores_BT, pool_BT, rule.q, rule.scope)
    else:
        keep_RT = _topk_keep(_rows(scores_BT, rule.scope), _rows(pool_BT, rule.scope), rule.fraction,
                             rule.static_k)
        keep_BT = keep_RT.reshape(scores_BT.shape)
    if rule.pad_policy == "keep":
        keep_BT = keep_BT | ~pool_BT
    return keep_BT


# ---- moving tokens: flat (N, D) ----

def pack(x_BTD: torch.Tensor, keep_BT: torch.Tensor, size: int | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather kept tokens: (x_ND, idx_N), idx_N = flat indices b*T + t, ascending.

    `size=None` finds N with `nonzero` (a host sync). A static `size` pads idx_N with B*T (a "drop" index
    the scatter functions ignore) and the matching rows of x_ND with copies of the last token.
    """
    B, T = keep_BT.shape
    keep_flat = keep_BT.reshape(B * T)
    if size is None:
        idx_N = keep_flat.nonzero().squeeze(1)  # (N,)
    else:
        idx_N = torch.nonzero_static(keep_flat, size=size, fill_value=B * T).squeeze(1)  # (size,)
    return gather_flat(x_BTD, idx_N), idx_N


def gather_flat(t_BT: torch.Tensor, idx_N: torch.Tensor) -> torch.Tensor:
    """Rows idx_N of any (B, T, ...) tensor (positions, cos/sin, valid): (N, ...)."""
    B, T = t_BT.shape[:2]
    flat = t_BT.reshape(B * T, *t_BT.shape[2:])  # (B*T, ...)
    return flat.index_select(0, idx_N.clamp(max=B * T - 1))  # padding (B*T) reads the last row


def _nothing_where(y: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """y with -0.0 where `pad`: the one value whose sum leaves every number bit-identical (x + 0.0 turns a -0.0
    into +0.0, and multiplying a padding row by zero kept its inf / NaN, which then landed on the real token the
    padding index points at). Padding entries get no gradient."""
    return y.masked_fill(pad, -0.0)


def scatter_add(out_BTD: torch.Tensor, y_ND: torch.Tensor, idx_N: torch.Tensor) -> torch.Tensor:
    """out + y placed at the flat rows idx_N (out-of-place; differentiable). Index B*T is ignored.
    The result is a fresh (B, T, D) tensor, not a view (FSDP2 wants layer outputs that are not views)."""
    B, T, _ = out_BTD.shape
    real_N = idx_N < B * T
    idx_N = idx_N.clamp(max=B * T - 1)
    y_ND = _nothing_where(y_ND.to(out_BTD.dtype), ~real_N[:, None])  # padding rows add nothing
    return out_BTD.index_put((idx_N // T, idx_N % T), y_ND, accumulate=True)


def scatter_add_(out_BTD: torch.Tensor, y_ND: torch.Tensor, idx_N: torch.Tensor) -> torch.Tensor:
    """In-place `scatter_add` into a contiguous out (inference, or when autograd allows it)."""
    B, T, D = out_BTD.shape
    real_N = idx_N < B * T
    y_ND = _nothing_where(y_ND.to(out_BTD.dtype), ~real_N[:, None])  # padding rows add nothing
    out_BTD.view(B * T, D).index_add_(0, idx_N.clamp(max=B * T - 1), y_ND)
    return out_BTD


def unpack(y_ND: torch.Tensor, idx_N: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(B, T, D) tensor holding y at rows idx_N and zeros elsewhere. Index B*T is ignored."""
    D = y_ND.shape[-1]
    buf = y_ND.new_zeros(B * T + 1, D).index_copy(0, idx_N, y_ND)  # (B*T+1, D)
    return buf[: B * T].view(B, T, D)


# ---- moving tokens: padded per row (B, K, D) ----

def pack_indices(keep_BT: torch.Tensor, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept columns compacted to the front: idx_BK (ascending within a row) and valid_BK.

    Entries past a row's count have valid False and idx 0. K is the longest row (a host sync) unless
    `size` is given (kept tokens beyond it are dropped), or one token per row is packed in a forward torch.compile
    traces (a compiled decode step): then K = 1, whatever was kept, so shapes do not depend on the router."""
    B, T = keep_BT.shape
    count_B = keep_BT.sum(1)  # (B,)
    K = size
    if K is None:
        K = 1 if T == 1 and torch.compiler.is_compiling() else int(count_B.max())
    col_BT = keep_BT.long().cumsum(1) - 1  # destination column of each kept token
    dest_BT = torch.where(keep_BT & (col_BT < K), col_BT, K)  # others -> scratch column K
    t_BT = torch.arange(T, device=keep_BT.device).expand(B, T)
    idx_BK = torch.zeros(B, K + 1, dtype=torch.long, device=keep_BT.device).scatter_(1, dest_BT, t_BT)[:, :K]
    valid_BK = torch.arange(K, device=keep_BT.device)[None, :] < count_B[:, None]  # (B, K)
    return idx_BK, valid_BK


def pack_padded(x_BTD: torch.Tensor, keep_BT: torch.Tensor, positions_BT: torch.Tensor | None = None,
                size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact each row's kept tokens to the front: (x_BKD, pos_BK, valid_BK, idx_BK).

    idx_BK holds column indices t (ascending within a row, see `pack_indices`); pos_BK the original
    positions (`positions_BT` gathered, or t itself). Entries past a row's count have valid False, idx 0
    and pos of column 0. K is the longest row (a host sync) unless `size` is given.
    """
    idx_BK, valid_BK = pack_indices(keep_BT, size)
    x_BKD = gather_padded(x_BTD, idx_BK)  # (B, K, D)
    pos_BK = idx_BK.clone() if positions_BT is None else positions_BT.gather(1, idx_BK)
    return x_BKD, pos_BK, valid_BK, idx_BK


def gather_padded(t_BT: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
    """Columns idx_BK of any (B, T, ...) tensor (cos/sin, valid, scores): (B, K, ...)."""
    rest = t_BT.shape[2:]
    idx = idx_BK.view(*idx_BK.shape, *([1] * len(rest))).expand(*idx_BK.shape, *rest)  # (B, K, ...)
    return t_BT.gather(1, idx)


def scatter_padded_add(out_BTD: torch.Tensor, y_BKD: torch.Tensor, idx_BK: torch.Tensor,
                       valid_BK: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_padded`: out + y at (b, idx_BK[b, k]) for valid entries (out-of-place)."""
    D = out_BTD.shape[-1]
    y_BKD = _nothing_where(y_BKD.to(out_BTD.dtype), ~valid_BK[..., None])  # padding entries add nothing
    return out_BTD.scatter_add(1, idx_BK[..., None].expand(-1, -1, D), y_BKD)


# ---- budget schedules ----

def linear_ramp(step: int, start: float, end: float, num_steps: int) -> float:
    """start + min(1, step / num_steps) * (end - start): GateSkip's skip ratio, 0 -> 0.2 over training."""
    if num_steps <= 0:
        return end
    return start + min(1.0, max(0.0, step / num_steps)) * (end - start)


def capacity_anneal(step: int, c: float, period: float) -> float:
    """c + (1 - c) / (step / period + 1): MoD capacity annealed from 1.0 toward c (GateSkip's baseline)."""
    if period <= 0:
        raise ValueError(f"capacity_anneal period must be positive, got {period}.")
    return c + (1.0 - c) / (step / period + 1.0)
