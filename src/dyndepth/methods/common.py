"""Small pieces every method object shares (composition, not a base class)."""

from __future__ import annotations

import contextlib
from dataclasses import asdict


@contextlib.contextmanager
def override_config(cfg, result=None, **fields):
    """Temporarily set dataclass fields of a method's config; restore them on exit. Yields `result`."""
    unknown = [k for k in fields if not hasattr(cfg, k)]
    if unknown:
        raise ValueError(f"{type(cfg).__name__} has no field {unknown[0]!r}.")
    old = {k: getattr(cfg, k) for k in fields}
    for k, v in fields.items():
        setattr(cfg, k, v)
    try:
        yield result
    finally:
        for k, v in old.items():
            setattr(cfg, k, v)


def make_config(cls, cfg):
    """A method's config dataclass from an instance, a recipe's `[method]` dict (its `name` dropped) or None."""
    if isinstance(cfg, dict):
        return cls(**{k: v for k, v in cfg.items() if k != "name"})
    return cfg if cfg is not None else cls()


def method_dict(name: str, cfg) -> dict:
    """What `save_pretrained` records in config.json so `from_pretrained` can re-attach the method."""
    return {"name": name, **asdict(cfg)}
