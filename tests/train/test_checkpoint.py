import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_loader import TinyLoader
from train_script import tiny_train_config

from dyndepth import CausalLM, preset
from dyndepth.train import train
from dyndepth.train.checkpoint import latest_checkpoint, list_checkpoints, load_model_weights

SCRIPT = Path(__file__).with_name("train_script.py")


def test_latest_ignores_tmp_and_incomplete_dirs_and_keep_last(tmp_path):
    cfg = tiny_train_config(str(tmp_path), steps=6, save_every=1, keep_last=2)
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3"))
    train(model, TinyLoader(2, 16), cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005", "step_0000006"]
    (tmp_path / "step_0000009.tmp").mkdir()  # a save killed before its rename
    (tmp_path / "step_0000009.tmp" / "train_state.pt").write_bytes(b"partial")
    (tmp_path / "step_0000008").mkdir()  # not a complete checkpoint (no train_state.pt)
    assert latest_checkpoint(tmp_path).name == "step_0000006"
    assert sorted(p.name for p in (tmp_path / "step_0000006").iterdir()) == [
        "config.yaml", "model.safetensors", "rank_0.pt", "train_state.pt"]
    # the weights (tied lm_head re-aliased) load into a fresh model and match the trained one
    fresh = CausalLM(preset("tiny-qwen3"))
    load_model_weights(tmp_path / "step_0000006", fresh)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    # a fresh (non-resume) run into a folder with checkpoints is refused instead of mixing runs
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16), cfg)


def _losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _run(out_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out_dir), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_then_resume_follows_the_uninterrupted_loss_curve(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref = _run(ref_dir)  # uninterrupted, in parallel with the run we kill
    victim = _run(run_dir, "--sleep-at", "6")  # stops inside step 6, after the step-4 checkpoint
    deadline = time.time() + 60
    while not (run_dir / "sleeping").exists():
        assert victim.poll() is None, victim.stdout.read().decode()
        assert time.time() < deadline, "the victim run never reached step 6"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert latest_checkpoint(run_dir).name == "step_0000004"
    assert max(_losses(run_dir)) == 5  # step 6 never logged; step 5 will be dropped and redone
    resumed = _run(run_dir, "--resume")
    out, _ = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, out.decode()
    out, _ = ref.communicate(timeout=60)
    assert ref.returncode == 0, out.decode()
    expected, got = _losses(ref_dir), _losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    assert latest_checkpoint(run_dir).name == "step_0000012"
