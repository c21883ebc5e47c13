"""The language-modelling loss shared by training and evaluation.

Shape legend: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in float32 over positions whose label is not -100.

    logits (B, T, V) and labels (B, T) are already aligned (the data loader shifts labels), so position t
    predicts labels[t]. reduction "mean" averages over counted tokens (0 if none); "sum" adds them up.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align: "
                         "expected logits (B, T, V) with labels (B, T).")
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (B*T, V)
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    if reduction == "sum":
        return total
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count
