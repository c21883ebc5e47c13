from pathlib import Path

import pytest

from dyndepth import CausalLM, preset
from dyndepth.train import metrics
from dyndepth.train.metrics import flops_per_token, plot_loss
from dyndepth.train.optim import apply_freeze


def test_frozen_parameters_cost_4n_and_trainable_ones_6n():
    model = CausalLM(preset("tiny-qwen3"))
    cfg, T = model.config, 16
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T
    n = sum(p.numel() for p in model.parameters() if p.dim() >= 2)  # tied embeddings: once, as lm_head; no norms
    assert flops_per_token(model, T) == pytest.approx(6 * n + attn)
    frozen = apply_freeze(model, ["model.layers.0.*"])
    n0 = sum(p.numel() for name, p in model.named_parameters() if name in frozen and p.dim() >= 2)
    assert n0 > 0
    assert flops_per_token(model, T) == pytest.approx(6 * (n - n0) + 4 * n0 + attn)


def test_moe_experts_count_with_their_top_k_fraction():
    model = CausalLM(preset("tiny-qwen3-moe"))
    cfg, T = model.config, 16
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    n = sum(p.numel() for p in model.parameters() if p.dim() >= 2) - model.model.embed_tokens.weight.numel()
    # (untied: a lookup; norm weights and biases are elementwise)
    assert not cfg.tie_word_embeddings and 0 < experts < n and cfg.num_experts_per_tok < cfg.num_experts
    routed = experts * cfg.num_experts_per_tok / cfg.num_experts
    assert flops_per_token(model, T) == pytest.approx(6 * (n - experts + routed) + attn)


def test_resume_over_a_metrics_line_torn_by_a_kill_keeps_the_records(tmp_path):
    """A run killed while appending to metrics.jsonl leaves a partial last line; resuming stopped with
    "error: Expecting ',' delimiter: line 1 column 25 (char 24)", naming no file."""
    import json

    from dyndepth.runconfig import TrainConfig
    from dyndepth.train.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 3.0}\n{"step": 20, "loss": 2.5}\n{"step": 30, "lo')
    logger = MetricsLogger(tmp_path, TrainConfig(), enabled=True, resume_step=20)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    assert (tmp_path / "metrics.abandoned_0.jsonl").read_text().endswith('{"step": 30, "lo')  # set aside, not lost
    logger.log({"step": 30, "loss": 2.0})
    assert [r["step"] for r in logger.records] == [10, 20, 30]


def test_a_kill_while_resume_rewrites_the_metrics_keeps_the_history(tmp_path, monkeypatch):
    # resume rewrote metrics.jsonl in place: a kill during the write left it cut short
    import pathlib

    from dyndepth.runconfig import TrainConfig
    from dyndepth.train.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    history = "".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (10, 20, 30))
    path.write_text(history)
    write_text = pathlib.Path.write_text

    def killed(self, text, *args, **kwargs):  # half the text reaches the disk, then the process dies
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):  # (resumed at the last record: nothing to set aside, all rewritten)
        MetricsLogger(tmp_path, TrainConfig(), enabled=True, resume_step=30)
    monkeypatch.undo()
    assert path.read_text() == history


@pytest.mark.parametrize("key", ["tensorboard", "wandb"])
def test_a_logger_without_its_package_is_named_before_the_run_builds_anything(tmp_path, monkeypatch, key):
    # train.wandb=true without wandb stopped with "No module named 'wandb'" (no fix named) once the model and data were
    # built, and after a resumed run's metrics.jsonl had been rewritten
    import importlib.util

    from dyndepth.runconfig import load_run_config
    from dyndepth.train import run_training

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == key else find_spec(name, *a))
    recipe = load_run_config(None, [f"train.{key}=true", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ImportError, match=rf"train.{key}=true needs the {key} package: pip install {key}.*; or set "
                                          rf"train.{key}=false\."):
        run_training(recipe)
    assert not (tmp_path / "run").exists()


def test_a_loss_curve_of_one_logged_step_is_drawn(tmp_path, monkeypatch):
    """A run shorter than log_every (the demo's 6-step contenders at log_every 25) logs one record: loss.png drew it
    as a line without a marker, i.e. nothing, an empty plot under a 'train' legend."""
    figures = []
    monkeypatch.setattr(metrics, "save_figure", lambda fig, path, *args, **kw: figures.append(fig) or path)
    plot_loss([{"step": 6, "loss": 1.5}], tmp_path / "loss.png")
    (line,) = figures[0].axes[0].lines
    assert list(line.get_xdata()) == [6] and line.get_marker() not in ("None", "", None)


def _strict(text: str):
    """json.loads as jq / JavaScript parse: NaN and Infinity are not JSON."""
    import json

    def refuse(word):
        raise ValueError(f"{word} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_metrics_are_written_as_strict_json_and_read_back(tmp_path, monkeypatch):
    """A step skipped as non-finite logged grad_norm NaN, an overflowed eval perplexity inf: metrics.jsonl held the
    bare words NaN / Infinity, which jq, JavaScript and strict parsers refuse. They are null now, and the run's
    own readers (resume, the loss plot) take null back as NaN."""
    import math

    from dyndepth.runconfig import TrainConfig
    from dyndepth.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, TrainConfig(), enabled=True)
    logger.log({"step": 1, "loss": 2.0, "grad_norm": 1.0})
    logger.log({"step": 2, "loss": math.nan, "grad_norm": math.inf})
    logger.log({"step": 2, "eval_loss": 800.0, "eval_ppl": math.inf})
    lines = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 2, "loss": None, "grad_norm": None}
    assert lines[2]["eval_ppl"] is None
    resumed = MetricsLogger(tmp_path, TrainConfig(), enabled=True, resume_step=2)  # resume rewrites the file
    assert resumed.records == lines
    figures = []
    monkeypatch.setattr(metrics, "save_figure", lambda fig, path, *args, **kw: figures.append(fig) or path)
    plot_loss(resumed.records, tmp_path / "loss.png")  # (a null loss: a gap in the curve)
    train_line = figures[0].axes[0].lines[0]
    assert list(train_line.get_xdata()) == [1, 2] and math.isnan(train_line.get_ydata()[1])


def test_tensorboard_of_a_resumed_run_hides_the_abandoned_steps_and_a_new_run_sets_the_old_curves_aside(
        tmp_path, monkeypatch):
    """metrics.jsonl drops the records past the resumed step (and a new run sets the old file aside), but the
    TensorBoard writer appended to the same event folder: the abandoned run's steps past the checkpoint stayed, and
    the curves of a resumed run (or of two runs) were drawn over each other."""
    import importlib.util
    import sys
    import types

    from dyndepth.runconfig import TrainConfig
    from dyndepth.train.metrics import MetricsLogger

    writers = []

    class Writer:  # (the tensorboard package is optional: a stand-in that records how it was opened)
        def __init__(self, log_dir, **kw):
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / f"events.{len(writers)}").write_text("")
            writers.append(kw)

        def close(self):
            pass

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorboard"
                        else find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    cfg = TrainConfig(tensorboard=True)
    MetricsLogger(tmp_path, cfg, enabled=True).close()
    assert writers[-1].get("purge_step") is None
    MetricsLogger(tmp_path, cfg, enabled=True, resume_step=20).close()
    assert writers[-1]["purge_step"] == 21  # events of step >= 21 (the abandoned run's) are hidden
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == ["events.0", "events.1"]
    MetricsLogger(tmp_path, cfg, enabled=True).close()  # a new run in the folder: the old curves go aside
    assert sorted(p.name for p in (tmp_path / "tensorboard.abandoned_0").iterdir()) == ["events.0", "events.1"]
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == ["events.2"]


@pytest.mark.parametrize(("name", "tflops"), [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                              ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
                                              ("NVIDIA H200 NVL", 835)])
def test_mfu_divides_by_the_peak_of_the_cards_own_variant(monkeypatch, name, tflops):
    # every name holding "H100" took the SXM card's 989 TFLOP/s: the PCIe card's MFU read 24% low
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_flops(torch.device("cuda"), None) == tflops * 1e12
