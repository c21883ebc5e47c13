"""Packed fixed-length batches from a ShardSet, sharded across ranks, with exact resume.

The token stream is cut into windows of `seq_len + 1` tokens; window `w` covers tokens
`[w * seq_len, w * seq_len + seq_len + 1)`, so consecutive windows share one token and every token is
a target exactly once (but the stream's last (num_tokens - 1) % seq_len, which fill no window). Documents are
packed back to back (EOS-separated by the shard builder, each opened by BOS where the tokenizer's own encoding
opens a text with one, as Llama's does).

Each epoch, the windows are permuted with a generator seeded by `(seed, epoch)` (identity when
`shuffle=False`), truncated to a multiple of `world_size * batch_size` (the `left_out` windows: shuffled, others
each epoch; unshuffled, as validation reads, always the last ones), and dealt round-robin to
ranks: rank `r` gets permuted windows `r, r + W, r + 2W, ...`. Ranks are disjoint, every rank has the
same number of batches, and the whole state is `(epoch, cursor)`: resuming needs no replay.

Batch (B batch, T = seq_len):
    input_ids (B, T) long      window[:-1]
    labels    (B, T) long      window[1:], -100 where the target token's loss mask is 0 (prompt), and,
                               with intra_doc_mask, where the target starts a new document
    attention_mask (B, T) long only with packing="documents": 0 on the padding after the row's documents
    positions (B, T) long      only with intra_doc_mask: restarts at 0 at each document start
    doc_ids   (B, T) long      only with intra_doc_mask: 0, 1, ... per document inside the row;
                               attend only where doc_ids match (and causal)

Document ends: the label of a document's last token (its EOS) is the next document's first token. With
intra_doc_mask that prediction is made without seeing the next document at all, so it is not trained
(label -100). Without intra_doc_mask the stream is one sequence, as in GPT-2-style pretraining: the EOS
acts as the start-of-text context of the next document, and its label is the only place the first
token of a document is ever a target, so it stays trained.

Packing (`packing`): "stream" (above, pretraining's) cuts the stream where a window ends, so a window can open in
the middle of a document: for SFT data, an answer trained without its prompt in view. "documents" packs whole
documents in order into each window (next-fit), and pads the rest: the row's `attention_mask` (B, T) is 0 on the
padding, which is never a target. A document longer than a window fills windows of its own, cut as the stream is.
The first token of each window is then never a target (it opens a document; with intra_doc_mask it is not
trained anyway).

Resume (`load_state_dict`) continues at the same global position of the same window order; a state
saved with another world_size or batch_size is converted when the windows already served in the epoch
fill whole batches of the new layout (a checkpoint resumed at another world size).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dyndepth.data.shards import ShardSet, Tokenizer, build_shards
from dyndepth.data.sources import DataError, Document

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PACKINGS = ("stream", "documents")


class PackedLoader:
    def __init__(
        self,
        shards: ShardSet,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        intra_doc_mask: bool = False,
        packing: str = "stream",
    ) -> None:
        if packing not in PACKINGS:
            raise DataError(f"data.packing={packing!r} is not one of {PACKINGS}.")
        if seq_len < 1 or batch_size < 1:
            raise DataError(
                f"seq_len and batch_size must be >= 1, got seq_len={seq_len}, batch_size={batch_size}"
            )
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside [0, world_size={world_size})")
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.intra_doc_mask, self.packing = intra_doc_mask, packing
        if packing == "stream":
            self.starts = np.arange(max(0, (shards.num_tokens - 1) // seq_len), dtype=np.int64) * seq_len
            self.ends = self.starts + seq_len + 1
        else:
            self.starts, self.ends = document_windows(shards.doc_starts(), shards.num_tokens, seq_len)
        self.num_windows = len(self.starts)
        self.batches_per_epoch = self.num_windows // (world_size * batch_size)
        self.left_out = self.num_windows - self.batches_per_epoch * world_size * batch_size  # windows no whole batch
        # of world_size x batch_size holds, left out of every epoch (shuffled: others each time; else the last ones)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{shards.num_tokens} tokens make {self.num_windows} windows of seq_len+1={seq_len + 1}, fewer "
                f"than world_size*batch_size={world_size * batch_size}: lower seq_len or batch_size, or add data"
            )
        self.epoch, self.cursor = 0, 0
        self._epoch_windows: tuple[int, np.ndarray] | None = None

    def windows_for_epoch(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch`, in the order they are served (int64)."""
        if self._epoch_windows is None or self._epoch_windows[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            used = self.batches_per_epoch * self.world_size * self.batch_size
            self._epoch_windows = (epoch, order[:used][self.rank :: self.world_size].astype(np.int64))
        return self._epoch_windows[1]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of this rank; rolls over (and reshuffles) at the end of an epoch."""
        if self.cursor >= self.batches_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
        windows = self.windows_for_epoch(self.epoch)
        batch = self.read_windows(
            windows[self.cursor * self.batch_size : (self.cursor + 1) * self.batch_size]
        )
        self.cursor += 1
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches without end (epochs roll over); stop by step count in the training loop."""
        while True:
            yield self.next_batch()

    def read_windows(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        """Assemble the batch for the given window indices (one row per window)."""
        T, B = self.seq_len, len(windows)
        rows = np.zeros((B, T + 1), dtype=np.int64)  # (B, T+1); a window of documents shorter than T + 1 is padded
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)  # (B, T)
        for b, w in enumerate(windows):
            start, end = int(self.starts[w]), int(self.ends[w])
            rows[b, : end - start] = self.shards.tokens(start, end)
            labels[b, : end - start - 1] = rows[b, 1 : end - start]
            if self.shards.has_loss_mask:
                labels[b, : end - start - 1][self.shards.loss_mask(start + 1, end) == 0] = IGNORE_INDEX
            if self.intra_doc_mask:  # a target that opens a new document is not predictable from this one
                labels[b, self.shards.doc_starts(start + 1, end) - (start + 1)] = IGNORE_INDEX
        batch = {"input_ids": torch.from_numpy(rows[:, :-1].copy()), "labels": torch.from_numpy(labels)}
        if self.packing == "documents":  # the padding after each row's documents
            filled = (self.ends[windows] - self.starts[windows] - 1)[:, None]  # (B, 1) input tokens of each row
            batch["attention_mask"] = torch.from_numpy((np.arange(T)[None] < filled).astype(np.int64))  # (B, T)
        if self.intra_doc_mask:
            positions, doc_ids = zip(*(self._doc_layout(int(self.starts[w]), int(self.ends[w])) for w in windows))
            batch["positions"] = torch.from_numpy(np.stack(positions))  # (B, T)
            batch["doc_ids"] = torch.from_numpy(np.stack(doc_ids))  # (B, T)
        return batch

    def _doc_layout(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """`(positions (T,), doc_ids (T,))` for the input tokens [start, start + T) of a window ending at `end`
        (padding after its last input token, end - 1, is a segment of its own)."""
        T = self.seq_len
        is_start = np.zeros(T, dtype=bool)
        is_start[self.shards.doc_starts(start, end - 1) - start] = True
        is_start[0] = True  # the row's first token opens a segment even mid-document
        if end - 1 - start < T:
            is_start[end - 1 - start] = True
        doc_ids = np.cumsum(is_start) - 1
        arange = np.arange(T)
        segment_start = np.maximum.accumulate(np.where(is_start, arange, 0))
        return (arange - segment_start).astype(np.int64), doc_ids.astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this loader is (plain ints, JSON-safe)."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "packing": self.packing,
            "num_tokens": self.shards.num_tokens,
            "num_windows": self.num_windows,  # (the same tokens cut otherwise: a dyndepth version's packing)
            "source_digest": getattr(self.shards, "source_digest", None),  # user data: its files' content
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the data, seed, shuffle and seq_len must match the ones it was saved with.

        A state from another world_size or batch_size (a checkpoint resumed at another world size) is
        converted to the same global position: `cursor * world_size * batch_size` windows of the epoch
        have been served, and must fill whole batches of this loader (a finished epoch: the next one's start).
        """
        data = {"num_tokens": self.shards.num_tokens, "num_windows": self.num_windows,
                "source_digest": getattr(self.shards, "source_digest", None)}
        for key in ("seed", "shuffle", "seq_len", "packing", "num_tokens", "num_windows", "source_digest"):
            mine = data[key] if key in data else getattr(self, key)
            if state.get(key) is not None and mine is not None and state[key] != mine:  # (older states lack some)
                what = ("the training data changed since (a file of data.source edited, renamed, added or removed, "
                        "another tokenizer or split, or a dyndepth version that tokenizes or packs it otherwise)"
                        if key in data
                        else f"{key} changed")
                raise DataError(
                    f"loader state was saved with {key}={state[key]} but this loader has {key}={mine}: {what}; an "
                    "exact resume needs the same data and loader settings: restore them, or train into a new "
                    "train.out_dir"
                )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        world, batch = state.get("world_size", self.world_size), state.get("batch_size", self.batch_size)
        if (world, batch) == (self.world_size, self.batch_size):
            if state.get("rank", self.rank) != self.rank:
                raise DataError(f"loader state of rank {state['rank']} given to rank {self.rank}")
        else:
            if cursor >= self.num_windows // (world * batch):  # its whole epoch served: the next one starts
                epoch, cursor = epoch + 1, 0
            served, per_batch = cursor * world * batch, self.world_size * self.batch_size
            if served % per_batch:
                raise DataError(
                    f"loader state was saved by world_size={world} x batch_size={batch} after {served} windows of "
                    f"epoch {epoch}, which is not a whole number of batches of world_size={self.world_size} x "
                    f"batch_size={self.batch_size}; resume from a checkpoint at a step where it is, or keep "
                    "world_size x batch_size"
                )
            cursor = served // per_batch
        self.epoch, self.cursor = epoch, cursor


def document_windows(doc_starts: np.ndarray, num_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`(starts, ends)` (W,) int64: the token ranges of `packing="documents"` windows, whole documents in order,
    each window at most seq_len + 1 tokens (next-fit) and at least 2 (one target). A document longer than that fills
    windows of its own, each sharing one token with the next as the stream's do; its last piece is packed with what
    follows."""
    limit = seq_len + 1
    bounds = np.append(doc_starts, num_tokens).astype(np.int64)
    starts: list[int] = []
    ends: list[int] = []
    open_at = None  # start of the window being filled
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if open_at is not None and b - open_at > limit:  # this document does not fit: close the window before it
            if a - open_at > 1:  # (a lone token, a document that is only its EOS, is no window: nothing to predict)
                starts.append(open_at)
                ends.append(a)
            open_at = None
        while b - a > limit:  # a long document: full windows of its own
            starts.append(a)
            ends.append(a + limit)
            a += seq_len
        open_at = a if open_at is None else open_at
    if open_at is not None and num_tokens - open_at > 1:  # (a lone token is no window: nothing to predict)
        starts.append(open_at)
        ends.append(num_tokens)
    return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)


def loader_from_texts(
    texts: Iterable[str | Document | tuple[str, str]],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    out_dir: str | Path | None = None,
    *,
    append_eos: bool = True,
    **loader_kwargs: Any,
) -> PackedLoader:
    """A PackedLoader over a few in-memory texts (demos, tests).

    With `out_dir` the texts go through `build_shards` (a real on-disk split); without, they are
    tokenized into RAM. `(prompt, response)` pairs and Documents are accepted too.
    """
    if out_dir is not None:
        shards = build_shards(texts, tokenizer, out_dir, append_eos=append_eos, source="loader_from_texts")
    else:
        shards = ShardSet.from_documents(texts, tokenizer, append_eos=append_eos)
    return PackedLoader(shards, seq_len, batch_size, **loader_kwargs)
