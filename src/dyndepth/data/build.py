"""From a recipe's `[data]` section to a tokenizer and a packed, rank-sharded loader.

Schema (every key optional):

    [data]
    source = "embedded"    # "embedded" (synthetic tasks + stdlib text), "synthetic", "stdlib",
                           # a file or folder (txt/md/py/jsonl/parquet/.gz), or "hf:<dataset name>"
    tokenizer = "byte"     # "byte", or a folder with tokenizer.json / encoder.json + vocab.bpe
    tasks = []             # synthetic task names; empty: all of them
    difficulty = {}        # per-task knobs, e.g. {add = {digits = 2}}
    synthetic_examples = 20000
    examples_per_doc = 32  # synthetic examples per packed document
    stdlib_bytes = 2000000
    val_source = ""        # user data only: a separate validation file/folder (else 1% of documents)
    cache_dir = "runs/data"  # token shards are built once here and reused (keyed by the source)
    intra_doc_mask = false
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dyndepth.data.loader import PackedLoader
from dyndepth.data.shards import ShardSet, build_shards, open_shards
from dyndepth.data.sources import DataError, Document, iter_documents
from dyndepth.data.stdlib_corpus import stdlib_documents
from dyndepth.data.synthetic import make_examples
from dyndepth.tokenizer import load_tokenizer

DEFAULTS = dict(source="embedded", tokenizer="byte", tasks=[], difficulty={}, synthetic_examples=20000,
                examples_per_doc=32, stdlib_bytes=2_000_000, val_source="", cache_dir="runs/data",
                intra_doc_mask=False)
EMBEDDED = ("embedded", "synthetic", "stdlib")


def resolve_data_config(data_cfg: dict) -> dict:
    unknown = set(data_cfg) - set(DEFAULTS)
    if unknown:
        raise DataError(f"unknown data.{sorted(unknown)[0]}; valid keys: {sorted(DEFAULTS)}.")
    return {**DEFAULTS, **data_cfg}


def build_tokenizer(data_cfg: dict):
    return load_tokenizer(resolve_data_config(data_cfg)["tokenizer"])


def embedded_documents(cfg: dict, split: str, seed: int) -> list[Document]:
    """Synthetic-task documents (several examples each) and/or stdlib source files, interleaved."""
    docs: list[Document] = []
    if cfg["source"] in ("embedded", "synthetic"):
        n = cfg["synthetic_examples"] if split == "train" else max(cfg["synthetic_examples"] // 20, 64)
        examples = make_examples(cfg["tasks"] or None, n, seed, difficulty=cfg["difficulty"] or None, split=split)
        k = cfg["examples_per_doc"]
        docs += [Document("".join(e.text for e in examples[i:i + k])) for i in range(0, len(examples), k)]
    if cfg["source"] in ("embedded", "stdlib"):
        budget = cfg["stdlib_bytes"] if split == "train" else max(cfg["stdlib_bytes"] // 20, 50_000)
        stdlib = [Document(t) for t in stdlib_documents(budget, seed=seed, split=split)]
        docs = _interleave(docs, stdlib)
    return docs


def _interleave(a: list, b: list) -> list:
    """Spread the shorter list evenly through the longer one, so every window mixes both kinds."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return list(a)
    out, step = [], len(a) / len(b)
    for i, x in enumerate(a):
        out.append(x)
        if int((i + 1) / step) > int(i / step) and int(i / step) < len(b):
            out.append(b[int(i / step)])
    return out


def _shard_dir(cfg: dict, tokenizer, source: str) -> Path:
    key = json.dumps([str(Path(source).resolve()) if Path(source).exists() else source,
                      type(tokenizer).__name__, tokenizer.vocab_size], sort_keys=True)
    return Path(cfg["cache_dir"]) / hashlib.sha256(key.encode()).hexdigest()[:16]


def user_shards(cfg: dict, tokenizer, split: str) -> ShardSet:
    """Token shards for user data, built on first use and reused from `cache_dir` afterwards."""
    source = cfg["val_source"] if split == "val" and cfg["val_source"] else cfg["source"]
    folder = _shard_dir(cfg, tokenizer, source)
    manifest = folder / split / "manifest.json"
    if not manifest.exists():
        docs = list(iter_documents(source))
        if not docs:
            raise DataError(f"data.source {source!r} has no documents.")
        if not cfg["val_source"]:  # hold out every 100th document (at least one) for validation
            held = set(range(0, len(docs), 100)) if len(docs) > 1 else set()
            picked = [d for i, d in enumerate(docs) if (i in held) == (split == "val")]
            docs = picked or docs
        build_shards(docs, tokenizer, folder, split=split, source=str(source))
    return open_shards(folder, split=split)


def build_loader(data_cfg: dict, *, split: str = "train", batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, tokenizer=None) -> PackedLoader:
    """The loader for one rank: packed (seq_len + 1)-token windows, disjoint across ranks, resumable."""
    cfg = resolve_data_config(data_cfg)
    tokenizer = tokenizer or load_tokenizer(cfg["tokenizer"])
    if cfg["source"] in EMBEDDED:
        shards = ShardSet.from_documents(embedded_documents(cfg, split, seed), tokenizer)
    else:
        shards = user_shards(cfg, tokenizer, split)
    return PackedLoader(shards, seq_len, batch_size, rank=rank, world_size=world_size, seed=seed,
                        shuffle=split == "train", intra_doc_mask=cfg["intra_doc_mask"])
