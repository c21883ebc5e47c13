"""KV-cached batched generation: left padding, greedy / temperature / top-k / top-p, stop tokens, streaming.

Shape legend: B batch, T prompt length, V vocab.

The loop owns positions: a left-padded row's real tokens sit at positions 0..len-1 (as in HF
`generate`), each new token goes at the row's next position, and the cache is written at exactly
those positions. Nothing advances implicitly, so methods that skip or repeat layers keep the cache
consistent by construction.
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
from collections.abc import Callable, Iterable

import torch

from dyndepth.config import is_whole, position_limit, position_limit_name
from dyndepth.core.accounting import accounting_off_by_default
from dyndepth.core.cache import KVCache
from dyndepth.devices import resolve_dtype
from dyndepth.models.forward import check_inputs

log = logging.getLogger(__name__)
MIN_TEMPERATURE = 1e-6  # below it, sampling is greedy in all but overflow
_warned_recompile_limits: set[int] = set()  # recompile limits `generate(compile=...)` has warned at (once each)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   repetition_penalty: float = 1.0) -> None:
    """Sampling settings a user can mistype, refused before any forward (a NaN temperature failed inside torch's
    sampler; a negative one ran greedy; a string or a fractional top_k failed inside torch)."""
    if not _real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}.")
    if 0 < temperature < MIN_TEMPERATURE:  # logits / 1e-40 overflow to inf: NaN probabilities inside torch's sampler
        raise ValueError(f"temperature {temperature!r} is too small to divide logits by (at least {MIN_TEMPERATURE}); "
                         "use 0 for greedy decoding.")
    if top_k is not None and (not is_whole(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a whole number >= 1 (None: no top-k cut), got {top_k!r}.")
    if top_p is not None and (not _real(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] (1 or None: no nucleus cut), got {top_p!r}.")
    if not _real(repetition_penalty) or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1: none; 1.05-1.3 discourage repeats), got "
                         f"{repetition_penalty!r}.")


def _real(value) -> bool:
    """A real number (a Python, numpy or one-element torch value); not a bool or a string."""
    if torch.is_tensor(value):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_length(config, prompt_len: int, max_new_tokens: int) -> None:
    limit = position_limit(config)
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"{position_limit_name(config)}; ask for fewer new tokens.")


def check_request(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  stop_tokens=None, pad_token_id: int | None = None,
                  repetition_penalty: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every check of a generation request, before any forward (generate's and speculative decoding's): the long
    attention mask (B, T), the stop ids (S,) and the pad id. Default stops as `default_stop_tokens` says; the default
    pad is generation_config.json's (config.json's without that file, as transformers reads them) when it is a token
    id, else the first stop id."""
    config = model.config
    check_inputs(config, input_ids, attention_mask)  # (here too: a generate of 0 tokens runs no forward)
    if not is_whole(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}.")
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device).long()
    check_left_padded(mask)
    check_length(config, int(mask.sum(-1).max()), int(max_new_tokens))
    stops = default_stop_tokens(model) if stop_tokens is None else _token_ids(stop_tokens, config.vocab_size)
    if pad_token_id is None:  # a checkpoint's generation_config.json alone, when it has one (transformers reads
        # config.json's pad only without it): one without a pad id pads with the first stop id, as transformers does
        generation_config = getattr(model, "generation_config", None)
        pad_token_id = generation_config.get("pad_token_id") if generation_config else config.pad_token_id
        if pad_token_id is None or not 0 <= pad_token_id < config.vocab_size:  # (-1 in some Llama conversions)
            pad_token_id = stops[0] if stops else 0
    elif not is_whole(pad_token_id) or not 0 <= pad_token_id < config.vocab_size:
        raise ValueError(f"pad_token_id must be a token id in [0, {config.vocab_size}), got {pad_token_id!r}.")
    return mask, torch.tensor(stops, device=input_ids.device, dtype=torch.long), int(pad_token_id)


def default_stop_tokens(model) -> list[int]:
    """The ids a generation stops at by default: `generation_config.json`'s eos_token_id when the checkpoint has one
    (as transformers' generate; Qwen3 stops at <|im_end|> and <|endoftext|> there), else config.json's."""
    eos = (getattr(model, "generation_config", None) or {}).get("eos_token_id")
    if eos is None:
        return model.config.eos_token_ids
    return [eos] if isinstance(eos, int) else list(eos)


def _token_ids(value, vocab_size: int) -> list[int]:
    """stop_tokens (an id, or ids in any iterable) as a list of ids in [0, vocab_size), else a ValueError."""
    try:
        items = [value] if is_whole(value) else list(value)
    except TypeError:
        items = None
    if items is None or not all(is_whole(v) for v in items):
        raise ValueError(f"stop_tokens must be a token id or a list of token ids, got {value!r}.")
    ids = [operator.index(v) for v in items]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"stop_tokens {bad} lie outside the model's vocabulary [0, {vocab_size}).")
    return ids


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """Softmax of (..., V) logits after temperature, top-k, then top-p (as in HF): what `sample_next` draws from, and
    the distributions speculative sampling compares."""
    shape = logits.shape
    logits = logits.reshape(-1, shape[-1]).float() / temperature  # (B', V)
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, shape[-1]), dim=-1).values[:, -1:]  # (B', 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits.softmax(-1).reshape(shape)


def penalize_repeats(logits_BV: torch.Tensor, seen_BN: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL paper's repetition penalty, as transformers applies it (before temperature, top-k and top-p, greedy
    too): the logit of every token already in the row, prompt included, divided by `penalty` where positive and
    multiplied by it where negative. `seen_BN`: the row's ids so far (a padding position holds one of the row's
    real ids, so the pad id is not penalized for the padding)."""
    logits = logits_BV.float()
    seen = logits.gather(1, seen_BN)  # (B, N)
    return logits.scatter(1, seen_BN, torch.where(seen < 0, seen * penalty, seen / penalty))


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row (B,). temperature 0 is greedy; else a draw from `filtered_probs`."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    return torch.multinomial(filtered_probs(logits_BV, temperature, top_k, top_p), 1, generator=generator).squeeze(1)


def check_finite(values: torch.Tensor, model, what: str) -> None:
    """A FloatingPointError when `values` (a model's logits or scores) hold NaN or inf, which argmax and the scores of
    multiple-choice tasks would turn silently into token 0 and chance accuracy (one host sync)."""
    if not bool(torch.isfinite(values).all()):
        raise not_finite(model, what)


def not_finite(model, what: str) -> FloatingPointError:
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return FloatingPointError(
        f"{what} are not finite (NaN or inf) in this {dtype} model: its activations overflowed, or its weights hold "
        "NaN. float16 holds at most 65504, which the activations of many checkpoints exceed: load the model in "
        "bfloat16 or float32 (dtype=bfloat16).")


def check_left_padded(mask_BT: torch.Tensor) -> None:
    if bool(((mask_BT != 0) & (mask_BT != 1)).any()):
        raise ValueError("attention_mask must hold 1 for real tokens and 0 for padding; got other values.")
    if (mask_BT.sum(-1) == 0).any():
        raise ValueError("a row of attention_mask has no real token; drop empty prompts before generating.")
    if (mask_BT[:, 1:] < mask_BT[:, :-1]).any():
        row = int((mask_BT[:, 1:] < mask_BT[:, :-1]).any(-1).nonzero()[0])
        if mask_BT[row, -1] == 0:
            raise ValueError("attention_mask is right-padded; generation needs left padding (pad tokens first), "
                             "e.g. tokenizer padding_side='left'.")
        raise ValueError(f"attention_mask row {row} has padding between real tokens; generation takes left padding "
                         "only (pad tokens first, then the prompt's tokens).")


def knob_owner(model):
    """What runtime knobs set: the attached method, else the model itself when it has knobs (a recurrent family's
    `steps`, Dreamer's `exit_kl`), else None."""
    if getattr(model, "method", None) is not None:
        return model.method
    return model if callable(getattr(model, "knobs", None)) and callable(getattr(model, "override", None)) else None


@torch.no_grad()
def decoding_knobs(model, skip_budget: float | None, method_knobs: dict | None):
    """The attached method's `decoding` scope for a generation's knobs, or, without a method, the model's own
    `override` when it has knobs (a recurrent family's `steps`, Dreamer's `exit_kl`); a ValueError (here, or on
    entering it: names, values, calibration) for knobs it cannot decode with."""
    method = getattr(model, "method", None)
    if method is None and knob_owner(model) is not None:
        if skip_budget is not None:
            raise ValueError(f"a {type(model).__name__} has no skip budget (no method is attached); its own knobs are "
                             f"{sorted(model.knobs())}: pass those (method_knobs, or --knobs from a shell).")
        return model.override(**dict(method_knobs or {}))
    if method is None:
        raise ValueError("the model has no method attached: post-train one (dyndepth train RECIPE --method gateskip, "
                         "or mod / dnd) or attach one (attach_gateskip) to generate with a skip budget or knobs.")
    if skip_budget is not None and "budget" in (method_knobs or {}):
        raise ValueError("the budget is given twice (skip_budget and the knob budget); give one.")
    if skip_budget is not None and "budget" not in method.knobs():
        raise ValueError(f"a skip budget (skip_budget, --skip-budget) is GateSkip's knob; {method.name} decodes with "
                         f"its own knobs {sorted(method.knobs())}: pass those (method_knobs, or --knobs from a shell, "
                         "e.g. --knobs capacity=0.25,mode=router_threshold for mod).")
    return method.decoding(**dict(method_knobs or {}, **({} if skip_budget is None else {"budget": skip_budget})))


@torch.no_grad()  # (called directly too: with autograd on, the cache's in-place writes chained every step's graph)
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    generator: torch.Generator | None = None,
    compile: bool | dict = False,
    cache_dtype: torch.dtype | str | None = None,
    skip_budget: float | None = None,
    method_knobs: dict | None = None,
    cache: KVCache | None = None,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Return the prompt plus up to `max_new_tokens` new tokens per row, (B, T + n).

    stop_tokens: a row stops once it emits one (default: generation_config.json's eos ids when the checkpoint has
      them, else config.json's; pass [] for none);
      later positions of a stopped row hold `pad_token_id`. The loop ends when every row stopped.
    callback(step, tokens (B,)): called with each new column, for streaming.
    compile: compile the one-token decode step over the full-length static cache (CUDA graphs on GPU); a dict:
      torch.compile options for the step (`decode_compile_options`: inductor, "reduce-overhead" on CUDA, static
      shapes). Each batch size, length (prompt + max_new_tokens, or the given cache's) and model compiles another
      variant; past torch._dynamo.config.recompile_limit (8) new ones run eager, with a warning.
    cache_dtype: the KV cache's dtype (default: the model's); another than the dtype the model computes in needs
      torch.autocast around the call.
    cache: a KVCache to decode into (emptied first) instead of a new one: for batch size B, the model's
      `num_slots()` and at least prompt + max_new_tokens positions. Passing the same cache to repeated compiled
      generates lets CUDA graphs replay on the same addresses (a new cache re-records them, and torch stops
      recording after a limit of address changes); the caller owns it, so two generates must not share one at once.
    skip_budget: shorthand for `method_knobs={"budget": skip_budget}` (GateSkip decodes with per-branch
      thresholds calibrated at that budget, see `dyndepth.methods.calibrate`).
    method_knobs: runtime knobs of the attached method for this generation (`method.decoding(**knobs)`).
    repetition_penalty: > 1 discourages tokens the row already holds (`penalize_repeats`; 1: off).
    Logits that are not finite in a running row (a float16 overflow, in the prompt or later) are a FloatingPointError:
    the prompt's at once, the steps' at the end (a flag kept on the device: no host sync per token).
    """
    if skip_budget is not None or method_knobs:
        with decoding_knobs(model, skip_budget, method_knobs):
            return generate(model, input_ids, max_new_tokens, attention_mask, temperature, top_k, top_p,
                            stop_tokens, pad_token_id, callback, generator, compile, cache_dtype, cache=cache,
                            repetition_penalty=repetition_penalty)
    mask, stops, pad_token_id = check_request(model, input_ids, max_new_tokens, attention_mask, temperature, top_k,
                                              top_p, stop_tokens, pad_token_id, repetition_penalty)
    max_new_tokens, config, device, B = operator.index(max_new_tokens), model.config, input_ids.device, len(input_ids)
    if max_new_tokens == 0:
        return input_ids

    lengths = mask.sum(-1)  # (B,)
    prompt_len = int(lengths.max())
    max_len = prompt_len + max_new_tokens
    compiled = compile is True or isinstance(compile, dict)
    dtype = resolve_dtype(cache_dtype) or next(model.parameters()).dtype  # (a name, as the CLI's --dtype, too)
    if cache is None:
        cache = KVCache.for_model(config, B, max_len, num_slots=model.num_slots(), dtype=dtype, device=device)
    else:
        _check_given_cache(cache, config, B, max_len, model.num_slots(), device, dtype)
        cache.reset()
    if compiled and cache.keys[0].is_cuda:  # CUDA graphs replay a step that writes these in place (as HF's static
        for t in cache.buffers():  # cache does): marked static, a new cache re-records instead of falling back
            torch._dynamo.mark_static_address(t)

    with accounting_off_by_default():  # no step reads its FLOP ledger or statistics (core.accounting)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        out = model(input_ids, attention_mask=mask, positions=positions, cache=cache.window(prompt_len), num_logits=1)
        check_finite(out.logits, model, "the prompt's next-token logits")  # (NaN: greedy emitted token 0 throughout)
        step = decode_step(model, compile if compiled else False)
        if compiled:
            _warn_at_recompile_limit()

        tokens = [input_ids]
        seen = torch.where(mask.bool(), input_ids, input_ids[:, -1:])  # (B, T) a left-padded row's last id is real
        unfinished = torch.ones(B, dtype=torch.bool, device=device)
        next_pos = lengths[:, None]  # (B, 1)
        # the first step whose logits are not finite in a running row (-1: none), kept on the device and read once at
        # the end: an overflow that appears only while decoding (a long generation's activations) emitted token 0 on
        # from there, silently, and a check per step would cost a host sync per token
        overflow = torch.full((), -1, device=device)
        for i in range(max_new_tokens):
            logits = out.logits[:, -1]  # (B, V)
            if i:  # (step 0's are the prompt's, checked above)
                bad = (~torch.isfinite(logits).all(-1) & unfinished).any()
                overflow = torch.where(bad & (overflow < 0), i, overflow)
            if repetition_penalty != 1.0:
                logits = penalize_repeats(logits, seen, repetition_penalty)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            nxt = torch.where(unfinished, nxt, pad_token_id)
            tokens.append(nxt[:, None])
            if repetition_penalty != 1.0:
                seen = torch.cat([seen, nxt[:, None]], dim=1)
            if callback is not None:
                callback(i, nxt)
            if len(stops):
                unfinished = unfinished & ~torch.isin(nxt, stops)
                if not bool(unfinished.any()):
                    break
            if i == max_new_tokens - 1:
                break
            view = cache if compiled else cache.window(prompt_len + i + 1)
            out = step(nxt[:, None], next_pos, view)
            next_pos = next_pos + 1
        if int(overflow) >= 0:
            raise not_finite(model, f"the next-token logits after {int(overflow)} generated tokens (the prompt's were "
                                    "finite)")
        return torch.cat(tokens, dim=1)


def _check_given_cache(cache: KVCache, config, batch_size: int, max_len: int, slots: int, device,
                       dtype: torch.dtype) -> None:
    _, G, _, H = cache.keys[0].shape  # (B, G, S + 1, H)
    have = (f"batch {cache.batch_size}, {len(cache.keys)} slots, {cache.max_seq_len} positions, {G} x {H} kv heads, "
            f"{cache.keys[0].dtype} on {cache.keys[0].device}")
    need = (f"batch {batch_size}, {slots} slots, {max_len} positions, {config.num_key_value_heads} x "
            f"{config.head_dim}, {dtype} on {device}")
    fits = (cache.batch_size == batch_size and len(cache.keys) >= slots and cache.max_seq_len >= max_len
            and (G, H) == (config.num_key_value_heads, config.head_dim) and cache.keys[0].device == device
            and cache.keys[0].dtype == dtype)
    cache.check_writable()  # (before `reset` writes it)
    if not fits:
        raise ValueError(f"the given cache ({have}) does not fit this generation ({need}): build one with "
                         "KVCache.for_model(model.config, B, prompt + new tokens, num_slots=model.num_slots() (under "
                         "the generation's knobs), dtype=..., device=...).")


def decode_step(model, compile: bool | dict):
    """The one-token step `generate` runs, (tokens (B, 1), positions (B, 1), cache) -> output; compiled with
    `decode_compile_options` unless `compile` is False."""
    def step(tok_B1: torch.Tensor, pos_B1: torch.Tensor, cache: KVCache):
        return model(tok_B1, positions=pos_B1, cache=cache)

    if compile is False:
        return step
    return torch.compile(step, **decode_compile_options(model, compile))


def _warn_at_recompile_limit() -> None:
    """Dynamo compiles the decode step once per batch size, cache length, model and knobs seen in the process (static
    shapes); past torch._dynamo.config.recompile_limit (8 by default) any other runs eager, slow, and torch logs that
    once, as a compiler message. Say it in dyndepth's words when the step holds that many variants."""
    try:  # (a private helper of torch 2.11-2.14: a torch without it warns of nothing)
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return
    code = decode_step(None, False).__code__  # the code object every decode_step compiles: dynamo keeps its cache there
    limit, held = torch._dynamo.config.recompile_limit, len(_debug_get_cache_entry_list(code))
    if held >= limit and limit not in _warned_recompile_limits:
        _warned_recompile_limits.add(limit)
        log.warning("generate(compile=...): the compiled decode step holds %d variants (one per batch size, prompt + "
                    "new tokens length, model and method knobs this process generated with), torch._dynamo.config."
                    "recompile_limit=%d: a generation of another shape may now run eager, at eager speed (dynamo "
                    "counts per model). Raise that limit (e.g. to 64) before generating, or keep to one shape (pad "
                    "prompts to one batch size and pass the same cache=).", held, limit)


def decode_compile_options(model, compile: bool | dict = True) -> dict:
    """The torch.compile options of a compiled decode step: static shapes, inductor, CUDA graphs on a GPU; a dict
    given as `compile` overrides them (inductor `options` replace the default mode: torch takes one of the two)."""
    cuda = next(model.parameters()).is_cuda
    options = {"backend": "inductor", "mode": "reduce-overhead" if cuda else "default", "fullgraph": False,
               "dynamic": False}
    if not isinstance(compile, dict):
        return options
    if "options" in compile and "mode" not in compile:
        del options["mode"]
    return {**options, **compile}
