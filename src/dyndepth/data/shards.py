"""Tokenize once into memory-mapped token shards with a manifest; read them back as one token stream.

On-disk layout of one split (`<out_dir>/<split>/`):
    shard_00000.bin        raw token ids, uint16 if vocab_size <= 65536 else uint32 (nanoGPT-style)
    shard_00000.mask.bin   uint8 loss mask, 0 = prompt token (not trained), 1 = trained; written only
                           for shards that contain prompt tokens (a shard without one is all 1s)
    shard_00000.idx        int64 global token offsets of the documents that start in this shard
    manifest.json          dtype, vocab_size, num_tokens, shards [...], tokenizer, source, version

Building streams: each document is tokenized and appended to the open shard files straight away, so
memory stays O(one document) however large the corpus. Every file is written to `<name>.tmp` and moved
into place with `os.replace`; the manifest is written last, so a directory with a manifest is complete.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dyndepth.data.sources import DataError, Document, as_documents

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids 0..vocab_size-1."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_document(
    doc: Document, tokenizer: Tokenizer, append_eos: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """`(ids (n,) int64, loss_mask (n,) uint8 | None)`; the mask is None when every token is trained.

    Segments are encoded separately and concatenated (prompt, then response, then EOS, which is trained
    so the model learns to stop).
    """
    ids: list[int] = []
    mask: list[int] = []
    for text, trained in doc.segments():
        piece = tokenizer.encode(text)
        ids.extend(piece)
        mask.extend([int(trained)] * len(piece))
    if append_eos and ids:
        ids.append(tokenizer.eos_token_id)  # type: ignore[arg-type]  (checked by the caller)
        mask.append(1)
    ids_arr = np.asarray(ids, dtype=np.int64)
    if ids_arr.size and (ids_arr.min() < 0 or ids_arr.max() >= tokenizer.vocab_size):
        raise DataError(
            f"tokenizer produced id {int(ids_arr.max())} outside [0, vocab_size={tokenizer.vocab_size}); "
            "its vocab_size is wrong or the ids come from another tokenizer"
        )
    return ids_arr, (np.asarray(mask, dtype=np.uint8) if doc.prompt else None)


_worker_args: tuple[Tokenizer, bool] | None = None


def _init_worker(tokenizer: Tokenizer, append_eos: bool) -> None:
    global _worker_args
    _worker_args = (tokenizer, append_eos)


def _encode_in_worker(doc: Document) -> tuple[np.ndarray, np.ndarray | None]:
    assert _worker_args is not None
    return encode_document(doc, *_worker_args)


class _ShardWriter:
    """Appends tokens (and loss masks, doc starts) to shard files, rolling over every `shard_tokens`."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.dtype, self.shard_tokens = out_dir, dtype, shard_tokens
        self.entries: list[dict[str, Any]] = []
        self.total = 0
        self._open()

    def _open(self) -> None:
        self.name = f"shard_{len(self.entries):05d}"
        self.tok_f = open(self.out_dir / f"{self.name}.bin.tmp", "wb")  # noqa: SIM115 (closed in _close)
        self.mask_f: Any = None
        self.count = 0
        self.starts = array("q")

    def write_document(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        self.starts.append(self.total)  # the open shard always has room (full shards close eagerly)
        pos = 0
        while pos < len(ids):
            n = min(self.shard_tokens - self.count, len(ids) - pos)
            self._write_mask(None if mask is None else mask[pos : pos + n], n)
            self.tok_f.write(ids[pos : pos + n].astype(self.dtype).tobytes())
            self.count, self.total, pos = self.count + n, self.total + n, pos + n
            if self.count == self.shard_tokens:
                self._close()
                self._open()

    def _write_mask(self, mask: np.ndarray | None, n: int) -> None:
        if self.mask_f is None:
            if mask is None or mask.all():
                return
            self.mask_f = open(self.out_dir / f"{self.name}.mask.bin.tmp", "wb")  # noqa: SIM115
            for lo in range(0, self.count, 1 << 20):  # backfill the shard's earlier, all-trained tokens
                self.mask_f.write(np.ones(min(1 << 20, self.count - lo), np.uint8).tobytes())
        self.mask_f.write((np.ones(n, np.uint8) if mask is None else mask).tobytes())

    def _close(self) -> None:
        files = {"file": f"{self.name}.bin", "mask_file": None, "idx_file": f"{self.name}.idx"}
        self.tok_f.close()
        if self.mask_f is not None:
            self.mask_f.close()
            files["mask_file"] = f"{self.name}.mask.bin"
        with open(self.out_dir / f"{self.name}.idx.tmp", "wb") as f:
            f.write(np.asarray(self.starts, dtype=np.int64).tobytes())
        for name in filter(None, files.values()):
            os.replace(self.out_dir / f"{name}.tmp", self.out_dir / name)
        self.entries.append({**files, "num_tokens": self.count, "num_documents": len(self.starts)})

    def finish(self) -> list[dict[str, Any]]:
        if self.count:
            self._close()
        else:  # nothing was written since the last roll-over: drop the empty shard
            self.tok_f.close()
            (self.out_dir / f"{self.name}.bin.tmp").unlink()
        return self.entries


def _encode_all(
    documents: Iterable[Document | str | tuple[str, str]],
    tokenizer: Tokenizer,
    append_eos: bool,
    num_workers: int,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Encoded non-empty documents, in order; a process pool when `num_workers > 0`."""
    if append_eos and tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token_id: set one, or pass append_eos=False")
    docs = as_documents(documents)
    if num_workers > 0:
        with multiprocessing.Pool(num_workers, _init_worker, (tokenizer, append_eos)) as pool:
            yield from (e for e in pool.imap(_encode_in_worker, docs, chunksize=64) if e[0].size)
    else:
        yield from (e for e in (encode_document(d, tokenizer, append_eos) for d in docs) if e[0].size)


def _base_manifest(tokenizer: Tokenizer, append_eos: bool, source: str) -> dict[str, Any]:
    name = getattr(tokenizer, "name_or_path", None) or getattr(tokenizer, "name", None)
    info = {
        "class": type(tokenizer).__name__,
        "name": None if name is None else str(name),
        "vocab_size": int(tokenizer.vocab_size),
        "eos_token_id": tokenizer.eos_token_id,
    }
    return {
        "version": FORMAT_VERSION,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": int(tokenizer.vocab_size),
        "eos_token_id": tokenizer.eos_token_id,
        "append_eos": append_eos,
        "tokenizer": info,
        "source": source,
    }


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def build_shards(
    documents: Iterable[Document | str | tuple[str, str]],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    split: str = "train",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    append_eos: bool = True,
    source: str = "",
    num_workers: int = 0,
) -> ShardSet:
    """Tokenize `documents` (streamed) into `<out_dir>/<split>/`; returns the opened ShardSet.

    `num_workers > 0` tokenizes in a process pool (the tokenizer must be picklable); order is kept.
    Rebuilding over an existing split replaces it; stale shard files of the old build are removed.
    """
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / MANIFEST).unlink(missing_ok=True)  # the split is incomplete until the new manifest lands
    writer = _ShardWriter(split_dir, token_dtype(tokenizer.vocab_size), shard_tokens)
    for ids, mask in _encode_all(documents, tokenizer, append_eos, num_workers):
        writer.write_document(ids, mask)
    entries = writer.finish()
    if writer.total == 0:
        raise DataError(f"no tokens to write to {split_dir}: every document was empty")
    keep = {name for e in entries for name in (e["file"], e["mask_file"], e["idx_file"]) if name}
    for stale in split_dir.glob("shard_*"):
        if stale.name not in keep:
            stale.unlink()
    manifest = {
        **_base_manifest(tokenizer, append_eos, source),
        "split": split,
        "num_tokens": writer.total,
        "num_documents": sum(e["num_documents"] for e in entries),
        "has_loss_mask": any(e["mask_file"] for e in entries),
        "shards": entries,
    }
    _write_json_atomic(split_dir / MANIFEST, manifest)
    logger.info("wrote %d tokens in %d shards to %s", writer.total, len(entries), split_dir)
    return open_shards(split_dir)


class ShardSet:
    """A split's shards as one token stream: random access to token ranges across shard boundaries."""

    def __init__(
        self,
        manifest: dict[str, Any],
        tokens: list[np.ndarray],
        masks: list[np.ndarray | None],
        starts: list[np.ndarray],
    ) -> None:
        self.manifest = manifest
        self._tokens, self._masks, self._starts = tokens, masks, starts
        self._offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(np.int64)
        self.num_tokens = int(self._offsets[-1])
        self.vocab_size = int(manifest["vocab_size"])
        self.has_loss_mask = any(m is not None for m in masks)
        self.num_documents = sum(len(s) for s in starts)

    def __len__(self) -> int:
        return self.num_tokens

    def _pieces(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """`(shard, lo, hi)` local ranges covering global tokens [start, end)."""
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"token range [{start}, {end}) is outside [0, {self.num_tokens})")
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while start < end:
            hi = min(end, int(self._offsets[i + 1]))
            yield i, start - int(self._offsets[i]), hi - int(self._offsets[i])
            start, i = hi, i + 1

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Token ids [start, end) as int64, copied out of the memory map."""
        parts = [self._tokens[i][lo:hi] for i, lo, hi in self._pieces(start, end)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def loss_mask(self, start: int, end: int) -> np.ndarray:
        """Loss mask [start, end) as uint8 (1 = trained); all 1s where a shard has no mask file."""
        parts = [
            np.ones(hi - lo, np.uint8) if self._masks[i] is None else np.asarray(self._masks[i][lo:hi])
            for i, lo, hi in self._pieces(start, end)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)

    def doc_starts(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Global offsets (int64, sorted) of the documents starting in [start, end)."""
        end = self.num_tokens if end is None else end
        parts = []
        for i, _, _ in self._pieces(start, end):
            s = self._starts[i]
            parts.append(np.asarray(s[np.searchsorted(s, start) : np.searchsorted(s, end)]))
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    @classmethod
    def from_documents(
        cls,
        documents: Iterable[Document | str | tuple[str, str]],
        tokenizer: Tokenizer,
        append_eos: bool = True,
    ) -> ShardSet:
        """An in-memory, single-shard ShardSet (for demos and tests; everything is held in RAM)."""
        encoded = list(_encode_all(documents, tokenizer, append_eos, num_workers=0))
        if not encoded:
            raise DataError("no tokens: every document was empty")
        tokens = np.concatenate([ids for ids, _ in encoded]).astype(token_dtype(tokenizer.vocab_size))
        mask = None
        if any(m is not None for _, m in encoded):
            mask = np.concatenate([np.ones(len(i), np.uint8) if m is None else m for i, m in encoded])
        starts = np.cumsum([0] + [len(ids) for ids, _ in encoded[:-1]]).astype(np.int64)
        manifest = {**_base_manifest(tokenizer, append_eos, "memory"), "num_tokens": int(tokens.size)}
        return cls(manifest, [tokens], [mask], [starts])


def open_shards(path: str | Path, split: str = "train") -> ShardSet:
    """Memory-map a split written by `build_shards`: `path` is the split folder or its parent."""
    root = Path(path)
    if not (root / MANIFEST).is_file() and (root / split / MANIFEST).is_file():
        root = root / split
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise DataError(
            f"{manifest_path}: no shard manifest. Build the split first with "
            "dyndepth.data.shards.build_shards; an interrupted build leaves no manifest and must be rerun."
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path}: format version {manifest.get('version')} != {FORMAT_VERSION}; rebuild"
        )
    dtype = np.dtype(manifest["dtype"])
    tokens, masks, starts = [], [], []
    for entry in manifest["shards"]:
        n = int(entry["num_tokens"])
        tokens.append(_memmap(root / entry["file"], dtype, n))
        masks.append(
            _memmap(root / entry["mask_file"], np.dtype(np.uint8), n) if entry["mask_file"] else None
        )
        starts.append(_memmap(root / entry["idx_file"], np.dtype(np.int64), int(entry["num_documents"])))
    return ShardSet(manifest, tokens, masks, starts)


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    size = path.stat().st_size if path.is_file() else -1
    if size != count * dtype.itemsize:
        raise DataError(
            f"{path}: expected {count} x {dtype.name} ({count * dtype.itemsize} bytes), found "
            f"{'no file' if size < 0 else f'{size} bytes'}; the shard is damaged: rebuild this split"
        )
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))
