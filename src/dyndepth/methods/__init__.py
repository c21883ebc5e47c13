"""Adaptive-depth methods. Each attaches to a CausalLM (`attach(model, cfg) -> method`) and may return
trainer hooks (`hooks(method, total_steps)`). METHODS is looked up by exact name."""

from dyndepth.methods.gateskip import GateSkip, GateSkipConfig, GateSkipHook, attach_gateskip, calibrate
from dyndepth.methods.mod import MoD, MoDConfig, MoDHook, attach_mod, calibrate_mod
from dyndepth.methods.speculative import SpecStats, speculative_generate

METHODS = {
    "gateskip": (attach_gateskip, lambda method, steps: [GateSkipHook(method, steps)]),
    "mod": (attach_mod, lambda method, steps: [MoDHook(method, steps)]),
}

__all__ = ["METHODS", "GateSkip", "GateSkipConfig", "GateSkipHook", "MoD", "MoDConfig", "MoDHook",
           "SpecStats", "attach_gateskip", "attach_mod", "calibrate", "calibrate_mod", "speculative_generate"]
