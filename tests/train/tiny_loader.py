"""A deterministic in-memory loader for the training tests (the shape of the real data loader).

Batch `cursor` is drawn from a generator seeded by (seed, cursor), so the state is just the cursor.
Rank r of world_size W takes rows [r*B, (r+1)*B) of the global batch of W*B rows.
"""

from __future__ import annotations

import torch


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
