"""Attaching methods by name: the one place that knows every method (a new method is one line here).

`attach_method(model, "gateskip", {"budget": 0.3})` builds the method's config from a dict (unknown
keys are an error), adds its parameters to the model's layers and returns the method;
`method.trainer_hooks(total_steps)` then gives what the trainer needs. Both `from_pretrained` (a
checkpoint whose config.json names a method) and the trainer (a recipe's `[method]` section) go
through here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from dyndepth.core.method import Method
from dyndepth.methods.common import budget_ppm
from dyndepth.methods.dnd import attach_dnd
from dyndepth.methods.gateskip import attach_gateskip
from dyndepth.methods.mod import attach_mod

METHODS: dict[str, Callable] = {  # name -> attach(model, options) -> Method; one line per method
    "gateskip": attach_gateskip,
    "mod": attach_mod,
    "dnd": attach_dnd,
}
METHOD_NAMES = tuple(METHODS)
log = logging.getLogger(__name__)

# config.json fields of dyndepth before 2026-12-02: the knob a method's thresholds were calibrated at (null: none),
# now a buffer beside each layer's thresholds. method -> (old field, threshold buffer, the buffer that holds it now)
_CALIBRATED_FIELDS = {
    "gateskip": ("calibrated_budget", ".gateskip.tau", ".gateskip.tau_budget_ppm"),
    "mod": ("calibrated_capacity", ".mod.threshold", ".mod.threshold_capacity_ppm"),
}
CALIBRATION_KNOBS = tuple(knob for _, _, knob in _CALIBRATED_FIELDS.values())  # (state key suffixes)


def attach_method(model, name: str, options: dict | None = None) -> Method:
    """Attach method `name` with config fields `options` (a dict; unknown keys raise) to `model`."""
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not one of {sorted(METHODS)}.")
    return METHODS[name](model, dict(options or {}))


def upgrade_saved_method(options: dict, state: dict[str, torch.Tensor]) -> dict:
    """A saved `dyndepth_method` (config.json's, with its name) and the folder's state as today's method takes
    them (`state` is changed in place; the options are returned without the old layouts' fields):
    - before 2026-12-02 the knob the thresholds were calibrated at was `calibrated_budget` / `calibrated_capacity`
      in config.json: it moves into the buffer beside each layer's thresholds;
    - before 2026-12-03 a bfloat16 / float16 save cast the thresholds with the model, too coarse for the float32
      scores they are compared with: their calibration is dropped, so decoding at the knob asks for a new one;
    - before 2026-12-02 a GateSkip with `shared=True` kept its one gate pair and one threshold pair in layer 0:
      the gates move to the model, and every layer gets thresholds of its own, not calibrated (`unshare_gates`)."""
    old = _CALIBRATED_FIELDS.get(options.get("name"))
    if old is None:
        return options
    field, threshold, knob = old
    options = dict(options)
    if options["name"] == "gateskip" and options.get("shared"):  # (thresholds per layer, uncalibrated, from here
        unshare_gates(state)  # on: the old one pair, layer 0's calibration applied at every layer, is dropped)
    value = options.pop(field, None)
    coarse = []  # the thresholds calibrated and stored in 16 bits
    for key in [k for k in state if k.endswith(threshold)]:
        knob_key = key.removesuffix(threshold) + knob
        state.setdefault(knob_key, torch.tensor(-1 if value is None else budget_ppm(value), dtype=torch.long))
        if state[key].dtype in (torch.bfloat16, torch.float16) and int(state[knob_key]) >= 0:
            coarse.append(key)
            state[knob_key] = torch.tensor(-1, dtype=torch.long)
    if coarse:
        name = field.removeprefix("calibrated_")
        log.warning("%d %s thresholds (%s, ...) are stored in %s, as a dyndepth before 2026-12-03 saved them: too "
                    "coarse to keep the %s they were calibrated for, they were dropped; calibrate the model again "
                    "to decode at a %s (dyndepth calibrate MODEL --text FILE --knobs %s=VALUE --out DIR).",
                    len(coarse), options["name"], coarse[0], str(state[coarse[0]].dtype).removeprefix("torch."),
                    name, name, name)
    return options


def unshare_gates(state: dict[str, torch.Tensor]) -> bool:
    """A shared-gate GateSkip state laid out as before 2026-12-02 (gates at `model.layers.0.gateskip.*_gate.*`,
    thresholds in layer 0 only) -> today's (gates at `model.gateskip.*`, thresholds per layer, not calibrated), in
    place; False where the state is not in the old layout."""
    old_prefix, new_prefix = "model.layers.0.gateskip.", "model.gateskip."
    gates = [k for k in state if k.startswith((old_prefix + "attn_gate.", old_prefix + "mlp_gate."))]
    if not gates or any(k.startswith(new_prefix) for k in state):
        return False
    for key in gates:
        state[new_prefix + key.removeprefix(old_prefix)] = state.pop(key)
    layers = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.")}
    for i in sorted(layers):
        state[f"model.layers.{i}.gateskip.tau"] = torch.zeros(2)
        state[f"model.layers.{i}.gateskip.tau_budget_ppm"] = torch.tensor(-1, dtype=torch.long)
    log.warning("a shared-gate GateSkip saved by a dyndepth before 2026-12-02: its gates load, but its thresholds "
                "(layer 0's, applied at every layer then) were dropped; calibrate the model again to decode at a "
                "budget (dyndepth calibrate MODEL --text FILE --knobs budget=VALUE --out DIR).")
    return True


def reconfigure_method(model, name: str, options: dict) -> Method:
    """A model that already carries method `name` (a post-training checkpoint): apply new config fields
    (training options such as the ramp or the penalty). Unknown keys raise; so does another method."""
    from dyndepth.methods.common import replace_config

    method = model.method
    if method is None or method.name != name:
        have = None if method is None else method.name
        raise ValueError(f"the model carries method {have!r}, not {name!r}; attach {name!r} to a model without one.")
    method.configure(replace_config(method.config, **options))
    return method
