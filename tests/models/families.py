"""Helpers the model-family tests share (Dreamer, MoEUT, Huginn, MoR)."""

import torch


def varied(model_class, config, std: float, seed: int = 0):
    """`model_class(config)` in eval mode with matrices redrawn at `std`, larger than the init, so every component
    moves the output visibly (the embedding keeps its init)."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed_tokens" not in name:
                p.normal_(0, std)
    return model


def left_padded(B: int = 3, T: int = 12, vocab: int = 256, pads: tuple[int, ...] = (0, 3, 6)):
    """Random ids (B, T) and a left-padding mask with `pads[b]` PAD columns in row b."""
    ids = torch.randint(0, vocab, (B, T))
    mask = torch.ones_like(ids)
    for b, n in enumerate(pads[:B]):
        mask[b, :n] = 0
    return ids, mask
