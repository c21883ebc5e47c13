"""The contract between a model and an adaptive-depth method (GateSkip, MoD, DND, ...).

A method is a plain object attached as `model.method`; its parameters live in the layers it changes
(`model.layers.{i}.<name>.*`). The model always calls `layer(x, ctx, slot)`, and a layer whose context
carries a method hands the call to `method.layer_forward(layer, x, ctx, slot)`. So the method runs
inside the layer call, and everything wrapped around a layer from outside (FSDP2 units, activation
checkpointing, `torch.compile`) wraps the method's work too. A method never calls a layer's submodules
from outside that call; it uses the layer's branch functions (`attn_branch`, `mlp_branch`, `block`).

Per forward: `begin` returns the method's own state object (a small dataclass), which the model puts on
`ctx.state`; `layer_forward` runs once per layer application; `end` turns the state into weighted
losses and logged statistics. Runtime knobs (budgets, modes) are attributes of the method changed with
`override(**knobs)`; the config dataclass (`config`) is what was attached and what `save_pretrained`
records. Non-gradient controller state lives in buffers or on the method, never in the config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from dyndepth.core.context import ForwardContext


@dataclass
class MethodOutput:
    """What `Method.end` returns: weighted losses (summed into `DecoderOutput.aux_loss`) and detached
    statistics, keyed `<method name>/<stat>`."""

    losses: list[torch.Tensor] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Method(Protocol):
    name: str  # registry key and stats prefix, e.g. "gateskip"
    config: Any  # the method's config dataclass, as attached (recorded in config.json)

    def configure(self, config: Any) -> None:
        """Adopt a new config of the same method (changed training options); runtime knobs reset to it.
        Fields that shape the method's parameters cannot change (ValueError)."""

    def extra_slots(self, num_slots: int) -> int:
        """KV-cache slots the method adds to the model's `num_slots` (DND's nested passes); 0 for most."""

    def begin(self, input_ids: torch.Tensor, ctx: ForwardContext) -> Any:
        """Per-forward state (the method's dataclass), stored by the model on `ctx.state`."""

    def layer_forward(self, layer: torch.nn.Module, x: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        """The layer's forward with the method: (B, T, D) -> (B, T, D). Runs inside `layer(x, ctx, slot)`."""

    def end(self, ctx: ForwardContext) -> MethodOutput:
        """Losses and statistics of this forward, from `ctx.state`."""

    def knobs(self) -> dict[str, Any]:
        """The current runtime knobs (what `override` accepts), e.g. {"budget": 0.3, "mode": "quantile"}."""

    def override(self, **knobs: Any) -> AbstractContextManager:
        """Temporarily set runtime knobs: `with method.override(budget=0.3): model(ids)`. Unknown knobs
        raise ValueError naming the valid ones."""

    def decoding(self, **knobs: Any) -> AbstractContextManager:
        """Configure the method for cached, token-by-token decoding at these knobs (GateSkip switches to its
        calibrated thresholds); raises a clear error when that needs a calibration first."""

    def recording(self, recorder: ThresholdRecorder) -> AbstractContextManager:
        """While active, forwards record the scores a calibration needs into `recorder`."""

    def set_thresholds(self, thresholds: dict, knobs: dict[str, Any]) -> None:
        """Store calibrated thresholds (the recorder's result) for decoding at `knobs`."""

    def trainer_hooks(self, total_steps: int) -> list:
        """Hooks for `dyndepth.train` (ramps, controllers); see train/hooks.py for what a hook may do."""

    def lookahead(self) -> str:
        """"" when, at the current knobs, a token's routing depends on it and earlier tokens only; else a sentence
        naming what reads later tokens (MoD's top-k of a row), so a scorer can say that a log-likelihood may see the
        continuation it scores."""

    def untrained_parameters(self) -> list[str]:
        """Name globs of the method's parameters no training forward reaches with its current config and knobs
        (MoD's router when it does not scale the block); the trainer freezes them, as DDP needs a gradient for
        every trainable parameter. [] for most."""

    def to_dict(self) -> dict:
        """{"name": ..., **config} for config.json, so `from_pretrained` re-attaches the method."""


class ThresholdRecorder:
    """Per-key score thresholds over calibration batches: for each batch, the threshold that keeps all
    but the lowest floor(q * n) pool scores (`core.routing.rank_threshold`); `result` averages them over the
    batches large enough to skip a token (a short last batch, floor(q * n) = 0, has no threshold: its -inf
    made the mean -inf, and nothing skipped)."""

    def __init__(self) -> None:
        self.values: dict[Any, list[torch.Tensor]] = {}
        self.fraction = 0.0  # the skip fraction recorded (for the error when no batch could skip)
        self.tied: dict[Any, float] = {}  # key -> the largest fraction a batch's threshold skips, where ties made it
        # skip more than the budget (saturated gates: every score the same float)

    def record(self, key, scores_BT: torch.Tensor, pool_BT: torch.Tensor, skip_fraction: float) -> None:
        from dyndepth.core.routing import rank_threshold

        nan_BT = scores_BT.isnan() if pool_BT is None else scores_BT.isnan() & pool_BT.bool()
        if bool(nan_BT.any()):  # NaN ranks above every score: a threshold fitted around them (or, when most were NaN,
            # none: the error then blamed the batch size), stored and saved with the model
            raise ValueError(f"the calibration scores at routing point {key!r} hold NaN: the model's activations are "
                             "not finite on this batch (float16 overflow past 65504, or NaN weights); calibrate the "
                             "model in bfloat16 or float32, and check its weights.")
        tau = rank_threshold(scores_BT.float(), pool_BT, skip_fraction, scope="batch").reshape(())
        self.fraction = skip_fraction
        taus = self.values.setdefault(key, [])
        if skip_fraction <= 0 or bool(torch.isfinite(tau)):  # (-inf: keep all, right when nothing is to skip)
            taus.append(tau.detach())  # (one host sync per batch and routing point: calibration only)
            pool = torch.ones_like(scores_BT, dtype=torch.bool) if pool_BT is None else pool_BT.bool()
            skipped = float((scores_BT.float() <= tau)[pool].float().mean())  # as decoding's `s > tau` keeps
            if skipped > skip_fraction + max(0.05, 0.5 * skip_fraction):
                self.tied[key] = max(skipped, self.tied.get(key, 0.0))

    def result(self) -> dict[Any, torch.Tensor]:
        if not self.values:
            raise ValueError("no calibration scores were recorded: the knobs route no token (e.g. budget=0 has no "
                             "threshold to fit) or the batches have no real tokens.")
        if not all(self.values.values()):  # (only with a fraction > 0)
            raise ValueError(f"no calibration batch was large enough to skip a token at a fraction of "
                             f"{self.fraction:g}: a batch needs at least {math.ceil(1 / self.fraction - 1e-9)} real "
                             "tokens per routing pool; give more rows per batch (--batch-size) or longer windows "
                             "(--seq-len), or skip more (a larger GateSkip budget, a smaller MoD capacity).")
        return {key: torch.stack(v).float().mean() for key, v in self.values.items()}


def check_knobs(method_name: str, allowed: Iterable[str], knobs: dict) -> None:
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(f"{method_name} has no runtime knob {unknown[0]!r}; its knobs are {sorted(allowed)}.")
