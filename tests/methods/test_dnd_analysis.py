"""DND analysis: per-layer report from the ledger, selection traces, entropy correlation, plots."""

import json

import numpy as np
import pytest
import torch
from test_dnd import dnd_model

import dyndepth
from dyndepth import CausalLM, preset
from dyndepth.methods import dnd_analysis
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


def by_hand(model, base, batches):
    """(selection frequency, the base model's next-token entropy) of the valid tokens, computed directly: the share
    of DND layers whose eval forward selected the token, and the entropy of the base model's prediction at the
    token's own position (of the token after it)."""
    freq, ent = [], []
    for ids, mask in batches:
        trace = dyndepth.Trace()
        with torch.no_grad():
            model(ids, attention_mask=mask, trace=trace)
            logits = base(ids, attention_mask=mask).logits.double()
        keep = trace.ctx.state.keep
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        p = logits.softmax(-1)
        freq.append(torch.stack([keep[i] for i in model.method.layers]).double().mean(0)[valid])
        ent.append(-(p * p.log()).sum(-1)[valid])
    return torch.cat(freq).numpy(), torch.cat(ent).numpy()


def test_entropy_correlation_is_the_pearson_r_of_selection_frequency_and_the_base_models_entropy():
    model, method = dnd_model()  # beta 0.5: nesting changes the logits, so the DND model's entropies differ
    model.eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids2 = torch.randint(0, 256, (1, 9))
    base = CausalLM(preset("tiny-qwen3")).eval()  # the same weights, without DND: a separate model
    base.load_state_dict(model.state_dict(), strict=False)
    batches = [(ids, mask), (ids2, None)]
    f, e = by_hand(model, base, batches)
    assert 0 < f.mean() < 1 and len(set(f.tolist())) == 3  # tokens nested by 0, 1 and 2 layers
    result = entropy_correlation(model, [(ids, mask), ids2])
    assert result["tokens"] == 19 + 9 == len(f)
    assert result["pearson_r"] == pytest.approx(np.corrcoef(f, e)[0, 1], abs=1e-4)  # float32 in the tool
    assert result["selection_rate"] == pytest.approx(f.mean(), abs=1e-6)
    assert result["entropy_nested"] == pytest.approx(e[f >= 0.5].mean(), abs=1e-5)
    assert result["entropy_other"] == pytest.approx(e[f < 0.5].mean(), abs=1e-5)
    # an explicit base model: its entropies, not the DND model's (the same selections)
    torch.manual_seed(7)
    other = CausalLM(preset("tiny-qwen3")).eval()
    f2, e2 = by_hand(model, other, batches)
    assert (f2 == f).all()
    got = entropy_correlation(model, batches, base=other)["pearson_r"]
    assert got == pytest.approx(np.corrcoef(f2, e2)[0, 1], abs=1e-4)
    assert abs(got - result["pearson_r"]) > 0.05
    assert model.method is method


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


def test_the_controller_plot_shows_the_ratio_the_controller_steers_by():
    # training logs the mean of its micro-batches' fractions as dnd/selected/L*, while the controller steers by the
    # step's nested / valid tokens (micro-batches of 16 and 4 real tokens nesting 4 and 3: 7 / 20, not (0.25 + 0.75) / 2)
    from dyndepth.methods.dnd_analysis import controller_series

    records = [{"step": 1, "dnd/selected/L4": 0.5, "dnd/nested_tokens/L4": 3.5, "dnd/valid_tokens": 10.0,
                "dnd/tau/L4": 0.5},
               {"step": 2, "dnd/selected/L4": 0.3, "dnd/tau/L4": 0.49}]  # a record of an older run: its mean
    series = controller_series(records)
    assert series["dnd/selected/L"] == {"dnd/selected/L4": [(1, 0.35), (2, 0.3)]}
    assert series["dnd/tau/L"] == {"dnd/tau/L4": [(1, 0.5), (2, 0.49)]}


def test_next_token_entropy_runs_in_row_chunks_in_float32(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(37, 50) * 4
    p = logits.softmax(-1)
    want = -(p * p.log()).sum(-1)
    monkeypatch.setattr(dnd_analysis, "ENTROPY_CHUNK_ELEMENTS", 8 * 50)  # 8-row chunks: 4 full and one of 5
    got = dnd_analysis.next_token_entropy(logits)
    assert got.shape == (37,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # bfloat16 logits (a bf16 model's): upcast per chunk, the entropy of the same (rounded) logits in float32
    low = logits.bfloat16()
    q = low.float().softmax(-1)
    torch.testing.assert_close(dnd_analysis.next_token_entropy(low), -(q * q.log()).sum(-1), atol=1e-5, rtol=1e-5)
    assert dnd_analysis.next_token_entropy(logits[:0]).shape == (0,)
