"""Attaching methods by name: the one place that knows every method (a new method is one line here).

`attach_method(model, "gateskip", {"budget": 0.3})` builds the method's config from a dict (unknown
keys are an error), adds its parameters to the model's layers and returns the method;
`method.trainer_hooks(total_steps)` then gives what the trainer needs. Both `from_pretrained` (a
checkpoint whose config.json names a method) and the trainer (a recipe's `[method]` section) go
through here.
"""

from __future__ import annotations

from collections.abc import Callable

from dyndepth.core.method import Method


def _attachers() -> dict[str, Callable]:
    from dyndepth.methods.gateskip import attach_gateskip
    from dyndepth.methods.mod import attach_mod

    return {"gateskip": attach_gateskip, "mod": attach_mod}


METHOD_NAMES = ("gateskip", "mod")


def attach_method(model, name: str, options: dict | None = None) -> Method:
    """Attach method `name` with config fields `options` (a dict; unknown keys raise) to `model`."""
    attachers = _attachers()
    if name not in attachers:
        raise ValueError(f"method {name!r} is not one of {sorted(attachers)}.")
    return attachers[name](model, dict(options or {}))


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


def check_attachable(model, name: str) -> list:
    """The model's layers, after checking a method can attach: a decoder whose layers expose the branch
    functions, with no method attached yet."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "attn_branch") and hasattr(layer, "mlp_branch") for layer in layers):
        raise ValueError(f"{name} attaches to decoder models whose layers expose attn_branch / mlp_branch "
                         f"(CausalLM); {type(model).__name__} has none.")
    if getattr(model, "method", None) is not None:
        raise ValueError(f"the model already carries method {model.method.name!r}; load the base model to "
                         f"attach {name!r} instead.")
    return list(layers)
