"""One `calibrate` for every method with thresholds: decoding token by token cannot rank a batch, so a
method routes by per-(layer, branch) thresholds fitted on calibration text at the wanted knobs."""

from __future__ import annotations

import torch

from dyndepth.core.method import ThresholdRecorder


@torch.no_grad()
def calibrate(model, batches, **knobs) -> dict:
    """Run `batches` (tensors (B, T) or (ids, attention_mask) tuples) with the method at `knobs` (e.g.
    `budget=0.3` for GateSkip, `capacity=0.25` for MoD), record each routing point's threshold (the score
    that keeps all but the budget's lowest scores of the batch, averaged over batches) and store them in
    the method's buffers for decoding at those knobs. Returns {key: threshold}."""
    method = model.method
    if method is None:
        raise ValueError("calibrate needs a model with a method attached (e.g. attach_gateskip).")
    recorder = ThresholdRecorder()
    was_training = model.training
    model.eval()
    try:
        with method.override(**knobs), method.recording(recorder):
            for batch in batches:
                ids, mask = batch if isinstance(batch, tuple) else (batch, None)
                model(ids, attention_mask=mask)
    finally:
        model.train(was_training)
    thresholds = recorder.result()
    method.set_thresholds(thresholds, knobs)
    return thresholds
