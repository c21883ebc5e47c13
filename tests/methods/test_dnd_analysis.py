"""DND analysis: per-layer report from the ledger, selection traces, entropy correlation, plots."""

import json

import pytest
import torch
from test_dnd import dnd_model

from dyndepth.methods.dnd_analysis import (
    entropy_correlation,
    layer_report,
    plot_controller,
    selection_heatmap,
    trace_selection,
    without_method,
)
from dyndepth.tokenizer import ByteTokenizer


def test_layer_report_and_trace_agree_with_the_forward():
    model, method = dnd_model()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        out = model(ids)
    report = layer_report(model, out)
    scores, selected, valid = trace_selection(model, ids)
    assert scores.shape == selected.shape == (2, 2, 16) and valid.all()
    for j, layer in enumerate(method.layers):
        assert report[layer]["selected"] == pytest.approx(float(selected[j].float().mean()))
        # the nested pass costs about its share of tokens (attention among fewer tokens costs less)
        assert 0 < report[layer]["flops_overhead_ideal"] <= report[layer]["flops_overhead_executed"]
        assert report[layer]["flops_overhead_ideal"] < report[layer]["selected"] + 0.01
    with without_method(model):
        assert model.method is None
    assert model.method is method


def test_entropy_correlation_is_a_pearson_r_over_valid_tokens():
    model, _ = dnd_model()
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    result = entropy_correlation(model, [(ids, mask)])
    assert result["tokens"] == 19 and -1 <= result["pearson_r"] <= 1 and 0 < result["selection_rate"] < 1


def test_plots(tmp_path):
    model, _ = dnd_model()
    path = selection_heatmap(model, ByteTokenizer(), "x = 12 + 30", tmp_path / "heat.png")
    assert path.stat().st_size > 1000
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "loss": 1.0, "dnd/selected/L4": 0.2 + 0.01 * s,
                                             "dnd/tau/L4": 0.5 - 0.01 * s}) for s in range(1, 6)))
    assert plot_controller(metrics, tmp_path / "ctl.png", target=0.2).stat().st_size > 1000
    metrics.write_text(json.dumps({"step": 1, "loss": 1.0}))
    with pytest.raises(ValueError, match="dnd/selected"):
        plot_controller(metrics, tmp_path / "none.png")
