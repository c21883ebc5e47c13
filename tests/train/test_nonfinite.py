"""A NaN or inf injected into one training step (through a hook's auxiliary loss, which reaches every
gradient): train.nonfinite="stop" ends the run naming the step with the last checkpoint intact;
"skip" drops that update, counts it, and goes on."""

import json
import logging
import math

import pytest
import torch
from tiny_loader import TinyLoader
from train_script import tiny_train_config

from dyndepth import CausalLM, preset
from dyndepth.runconfig import RunConfigError
from dyndepth.train import Hook, train
from dyndepth.train.checkpoint import list_checkpoints, verify_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class PoisonHook(Hook):
    """At optimizer step `at` (grad_accum=1: one aux_loss call per step), an auxiliary loss of `value` times
    the mean logit, so every gradient turns non-finite; zero otherwise. Snapshots a weight at each call."""

    name = "poison"

    def __init__(self, at: int, value: float = math.nan) -> None:
        self.at, self.value, self.calls, self.weights = at, value, 0, {}

    def aux_loss(self, model, batch, out):
        self.calls += 1
        self.weights[self.calls] = model.model.norm.weight.detach().clone()  # after step calls - 1
        scale = self.value if self.calls == self.at else 0.0
        return out.logits.float().mean() * scale, {}

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def _train(out_dir, hook: PoisonHook, steps: int, **kw):
    torch.manual_seed(0)
    cfg = tiny_train_config(str(out_dir), steps=steps, save_every=2, **kw)
    return train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16), cfg, hooks=[hook])


def _records(out_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_stop_names_the_step_and_leaves_the_last_checkpoint_intact(tmp_path, value):
    ref = tmp_path / "ref"
    _train(ref, PoisonHook(at=0), steps=8)  # the same run without the fault
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"step 5: the loss is -?(nan|inf) and the gradient norm (nan|inf);.*"
                                                 r"not applied.*step_0000004, is intact"):
        _train(run, PoisonHook(at=5, value=value), steps=8)
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    assert not list(run.glob("*.tmp"))
    verify_checkpoint(run / "step_0000004")
    assert max(_records(run)) == 4  # nothing logged from step 5
    _train(run, PoisonHook(at=0), steps=8, resume=True)  # resume the clean run
    got, want = _records(run), _records(ref)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        assert abs(got[step]["loss"] - want[step]["loss"]) <= 1e-6, step


def test_skip_drops_the_update_counts_it_and_survives_resume(tmp_path, caplog):
    hook = PoisonHook(at=3)
    with caplog.at_level(logging.WARNING, logger="dyndepth"):
        result = _train(tmp_path / "straight", hook, steps=6, nonfinite="skip")
    warned = [r.getMessage() for r in caplog.records if "was skipped" in r.getMessage()]
    assert len(warned) == 1 and "non-finite objective (nan: the loss" in warned[0]  # it quoted the finite loss
    assert result.nonfinite_steps == 1 and result.steps == 6
    assert not torch.equal(hook.weights[2], hook.weights[3])  # step 2 updated the weights
    assert torch.equal(hook.weights[3], hook.weights[4])  # step 3 did not
    records = _records(tmp_path / "straight")
    assert [records[s]["nonfinite_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert records[3]["grad_norm"] is None  # NaN, written as strict JSON's null
    assert all(math.isfinite(records[s]["loss"]) for s in records)
    state = torch.load(tmp_path / "straight" / "step_0000006" / "train_state.pt", weights_only=True)
    assert state["nonfinite_steps"] == 1
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {5.0}  # AdamW took 5 steps
    # the same run, stopped at step 4 and resumed: same curve, and the count carries over
    _train(tmp_path / "resumed", PoisonHook(at=3), steps=4, nonfinite="skip")
    resumed = _train(tmp_path / "resumed", PoisonHook(at=3), steps=6, nonfinite="skip", resume=True)
    assert resumed.nonfinite_steps == 1
    again = _records(tmp_path / "resumed")
    assert [again[s]["nonfinite_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    for step in records:
        assert abs(again[step]["loss"] - records[step]["loss"]) <= 1e-6, step


def test_nonfinite_takes_only_stop_or_skip():
    with pytest.raises(RunConfigError, match=r"train\.nonfinite='ignore' is not one of \('stop', 'skip'\)"):
        tiny_train_config("unused", nonfinite="ignore")


class GradientPoison(PoisonHook):
    """At step `at`, a finite loss whose backward turns the logits' gradient to NaN (a loss-only check misses it)."""

    def aux_loss(self, model, batch, out):
        self.calls += 1
        if self.calls == self.at and out.logits.requires_grad:
            out.logits.register_hook(lambda g: g * math.nan)
        return out.logits.new_zeros((), dtype=torch.float32), {}


def test_a_non_finite_gradient_under_a_finite_loss_stops_the_run(tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 3: the loss is [0-9.]+ and the gradient norm nan"):
        _train(tmp_path, GradientPoison(at=3), steps=4)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002"]


def test_skip_warns_on_rank_0_only(tmp_path, caplog, monkeypatch):
    # under torchrun every rank skips the same step (the flag is all-reduced), and each printed the warning
    from dyndepth.train import checkpoint, parallel
    from dyndepth.train.parallel import DistInfo

    monkeypatch.setattr(parallel, "init_distributed", lambda *a, **k: DistInfo(rank=1))  # a non-main rank
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda *a, **k: None)  # (rank 0 makes the folder)
    with caplog.at_level(logging.WARNING, logger="dyndepth"):
        result = _train(tmp_path / "rank1", PoisonHook(at=2), steps=3, nonfinite="skip")
    assert result.nonfinite_steps == 1  # skipped and counted there too, only not said
    assert not [r for r in caplog.records if "was skipped" in r.getMessage()]
