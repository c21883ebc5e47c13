"""AdamW with parameter groups (decay / no decay, per-glob LR multipliers, frozen globs) and LR schedules.

Groups: every trainable parameter with fewer than two dimensions (norm weights, biases) gets no weight
decay; a parameter matching an `lr_groups` glob gets `lr * multiplier` (first matching glob wins); a
parameter matching a `freeze` glob gets `requires_grad=False` and is left out of the optimizer.
Globs are `fnmatch` patterns over the HF parameter names, e.g. "model.layers.*.gateskip.*".
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
from torch import nn

from dyndepth.runconfig import TrainConfig


def apply_freeze(model: nn.Module, globs: list[str]) -> list[str]:
    """Set requires_grad=False on every parameter matching a glob; returns the frozen names (a tensor once). A tied
    lm_head answers to its own name too: `lm_head.*`, as docs/methods.md freezes the backbone, was refused as
    matching nothing on a tied model (Qwen3-0.6B); it freezes the embedding the head is."""
    named = list(model.named_parameters(remove_duplicate=False))  # (a tied head's name beside the embedding's)
    names = [n for n, _ in named]
    for glob in globs:
        if not any(fnmatchcase(n, glob) for n in names):
            raise ValueError(f"freeze glob {glob!r} matches no parameter; names look like {names[:3]}.")
    frozen, seen = [], set()
    for name, p in named:
        if id(p) not in seen and any(fnmatchcase(name, g) for g in globs):
            p.requires_grad_(False)
            frozen.append(name)
            seen.add(id(p))
    return frozen


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups keyed by (weight decay, LR multiplier); each group records `lr_mult` and `names`."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for glob in cfg.lr_groups:
        if not any(fnmatchcase(n, glob) for n in names):
            raise ValueError(f"lr_groups glob {glob!r} matches no trainable parameter (train.freeze, and the "
                             f"parameters a method's training never reaches, are frozen); names look like {names[:3]}.")
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = next((m for g, m in cfg.lr_groups.items() if fnmatchcase(name, g)), 1.0)
        decay = p.ndim >= 2
        group = groups.setdefault((decay, mult), {
            "params": [], "names": [], "lr_mult": mult, "lr": cfg.lr * mult,
            "weight_decay": cfg.weight_decay if decay else 0.0,
        })
        group["params"].append(p)
        group["names"].append(name)
    if not groups:
        raise ValueError("no trainable parameters: every parameter is frozen (check train.freeze).")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel on CUDA."""
    groups = param_groups(model, cfg)
    on_cuda = groups[0]["params"][0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=True if on_cuda else None)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Factor on each group's base LR at 0-based optimizer step `step` (the step about to be taken).

    warm-up: linear from 1/warmup to 1 over `warmup` steps; then
    cosine: half cosine from 1 down to min_lr/lr at `steps`;
    wsd: stable at 1, then linear decay to min_lr/lr over the last `decay_frac * steps` steps;
    constant: 1.
    """
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = round(cfg.decay_frac * cfg.steps)
        decay_start = max(cfg.warmup, cfg.steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, cfg.steps - decay_start))
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine, wsd or constant.")


class _Schedule:
    """A picklable callable so LambdaLR's state_dict round-trips."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def __call__(self, step: int) -> float:
        return lr_multiplier(step, self.cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(cfg))
