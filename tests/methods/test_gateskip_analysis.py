"""GateSkip analysis: traced importances and masks match an independent reference, statistics, BOS report,
plots."""

import math

import pytest
import torch
from gated import gated_model, masked_dense_reference

from dyndepth import CausalLM, plots, preset
from dyndepth.methods.gateskip_analysis import (
    bos_anchor_report,
    collect_gate_stats,
    skipped_tokens,
    trace_forward,
)
from dyndepth.plots import compute_heatmap, plot_gate_stats
from dyndepth.tokenizer import ByteTokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def anchor_model(sign: float, **cfg):
    """Every gate reads the direction of token 7's embedding: position 0 holds token 7 (and no other
    position does), so its importance is sigmoid(+-8) against sigmoid(~N(0, 1)) for the other tokens."""
    model, method = gated_model(**cfg)
    with torch.no_grad():
        u = torch.randn(64)
        u /= u.norm()
        model.model.embed_tokens.weight[7] = u  # dominates the small updates of the random layers
        for layer in model.model.layers:
            for gate in (layer.gateskip.attn_gate, layer.gateskip.mlp_gate):
                gate.proj.weight.copy_(sign * u.expand(64, 64))
    ids = torch.randint(8, 256, (4, 16))
    ids[:, 0] = 7
    return model, method, ids


@pytest.mark.parametrize("name,cfg", [("tiny-qwen3", {}), ("tiny-qwen3-moe", {}),
                                      ("tiny-qwen3", {"gate": "scalar", "shared": True})])
def test_trace_agrees_with_an_independent_reference(name, cfg):
    model, _ = gated_model(name, budget=0.3, **cfg)
    ids = torch.randint(0, 256, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    with torch.no_grad():
        stats = model(ids, attention_mask=mask).stats
        tr = trace_forward(model, ids, mask)
        _, keeps, scores = masked_dense_reference(model, ids, mask)
    valid = mask.bool()
    assert list(tr.keep) == list(keeps) and list(tr.importance) == list(scores)
    for key in keeps:  # every layer's importances and decisions, not only the first
        torch.testing.assert_close(tr.importance[key][valid], scores[key][valid], atol=1e-5, rtol=0)
        assert torch.equal(tr.keep[key] & valid, keeps[key] & valid), key
    for branch in ("attn", "mlp"):
        skipped = [(~tr.keep[(i, branch)] & tr.pool).sum() / tr.pool.sum() for i in range(2)]
        assert float(torch.stack(skipped).mean()) == pytest.approx(float(stats[f"gateskip/{branch}_skipped"]))
    assert int(tr.positions[2, 4]) == 0 and not tr.valid[2, :4].any()


def test_collect_gate_stats_numbers():
    model, _ = gated_model(budget=0.3)
    batches = [torch.randint(0, 256, (4, 20)), torch.randint(0, 256, (2, 20))]
    stats = collect_gate_stats(model, batches)
    assert stats.mean.shape == (2, 2) and stats.quantiles.shape == (2, 2, 5) and stats.num_tokens == 120
    assert torch.allclose(stats.skipped, torch.full((2, 2), 0.3))  # floor(0.3 * 80) and floor(0.3 * 40): exact
    assert (stats.quantiles.diff(dim=-1) >= 0).all()
    with torch.no_grad():
        layer = model.model.layers[0]
        s_BT = torch.cat([layer.gateskip.attn_gate(layer.input_layernorm(model.model.embed_tokens(b))).mean(-1)
                          for b in batches])  # (6, 20)
    assert float(stats.mean[0, 0]) == pytest.approx(float(s_BT.mean()), abs=1e-6)
    assert float(stats.std[0, 0]) == pytest.approx(float(s_BT.std(unbiased=False)), abs=1e-6)
    torch.testing.assert_close(stats.position_mean[0, 0], s_BT.mean(0))
    assert stats.position_count.tolist() == [6.0] * 20
    assert 0 <= float(stats.pos0_percentile.min()) and float(stats.pos0_percentile.max()) <= 1
    assert set(stats.summary()) >= {"layer0/attn/mean", "layer1/mlp/skipped"}


def test_statistics_over_more_than_2_to_the_24_tokens():
    """torch.quantile refuses more than 2**24 values: statistics (and prune_layers by gate) over ~17M tokens stopped
    with "quantile() input tensor is too large" after every forward had run."""
    from dyndepth.methods.gateskip_analysis import _StatsAccumulator

    N = 2**24 + 3
    acc = _StatsAccumulator(num_layers=1)
    acc.values = {0: [torch.linspace(0, 1, N)], 1: [torch.linspace(1, 3, N)]}  # (N,) each: attn, mlp of layer 0
    acc.pos_sums, acc.pos_counts = [torch.zeros(1, 2, 1)], [torch.ones(1)]
    stats = acc.finish(0.0, (0.0, 0.25, 0.5, 1.0))
    assert stats.num_tokens == N
    torch.testing.assert_close(stats.quantiles[0], torch.tensor([[0.0, 0.25, 0.5, 1.0], [1.0, 1.5, 2.0, 3.0]]))


def test_budget_override_is_temporary_and_padding_is_excluded():
    model, method = gated_model(budget=0.3)
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    stats = collect_gate_stats(model, [(ids, mask)], budget=0.0)
    assert stats.budget == 0.0 and (stats.skipped == 0).all() and method.budget == 0.3
    assert stats.num_tokens == 17
    assert stats.position_count.tolist() == [2.0] * 7 + [1.0] * 3  # left padding: row 1 starts at column 3


@pytest.mark.parametrize("protect_bos", [False, True])
def test_bos_anchor_report_measures_position_zero(protect_bos):
    model, _, ids = anchor_model(+1.0, budget=0.3, protect_bos=protect_bos)
    high = bos_anchor_report(model, [ids])
    assert high.mean_pos0 > 0.99 > high.mean_rest
    assert (high.pos0_percentile == 1).all()
    assert high.branches_never_skipped == 1.0 and high.layers_never_skipped == 1.0
    model, _, ids = anchor_model(-1.0, budget=0.3, protect_bos=protect_bos)
    low = bos_anchor_report(model, [ids])
    assert low.mean_pos0 < 0.01 < low.mean_rest and (low.pos0_percentile == 0).all()
    assert low.protect_bos == protect_bos
    expected = 1.0 if protect_bos else 0.0  # protected position 0 is never skipped, whatever its importance
    assert low.branches_never_skipped == expected and low.layers_never_skipped == expected
    assert (low.pos0_skipped == 1 - expected).all()


def test_statistics_count_the_pool_and_weigh_every_real_token():
    # a left-padded batch with an EOS and attention-only skipping: the skip fraction is over the ranking pool (EOS out),
    # the rest's importance is a mean over real tokens (not over positions, which padding fills unevenly), and a layer
    # whose MLP never skips position 0 still skipped it (its attention did)
    model, _, ids = anchor_model(-1.0, budget=0.3, skip_branches="attn", eos=5)
    ids[0, 6] = 5
    ids[3, 5] = 7  # row 3 starts at column 5: its position 0 is the anchor token too
    mask = torch.ones_like(ids)
    mask[3, :5] = 0
    pool = int(mask.sum()) - 1  # 58 real tokens, one EOS
    stats = collect_gate_stats(model, [(ids, mask)])
    torch.testing.assert_close(stats.skipped[:, 0], torch.full((2,), math.floor(0.6 * pool) / pool))
    assert (stats.skipped[:, 1] == 0).all()
    report = bos_anchor_report(model, [(ids, mask)])
    assert report.branches_never_skipped == 0.5 and report.layers_never_skipped == 0.0
    tr = trace_forward(model, ids, mask)
    rest = tr.valid & (tr.positions != 0)
    for (slot, branch), s_BT in tr.importance.items():
        b = ("attn", "mlp").index(branch)
        assert float(report.rest_importance[slot, b]) == pytest.approx(float(s_BT[rest].mean()), abs=1e-6)


def test_skipped_tokens_agree_with_an_independent_reference():
    model, _ = gated_model(vocab=264, budget=0.25)
    tok = ByteTokenizer(264)
    text = "hello gated world"
    rows = skipped_tokens(model, tok, text)
    assert rows[0][0] == "<|bos|>" and "".join(t for t, _ in rows[1:]) == text
    masks = torch.stack([m for _, m in rows])  # (T, L, 2)
    assert masks.shape == (len(text) + 1, 2, 2) and masks.dtype == torch.bool
    with torch.no_grad():
        _, keeps, _ = masked_dense_reference(model, torch.tensor([tok.encode(text, add_bos=True)]))
    for (slot, branch), keep in keeps.items():
        assert torch.equal(masks[:, slot, ("attn", "mlp").index(branch)], ~keep[0])
    assert int(masks[:, 0, 0].sum()) == math.floor(0.25 * (len(text) + 1))
    assert not torch.stack([m for _, m in skipped_tokens(model, tok, text, budget=0.0)]).any()


def test_plots_write_pngs(tmp_path, monkeypatch):
    model, _ = gated_model(vocab=264, budget=0.3)
    tok = ByteTokenizer(264)
    for value in ("executed", "importance"):
        path = compute_heatmap(model, tok, "tokens skip branches", tmp_path / f"heat_{value}.png", value=value,
                               dpi=40)
        assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="executed"):
        compute_heatmap(model, tok, "x", tmp_path / "bad.png", value="flops")
    stats = collect_gate_stats(model, [torch.randint(0, 256, (2, 12))])
    assert plot_gate_stats(stats, tmp_path / "stats.png", dpi=40).read_bytes()[:8] == PNG_MAGIC
    # the title names the budget drawn (the demo's and repro's heatmaps said only "executed")
    titles = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, *args, **kw: titles.append(fig.axes[0].get_title()))
    compute_heatmap(model, tok, "tokens skip", tmp_path / "t.png")
    compute_heatmap(model, tok, "tokens skip", tmp_path / "t.png", budget=0.5)
    assert titles == ["GateSkip compute per token (executed; budget 30%, quantile mode)",
                      "GateSkip compute per token (executed; budget 50%, quantile mode)"]


def test_analysis_needs_a_gateskip_model():
    model = CausalLM(preset("tiny-qwen3")).eval()
    with pytest.raises(ValueError, match="attach_gateskip"):
        collect_gate_stats(model, [torch.randint(0, 256, (1, 4))])
