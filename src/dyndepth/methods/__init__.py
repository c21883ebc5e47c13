"""Adaptive-depth methods on the contract of `core/method.py`. Attach one by name with `attach_method`
(registry.py, which lists every method) or with its own `attach_*` function."""

from dyndepth.methods.calibration import calibrate
from dyndepth.methods.dnd import DND, DNDConfig, DNDHook, attach_dnd
from dyndepth.methods.gateskip import GateSkip, GateSkipConfig, GateSkipHook, attach_gateskip
from dyndepth.methods.mod import MoD, MoDConfig, MoDHook, attach_mod
from dyndepth.methods.registry import METHOD_NAMES, attach_method, reconfigure_method
from dyndepth.methods.speculative import SpecStats, speculative_generate

__all__ = ["DND", "METHOD_NAMES", "DNDConfig", "DNDHook", "GateSkip", "GateSkipConfig", "GateSkipHook", "MoD",
           "MoDConfig", "MoDHook", "SpecStats", "attach_dnd", "attach_gateskip", "attach_method", "attach_mod",
           "calibrate", "reconfigure_method", "speculative_generate"]
