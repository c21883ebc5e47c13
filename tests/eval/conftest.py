"""A tiny random Qwen3 checkpoint with a tiny BPE tokenizer, exported with save_pretrained (offline)."""

import pytest
import torch

import dyndepth
from dyndepth.tokenizer import train_bpe

TEXTS = [
    "The quick brown fox jumps over the lazy dog. A man is sitting on a roof.",
    "Question: Which gas do plants take in? Answer: carbon dioxide. She bends down and grabs the pole.",
    "Janet sells 16 - 3 - 4 = 9 duck eggs a day. #### 9 The woman retired, therefore she got a pension.",
    "How do I ready a guinea pig cage for its new occupants? Provide bedding, water and food.",
] * 20


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(folder, tokenizer): weights scaled up from the 0.02 init so predictions are peaked, not near-ties."""
    folder = tmp_path_factory.mktemp("tiny_ckpt")
    tok = train_bpe(iter(TEXTS), vocab_size=320)
    tok.save(folder)
    config = dyndepth.preset("tiny-qwen3", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                             max_position_embeddings=256)
    torch.manual_seed(0)
    model = dyndepth.CausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder, tok
