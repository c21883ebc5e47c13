import pytest
import torch

from dyndepth import CausalLM, preset
from dyndepth.core import flops
from dyndepth.eval.compute import compute_report
from dyndepth.methods import attach_method


def test_plain_model_report_matches_the_analytic_counts():
    model = CausalLM(preset("tiny-qwen3")).eval()
    ids = torch.randint(0, 256, (2, 12))
    report = compute_report(model, ids, repeats=1)
    per_token = flops.forward_flops(model.config, 12, B=2) / 24
    assert report.tokens == 24
    assert report.executed_per_token == report.ideal_per_token == report.dense_per_token == pytest.approx(per_token)
    assert report.executed_fraction == 1.0 and set(report.parts) == {"attn", "mlp", "lm_head"}
    assert [report.slots[s]["mlp"]["processed"] for s in (0, 1)] == [1.0, 1.0]
    assert report.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # 2 layers x K and V x 2 kv heads x 16 x fp32
    assert report.latency_s > 0 and "tokens: executed 100.0%" in report.summary()


def test_a_method_report_shows_what_each_layer_processed():
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3")).eval()
    attach_method(model, "gateskip", {"budget": 0.5})
    ids = torch.randint(0, 256, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # 36 valid tokens: floor(0.5 * 36) = 18 skip each branch
    report = compute_report(model, ids, mask, repeats=1)
    assert report.tokens == 36 and report.slots[1]["mlp"]["processed"] == pytest.approx(18 / 36)
    assert report.ideal_per_token <= report.executed_per_token and "gate" in report.parts
    assert report.stats["gateskip/mlp_skipped"] == pytest.approx(0.5)
    assert report.to_dict()["ideal_fraction"] == pytest.approx(report.ideal_fraction)
