"""The extension point through which a method adds auxiliary losses and controllers to training.

The trainer knows no method. A method hands it hooks; each hook may implement any of:

- `aux_loss(model, batch, out) -> (loss, stats) | None`: a scalar added to the training loss of every
  micro-batch (already weighted), with a dict of detached scalars to log. The model's own
  `out.aux_loss` (e.g. MoE balancing) is always added by the trainer and needs no hook.
- `after_step(model, step, stats, dist) -> dict | None`: runs after every optimizer step, outside
  autograd. Controllers live here: GateSkip's skip ramp, DND's threshold controller, MoE bias
  balancing. `stats` holds this step's training statistics (detached tensors, this rank only; model
  stats such as per-layer keep fractions included; `stats["loss"]` is this rank's share of the step's
  token-weighted loss, whose mean over ranks is that loss); use `dist.all_reduce_mean` so every rank
  applies the same update. Returned scalars are logged.
- `after_skipped_step(model, step, dist) -> dict | None`: runs instead of `after_step` on a step
  train.nonfinite="skip" dropped (its statistics are not finite), for work a controller schedules by step
  number (DND's threshold sync). Every rank skips the same steps, so collectives are safe here too.
- `state_dict() -> dict` / `load_state_dict(state)`: controller state saved in every checkpoint.
  State kept in model buffers is saved with the weights already and needs nothing here.

`model` is the unwrapped model (no DDP wrapper), so hooks find buffers by their HF-style names.
Hooks are identified in checkpoints by `name` (default: the class name).
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from dyndepth.train.parallel import DistInfo

log = logging.getLogger(__name__)


@runtime_checkable
class TrainHook(Protocol):
    """Structural type: implement only the methods you need (see the module docstring)."""

    name: str


class Hook:
    """Convenience base with no-op defaults; any object with the same methods works as well."""

    name: str = ""

    def aux_loss(self, model: nn.Module, batch: dict, out) -> tuple[torch.Tensor, dict] | None:
        return None

    def after_step(self, model: nn.Module, step: int, stats: dict, dist: DistInfo) -> dict | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def hook_name(hook: object) -> str:
    return getattr(hook, "name", "") or type(hook).__name__


def check_hooks(hooks) -> list:
    """Validate hook names are unique (checkpoints key hook state by name)."""
    hooks = list(hooks)
    names = [hook_name(h) for h in hooks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two hooks share the name(s) {dupes}; give each a distinct `name` attribute.")
    return hooks


def hooks_aux_loss(hooks, model: nn.Module, batch: dict, out) -> tuple[torch.Tensor | None, dict]:
    """Sum of the hooks' auxiliary losses for one micro-batch, and their stats (prefixed by hook name)."""
    total, stats = None, {}
    for hook in hooks:
        fn = getattr(hook, "aux_loss", None)
        result = fn(model, batch, out) if fn is not None else None
        if result is None:
            continue
        loss, hook_stats = result
        total = loss if total is None else total + loss
        name = hook_name(hook)
        stats[f"{name}/aux_loss"] = loss.detach()
        stats.update({f"{name}/{k}": v for k, v in (hook_stats or {}).items()})
    return total, stats


def hooks_after_step(hooks, model: nn.Module, step: int, stats: dict, dist: DistInfo, skipped: bool = False) -> dict:
    """Each hook's `after_step` (`after_skipped_step` for a skipped step); their returns, prefixed by hook name."""
    logged = {}
    with torch.no_grad():
        for hook in hooks:
            if skipped:
                fn = getattr(hook, "after_skipped_step", None)
                result = fn(model, step, dist) if fn is not None else None
            else:
                fn = getattr(hook, "after_step", None)
                result = fn(model, step, stats, dist) if fn is not None else None
            logged.update({f"{hook_name(hook)}/{k}": v for k, v in (result or {}).items()})
    return logged


def hooks_state_dict(hooks) -> dict:
    return {hook_name(h): h.state_dict() for h in hooks if hasattr(h, "state_dict")}


def hooks_load_state_dict(hooks, state: dict, of_ranks: list[dict] | None = None, warn: bool = True) -> None:
    """Restore each hook's saved state; a hook the checkpoint has no state for (a run that trained without it)
    starts fresh, with a warning (`warn`: rank 0's only, under torchrun). `of_ranks` (a checkpoint of another world size): the saved ranks' hook states this
    rank takes over (rank 0: all, the others: none), which a hook with rank-local state merges by
    `merge_rank_states(states) -> state`; the other hooks load `state`, rank 0's."""
    for hook in hooks:
        name = hook_name(hook)
        if not hasattr(hook, "load_state_dict"):
            continue
        if name not in state:
            if warn:
                log.warning("the checkpoint has no state for hook %r (it has %s): the hook starts fresh.", name,
                            sorted(state))
            continue
        if of_ranks is not None and hasattr(hook, "merge_rank_states"):
            hook.load_state_dict(hook.merge_rank_states([s[name] for s in of_ranks if name in s]))
        else:
            hook.load_state_dict(state[name])
