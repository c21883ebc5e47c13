"""Model arguments for evaluation (`--model-args k=v,...`, lm-eval's `model_args`): loading and method knobs.

Shared by the lm-eval adapter (harness.py) and perplexity runs, and free of lm-eval imports so that
perplexity works without it. Every argument that is not in `ADAPTER_ARGS` is a knob of the
adaptive-depth method attached from the checkpoint's config.json: a name in `NAMED_KNOBS`, or any
runtime knob the method's `override(**knobs)` accepts (`method.knobs()`; for methods without it, the
fields of its config dataclass). A model without a method that has knobs of its own (Dreamer: `steps`,
`exit_kl`) takes those (`knob_owner`). Adding a method knob (DND ratio, recurrences, exit threshold) is one
line in `NAMED_KNOBS`, or nothing at all when the method already calls the knob by the wanted name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch

from dyndepth.devices import resolve_device
from dyndepth.generation import knob_owner
from dyndepth.methods.common import parse_key_values

log = logging.getLogger(__name__)

# Named method knobs, one line each: model argument -> (field of the method's config used by scoring
# forwards, keyword of `model.generate` used for decoding, or None to keep the field set while decoding).
NAMED_KNOBS: dict[str, tuple[str, str | None]] = {
    "skip_budget": ("budget", "skip_budget"),  # GateSkip: fraction of tokens that skip each branch
}
ADAPTER_ARGS = ("pretrained", "tokenizer", "dtype", "device", "batch_size", "max_batch_size", "max_length",
                "max_gen_toks", "add_bos_token", "enable_thinking", "think_end_token")


@dataclasses.dataclass
class Knobs:
    """Method knobs resolved against the attached method (all empty for a model without one)."""

    fields: dict  # config fields set for scoring forwards
    generate: dict  # keywords for `model.generate`
    decode_fields: dict  # config fields kept set while generating (those without a generate keyword)

    def scoring(self, model):
        """Context manager: the knobs applied to `knob_owner(model)` for scoring forwards."""
        return knob_owner(model).override(**self.fields) if self.fields else contextlib.nullcontext()

    def decoding(self, model):
        return knob_owner(model).override(**self.decode_fields) if self.decode_fields else contextlib.nullcontext()


@dataclasses.dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    knobs: Knobs
    device: torch.device
    lookahead: str = ""  # what makes scoring forwards read later tokens ("" : causal; `Method.lookahead`)


def load_for_eval(pretrained, tokenizer=None, dtype: str | None = None, device: str | None = None,
                  **knobs) -> Loaded:
    """Model, tokenizer and method knobs from model arguments (what every evaluation path starts with)."""
    resolved = resolve_device(device)
    model = load_model(pretrained, dtype, resolved)
    loaded = Loaded(model, load_tokenizer(pretrained, tokenizer, model), split_knobs(knob_owner(model), knobs), resolved)
    if model.method is not None:
        with loaded.knobs.scoring(model):
            loaded.lookahead = model.method.lookahead()
    if loaded.lookahead:
        log.warning("scoring forwards are not causal: %s, so a log-likelihood can depend on the continuation it "
                    "scores.", loaded.lookahead)
    return loaded


def add_stats(sums: dict[str, float], stats: dict) -> float:
    """Add a forward's scalar statistics (one-element tensors and plain numbers) into `sums`, weighted by its valid
    tokens, and return that count (0: a forward without a ledger, or of PAD only, adds nothing). Divided by the summed
    counts, a fraction (GateSkip's skipped share, DND's selected one) becomes a mean over tokens and a total (`flops/*`,
    `*/flops`) a figure per token, so neither depends on how the forwards were batched (a fraction over a method's own
    pool, GateSkip's non-EOS tokens, up to the EOS tokens' share of each forward). Shared by the lm-eval adapter and
    perplexity runs."""
    n = float(stats.get("tokens/valid", 0))
    if not n:
        return 0.0
    for k, v in stats.items():
        scalar = v.numel() == 1 if isinstance(v, torch.Tensor) else isinstance(v, (int, float))
        if scalar and not isinstance(v, bool) and k != "tokens/valid":
            total = k.startswith("flops/") or k.endswith("/flops")  # (MoR's tokens_r{r} are fractions)
            sums[k] = sums.get(k, 0.0) + float(v) * (1.0 if total else n)
    return n


def parse_model_args(text: str | None) -> dict:
    """'k=v,k=v' -> dict; values true/false, ints and floats are converted (as lm-eval does)."""
    return parse_key_values(text, "model argument {item!r} is not key=value; write e.g. --model-args "
                                  "skip_budget=0.3,dtype=bfloat16.")


def split_knobs(method, knobs: dict) -> Knobs:
    """Method knobs -> `Knobs`. Unknown names are an error naming the valid ones; values are cast to the
    type of the knob's current value (lm-eval parses `0` as an int) and the method's own checks run now."""
    if not knobs:
        return Knobs({}, {}, {})
    current = method_knobs(method) if method is not None else {}
    result, named = Knobs({}, {}, {}), {}
    for name, value in knobs.items():
        field, gen_kw = NAMED_KNOBS.get(name, (name, None))
        if field not in current:
            raise ValueError(_unknown_arg(name, field, method, set(current)))
        if field in named:  # skip_budget=0.3,budget=0.2: scoring took one, generation the other
            raise ValueError(f"model arguments {named[field]} and {name} both set the method's {field}; give one.")
        named[field] = name
        value = _coerce(value, current[field], name)
        result.fields[field] = value
        if gen_kw is None:
            result.decode_fields[field] = value
        else:
            result.generate[gen_kw] = value
    with method.override(**result.fields):  # the method's own checks of names and values
        pass
    config = _method_config(method)
    if dataclasses.is_dataclass(config):  # and its config's checks (__post_init__), on a copy
        names = {f.name for f in dataclasses.fields(config)}
        dataclasses.replace(config, **{k: v for k, v in result.fields.items() if k in names})
    return result


def method_knobs(method) -> dict:
    """What `method.override` accepts, with current values: `method.knobs()` where the method has it,
    else the fields of its config dataclass."""
    if callable(getattr(method, "knobs", None)):
        return dict(method.knobs())
    config = _method_config(method)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _method_config(method):
    return getattr(method, "config", None) or getattr(method, "cfg", None)


def _unknown_arg(name: str, field: str, method, fields: set[str]) -> str:
    valid = f"adapter arguments {list(ADAPTER_ARGS)}"
    if method is None:
        return (f"unknown model argument {name!r}: this model has no adaptive-depth method attached, so it takes "
                f"only the {valid}.")
    owner = (f"the {type(method).__name__} model" if isinstance(method, torch.nn.Module)
             else f"the attached {getattr(method, 'name', type(method).__name__)} method")
    if name in NAMED_KNOBS:
        return (f"model argument {name!r} sets the method field {field!r}, which {owner} does not have; its knobs "
                f"are {sorted(fields)}.")
    return (f"unknown model argument {name!r}: valid are the {valid}, the named knobs {sorted(NAMED_KNOBS)} and the "
            f"knobs of {owner} {sorted(fields)}.")


def _coerce(value, current, name: str):
    if isinstance(value, str) and value.lower() in ("none", "null"):  # a knob that is off (Dreamer's exit_kl)
        return None
    if isinstance(current, bool):
        try:
            return as_bool(value)
        except ValueError:
            raise ValueError(f"model argument {name}={value!r} must be true or false.") from None
    try:
        if isinstance(current, int) and not isinstance(value, bool):
            number = float(value)
            if not number.is_integer():  # 2.5 became 2
                raise ValueError
            return int(number)
        if isinstance(current, float) and not isinstance(value, bool):
            return float(value)
    except (TypeError, ValueError, OverflowError):
        kind = "whole number" if isinstance(current, int) else "number"
        raise ValueError(f"model argument {name}={value!r} must be a {kind}.") from None
    return value


def as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {value!r}.")
        return value.lower() in ("true", "1")
    return bool(value)


def token_count(name: str, value) -> int | None:
    """A model argument that counts tokens (max_length, max_gen_toks) as an int >= 1, None left as None; anything
    else is an error naming it (0 had silently become the model's window, 'abc' named no argument)."""
    if value is None:
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{name}={value}: give a positive number of tokens"
                         + (", or leave it out for the model's max_position_embeddings." if name == "max_length"
                            else "."))
    return count


def batch_count(value) -> int:
    """The batch_size model argument as sequences per forward: 'auto' (lm-eval's batch-size search, 'auto:N' too) is
    read as 16, for the lm-eval adapter and perplexity alike (perplexity's int('auto') failed after every task ran)."""
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("batch_size=%s: dyndepth does not search batch sizes; using 16.", value)
        return 16
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size={value!r} must be a positive integer.") from None
    if size < 1:
        raise ValueError(f"batch_size={value!r} must be a positive integer.")
    return size


def load_model(pretrained, dtype: str | None, device: torch.device):
    """A checkpoint folder or hub id, a preset name (random weights, for smoke tests) or a model object."""
    import dyndepth
    from dyndepth.devices import DTYPES
    from dyndepth.models import preset_model

    if dtype in (None, "auto"):
        dtype = None
    elif dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {['auto', *DTYPES]}.")
    if isinstance(pretrained, torch.nn.Module):
        model = pretrained if dtype is None else pretrained.to(DTYPES[dtype])
    elif str(pretrained) in dyndepth.PRESETS:  # random weights, the same every run (seed 0)
        model = preset_model(str(pretrained))
        model = model if dtype is None else model.to(DTYPES[dtype])
    else:
        model = dyndepth.from_pretrained(pretrained, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(pretrained, tokenizer, model=None):
    """`tokenizer` (a folder, 'byte' or an object); by default the checkpoint folder ('byte' for a preset)."""
    from dyndepth import PRESETS
    from dyndepth.tokenizer import load_tokenizer as load

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        tok = tokenizer
    elif tokenizer is None and isinstance(pretrained, torch.nn.Module):
        raise ValueError("a model object needs a tokenizer: pass tokenizer=FOLDER, 'byte' or a tokenizer object.")
    else:
        if tokenizer is not None:
            from dyndepth.train.run import check_own_tokenizer

            check_own_tokenizer(pretrained, tokenizer, "tokenizer=")
        tok = load(tokenizer if tokenizer is not None else ("byte" if str(pretrained) in PRESETS else pretrained))
    if model is not None and tok.vocab_size > model.config.vocab_size:
        fix = ("a preset whose vocab holds the byte tokenizer's ids, e.g. demo-tiny" if str(pretrained) in PRESETS
               else "the tokenizer the model was trained with (tokenizer=FOLDER)")
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}; pass {fix}.")
    return tok
