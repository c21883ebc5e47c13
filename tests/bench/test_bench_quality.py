import json

import dyndepth
from dyndepth.bench.quality import QualityBenchConfig, main


def test_quality_bench_compares_methods_at_measured_compute(tmp_path):
    dyndepth.CausalLM(dyndepth.preset("demo-tiny")).save_pretrained(tmp_path / "base")
    data = {"source": "synthetic", "synthetic_examples": 6000, "tasks": ["add", "copy"]}
    cfg = QualityBenchConfig(base=str(tmp_path / "base"), steps=2, gateskip_budgets=[0.5], mod_capacities=[0.125],
                             eval_examples=2, data=data, out_dir=str(tmp_path / "out"))
    result = main(cfg)
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"base", "GateSkip q=50%", "MoD c=12.5%"}
    assert rows["base"]["compute"] == 1.0
    assert rows["GateSkip q=50%"]["compute"] < 1.0 and rows["MoD c=12.5%"]["compute"] < 0.8
    saved = json.loads((tmp_path / "out" / "quality-cpu.json").read_text())
    assert saved["rows"][0]["model"] == "base" and all(r["val_loss"] > 0 for r in saved["rows"])
