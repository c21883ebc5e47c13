import json

import pytest
import torch

import dyndepth
from dyndepth.eval.dreamer import render, run_study
from dyndepth.runconfig import RunConfig, TrainConfig, save_run_config


@pytest.fixture
def run_dir(tmp_path):
    """A `dyndepth train`-shaped folder: config.yaml (synthetic data) and an exported Dreamer in model/."""
    torch.manual_seed(0)
    model = dyndepth.build_model(dyndepth.preset("dreamer-tiny", num_recurrences=2))
    model.save_pretrained(tmp_path / "model")
    data = {"source": "synthetic", "tasks": ["add", "var"], "synthetic_examples": 200,
            "difficulty": {"add": {"digits": 1}, "var": {"hops": 1}}}
    rc = RunConfig(model={"preset": "dreamer-tiny"}, data=data, train=TrainConfig(batch_size=2, seq_len=32))
    save_run_config(rc, tmp_path / "config.yaml")
    return tmp_path


def test_study_sweeps_depth_and_writes_the_heatmap(run_dir):
    result = run_study(run_dir, examples_per_task=2, num_batches=1, exit_kls=(1e-3,))
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["R=1", "R=2 (trained)", "R=4", "exit KL<0.001"]
    for row in result["rows"][:3]:  # fixed depth: every token runs every step
        assert row["avg_depth"] == pytest.approx(row["steps"]) and 0 <= row["exact_match"] <= 1
        assert row["flops_ideal"] == pytest.approx(row["flops_executed"])
    deeper = [r["flops_executed"] for r in result["rows"][:3]]
    assert deeper == sorted(deeper)  # more steps, more compute
    exit_row = result["rows"][-1]
    assert exit_row["avg_depth"] <= 2 and exit_row["flops_ideal"] <= exit_row["flops_executed"]
    assert (run_dir / "expert_usage.png").stat().st_size > 0 and (run_dir / "quality_vs_depth.png").exists()
    usage = torch.tensor(result["expert_usage"])
    assert usage.shape == (2, 16) and torch.allclose(usage.sum(-1), usage.sum(-1)[0].expand(2))
    saved = json.loads((run_dir / "dreamer_study.json").read_text())
    assert 0 < saved["expert_diversity"] <= 1 and len(saved["state_change"]) == 2
    assert "| R=2 (trained) |" in render(result)
