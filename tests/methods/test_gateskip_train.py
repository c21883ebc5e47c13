"""Post-training a saved checkpoint with `dyndepth train --method gateskip`, end to end through the CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

import dyndepth
from dyndepth.cli import app


def test_cli_posttrains_a_pretrained_model_with_gateskip(tmp_path):
    base = dyndepth.CausalLM(dyndepth.preset("demo-tiny"))
    base.save_pretrained(tmp_path / "base")
    recipe = tmp_path / "post.toml"
    recipe.write_text(
        f'[model]\npretrained = "{tmp_path / "base"}"\n'
        "[method]\nramp_end = 0.2\n"
        f'[train]\nsteps = 4\nbatch_size = 2\nseq_len = 32\nwarmup = 1\nlr = 1e-3\nmin_lr = 1e-4\nlog_every = 1\n'
        f'progress = false\nplot = false\ndevice = "cpu"\neval_batches = 1\nout_dir = "{tmp_path / "run"}"\n'
        '[data]\nsource = "embedded"\nsynthetic_examples = 200\nstdlib_bytes = 20000\n')
    result = CliRunner().invoke(app, ["train", str(recipe), "--method", "gateskip"])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # each step logs the budget it trained at: 0 at the first step, the ramp's end at the last (the metric read one
    # step ahead, and the last step trained one ramp step short of 0.2)
    steps = [r for r in records if "gateskip/budget" in r]  # (the last record is the evaluation's)
    assert [r["gateskip/budget"] for r in steps] == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])
    assert steps[0]["gateskip/attn_skipped"] == 0.0 < steps[-1]["gateskip/attn_skipped"] <= 0.2
    assert any("gateskip/gate_sq" in r for r in records)
    tuned = dyndepth.from_pretrained(tmp_path / "run" / "model")
    assert tuned.method is not None and tuned.method.name == "gateskip"
    moved = tuned.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight
    assert moved.abs().max() > 0  # full fine-tune: the backbone trained too
    assert torch.isfinite(tuned(torch.randint(0, 259, (1, 8))).logits).all()
