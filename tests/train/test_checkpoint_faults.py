"""Faults injected into training checkpoints, each followed by a resume that must follow the loss curve of
one uninterrupted run: SIGKILL during training and at three points of a save, a full disk (ENOSPC) at
every save point and from the writers themselves, truncated, bit-flipped, missing and garbled files, and
pickles that would run code on load."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_loader import TinyLoader
from train_script import tiny_train_config

from dyndepth import CausalLM, preset
from dyndepth.safetensors_io import CheckpointError
from dyndepth.train import Hook, train
from dyndepth.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    rng_state,
    set_rng_state,
    verify_checkpoint,
)
from dyndepth.train.integrity import write_manifest
from dyndepth.train.parallel import DistInfo
from dyndepth.train.trainer import setup_model

SCRIPT = Path(__file__).with_name("train_script.py")
KILLED_SAVE_POINTS = ("before_weights", "after_weights", "before_rename")


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out_dir: Path, steps: int = 12, hooks=(), **kw):
    """The run of train_script.py (12 steps, checkpoints at 4, 8 and 12) in this process."""
    torch.manual_seed(0)
    cfg = tiny_train_config(str(out_dir), steps=steps, **kw)
    return train(CausalLM(preset("tiny-qwen3")), TinyLoader(4, 16), cfg, hooks=hooks)


def _losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _assert_same_curve(run_dir: Path, ref_dir: Path) -> None:
    expected, got = _losses(ref_dir), _losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])


def _no_tmp(out_dir: Path) -> bool:
    return not list(out_dir.glob("*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    _train(out)
    torch.set_num_threads(threads)
    assert [p.name for p in list_checkpoints(out)] == ["step_0000004", "step_0000008", "step_0000012"]
    return out


# ----------------------------------------------------------------------------------------- SIGKILL

@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict[str, Path]:
    """Runs of train_script.py SIGKILLed inside step 6, and inside the step-8 save at each of
    KILLED_SAVE_POINTS (all started at once); each case's out_dir as the run left it."""
    root = tmp_path_factory.mktemp("killed")
    cases = {"training": (["--sleep-at", "6"], {}, "sleeping")}
    cases.update({p: ([], {"DYNDEPTH_CHECKPOINT_FAULT": f"{p}@8"}, f"{p}.fault") for p in KILLED_SAVE_POINTS})
    procs = {}
    for name, (args, env, _) in cases.items():
        env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        procs[name] = subprocess.Popen([sys.executable, str(SCRIPT), str(root / name), *args], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300  # a safety net for a broken run, not a timing assertion
    for name, (_, _, marker) in cases.items():
        proc = procs[name]
        while not (root / name / marker).exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, f"run {name} never reached its fault point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    return {name: root / name for name in cases}


@pytest.mark.parametrize("case", ["training", *KILLED_SAVE_POINTS])
def test_sigkill_then_resume_follows_the_uninterrupted_loss_curve(killed, reference, case):
    run_dir = killed[case]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004"]  # an unfinished save is no checkpoint
    if case == "training":
        assert max(_losses(run_dir)) == 5  # step 6 never logged; step 5 will be dropped and redone
    else:
        assert (run_dir / "step_0000008.tmp").is_dir() and max(_losses(run_dir)) == 8
        assert (run_dir / "step_0000008.tmp" / "manifest.json").exists() == (case == "before_rename")
    _train(run_dir, resume=True)
    _assert_same_curve(run_dir, reference)
    assert _no_tmp(run_dir)  # the killed save's folder is removed on resume
    assert latest_checkpoint(run_dir).name == "step_0000012"
    verify_checkpoint(latest_checkpoint(run_dir))


# --------------------------------------------------------------------------------------- full disk

def _fail_writer(monkeypatch, target: str, name: str) -> None:
    """Make the writer of `name` in the step-8 save write half of its bytes, then fail as a full disk does."""
    module, attr = ("dyndepth.safetensors_io", "_save") if target == "safetensors" else ("torch", "save")
    real = getattr(sys.modules[module], attr)

    def writer(obj, path, *args, **kwargs):
        path_str = str(path)
        if "step_0000008.tmp" not in path_str or name not in Path(path_str).name:
            return real(obj, path, *args, **kwargs)
        real(obj, path, *args, **kwargs)
        data = Path(path_str).read_bytes()
        Path(path_str).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sys.modules[module], attr, writer)


FULL_DISK = [("env", p) for p in ("before_weights", "after_weights", "before_manifest", "before_rename")]
FULL_DISK += [("safetensors", "model.safetensors"), ("torch", "train_state.pt"), ("torch", "rank_0.pt")]


@pytest.mark.parametrize(("how", "where"), FULL_DISK, ids=[f"{h}:{w}" for h, w in FULL_DISK])
def test_full_disk_during_a_save_keeps_the_previous_checkpoints(tmp_path, reference, monkeypatch, how, where):
    if how == "env":
        monkeypatch.setenv("DYNDEPTH_CHECKPOINT_FAULT", f"{where}@8:enospc")
    else:
        _fail_writer(monkeypatch, how, where)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step_0000008 .*No space left on device.*"
                                              r"untouched \(latest: step_0000004\)"):
        _train(tmp_path, keep_last=1)
    assert _no_tmp(tmp_path)  # nothing a later run could take for a checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004"]  # keep_last=1 pruned nothing
    verify_checkpoint(tmp_path / "step_0000004")
    monkeypatch.undo()
    _train(tmp_path, resume=True, keep_last=1)
    _assert_same_curve(tmp_path, reference)


# ------------------------------------------------------------------------------------ damaged files

def _damage(file: Path, how: str) -> None:
    if how == "delete":
        file.unlink()
        return
    data = bytearray(file.read_bytes())
    if how == "truncate":
        data = data[: len(data) * 2 // 3]
    elif how == "flip":
        data[len(data) // 2] ^= 0x04  # one bit, mid-file
    elif how == "garble":
        data = bytearray(b"{not json")
    file.write_bytes(bytes(data))


DAMAGE = [("model.safetensors", "truncate", "is truncated"), ("model.safetensors", "flip", "sha256 differs"),
          ("train_state.pt", "flip", "sha256 differs"), ("rank_0.pt", "truncate", "is truncated"),
          ("config.yaml", "delete", "is missing"), ("manifest.json", "garble", "manifest.json is damaged"),
          ("manifest.json", "delete", "has no manifest.json")]


@pytest.mark.parametrize(("name", "how", "says"), DAMAGE, ids=[f"{n}:{h}" for n, h, _ in DAMAGE])
def test_resume_skips_a_damaged_latest_checkpoint(tmp_path, reference, caplog, name, how, says):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _damage(run / "step_0000012" / name, how)
    with caplog.at_level(logging.WARNING, logger="dyndepth"):
        _train(run, resume=True)
    warning = [r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage()]
    assert len(warning) == 1 and "step_0000012" in warning[0] and says in warning[0], warning
    assert [p.name for p in (run / "abandoned_0").iterdir()] == ["step_0000012"]  # kept aside, not deleted
    # and so is the replaced run's log (its records past step 8 were dropped without a copy)
    assert (run / "metrics.abandoned_0.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    _assert_same_curve(run, reference)  # steps 9-12 redone from step 8
    verify_checkpoint(run / "step_0000012")


def test_an_explicitly_named_damaged_checkpoint_is_an_error(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _damage(run / "step_0000008" / "model.safetensors", "flip")
    with pytest.raises(CheckpointError, match=r"cannot resume from .*step_0000008: .*model\.safetensors is damaged"):
        _train(run, resume=str(run / "step_0000008"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged"):  # export checks it too
        load_model_weights(run / "step_0000008", CausalLM(preset("tiny-qwen3")))
    for ckpt in list_checkpoints(run):  # every checkpoint damaged: resume=true stops instead of starting over
        _damage(ckpt / "rank_0.pt", "truncate")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be resumed \(step_0000012: .*rank_0"):
        _train(run, resume=True)


def test_old_format_checkpoint_is_refused_with_the_way_out(tmp_path, reference):
    old = tmp_path / "step_0000004"
    shutil.copytree(reference / "step_0000004", old)
    (old / "manifest.json").unlink()
    torch.save({"rng": {"numpy": np.random.get_state()}, "loader": {"cursor": 4}}, old / "rank_0.pt")  # pickled numpy
    with pytest.raises(CheckpointError, match=r"older dyndepth.*dyndepth convert"):
        _train(tmp_path / "new", resume=str(old))


# ----------------------------------------------------------------------------------- no code on load

class _Payload:
    """Unpickling this runs `os.makedirs(marker)`, the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


@pytest.mark.parametrize("name", ["train_state.pt", "rank_0.pt"])
def test_a_checkpoint_carrying_a_malicious_pickle_is_refused(tmp_path, reference, name):
    ckpt, marker = tmp_path / "step_0000004", tmp_path / "code_ran"
    shutil.copytree(reference / "step_0000004", ckpt)
    state = torch.load(ckpt / name, weights_only=True)
    state["hooks" if name == "train_state.pt" else "loader"] = {"x": _Payload(marker)}
    torch.save(state, ckpt / name)
    write_manifest(ckpt, 4)  # whoever can write the files can write a matching manifest too
    cfg = tiny_train_config(str(tmp_path / "out"), steps=12)
    raw, _, opt, sched = setup_model(CausalLM(preset("tiny-qwen3")), cfg, DistInfo())
    with pytest.raises(CheckpointError, match=rf"{name} was refused: .*could run code"):
        load_checkpoint(ckpt, raw, opt, sched, TinyLoader(4, 16), DistInfo(), cfg)
    with pytest.raises(CheckpointError, match="was refused"):
        _train(tmp_path / "out", resume=str(ckpt))
    assert not marker.exists()


def test_state_that_would_need_pickle_is_refused_before_anything_is_written(tmp_path):
    class NumpyHook(Hook):
        name = "numpy_state"

        def state_dict(self):
            return {"history": np.zeros(3)}

    with pytest.raises(CheckpointError, match=r"hook state\['numpy_state'\]\['history'\] is a ndarray"):
        _train(tmp_path, steps=4, hooks=[NumpyHook()])
    assert list_checkpoints(tmp_path) == [] and _no_tmp(tmp_path)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(2))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
