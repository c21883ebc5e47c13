"""Small pieces every method object shares (composition, not a base class)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import typing
from dataclasses import asdict

log = logging.getLogger(__name__)

PPM = 1_000_000  # budgets stored in integer buffers, in parts per million (model.to(dtype) leaves them alone)


def make_config(cls, cfg):
    """A method's config dataclass from an instance, a recipe's `[method]` dict (its `name` dropped) or None.
    Unknown keys are an error that names the valid ones."""
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    if not isinstance(cfg, dict):
        raise TypeError(f"expected a {cls.__name__} or a dict of its fields, got {type(cfg).__name__}.")
    fields = {k: v for k, v in cfg.items() if k != "name"}
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {unknown[0]!r}; valid fields: {sorted(names)}.")
    kinds = {name: tp.__name__ for name, tp in typing.get_type_hints(cls).items() if tp in (float, int, bool, str)}
    for name, value in fields.items():  # recipe values arrive untyped: `ratio = "abc"` is named here
        if name in kinds:  # (annotations resolved, so a file without `from __future__ import annotations` too)
            fields[name] = _scalar(value, kinds[name], f"{cls.__name__}.{name}", names[name].default)
    return cls(**fields)


def _scalar(value, kind: str, where: str, default):
    """A recipe value as the field's scalar type, as the train section's coercion reads them: any real number
    for a float, an integral one for an int (1e3 too), 0 / 1 for a bool; a ValueError naming the field else."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "float" and real:
        return float(value)
    if kind == "int" and real and float(value).is_integer():
        return int(value)
    if kind == "bool" and (isinstance(value, bool) or (real and value in (0, 1))):
        return bool(value)
    if kind == "str" and (isinstance(value, str) or value is None):  # None (`--set x=none`): the config's own
        return value  # check names a choice field's choices
    raise ValueError(f"{where}={value!r} must be {'an' if kind == 'int' else 'a'} {kind}, like its default "
                     f"{default!r}.")


def check_structural(name: str, old, new, fields: tuple[str, ...]) -> None:
    """`configure` of an attached method: the config fields that shape its parameters cannot change."""
    changed = [f for f in fields if old is not None and getattr(old, f) != getattr(new, f)]
    if changed:
        raise ValueError(f"{name}.{changed[0]} cannot change once attached (it shapes the parameters).")


def replace_config(cfg, **fields):
    """A copy of a method's config with some fields changed (validated like a fresh config)."""
    return make_config(type(cfg), {**asdict(cfg), **fields})


@contextlib.contextmanager
def override_knobs(method, check, **knobs):
    """Set runtime knobs (attributes of `method`) for the `with` block and restore them after.
    `check(knobs)` validates names and values first (a value of another type than the knob's is refused before it);
    yields the method."""
    _check_types(method, knobs)
    check(knobs)
    old = {k: getattr(method, k) for k in knobs}
    for k, v in knobs.items():
        setattr(method, k, v)
    try:
        yield method
    finally:
        for k, v in old.items():
            setattr(method, k, v)


def _check_types(method, knobs: dict) -> None:
    """A knob takes a value of its current type: a finite number for a number (an int for a float too; nan passed
    every range check), true / false for a flag, a word for a word (e.g. `budget="abc"` from a shell is one clear
    error, not a TypeError later)."""
    known = method.knobs() if hasattr(method, "knobs") else {}
    for k, v in knobs.items():
        if k not in known:  # (unknown names: `check` says so)
            continue
        current = known[k]
        if isinstance(current, bool):
            ok, want = isinstance(v, bool), "true or false"
        elif isinstance(current, (int, float)):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            want = "a number, not nan or inf"
        elif isinstance(current, str):
            ok, want = isinstance(v, str), "a word"
        else:
            continue
        if not ok:
            raise ValueError(f"{method.name} knob {k}={v!r} must be {want}.")


def method_dict(name: str, cfg) -> dict:
    """What `save_pretrained` records in config.json so `from_pretrained` can re-attach the method."""
    return {"name": name, **asdict(cfg)}


def budget_ppm(value: float) -> int:
    return round(value * PPM)


def check_attachable(model, name: str) -> list:
    """The model's layers, after checking a method can attach: a decoder whose layers expose the branch
    functions, with no method attached yet."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "attn_branch") and hasattr(layer, "mlp_branch") for layer in layers):
        raise ValueError(f"{name} attaches to decoder models whose layers expose attn_branch / mlp_branch "
                         f"(CausalLM); {type(model).__name__} has none.")
    method = getattr(model, "method", None)
    if method is not None and method.name == getattr(model.config, "model_type", None):  # MoR: the family's routing
        raise ValueError(f"{type(model).__name__} routes its recursions through its own method {method.name!r}, so "
                         f"it takes no other: attach {name!r} to a decoder (CausalLM) instead.")
    if method is not None:
        raise ValueError(f"the model already carries method {model.method.name!r}; load the base model to "
                         f"attach {name!r} instead.")
    return list(layers)


def check_calibrated(stored_ppm, value: float, knob: str, what: str, owner: str, alternative: str = "") -> None:
    """Thresholds `calibrate` stored (the knob value they were fitted at, in parts per million; < 0: never fitted)
    must be `value`'s; else a ValueError saying what they are and how to fit them. GateSkip's and MoD's."""
    calibrated = {int(p) / PPM for p in stored_ppm}
    if calibrated == {budget_ppm(value) / PPM}:
        return
    now = ("not calibrated" if max(calibrated) < 0 else
           f"calibrated for {knob}(s) {sorted(c for c in calibrated if c >= 0)}")
    raise ValueError(f"{what} needs {owner}'s thresholds calibrated for it, and they are {now}; run "
                     f"dyndepth.methods.calibrate(model, batches, {knob}={value}) first (from a shell: dyndepth "
                     f"calibrate MODEL --text FILE --knobs {knob}={value} --out DIR){alternative}.")


def drop_calibration(stored_ppm, knob: str, owner: str, warn: bool = True) -> None:
    """Mark thresholds `calibrate` stored as not fitted (their knob value buffers, in ppm, set to -1), with a warning
    when any were: a training step moves the scores they were fitted to, so at their knob they no longer keep its
    share, and decoding must ask for a new calibration rather than silently skip another fraction. The trainer
    hooks of GateSkip and MoD call it after the first step (one host read per run); `warn`: rank 0 only."""
    fitted = sorted({int(p) / PPM for p in stored_ppm if int(p) >= 0})
    if not fitted:
        return
    for p in stored_ppm:
        p.fill_(-1)
    if warn:
        log.warning("training moved the %s scores its thresholds were calibrated on (%s %s): they were dropped; "
                    "calibrate the trained model again to decode at a %s (dyndepth calibrate).", owner, knob,
                    ", ".join(f"{v:g}" for v in fitted), knob)


def parse_key_values(text: str | None, error: str) -> dict:
    """'k=v,k=v' -> dict, values true / false, ints and floats converted (as lm-eval does), the rest strings; an item
    without '=' raises ValueError(error.format(item=item))."""
    out = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(error.format(item=item))
        out[key.strip()] = _parsed(value.strip())
    return out


def _parsed(value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
