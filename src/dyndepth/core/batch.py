"""The batch forms that functions running a model over `batches` (calibration, pruning scores, analyses) accept,
reduced to the forward's (input_ids, attention_mask).

Shape legend: B batch, T tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

FORMS = ("a tensor of token ids (B, T)",
         ("a tuple or list (ids,) or (ids, attention_mask), as a DataLoader over a TensorDataset yields"),
         ("a dict with 'input_ids' and optionally 'attention_mask' (and 'labels', unread), as an HF tokenizer or "
          "collator gives"))
IGNORED_KEYS = ("labels",)  # (read by a loss, not by the forward)


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids (B, T), attention_mask (B, T) | None) of a batch in one of `FORMS`; anything else a ValueError
    naming them."""
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        ids, mask = batch[0], batch[1] if len(batch) == 2 else None
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        extra = sorted(set(batch) - {"input_ids", "attention_mask", *IGNORED_KEYS})
        if extra:  # positions / doc_ids (packed documents) change the forward: dropping them silently mixed documents
            raise ValueError(f"a batch dict has keys {extra} this function does not pass to the model; give rows of "
                             "one sequence each with 'input_ids' and 'attention_mask' only (a loader without "
                             "data.intra_doc_mask, which adds 'positions' and 'doc_ids'; packing='documents' adds "
                             "only the attention_mask).")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise ValueError(f"a batch must be {'; or '.join(FORMS)}; got {_describe(batch)}.")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        hint = (" (`batches` is an iterable of batches: iterating one (B, T) tensor gave its rows; wrap it in a list)"
                if isinstance(ids, torch.Tensor) and ids.dim() == 1 else "")
        raise ValueError(f"a batch's input_ids must be an integer tensor (B, T); got {_describe(ids)}{hint}.")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        raise ValueError(f"a batch's attention_mask must be a tensor shaped like its input_ids {tuple(ids.shape)}; "
                         f"got {_describe(mask)}.")
    return ids, mask


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
    return f"a {type(value).__name__}"
