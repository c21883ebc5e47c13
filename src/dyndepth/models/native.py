"""What every model family shares that has no HF transformers class (Dreamer, Huginn, MoR): the lm_head and weight
init (`add_lm_head_and_init`), generation, the on-disk state dict and `save_pretrained`. A family's model class
binds these as its methods and names its `architecture` (written to config.json; `dyndepth.from_pretrained` reads
`model_type` to load it back)."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dyndepth.config import ConfigError
from dyndepth.core.layers import cast_state, float32_keys
from dyndepth.devices import resolve_dtype
from dyndepth.safetensors_io import write_pretrained


def checked_steps(steps):
    """A recurrent family's `steps` knob: a whole number >= 1, or None for the trained count (a float or a string
    would fail deep inside the forward's schedule)."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
        raise ValueError(f"steps must be a whole number of recurrences >= 1 (or None for the trained count), "
                         f"got {steps!r}.")
    return None if steps is None else int(steps)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
             temperature: float = 0.0, **kwargs) -> torch.Tensor:
    """Prompt plus new tokens (B, T + n): `dyndepth.generation.generate`, the decoder's loop."""
    from dyndepth.generation import generate as run  # generation imports the models: import at call time

    return run(model, input_ids, max_new_tokens, attention_mask=attention_mask, temperature=temperature, **kwargs)


def add_lm_head_and_init(model: nn.Module, zero_biases: bool = False) -> None:
    """`model.lm_head` (tied to the embedding when the config says so), then every Linear and Embedding weight of
    the model drawn from N(0, initializer_range^2) (and, with `zero_biases`, every Linear bias zeroed): the last
    step of a family's `__init__`, once all its modules exist."""
    config = model.config
    model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=config.initializer_range)
            if zero_biases and getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def disk_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict as written to disk: cast to `dtype` (the buffers kept in float32 stay float32), the tied
    lm_head dropped."""
    state = cast_state(model.state_dict(), dtype, float32_keys(model))
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_pretrained(model, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """config.json (`pretrained_config`) + safetensors; dtype a torch dtype or its name."""
    dtype = resolve_dtype(dtype)
    return write_pretrained(model.hf_state_dict(dtype), pretrained_config(model, dtype), path, max_shard_bytes,
                            getattr(model, "generation_config", None))


def pretrained_config(model, dtype: torch.dtype | None = None) -> dict:
    """The config.json `save_pretrained` writes: the family's fields, its `model_type`, `architectures =
    [model.architecture]` and the dtype."""
    config = model.config.to_dict()
    name = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    config.update(architectures=[model.architecture], torch_dtype=name, dtype=name)
    return config


_BESIDE_FIELDS = {"architectures", "dtype", "dyndepth_method", "transformers_version"}  # written with the fields


def config_reader(config_class) -> Callable[[dict], object]:
    """`config.json` (as `save_pretrained` wrote it) -> `config_class`, for the family's `ModelSpec`. Every key is
    a field of ours (we wrote them all): one we lack, a hand edit's typo (`num_recurrence`) or a newer dyndepth's
    option, was dropped and the model built without it."""
    def read(d: dict):
        known = {f.name for f in dataclasses.fields(config_class)}
        unknown = sorted(set(d) - known - _BESIDE_FIELDS)
        if unknown:
            raise ConfigError(f"config.json: {unknown} {'is not a field' if len(unknown) == 1 else 'are not fields'} "
                              f"of {config_class.__name__} (mistyped, or from a newer dyndepth?); its fields are "
                              f"{sorted(known)}.")
        return config_class.from_dict({**d, "torch_dtype": d.get("dtype") or d.get("torch_dtype")})
    return read


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
