"""Adaptive-depth methods against each other from one base model, shared by `make demo` and `dyndepth repro`.

Every method, and the plain fine-tune (SFT) it is compared with, post-trains a copy of the same base for
the same steps on the same batches (equal tokens). Each post-trained model is then scored at one or more
inference settings (GateSkip budgets, say) by a caller-given scorer (synthetic exact match in the demo,
offline lm-eval tasks in repro), and measured by the one compute report (`eval/compute.py`) on a fixed
probe batch: executed and ideal FLOPs per token, relative to the base model, and the forward's latency.

Every decision is causal, as in cached decoding (a token's route never depends on a later token):
GateSkip skips by per-branch thresholds calibrated at the budget, MoD routes by its predictor, DND nests
by its trained thresholds. Ranking a whole sequence at once (GateSkip's quantile rule, MoD's top-k) would
let a prompt token's route depend on the answer, which no generation can do.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import dyndepth
from dyndepth.bench.timing import interleaved_median
from dyndepth.eval.compute import compute_report
from dyndepth.methods import calibrate
from dyndepth.runconfig import RunConfig, TrainConfig
from dyndepth.train.run import build_hooks
from dyndepth.train.trainer import train

# The demo's data (`make demo`), so also the data its base was trained on (`bench quality` defaults to it):
# easy synthetic tasks with answer-only loss.
DEMO_DATA = {"source": "synthetic", "tokenizer": "byte", "tasks": ["var", "sort", "copy"], "task_weights": [2, 1, 1],
             "difficulty": {"var": {"hops": 1}, "sort": {"length": 4}, "copy": {"length": 5}},
             "synthetic_examples": 60_000, "synthetic_loss": "answer"}


@dataclass
class Contender:
    """One post-training run and the inference settings it is scored at."""

    label: str  # "SFT", "GateSkip", "MoD c=50%", ...
    method: dict  # the [method] section; {"name": "none"}: plain fine-tuning
    settings: list[dict] = field(default_factory=lambda: [{}])  # runtime knobs per scored row, e.g. {"budget": 0.3}


def posttrain(base: str, method: dict, loader, tcfg: TrainConfig):
    """A copy of the checkpoint `base` post-trained with `method` for `tcfg.steps` steps (fresh out_dir)."""
    out = Path(tcfg.out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "config.yaml").is_file():  # (not a training run's folder:
        # a user's `runs/sft` under `--out .` was deleted whatever it held)
        raise ValueError(f"{out} holds files no training run wrote (no config.yaml); a comparison replaces its own "
                         "post-training runs there: give another output folder.")
    model = dyndepth.from_pretrained(base)
    torch.manual_seed(tcfg.seed)  # the method's new parameters: the same whatever ran before (as `run_training`)
    hooks = build_hooks(method, model, tcfg.steps)
    shutil.rmtree(out, ignore_errors=True)  # this comparison's own previous run
    run_config = RunConfig(model={"pretrained": str(base)}, method=dict(method), train=tcfg)  # beside each checkpoint
    train(model, loader, tcfg, hooks=hooks, run_config=run_config)
    return model.eval()


@contextlib.contextmanager
def causal(model, knobs: dict, calibration: list):
    """`model` at the runtime `knobs` with causal decisions (module docstring), without autograd; GateSkip
    budgets > 0 are calibrated on `calibration` (batches of ids or (ids, mask)) first."""
    method = model.method
    if method is None and knobs:
        raise ValueError(f"knobs {knobs} need a model with a method attached.")
    if method is not None and method.name == "gateskip" and knobs.get("budget", 0.0) > 0:
        calibrate(model, calibration, budget=knobs["budget"])
    if method is None:
        ctx = contextlib.nullcontext()
    elif method.name == "mod":
        ctx = method.override(mode="predictor", **knobs)
    else:
        ctx = method.decoding(**knobs)
    with ctx, torch.no_grad():
        yield model


def slug(label: str) -> str:
    """A folder name for a contender's run: "MoD c=50%" -> "mod_c_50"."""
    return "_".join("".join(ch if ch.isalnum() else " " for ch in label.lower()).split())


def label_of(contender: Contender, knobs: dict) -> str:
    if not knobs:
        return contender.label
    return contender.label + " " + ", ".join(f"{'q' if k == 'budget' else k}={v:.0%}" if isinstance(v, float)
                                             else f"{k}={v}" for k, v in knobs.items())


def score(model, label: str, knobs: dict, scorer: Callable, probe: tuple, calibration: list,
          method: str = "base", reference=None) -> dict:
    """One row: the scorer's quality figures and its wall-clock seconds, plus the compute report of `probe`
    ((ids, mask)), all under `causal(model, knobs)`; `latency`: the probe forward's time over `reference`'s (the
    base model; default `model` itself), the two timed in turn in one loop."""
    with causal(model, knobs, calibration):
        t0 = time.perf_counter()
        quality = scorer(model)
        seconds = time.perf_counter() - t0
        report = compute_report(model, *probe)
        latency = latency_ratio(model, model if reference is None else reference, probe)
    return {"label": label, "method": method, "knobs": dict(knobs), **quality, "score_s": seconds,
            "executed_per_token": report.executed_per_token, "ideal_per_token": report.ideal_per_token,
            "dense_per_token": report.dense_per_token, "latency_s": report.latency_s, "latency": latency,
            "params": sum(p.numel() for p in model.parameters())}


def latency_ratio(model, reference, probe: tuple, repeats: int = 5) -> float:
    """Median forward time of `model` over `reference`'s on the probe (ids, mask), interleaved (a, b, b, a, ...)
    so both see the same machine state: rows scored minutes apart are not compared by lone times."""
    ids, mask = probe
    fns = {"model": lambda: model(ids, attention_mask=mask), "reference": lambda: reference(ids, attention_mask=mask)}
    t = interleaved_median(fns, ids.device, repeats, warmup=1)
    return t["model"] / t["reference"]


def compare(base: str, contenders: list[Contender], loader, tcfg: Callable[[str], TrainConfig], scorer: Callable,
            probe: tuple, calibration: list, progress: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Rows for the base and every contender setting, with `compute` = executed FLOPs per token / the base's
    and `ideal_compute` likewise; and the post-trained models by label (for plots).

    tcfg(label) gives each run's TrainConfig (its out_dir); `progress` reports each stage."""
    progress("scoring the base model")
    base_model = dyndepth.from_pretrained(base).eval()  # every row's latency is timed against it
    rows = [score(base_model, "base", {}, scorer, probe, calibration)]
    models, start = {}, loader.state_dict()
    for c in contenders:
        cfg = tcfg(c.label)
        progress(f"post-training {c.label}: {cfg.steps} steps")
        loader.load_state_dict(start)  # every contender sees the same batches
        model = posttrain(base, c.method, loader, cfg)
        models[c.label] = model
        for knobs in c.settings:
            progress(f"scoring {label_of(c, knobs)}")
            rows.append(score(model, label_of(c, knobs), knobs, scorer, probe, calibration, c.method.get("name"),
                              reference=base_model))
    for r in rows:
        r["compute"] = r["executed_per_token"] / rows[0]["executed_per_token"]
        r["ideal_compute"] = r["ideal_per_token"] / rows[0]["ideal_per_token"]
    return rows, models
