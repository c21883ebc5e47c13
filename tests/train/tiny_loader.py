"""Loaders for the training tests.

`TinyLoader`: deterministic in-memory batches with the shape of the real data loader's. Batch `cursor`
is drawn from a generator seeded by (seed, cursor), so the state is just the cursor. Rank r of
world_size W takes rows [r*B, (r+1)*B) of the global batch of W*B rows.
`sft_loader`: the real `PackedLoader` over prompt-masked SFT pairs of varied lengths.
"""

from __future__ import annotations

import random
import string

import torch

from dyndepth.data.loader import PackedLoader, loader_from_texts


class TinyLoader:
    def __init__(self, batch_size: int, seq_len: int, vocab: int = 256, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.batch_size, self.seq_len, self.vocab, self.seed = batch_size, seq_len, vocab, seed
        self.rank, self.world_size, self.cursor = rank, world_size, 0

    def next_batch(self) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.cursor)
        B, W = self.batch_size, self.world_size
        # a learnable stream: each row counts up from a random start, with random noise tokens
        start = torch.randint(0, self.vocab, (B * W, 1), generator=g)
        rows = (start + torch.arange(self.seq_len + 1)) % self.vocab  # (W*B, T+1)
        noise = torch.randint(0, self.vocab, rows.shape, generator=g)
        rows = torch.where(torch.rand(rows.shape, generator=g) < 0.2, noise, rows)
        rows = rows[self.rank * B:(self.rank + 1) * B]  # (B, T+1)
        self.cursor += 1
        return {"input_ids": rows[:, :-1].clone(), "labels": rows[:, 1:].clone()}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = state["cursor"]


class SmallBytes:
    """UTF-8 bytes as ids for the 256-id tiny models: ASCII text only, EOS = 255."""

    vocab_size, eos_token_id = 256, 255

    def encode(self, text: str) -> list[int]:
        return list(text.encode("ascii"))


def sft_pairs(n: int = 160, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs of varied lengths: 2-24 prompt characters, 1-16 response characters."""
    rng = random.Random(seed)

    def word(k: int) -> str:
        return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(k))

    return [(word(rng.randint(2, 24)), word(rng.randint(1, 16))) for _ in range(n)]


def sft_loader(batch_size: int, seq_len: int = 16, rank: int = 0, world_size: int = 1, **kw) -> PackedLoader:
    """The real packed loader over prompt-masked SFT pairs: rows carry different numbers of labels."""
    return loader_from_texts(sft_pairs(), SmallBytes(), seq_len, batch_size, rank=rank, world_size=world_size,
                             seed=kw.pop("seed", 0), **kw)
