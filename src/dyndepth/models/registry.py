"""Which model class builds which `model_type`, and named presets of every model family.

`from_pretrained`, the trainer, the CLI and the benchmarks build models through here, so a new model
family (Dreamer, the depth-recurrent baselines) is one `register_model` call in its own module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dyndepth.config import ConfigError


def _identity(state: dict) -> dict:
    return state


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model family: its config dataclass and model class, and how to read a HF
    `config.json` and on-disk state dict into them."""

    config_cls: type
    model_cls: type
    config_from_hf: Callable[[dict], Any]
    state_from_hf: Callable[[dict], dict] = _identity


MODELS: dict[str, ModelSpec] = {}
PRESETS: dict[str, dict] = {}  # name -> {"model_type": ..., **config fields}


def register_model(model_types: tuple[str, ...], spec: ModelSpec, presets: dict[str, dict] | None = None) -> None:
    for model_type in model_types:
        MODELS[model_type] = spec
    for name, fields in (presets or {}).items():
        if "model_type" not in fields:
            raise ConfigError(f"preset {name!r} must name its model_type.")
        PRESETS[name] = fields


def model_spec(model_type: str) -> ModelSpec:
    if model_type not in MODELS:
        raise ConfigError(f"model_type {model_type!r} is not supported; dyndepth builds {sorted(MODELS)}.")
    return MODELS[model_type]


def build_config(fields: dict) -> Any:
    """A config from a dict of its fields (model_type picks the config class; default "qwen3"). A field the class
    lacks is an error naming the valid ones; None for a string field is the word "none" (what `--set
    model.da_mode=none` parses to)."""
    spec = model_spec(fields.get("model_type", "qwen3"))
    known = {f.name: f for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(f"{spec.config_cls.__name__} has no field {unknown[0]!r}; its fields are "
                          f"{sorted(known)}.")
    return spec.config_cls(**{k: "none" if v is None and known[k].type in ("str", str) else v
                              for k, v in fields.items()})


def preset(name: str, **overrides) -> Any:
    """The config of a named preset (any model family), with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}.")
    return build_config({**PRESETS[name], **overrides})


def build_model(config) -> Any:
    """A fresh model (random weights) for `config`, of the class registered for its model_type."""
    return model_spec(config.model_type).model_cls(config)


def preset_model(name: str, seed: int = 0) -> Any:
    """A preset's model with random weights drawn from `seed`: the same in every run (torch seeds its default
    generator at random per process), the caller's random state untouched. For smoke runs and demos by name."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(preset(name))
