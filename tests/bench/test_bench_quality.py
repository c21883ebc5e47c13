import json

import pytest

import dyndepth
from dyndepth.bench.quality import QualityBenchConfig, base_val_loss, main


def test_quality_bench_compares_methods_at_measured_compute(tmp_path):
    dyndepth.CausalLM(dyndepth.preset("demo-tiny")).save_pretrained(tmp_path / "base")
    data = {"source": "synthetic", "synthetic_examples": 6000, "tasks": ["add", "copy"]}
    cfg = QualityBenchConfig(base=str(tmp_path / "base"), steps=2, gateskip_budgets=[0.5], mod_capacities=[0.125],
                             eval_examples=2, data=data, out_dir=str(tmp_path / "out"))
    result = main(cfg)
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"base", "GateSkip q=50%", "MoD c=12.5%"}
    assert rows["base"]["compute"] == 1.0 and rows["base"]["ideal_compute"] == 1.0
    for name in ("GateSkip q=50%", "MoD c=12.5%"):  # what ran includes what the routing allowed
        assert rows[name]["ideal_flops_per_token"] <= rows[name]["flops_per_token"]
        assert rows[name]["ideal_compute"] < 1.0
    # the base row is the base checkpoint's own loss on the first validation batches
    base = dyndepth.from_pretrained(tmp_path / "base").eval()
    assert rows["base"]["val_loss"] == pytest.approx(base_val_loss(base, data, cfg), rel=1e-6)
    saved = json.loads((tmp_path / "out" / "quality-cpu.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["base", "GateSkip q=50%", "MoD c=12.5%"]
    assert saved["rows"][1]["val_loss"] == rows["GateSkip q=50%"]["val_loss"]
