"""One `calibrate` for every method with thresholds: decoding token by token cannot rank a batch, so a
method routes by per-(layer, branch) thresholds fitted on calibration text at the wanted knobs."""

from __future__ import annotations

import logging
import math

import torch

from dyndepth.core.batch import split_batch
from dyndepth.core.method import ThresholdRecorder
from dyndepth.methods.common import parse_key_values
from dyndepth.models.qwen3 import CausalLM

log = logging.getLogger(__name__)


@torch.no_grad()
def calibrate(model, batches, **knobs) -> dict:
    """Run `batches` (ids (B, T), (ids, attention_mask) tuples or lists, or dicts with input_ids and attention_mask:
    `core.batch.split_batch`) with the method at `knobs` (e.g. `budget=0.3` for GateSkip, `capacity=0.25` for MoD),
    record each routing point's threshold (the score that keeps all but the budget's lowest scores of the batch,
    averaged over batches) and store them in the method's buffers for decoding at those knobs. Returns
    {key: threshold}."""
    method = model.method
    if method is None and not isinstance(model, CausalLM):  # (attach_gateskip, the fix named below, refuses it)
        raise ValueError(f"calibrate fits the decoding thresholds of GateSkip and MoD, which attach to the decoder "
                         f"family (CausalLM); a {type(model).__name__} has no thresholds to fit: it decodes by its "
                         "own knobs (e.g. `steps`).")
    if method is None:
        raise ValueError("calibrate needs a model with a method attached: post-train one (dyndepth train RECIPE "
                         "--method gateskip, or mod) or, in Python, attach one (attach_gateskip).")
    knobs = {k: v for k, v in knobs.items() if k != "mode"}  # calibration records in its own mode (`recording`)
    recorder = ThresholdRecorder()
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with method.recording(recorder), method.override(**knobs):  # (recording's mode first: no calibrated check)
            for seen, batch in enumerate(batches, 1):
                ids, mask = split_batch(batch)
                model(ids, attention_mask=mask)
    finally:
        model.train(was_training)
    if not seen:  # (the recorder's error blamed the knobs or padding)
        raise ValueError("calibrate got no batches (an empty list, or an iterator already used up); give at least one "
                         "batch of token ids (B, T) like the text the model will decode.")
    thresholds = recorder.result()
    for key, skipped in recorder.tied.items():  # (no threshold splits a tie: every tied score skips)
        log.warning("calibrate: the scores at routing point %r tie at its threshold, so deciding by it skips %.0f%% of "
                    "a calibration batch's tokens, not %.0f%%; saturated gates or routers (fresh GateSkip gates "
                    "with a large bias): train them first, or calibrate on other text.", key, 100 * skipped,
                    100 * recorder.fraction)
    method.set_thresholds(thresholds, knobs)
    return thresholds


def thresholds_record(thresholds: dict) -> dict[str, float | None]:
    """`calibrate`'s {key: threshold} as strict JSON: keys "slot" or "slot/branch", values floats, and None for a
    routing point that keeps every token (MoD at capacity 1.0 records -inf: no score is below it). The checkpoint's
    buffers keep -inf, which safetensors stores; JSON has no infinity (`-Infinity` breaks jq, JS and strict parsers)."""
    out = {}
    for key, value in thresholds.items():
        name = "/".join(map(str, key)) if isinstance(key, tuple) else str(key)
        value = float(value)
        if value == -math.inf:
            out[name] = None
        elif not math.isfinite(value):  # (NaN or +inf: scores that were not finite)
            raise ValueError(f"calibration threshold {name} is {value}: the calibration scores were not finite; "
                             "check the model's weights and the calibration text.")
        else:
            out[name] = value
    return out


def text_batches(tokenizer, text: str, num_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """The first num_batches x batch_size windows of seq_len tokens of `text` (tokenized once): calibration
    batches (B, T) for `calibrate`. Fewer when the text is shorter; a ValueError when it has no full window."""
    for name, value in (("batches", num_batches), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"calibration {name}={value} must be >= 1.")
    ids = torch.tensor(tokenizer.encode(text)[:num_batches * batch_size * seq_len], dtype=torch.long)
    rows = ids[:len(ids) // seq_len * seq_len].view(-1, seq_len)  # (windows, T)
    if len(rows) == 0:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}; "
                         "give a longer text or a smaller --seq-len.")
    return list(rows.split(batch_size))


def parse_knobs(spec: str) -> dict:
    """'budget=0.3,mode=threshold' -> {"budget": 0.3, "mode": "threshold"} (numbers and true / false parsed)."""
    return parse_key_values(spec, "method knob {item!r} must look like key=value, e.g. budget=0.3.")
