"""Routing primitives against slow per-row reference loops (STYLE.md section 6e)."""

import math
from fractions import Fraction

import pytest
import torch

from dyndepth.core.context import causal_mask
from dyndepth.core.routing import (
    SelectRule,
    capacity,
    capacity_anneal,
    gather_flat,
    gather_padded,
    linear_ramp,
    pack,
    pack_padded,
    rank_threshold,
    scatter_add,
    scatter_add_,
    scatter_padded_add,
    select,
    unpack,
)

# ---- slow references ----


def ref_k(fraction, n):
    return math.ceil(Fraction(str(fraction)) * n)


def ref_topk(scores, pool, fraction, static_T=None):
    """Per pool: the k best pool tokens, ties to the earlier token."""
    idx = [i for i in range(len(scores)) if pool[i]]
    k = ref_k(fraction, len(idx) if static_T is None else static_T)
    best = sorted(idx, key=lambda i: (-float(scores[i]), i))[:k]
    return [i in best for i in range(len(scores))]


def ref_quantile(scores, pool, q):
    """Skip exactly floor(q * n) pool tokens, the lowest scores; among ties the later token first."""
    idx = [i for i in range(len(scores)) if pool[i]]
    k = math.floor(Fraction(str(q)) * len(idx))
    skipped = sorted(idx, key=lambda i: (float(scores[i]), -i))[:k]
    return [bool(pool[i]) and i not in skipped for i in range(len(scores))]


def ref_select(scores_BT, valid_BT, rule):
    B, T = scores_BT.shape
    rows = [(scores_BT.reshape(-1), valid_BT.reshape(-1))] if rule.scope == "batch" else \
        [(scores_BT[b], valid_BT[b]) for b in range(B)]
    out = []
    for s, v in rows:
        if rule.kind == "topk":
            static_T = len(s) if rule.static_k else None
            out += ref_topk(s, v, rule.fraction, static_T)
        elif rule.kind == "quantile":
            out += ref_quantile(s, v, rule.q)
        else:
            out += [bool(v[i]) and float(s[i]) > rule.threshold for i in range(len(s))]
    keep = torch.tensor(out).reshape(B, T)
    return keep | ~valid_BT if rule.pad_policy == "keep" else keep


def random_case(seed, B=5, T=11, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        scores = torch.randint(0, 4, (B, T), generator=g).float() / 4  # many exact ties
    else:
        scores = torch.rand(B, T, generator=g)
    valid = torch.rand(B, T, generator=g) > 0.3
    valid[0] = False  # an all-PAD row
    valid[1] = False
    valid[1, 3] = True  # a row with one valid token
    valid[2] = True  # a full row
    return scores, valid


# ---- select ----

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("q", [0.0, 0.15, 0.5, 0.99])
@pytest.mark.parametrize("pad_policy", ["keep", "drop"])
def test_quantile_matches_reference(ties, scope, q, pad_policy):
    for seed in range(4):
        scores, valid = random_case(seed, ties=ties)
        rule = SelectRule(kind="quantile", scope=scope, q=q, pad_policy=pad_policy)
        assert torch.equal(select(scores, valid, rule), ref_select(scores, valid, rule))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("static_k", [False, True])
def test_topk_matches_reference(ties, scope, fraction, static_k):
    for seed in range(3):
        scores, valid = random_case(seed, T=10, ties=ties)
        for pad_policy in ("drop", "keep"):
            rule = SelectRule(kind="topk", scope=scope, fraction=fraction, static_k=static_k,
                              pad_policy=pad_policy)
            assert torch.equal(select(scores, valid, rule), ref_select(scores, valid, rule))


@pytest.mark.parametrize("pad_policy", ["keep", "drop"])
def test_threshold_matches_reference(pad_policy):
    scores, valid = random_case(0, ties=True)
    rule = SelectRule(kind="threshold", threshold=0.5, pad_policy=pad_policy)
    assert torch.equal(select(scores, valid, rule), ref_select(scores, valid, rule))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_threshold_compares_16_bit_scores_in_float32(dtype):
    # A float32 threshold rounded to the scores' dtype moved it: 0.1 became bfloat16's 0.10009765625, and a score
    # of exactly that value (above 0.1) was dropped.
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).to(dtype)
    for threshold in (0.1, 0.2, 0.3, float(scores[0, 2]) - 1e-6):
        rule = SelectRule(kind="threshold", threshold=threshold)
        assert select(scores, None, rule).tolist() == (scores.float() > threshold).tolist()


def test_select_edge_cases():
    scores = torch.tensor([[0.3, 0.1, 0.9, 0.2]])
    # GateSkip: the quantile pool excludes PAD, which is kept; floor(0.5 * 3) = 1 pool token is skipped.
    valid = torch.tensor([[True, False, True, True]])
    keep = select(scores, valid, SelectRule(kind="quantile", scope="batch", q=0.5, pad_policy="keep"))
    assert keep.tolist() == [[True, True, True, False]]
    keep = select(scores, valid, SelectRule(kind="quantile", scope="batch", q=0.3, pad_policy="keep"))
    assert keep.all()  # floor(0.3 * 3) = 0
    # q == 0 skips nothing; a single pool token is never skipped.
    assert select(scores, None, SelectRule(kind="quantile", q=0.0)).all()
    one = torch.tensor([[False, False, True, False]])
    assert select(scores, one, SelectRule(kind="quantile", q=0.99, pad_policy="drop")).tolist() == [one[0].tolist()]
    # top-k without valid: the whole row is the pool; PAD is never selected with "drop".
    assert select(scores, None, SelectRule(fraction=0.5)).tolist() == [[True, False, True, False]]
    assert not select(scores, torch.zeros_like(valid), SelectRule(fraction=1.0)).any()
    # bf16 scores work (ranked in float32 for the quantile).
    assert select(scores.bfloat16(), None, SelectRule(kind="quantile", q=0.5)).sum() == 2


def test_quantile_skips_exactly_the_budget_when_every_score_ties():
    # Fresh GateSkip gates in bfloat16: every importance is the same number. The old "s <= quantile" rule
    # skipped every token; the rank rule skips floor(q * n) of them, the later tokens first.
    scores = torch.full((3, 10), 0.9933, dtype=torch.bfloat16)
    for q, scope in ((0.2, "batch"), (0.2, "sequence"), (0.55, "batch")):
        keep = select(scores, None, SelectRule(kind="quantile", scope=scope, q=q))
        per_pool = 30 if scope == "batch" else 10
        assert int((~keep).sum()) == math.floor(q * per_pool) * (30 // per_pool)
    keep = select(scores, None, SelectRule(kind="quantile", scope="sequence", q=0.2))
    assert keep[:, :8].all() and not keep[:, 8:].any()


def test_rank_threshold_separates_exactly_the_budget():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, True], [True, False, False, False]])
    tau = rank_threshold(scores, valid, 0.5, scope="sequence")  # row 0 skips 2 of 4; row 1 skips 0 of 1
    assert tau[0, 0].item() == 2.5 and tau[1, 0].item() == float("-inf")
    tau_b = rank_threshold(scores, valid, 0.5, scope="batch")  # 5 pool tokens: skip 2 (1.0, 2.0)
    assert tau_b.shape == (1, 1) and tau_b.item() == 2.5
    g = torch.Generator().manual_seed(0)
    s = torch.rand(4, 50, generator=g)
    for q in (0.1, 0.3, 0.77):
        tau = rank_threshold(s, None, q, scope="batch")
        assert int((s <= tau).sum()) == math.floor(q * 200)
    assert rank_threshold(s, None, 1.0, scope="batch").item() == s.max().item()  # everything skipped


def test_rank_threshold_separates_adjacent_and_huge_scores():
    # The midpoint of two adjacent float32 scores can round up to the kept one, and that of two scores near
    # float32's largest overflows to inf: `score > tau` then skipped every token, not floor(q * n) of them.
    one, two = torch.tensor(1.0), torch.tensor(2.0)
    lo = one.nextafter(two)
    hi = lo.nextafter(two)  # (lo + hi) / 2 rounds to hi (ties to even)
    for scores in (torch.stack([hi, lo]).reshape(1, 2), torch.tensor([[3.2e38, 3.0e38]])):
        keep = select(scores, None, SelectRule(kind="quantile", q=0.5))
        assert keep.tolist() == [[True, False]]
        tau = rank_threshold(scores, None, 0.5)
        assert (scores > tau).tolist() == keep.tolist()


def test_select_rule_validation():
    with pytest.raises(ValueError, match="kind"):
        SelectRule(kind="random")
    with pytest.raises(ValueError, match="fraction"):
        SelectRule(fraction=1.5)
    with pytest.raises(ValueError, match="pad_policy"):
        SelectRule(pad_policy="skip")
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        select(torch.rand(2, 3, 4), None, SelectRule())


def test_capacity_has_no_float_creep():
    assert capacity(0.7, 10) == 7 and capacity(0.2, 10) == 2 and capacity(0.25, 10) == 3
    assert capacity(0.0, 5) == 0 and capacity(1.0, 5) == 5


# ---- pack / scatter ----

def test_pack_scatter_match_loops():
    B, T, D = 3, 7, 5
    x = torch.randn(B, T, D)
    keep = torch.rand(B, T) > 0.5
    keep[0] = False
    x_ND, idx_N = pack(x, keep)
    ref_rows = [(b, t) for b in range(B) for t in range(T) if keep[b, t]]
    assert idx_N.tolist() == [b * T + t for b, t in ref_rows]
    assert torch.equal(x_ND, torch.stack([x[b, t] for b, t in ref_rows]))
    y = torch.randn(len(ref_rows), D)
    out = torch.randn(B, T, D)
    ref = out.clone()
    for n, (b, t) in enumerate(ref_rows):
        ref[b, t] += y[n]
    torch.testing.assert_close(scatter_add(out, y, idx_N), ref)
    assert not torch.equal(out, ref)  # out-of-place left out alone
    ref_unpack = torch.zeros(B, T, D)
    for n, (b, t) in enumerate(ref_rows):
        ref_unpack[b, t] = y[n]
    assert torch.equal(unpack(y, idx_N, B, T), ref_unpack)
    torch.testing.assert_close(scatter_add_(out, y, idx_N), ref)
    torch.testing.assert_close(out, ref)  # in place


def test_pack_static_size_pads_and_is_ignored_by_scatter():
    B, T, D = 2, 5, 3
    x = torch.randn(B, T, D)
    keep = torch.tensor([[True, False, True, False, False], [False, False, False, False, True]])
    x_ND, idx_N = pack(x, keep, size=6)
    assert idx_N.tolist() == [0, 2, 9, 10, 10, 10]
    assert torch.equal(x_ND[:3], x.reshape(-1, D)[[0, 2, 9]])
    y = torch.randn(6, D)
    out = torch.zeros(B, T, D)
    expected = unpack(y[:3], idx_N[:3], B, T)
    assert torch.equal(scatter_add(out, y, idx_N), expected)
    assert torch.equal(unpack(y, idx_N, B, T), expected)
    assert torch.equal(scatter_add_(out.clone(), y, idx_N), expected)
    pos = torch.arange(T).expand(B, T)
    assert gather_flat(pos, idx_N[:3]).tolist() == [0, 2, 4]


def test_pack_compute_scatter_equals_masked_dense_with_grad():
    B, T, D = 2, 6, 4
    x = torch.randn(B, T, D, requires_grad=True)
    w = torch.randn(D, D)
    keep = torch.rand(B, T) > 0.4
    x_ND, idx_N = pack(x, keep)
    out = scatter_add(x, torch.tanh(x_ND @ w), idx_N)
    ref = x + torch.tanh(x @ w) * keep[..., None]
    torch.testing.assert_close(out, ref)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g, g_ref)


def bits(t):
    return t.view(torch.int32)


def test_scatter_padding_entries_leave_every_other_token_bit_identical():
    # Padding entries (past a row's count, or a static size's fill) point at a real token (column 0, the last
    # row) and must add nothing to it: not when their outputs are inf / NaN, nor by turning a -0.0 into +0.0.
    B, T, D = 2, 4, 3
    x = torch.randn(B, T, D)
    x[:, 0, 0] = -0.0
    x[:, -1, 1] = -0.0
    keep = torch.tensor([[False, True, False, True], [False, False, False, False]])
    _, _, valid_BK, idx_BK = pack_padded(x, keep, size=3)
    y_BKD = torch.tensor([float("inf"), float("nan"), -float("inf")]).expand(B, 3, D).clone()
    y_BKD[0, :2] = 1.0  # the two valid entries of row 0
    out = scatter_padded_add(x, y_BKD, idx_BK, valid_BK)
    assert torch.equal(bits(out[keep == 0]), bits(x[keep == 0]))
    assert torch.equal(out[keep], x[keep] + 1.0)
    _, idx_N = pack(x, keep, size=4)  # [1, 3, B*T, B*T]: the fill reads and must not write the last token
    y_ND = torch.tensor([[1.0] * D, [1.0] * D, [float("nan")] * D, [float("inf")] * D])
    for scatter in (scatter_add, lambda o, y, i: scatter_add_(o.clone(), y, i)):
        out = scatter(x, y_ND, idx_N)
        assert torch.equal(bits(out[keep == 0]), bits(x[keep == 0]))
        assert torch.equal(out[keep], x[keep] + 1.0)
    y_ND.requires_grad_(True)
    (grad,) = torch.autograd.grad(scatter_add(x, y_ND, idx_N).sum(), y_ND)
    assert grad.tolist() == [[1.0] * D, [1.0] * D, [0.0] * D, [0.0] * D]


# ---- pack_padded ----

def test_pack_padded_matches_loops():
    B, T, D = 4, 9, 3
    x = torch.randn(B, T, D)
    keep = torch.rand(B, T) > 0.5
    keep[0] = False
    keep[1] = True
    positions = torch.arange(T).expand(B, T) + torch.tensor([[0], [3], [5], [1]])
    x_BKD, pos_BK, valid_BK, idx_BK = pack_padded(x, keep, positions)
    K = int(keep.sum(1).max())
    assert x_BKD.shape == (B, K, D) and valid_BK.shape == (B, K)
    y = torch.randn(B, K, D)
    out = torch.randn(B, T, D)
    ref = out.clone()
    for b in range(B):
        cols = [t for t in range(T) if keep[b, t]]
        assert valid_BK[b].tolist() == [k < len(cols) for k in range(K)]
        assert idx_BK[b, : len(cols)].tolist() == cols
        assert pos_BK[b, : len(cols)].tolist() == positions[b, cols].tolist()
        for k, t in enumerate(cols):
            assert torch.equal(x_BKD[b, k], x[b, t])
            ref[b, t] += y[b, k]
    torch.testing.assert_close(scatter_padded_add(out, y, idx_BK, valid_BK), ref)
    assert torch.equal(gather_padded(positions, idx_BK), pos_BK)


def test_pack_padded_static_size_and_empty():
    keep = torch.tensor([[True, False, True], [False, False, False]])
    x = torch.randn(2, 3, 2)
    x_BKD, pos_BK, valid_BK, idx_BK = pack_padded(x, keep, size=3)
    assert x_BKD.shape == (2, 3, 2)
    assert valid_BK.tolist() == [[True, True, False], [False, False, False]]
    assert idx_BK[0, :2].tolist() == [0, 2] and pos_BK[0, :2].tolist() == [0, 2]
    x0, _, v0, _ = pack_padded(x, torch.zeros_like(keep))
    assert x0.shape == (2, 0, 2) and v0.shape == (2, 0)


def test_pack_padded_attention_equals_dense_rows():
    """Queries from a per-row subset, keys from all tokens: equals full causal attention at kept rows."""
    B, T, N, H = 3, 8, 2, 4
    q, k, v = (torch.randn(B, N, T, H) for _ in range(3))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[2, :3] = False  # left padding
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    keep = (torch.rand(B, T) > 0.5) & valid
    full_mask = causal_mask(positions, positions, valid, valid)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full_mask)  # (B, N, T, H)
    q_BTD = q.transpose(1, 2).reshape(B, T, N * H)
    q_BKD, pos_BK, valid_BK, idx_BK = pack_padded(q_BTD, keep, positions)
    K = q_BKD.shape[1]
    q_sub = q_BKD.view(B, K, N, H).transpose(1, 2)  # (B, N, K, H)
    mask = causal_mask(pos_BK, positions, valid, valid_BK)
    sub = torch.nn.functional.scaled_dot_product_attention(q_sub, k, v, attn_mask=mask)
    sub_BTD = scatter_padded_add(torch.zeros(B, T, N * H), sub.transpose(1, 2).reshape(B, K, N * H),
                                 idx_BK, valid_BK)
    dense_BTD = dense.transpose(1, 2).reshape(B, T, N * H) * keep[..., None]
    torch.testing.assert_close(sub_BTD, dense_BTD)


# ---- schedules and stats ----

def test_schedules():
    assert linear_ramp(0, 0.0, 0.2, 100) == 0.0
    assert linear_ramp(50, 0.0, 0.2, 100) == pytest.approx(0.1)
    assert linear_ramp(500, 0.0, 0.2, 100) == pytest.approx(0.2)
    assert linear_ramp(3, 0.0, 0.2, 0) == 0.2
    assert capacity_anneal(0, 0.8, 1500) == pytest.approx(1.0)
    assert capacity_anneal(1500, 0.8, 1500) == pytest.approx(0.9)
    assert capacity_anneal(10**9, 0.8, 1500) == pytest.approx(0.8, abs=1e-5)
    with pytest.raises(ValueError, match="period"):
        capacity_anneal(1, 0.8, 0)
    assert linear_ramp(-5, 0.0, 0.2, 10) == 0.0  # before the ramp starts: its start, not beyond


def test_counts_ignore_float_error_and_a_full_skip_thresholds_at_the_highest_score():
    assert capacity(0.14, 50) == 7 and capacity(0.55, 100) == 55  # 0.14 * 50 = 7.000000000000001
    s = torch.rand(1, 100)
    keep = select(s, None, SelectRule(kind="quantile", q=0.29))  # 0.29 * 100 = 28.999999999999996
    assert int((~keep).sum()) == 29
    valid = torch.tensor([[True, True, True, False]])
    tau = rank_threshold(torch.tensor([[0.1, 0.5, 0.3, 0.9]]), valid, 1.0)  # every pool token skips
    assert float(tau) == 0.5  # the highest pool score (the midpoint with PAD's +inf was inf)
