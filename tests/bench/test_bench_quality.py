import collections
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


def test_a_methods_settings_are_joined_in_knob_order_even_at_equal_compute():
    """GateSkip at q = 0 and 15% both executed 114% (the masked path): joined by compute, the demo's figure ran
    q=30% -> q=0% -> q=15%, which is no budget trade-off."""
    from dyndepth.plots import method_series

    def row(label, q, compute):
        return {"label": label, "method": "gateskip", "knobs": {"budget": q}, "compute": compute}

    rows = [row("q=30%", 0.3, 0.84), row("q=15%", 0.15, 1.138), row("q=0%", 0.0, 1.138), row("q=50%", 0.5, 0.66),
            {"label": "base", "method": "base", "knobs": {}, "compute": 1.0}]
    series = method_series(rows)
    assert [r["label"] for r in series["gateskip"]] == ["q=0%", "q=15%", "q=30%", "q=50%"]
    assert [r["label"] for r in series["base"]] == ["base"]


def test_a_post_trained_contender_does_not_depend_on_what_ran_before_it(tmp_path):
    """The method's new parameters were drawn from the global generator before the run seeded it: a contender's
    result depended on the contenders trained earlier (6.8 logits apart)."""
    import torch

    from dyndepth.bench.compare import posttrain
    from dyndepth.data.build import build_loader
    from dyndepth.runconfig import TrainConfig
    from dyndepth.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    base = dyndepth.CausalLM(dyndepth.preset("demo-tiny")).save_pretrained(tmp_path / "base")
    loader = build_loader({"source": "synthetic", "synthetic_examples": 200}, split="train", batch_size=2, seq_len=32,
                          seed=0, tokenizer=ByteTokenizer())
    start, logits = loader.state_dict(), []
    for prior in (0, 1):
        torch.manual_seed(prior)  # stands for whatever ran before this contender
        loader.load_state_dict(start)
        model = posttrain(str(base), {"name": "gateskip"}, loader,
                          TrainConfig(steps=2, batch_size=2, seq_len=32, device="cpu", out_dir=str(tmp_path / f"pt{prior}"),
                                      save_every=0, progress=False, plot=False, log_every=1))
        with torch.no_grad():
            logits.append(model(torch.arange(32)[None] % 200).logits)
    assert torch.equal(logits[0], logits[1])


def test_zero_post_training_steps_are_refused_before_any_work(tmp_path, monkeypatch):
    """`--steps 0` failed as "train.steps must be >= 1" only after the base had been scored (bench quality) or the
    whole throughput bench had run (bench dnd --quality): the option is checked with the others."""
    from typer.testing import CliRunner

    import dyndepth
    import dyndepth.bench.dnd as dnd_bench
    import dyndepth.bench.quality as quality_bench
    from dyndepth.cli import app

    dyndepth.CausalLM(dyndepth.preset("demo-tiny")).save_pretrained(tmp_path / "base")
    ran = []
    monkeypatch.setattr(quality_bench, "_score", lambda *a, **k: ran.append("score"))
    monkeypatch.setattr(dnd_bench, "run_throughput", lambda cfg: ran.append("throughput"))
    for args in (["bench", "quality"], ["bench", "dnd", "--model", "tiny-qwen3", "--quality"]):
        result = CliRunner().invoke(app, [*args, "--base", str(tmp_path / "base"), "--steps", "0", "--out",
                                          str(tmp_path / "out")])
        assert result.exit_code == 2 and "steps must be >= 1, got 0" in result.output, result.output
    assert ran == []


class _Scored(Exception):
    pass


@pytest.mark.parametrize("bench", ["quality", "dnd"])
def test_the_held_out_prompts_are_eval_examples_per_task(tmp_path, monkeypatch, bench):
    """eval_examples is per task (the docs: 120 held-out prompts, 40 per task), but the prompts were drawn with the
    training mix's weights: the demo's data (2:1:1) gave var 68, sort 29, copy 23, and the exact match leaned to
    var, the task GateSkip keeps best."""
    from dyndepth.bench import quality
    from dyndepth.bench.compare import DEMO_DATA
    from dyndepth.bench.dnd import DNDQualityConfig, run_quality

    dyndepth.CausalLM(dyndepth.preset("demo-tiny")).save_pretrained(tmp_path / "base")
    seen = []

    def score(model, label, examples, *args):  # the first row's prompts, then stop: nothing else to check
        seen.append(collections.Counter(e.task for e in examples))
        raise _Scored

    monkeypatch.setattr(quality, "_score", score)
    monkeypatch.setattr(quality, "_posttrain", lambda *args: dyndepth.from_pretrained(tmp_path / "base"))
    data = {**DEMO_DATA, "synthetic_examples": 8000}
    with pytest.raises(_Scored):
        if bench == "quality":
            quality.run_quality_bench(quality.QualityBenchConfig(base=str(tmp_path / "base"), eval_examples=10,
                                                                 data=data, out_dir=str(tmp_path / "out")))
        else:
            run_quality(DNDQualityConfig(base=str(tmp_path / "base"), eval_examples=10, data=data,
                                         out_dir=str(tmp_path / "out")))
    assert seen == [{"var": 10, "sort": 10, "copy": 10}]


def test_a_post_training_folder_holding_what_no_run_wrote_is_not_deleted(tmp_path):
    # posttrain deleted its out_dir to start afresh: `repro --out .` removed a user's ./runs/sft whatever it held
    from dyndepth.bench.compare import posttrain
    from dyndepth.runconfig import TrainConfig

    mine = tmp_path / "runs" / "sft"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files no training run wrote"):
        posttrain(str(tmp_path / "base"), {"name": "none"}, None, TrainConfig(steps=1, out_dir=str(mine)))
    assert (mine / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args", [["bench", "quality"], ["bench", "dnd", "--no-throughput", "--quality"]])
def test_a_base_with_a_tokenizer_other_than_bytes_is_refused_before_any_work(tmp_path, monkeypatch, args):
    """Both benches train and score on the embedded tasks as bytes: a GPT-2 BPE base (`dyndepth train` on Gutenberg)
    was post-trained and scored on byte ids its embeddings never saw, and printed a table of meaningless losses."""
    from typer.testing import CliRunner

    import dyndepth
    import dyndepth.bench.quality as quality_bench
    from dyndepth.cli import app
    from dyndepth.tokenizer import train_bpe

    base = tmp_path / "base"
    dyndepth.CausalLM(dyndepth.preset("tiny-qwen3", vocab_size=400)).save_pretrained(base)
    train_bpe(iter(["some text to learn a few merges from"] * 20), 300).save(base)
    ran = []
    monkeypatch.setattr(quality_bench, "_posttrain", lambda *a, **k: ran.append("posttrain"))
    monkeypatch.setattr(quality_bench, "_score", lambda *a, **k: ran.append("score"))
    result = CliRunner().invoke(app, [*args, "--base", str(base), "--steps", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "carries its own HFTokenizer" in result.output, result.output
    assert "--base a model trained on the embedded data with the byte tokenizer" in result.output
    assert ran == []


@pytest.mark.parametrize("args", [["bench", "quality"], ["bench", "dnd", "--no-throughput", "--quality"]])
def test_a_base_that_is_no_decoder_is_refused_before_any_work(tmp_path, monkeypatch, args):
    """A Dreamer base (`dyndepth train recipes/dreamer_tiny_cpu.toml`, byte tokenizer) was scored and post-trained
    for the first contender (SFT), then failed: "dnd attaches to decoder models ... DreamerLM has none"."""
    from typer.testing import CliRunner

    import dyndepth.bench.quality as quality_bench
    from dyndepth.cli import app
    from dyndepth.models import preset_model

    base = tmp_path / "base"
    preset_model("dreamer-tiny").save_pretrained(base)
    ran = []
    monkeypatch.setattr(quality_bench, "_posttrain", lambda *a, **k: ran.append("posttrain"))
    monkeypatch.setattr(quality_bench, "_score", lambda *a, **k: ran.append("score"))
    result = CliRunner().invoke(app, [*args, "--base", str(base), "--steps", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "is a 'dreamer' model; the methods attach to decoders" in result.output, \
        result.output
    assert ran == []
