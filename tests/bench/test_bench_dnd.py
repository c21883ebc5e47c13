import json
import math

import pytest

import dyndepth
from dyndepth.bench.dnd import DNDBenchConfig, DNDQualityConfig, fit_thresholds, main


def test_throughput_bench_reports_wall_clock_next_to_flop_overhead(tmp_path):
    cfg = DNDBenchConfig(model="demo-tiny", batches=[1, 3], prefill_len=24, decode_prompt_len=8, new_tokens=3,
                         repeats=1, ratio=0.3, out_dir=str(tmp_path))
    result = main(cfg)["throughput"]
    assert [(r["phase"], r["B"]) for r in result["rows"]] == [("prefill", 1), ("decode", 1), ("prefill", 3),
                                                              ("decode", 3)]
    prefill = [r for r in result["rows"] if r["phase"] == "prefill"]
    assert all(r["flops_overhead"] > 0 for r in result["rows"])  # routers at least
    assert all(r["control"] > 0 and r["base_s"] > 0 and r["dnd_s"] > 0 for r in result["rows"])
    assert any(r["selected"] > 0 for r in prefill)  # tau was fitted to nest 30% of random rows in layers 1..2
    assert result["layers"] == [1, 2] and set(result["layer_report"]) == {1, 2}
    saved = json.loads((tmp_path / "dnd-cpu-float32.json").read_text())
    assert saved["throughput"]["rows"][0]["flops_overhead"] == pytest.approx(prefill[0]["flops_overhead"])
    md = (tmp_path / "dnd-cpu-float32.md").read_text()
    assert "wall_over_flops" in md and "per layer (prefill B=1, T=24):" in md  # which run the layer table is of
    for r in result["rows"]:  # a ratio over the routers' ~0.03% alone read in the hundreds and meant nothing
        assert (r["wall_over_flops"] is None) == (r["selected"] == 0), r
        # eager: the nested pass runs the selected tokens only (prefill pads rows for attention pairs alone)
        assert r["ideal_overhead"] == pytest.approx(r["flops_overhead"], rel=0.05, abs=1e-4), r
    assert "- (router only)" in md
    # the columns a reader cannot infer: selected's share of what, and throughput's direction
    assert "selected = the share of the valid tokens nested" in md
    assert "throughput = base time / DND time" in md
    assert all(r["throughput"] == pytest.approx(r["base_s"] / r["dnd_s"]) for r in result["rows"])


def test_fit_thresholds_nests_the_ratio_of_the_calibration_tokens():
    import torch

    from dyndepth.methods import attach_dnd

    torch.manual_seed(0)
    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3")).eval()
    attach_dnd(model, {"layers": [0, 1], "router_init_std": 1.0})
    ids = torch.randint(0, 256, (4, 25))
    fit_thresholds(model, [ids], 0.2)
    with torch.no_grad():
        stats = model(ids).stats
    for layer in (0, 1):  # layer 1 fitted after layer 0's tau is set: exact too
        assert float(stats[f"dnd/selected/L{layer}"]) == pytest.approx(0.2)


def test_quality_bench_post_trains_dnd_and_sft_at_equal_tokens(tmp_path):
    dyndepth.CausalLM(dyndepth.preset("demo-tiny")).save_pretrained(tmp_path / "base")
    data = {"source": "synthetic", "synthetic_examples": 6000, "tasks": ["add", "copy"]}
    cfg = DNDQualityConfig(base=str(tmp_path / "base"), steps=2, eval_examples=2, data=data, out_dir=str(tmp_path))
    result = main(None, cfg)["quality"]
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"SFT", "DND"} and rows["SFT"]["compute"] == 1.0 and rows["DND"]["compute"] > 1.0
    r = result["entropy"]["pearson_r"]  # None when every token was nested equally often (2 steps of training)
    assert rows["DND"]["perplexity"] > 1.0 and (r is None or -1 <= r <= 1)
    assert result["entropy"]["tokens"] == 4 * 128  # 4 probe rows of the demo base's training window
    metrics = tmp_path / "dnd_quality_runs" / "dnd" / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert any("dnd/tau/L1" in r for r in records)
    sft = (tmp_path / "dnd_quality_runs" / "sft" / "metrics.jsonl").read_text()
    assert "dnd/" not in sft  # the baseline is the plain fine-tune
    for name in ("controller", "heatmap"):
        assert (tmp_path / f"dnd_{name}.png").stat().st_size > 1000


def test_compiled_decode_runs_the_nested_block_on_every_row(tmp_path):
    """`compile=True`: in a compiled decode step every row runs the nested block (one graph), so the FLOP overhead
    that ran is the same whichever rows nested, at every batch size; the heading says how decode ran."""
    # tiny-qwen3 (2 layers, both nested): eager, its B=1 rows nest no token and its B=3 rows 28%
    cfg = DNDBenchConfig(model="tiny-qwen3", batches=[1, 3], prefill_len=24, decode_prompt_len=8, new_tokens=4,
                         repeats=1, ratio=0.3, compile=True, compile_backend="eager", out_dir=str(tmp_path))
    decode = [r for r in main(cfg)["throughput"]["rows"] if r["phase"] == "decode"]
    assert decode[0]["flops_overhead"] == pytest.approx(decode[1]["flops_overhead"], rel=1e-6)
    assert decode[0]["flops_overhead"] > 0.1  # two nested layers of every row, not the routers alone
    for r in decode:  # what the selected tokens needed is less than what ran
        assert r["ideal_overhead"] < r["flops_overhead"]
    md = (tmp_path / "dnd-cpu-float32-compiled.md").read_text()
    assert "compiled (eager, static cache)" in md


def test_a_missing_quality_base_is_refused_before_the_throughput_runs(tmp_path, monkeypatch):
    """`--quality --base` naming no checkpoint failed only after the whole throughput bench had run (minutes at the
    default sizes): the base is checked when the options are, before any work."""
    from typer.testing import CliRunner

    import dyndepth.bench.dnd as dnd_bench
    from dyndepth.cli import app

    ran = []
    monkeypatch.setattr(dnd_bench, "run_throughput", lambda cfg: ran.append(cfg))
    result = CliRunner().invoke(app, ["bench", "dnd", "--model", "tiny-qwen3", "--quality", "--base",
                                      str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "is not a checkpoint folder" in result.output, result.output
    assert ran == []


def test_a_compiled_decode_row_that_nested_nothing_still_divides_by_what_ran(tmp_path):
    """Compiled, every row runs the nested block whether or not a token was selected: a decode row with nothing
    selected ran +85% FLOPs (tiny-qwen3), not the routers' ~0.1%, and read "- (router only)" with no ratio."""
    cfg = DNDBenchConfig(model="tiny-qwen3", batches=[1], prefill_len=16, new_tokens=2, repeats=1, compile=True,
                         compile_backend="eager", out_dir=str(tmp_path))
    decode = [r for r in main(cfg)["throughput"]["rows"] if r["phase"] == "decode"]
    assert decode[0]["selected"] == 0 and decode[0]["flops_overhead"] > 0.5  # this preset and seed nest nothing
    assert decode[0]["wall_over_flops"] == pytest.approx(decode[0]["wall_overhead"] / decode[0]["flops_overhead"])
    assert "router only" not in (tmp_path / "dnd-cpu-float32-compiled.md").read_text()


def test_an_empty_entropy_group_reads_as_a_dash_not_nan(tmp_path):
    """After a step or two every token is nested: the others' mean entropy (and r, with no spread) has no value,
    and the table printed "others nan" and the JSON a bare NaN."""
    dyndepth.CausalLM(dyndepth.preset("demo-tiny")).save_pretrained(tmp_path / "base")
    data = {"source": "synthetic", "synthetic_examples": 6000, "tasks": ["add", "copy"]}
    cfg = DNDQualityConfig(base=str(tmp_path / "base"), steps=1, eval_examples=1, data=data, out_dir=str(tmp_path))
    entropy = main(None, cfg)["quality"]["entropy"]
    assert entropy["entropy_other"] is None  # every token nested: no other token
    assert all(v is None or math.isfinite(v) for v in entropy.values())
    assert "nan" not in (tmp_path / "dnd.md").read_text().lower()
    assert "NaN" not in (tmp_path / "dnd.json").read_text()
    # the compute column (1, 1.18) is relative to the SFT row: the heading says so (it named no reference)
    assert "compute = executed FLOPs per token / the SFT model's" in (tmp_path / "dnd.md").read_text()


@pytest.mark.parametrize("layers, band", [(2, [0, 1]), (4, [1, 2])])
def test_the_quality_runs_nest_in_the_middle_of_the_bases_own_layers(tmp_path, monkeypatch, layers, band):
    """--quality nested layers 1..2, the demo base's band, whatever the base: a 2-layer base trained the SFT run,
    then failed with "dnd.layers=(1, 2) selects no band of a 2-layer model", a setting the bench has no flag for."""
    import dyndepth
    import dyndepth.bench.quality as quality_bench
    from dyndepth.bench.dnd import DNDQualityConfig, run_quality

    base = tmp_path / "base"
    dyndepth.CausalLM(dyndepth.preset("demo-tiny", num_hidden_layers=layers)).save_pretrained(base)
    methods = []

    def posttrain(cfg, method, out):
        methods.append(method)
        raise _Stop

    monkeypatch.setattr(quality_bench, "_posttrain", posttrain)
    with pytest.raises(_Stop):
        run_quality(DNDQualityConfig(base=str(base), steps=1, eval_examples=1, out_dir=str(tmp_path / "out")))
    assert methods == [{"name": "none", "layers": band, "ratio": 0.2}]


class _Stop(Exception):
    pass
