"""Tokenize once into memory-mapped token shards with a manifest; read them back as one token stream.

On-disk layout of one split (`<out_dir>/<split>/`):
    shard_00000.bin        raw token ids, uint16 if vocab_size <= 65536 else uint32 (nanoGPT-style)
    shard_00000.mask.bin   uint8 loss mask, 0 = prompt token (not trained), 1 = trained; written only
                           for shards that contain prompt tokens (a shard without one is all 1s)
    shard_00000.idx        int64 global token offsets of the documents that start in this shard
    manifest.json          dtype, vocab_size, num_tokens, shards [...], tokenizer, source, version

Building streams: documents are tokenized in batches (up to `BATCH_DOCS` documents or `BATCH_CHARS`
characters) with the tokenizer's batch API when it has one (`encode_many`: `tokenizers`' parallel
`encode_batch`), and appended to the open shard files straight away, so memory stays O(one batch)
however large the corpus. A text longer than `PIECE_CHARS` is cut into pieces before " word" when the
tokenizer says that is exact (`splits_before_words`: byte-level BPE such as GPT-2's or Qwen's), so even
one huge document is tokenized in parallel. A split is built in a private `.<split>.tmp-*` folder and
renamed into place, so builders racing on the same folder never see each other's files and a split
folder that exists is complete (the manifest is written last inside it).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import uuid
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
BATCH_DOCS, BATCH_CHARS = 1024, 1 << 22  # documents tokenized per batch-API call (whichever comes first)
PIECE_CHARS = 1 << 14  # long texts are cut into pieces of about this size (when that is exact)
_WORD_START = re.compile(r"(?<=\S)(?= [^\W\d_])")  # before " word" following a non-space character


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids 0..vocab_size-1."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def cut_text(text: str, tokenizer: Tokenizer, size: int | None = None) -> list[str]:
    """`text` as pieces of about `size` (default `PIECE_CHARS`) characters, cut before " word", when the
    tokenizer encodes such pieces to the ids of the whole (`splits_before_words`); otherwise `[text]`."""
    size = size or PIECE_CHARS
    if len(text) <= 2 * size or not getattr(tokenizer, "splits_before_words", False):
        return [text]
    pieces, start = [], 0
    while len(text) - start > 2 * size:
        cut = _WORD_START.search(text, start + size)
        if cut is None:
            break
        pieces.append(text[start : cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text: one call of the tokenizer's batch API (`encode_many`) if it has one."""
    many = getattr(tokenizer, "encode_many", None)
    return many(texts) if many is not None else [tokenizer.encode(t) for t in texts]


def encode_documents(
    docs: list[Document], tokenizer: Tokenizer, append_eos: bool = True
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """`[(ids (n,) int64, loss_mask (n,) uint8 | None)]` per document; a mask is None when every token
    is trained. One batch-API call for all the documents' segments (long ones cut into pieces).

    Segments are encoded separately and concatenated (BOS when the tokenizer's own encoding opens a text with
    one, as Llama's does, then prompt, then response, then EOS, which is trained so the model learns to stop;
    a text that already opens with BOS or a response that already ends in EOS, as a chat template's turns do,
    gets no second one).
    """
    pieces: list[str] = []
    owner: list[tuple[int, bool]] = []  # (document, trained) of each piece
    for d, doc in enumerate(docs):
        for text, trained in doc.segments():
            for piece in cut_text(text, tokenizer):
                pieces.append(piece)
                owner.append((d, trained))
    parts: list[list[tuple[list[int], bool]]] = [[] for _ in docs]
    for ids, (d, trained) in zip(encode_texts(tokenizer, pieces), owner):
        parts[d].append((ids, trained))
    bos = opening_bos(tokenizer)
    out = []
    for doc, doc_parts in zip(docs, parts):
        first = next((i for i, (ids, _) in enumerate(doc_parts) if ids), None)
        if bos is not None and first is not None and doc_parts[first][0][0] != bos:  # (trained as its segment is)
            doc_parts[first] = ([bos, *doc_parts[first][0]], doc_parts[first][1])
        add = append_eos and any(ids for ids, _ in doc_parts) and not _ends_in_eos(doc_parts, tokenizer)
        eos = [([tokenizer.eos_token_id], True)] if add else []
        doc_parts = doc_parts + eos  # type: ignore[operator]
        arrays = [np.array(ids, dtype=np.int64) for ids, _ in doc_parts]
        ids_arr = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        if ids_arr.size and (ids_arr.min() < 0 or ids_arr.max() >= tokenizer.vocab_size):
            raise DataError(
                f"tokenizer produced id {int(ids_arr.max())} outside [0, vocab_size={tokenizer.vocab_size}); "
                "its vocab_size is wrong or the ids come from another tokenizer"
            )
        mask = None
        if doc.prompt:
            mask = np.concatenate([np.full(len(a), trained, np.uint8) for a, (_, trained) in zip(arrays, doc_parts)])
        out.append((ids_arr, mask))
    return out


def opening_bos(tokenizer: Tokenizer) -> int | None:
    """The BOS id the tokenizer's own encoding (`encode(text, add_bos=None)`, as generate and eval encode a prompt)
    opens every text with: a Llama tokenizer's post-processor adds one; Qwen3's, GPT-2's and the byte tokenizer's
    add none (None). Documents open with it too, else a Llama model trained on them never saw the BOS that every
    prompt it is scored or sampled on starts with."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer.encode("a", add_bos=None)  # type: ignore[call-arg]
    except TypeError:  # a tokenizer with a plain encode(text): no rule of its own
        return None
    return bos if ids[:1] == [bos] else None


def _ends_in_eos(doc_parts: list[tuple[list[int], bool]], tokenizer: Tokenizer) -> bool:
    """Whether a document's ids already end in EOS, followed by whitespace at most: a chat template that
    closes each turn with the tokenizer's EOS (Qwen3's `<|im_end|>\\n`) gets no second one."""
    ids = next((ids for ids, _ in reversed(doc_parts) if ids), [])
    tail = ids[-4:]
    if tokenizer.eos_token_id not in tail:
        return False
    after = tail[len(tail) - tail[::-1].index(tokenizer.eos_token_id):]
    return not after or not tokenizer.decode(after, skip_special=False).strip()


def encode_document(
    doc: Document, tokenizer: Tokenizer, append_eos: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """`(ids (n,) int64, loss_mask (n,) uint8 | None)` of one document (see `encode_documents`)."""
    return encode_documents([doc], tokenizer, append_eos)[0]


def _batches(docs: Iterable[Document], max_docs: int = BATCH_DOCS, max_chars: int = BATCH_CHARS):
    """Consecutive lists of documents, each at most `max_docs` long or just over `max_chars` characters."""
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text) + len(doc.prompt or "")
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_worker_args: tuple[Tokenizer, bool] | None = None


def _init_worker(tokenizer: Tokenizer, append_eos: bool) -> None:
    global _worker_args
    _worker_args = (tokenizer, append_eos)


def _encode_in_worker(docs: list[Document]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    assert _worker_args is not None
    return encode_documents(docs, *_worker_args)


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
    """Encoded non-empty documents, in order, batch by batch; a process pool when `num_workers > 0`."""
    if append_eos and tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token_id: set one, or pass append_eos=False")
    batches = _batches(as_documents(documents))
    if num_workers > 0:
        with multiprocessing.Pool(num_workers, _init_worker, (tokenizer, append_eos)) as pool:
            for encoded in pool.imap(_encode_in_worker, batches):
                yield from (e for e in encoded if e[0].size)
    else:
        for batch in batches:
            yield from (e for e in encode_documents(batch, tokenizer, append_eos) if e[0].size)


def _base_manifest(tokenizer: Tokenizer, append_eos: bool, source: str | list[str]) -> dict[str, Any]:
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
    source: str | list[str] = "",
    num_workers: int = 0,
    replace: bool = True,
) -> ShardSet:
    """Tokenize `documents` (streamed) into `<out_dir>/<split>/`; returns the opened ShardSet.

    `num_workers > 0` tokenizes in a process pool (the tokenizer must be picklable); order is kept.
    The split is written to a private temporary folder and renamed into place: rebuilding over an
    existing split replaces it whole (`replace=False` keeps a complete split found there instead, as a
    cache does), and concurrent builders never mix files.
    """
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    split_dir = Path(out_dir) / split
    tmp_dir = Path(out_dir) / f".{split}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir(parents=True)
    try:
        writer = _ShardWriter(tmp_dir, token_dtype(tokenizer.vocab_size), shard_tokens)
        for ids, mask in _encode_all(documents, tokenizer, append_eos, num_workers):
            writer.write_document(ids, mask)
        entries = writer.finish()
        if writer.total == 0:
            raise DataError(f"no tokens to write to {split_dir}: every document of the source was empty; check "
                            "data.source (an empty file or folder?)")
        manifest = {
            **_base_manifest(tokenizer, append_eos, source),
            "split": split,
            "num_tokens": writer.total,
            "num_documents": sum(e["num_documents"] for e in entries),
            "has_loss_mask": any(e["mask_file"] for e in entries),
            "shards": entries,
        }
        _write_json_atomic(tmp_dir / MANIFEST, manifest)
        _move_into_place(tmp_dir, split_dir, replace)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %d tokens in %d shards to %s", writer.total, len(entries), split_dir)
    return open_shards(split_dir)


def _move_into_place(tmp_dir: Path, split_dir: Path, replace: bool) -> None:
    """Rename the finished `tmp_dir` to `split_dir`, replacing an older split (moved aside, then deleted)."""
    if not replace and (split_dir / MANIFEST).is_file():
        return  # another builder finished first; its split is the same data
    old = split_dir.with_name(f".{split_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        split_dir.rename(old)
    except FileNotFoundError:  # no older split
        old = None
    try:
        tmp_dir.rename(split_dir)
    except OSError:  # another builder renamed its complete split in between: keep that one
        if not (split_dir / MANIFEST).is_file():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
        self.source_digest: str | None = None  # the user source's content hash (`data.build.user_shards` sets it)
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
