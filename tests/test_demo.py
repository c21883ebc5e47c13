"""`make demo` on a reduced config: every contender is post-trained and scored, compute follows the method."""

import json

import pytest

from dyndepth.demo import DemoConfig, render, run_demo


def test_reduced_demo_scores_every_method(tmp_path, capsys):
    # batch 8 (the demo's 32): a quarter of the training work, and the base's answer loss still ends near 2.6
    cfg = DemoConfig(out_dir=str(tmp_path), steps=40, post_steps=4, eval_examples=3, budgets=[0.0, 0.3], batch_size=8)
    summary = run_demo(cfg)
    rows = {r["label"]: r for r in summary["rows"]}
    assert list(rows) == ["base", "SFT", "GateSkip q=0%", "GateSkip q=30%", "MoD c=50%", "DND 20%"]
    assert rows["base"]["compute"] == 1.0 and abs(rows["SFT"]["compute"] - 1.0) < 1e-9
    assert rows["GateSkip q=0%"]["compute"] > 1.1  # d x d vector gates on every branch cost ~15% at D=128
    assert rows["GateSkip q=30%"]["compute"] < rows["GateSkip q=0%"]["compute"] - 0.15
    assert rows["DND 20%"]["compute"] > 1.0  # nested passes cost extra
    assert rows["base"]["answer_loss"] < 3.5  # 40 steps of answer-only loss: well below uniform (ln 259 = 5.6)
    for r in rows.values():
        assert set(r["per_task"]) == {"var", "sort", "copy", "overall"}
        assert r["generate_s"] > 0 and r["latency_s"] > 0 and r["latency"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["label"] == "base"
    # the base names the byte tokenizer's EOS, as a `dyndepth train` export does: GateSkip ranked and skipped the EOS
    # after every example (the preset names none), contrary to its "EOS always runs"
    assert json.loads((tmp_path / "base_model" / "generation_config.json").read_text())["eos_token_id"] == 257
    for name in ("quality_vs_compute", "token_compute", "dnd_selection"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    table = render(summary)
    assert (tmp_path / "results.md").read_text().strip() == table.strip()
    assert summary["probe"][0] == 8 and summary["probe"][1] < 128  # 9 short examples fill rows of fewer tokens
    assert f"prefill: a forward of 8 x {summary['probe'][1]} held-out tokens" in table
    assert "| GateSkip q=30% |" in table and table in capsys.readouterr().out


def test_the_table_names_the_shape_of_the_timed_forward():
    """`dyndepth demo --eval-examples 5` timed a forward of 8 x 32 held-out tokens (all 15 examples' text) and its
    heading said 8 x 128."""
    row = {"label": "base", "exact_match": 1.0, "answer_loss": 0.1, "compute": 1.0, "ideal_compute": 1.0,
           "generate_s": 1.0, "latency": 1.0, "per_task": {"var": 1.0}}
    summary = {"config": {"data": {"tasks": ["var"]}, "steps": 1, "post_steps": 1, "eval_examples": 5},
               "params": 8e5, "seconds": 1, "machine": "m", "eval_examples": 5, "probe": [8, 32], "rows": [row]}
    assert "prefill: a forward of 8 x 32 held-out tokens" in render(summary)


@pytest.mark.parametrize("field, value", [("post_steps", -1), ("eval_examples", 0), ("steps", 0)])
def test_demo_refuses_a_count_below_one_before_training(field, value, tmp_path):
    """`dyndepth demo --eval-examples 0` trained the base and every contender, then stopped with
    "KeyError: 'overall'"; `--post-steps -1` failed only after the base's 600 steps."""
    with pytest.raises(ValueError, match=f"demo {field} must be >= 1, got {value}"):
        DemoConfig(out_dir=str(tmp_path / "out"), **{field: value})
    assert not (tmp_path / "out").exists()


def test_demo_refuses_a_folder_holding_what_no_demo_wrote(tmp_path):
    """`dyndepth demo --out runs` deleted runs/base (and sft/, gateskip/, ...), whatever they held, to start its own
    runs there afresh."""
    for name in ("base", "sft", "my_run"):
        (tmp_path / name).mkdir()
    (tmp_path / "sft" / "config.yaml").write_text("mine")
    with pytest.raises(ValueError, match=r"demo out_dir .* holds \['my_run'\], which no demo wrote; the demo "
                                         r"replaces its own folders there \(base, base_model, dnd_20, gateskip, "):
        DemoConfig(out_dir=str(tmp_path))
    assert (tmp_path / "sft" / "config.yaml").read_text() == "mine"
    (tmp_path / "my_run").rmdir()
    (tmp_path / "results.json").write_text("{}")
    DemoConfig(out_dir=str(tmp_path))  # an earlier demo's folder: its runs are the demo's own to replace
