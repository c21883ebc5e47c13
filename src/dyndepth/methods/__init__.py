"""Adaptive-depth methods. Each attaches to a CausalLM (`attach(model, cfg) -> method`) and may return
trainer hooks (`hooks(method, total_steps)`). METHODS is looked up by exact name."""

from dyndepth.methods.gateskip import GateSkip, GateSkipConfig, GateSkipHook, attach_gateskip, calibrate

METHODS = {
    "gateskip": (attach_gateskip, lambda method, steps: [GateSkipHook(method, steps)]),
}

__all__ = ["GateSkip", "GateSkipConfig", "GateSkipHook", "METHODS", "attach_gateskip", "calibrate"]
