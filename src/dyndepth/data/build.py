"""From a recipe's `[data]` section to a tokenizer and a packed, rank-sharded loader.

Schema (every key optional):

    [data]
    source = "embedded"    # "embedded" (synthetic tasks + stdlib text), "synthetic", "stdlib",
                           # a file or folder (txt/md/py/jsonl/parquet/.gz), "hf:<name>[:<split>]" or
                           # "hf:<name>:<config>:<split>" (a Hugging Face dataset), or a list
                           # of files, folders and hf: names, read in order: ["a.txt.gz", "b.txt.gz"]
    tokenizer = "byte"     # "byte", a folder with tokenizer.json / encoder.json + vocab.bpe, or "bpe:N": a
                           # byte-level BPE of N tokens trained on the training source, cached in cache_dir
    bpe_train_bytes = 64000000  # bpe:N trains on this many characters of the training documents (despite the
                           # name, characters: bytes only for ASCII text)
    text_split = "file"    # plain text files: one document per file, "line", "paragraph", or "eot"
                           # (blocks separated by a line holding only <|endoftext|>)
    tasks = []             # synthetic task names; empty: all of them
    task_weights = []      # relative frequency of each of `tasks`; empty: round-robin (exactly balanced)
    difficulty = {}        # per-task knobs, e.g. {add = {digits = 2}}
    synthetic_examples = 20000
    examples_per_doc = 32  # synthetic examples per packed document
    synthetic_loss = "all" # "answer": one document per example, loss on the answer, its terminator and the EOS
    stdlib_bytes = 2000000
    val_source = ""        # user data only: a separate validation file/folder or list (else 1% of documents);
                           # inside `source` it is also trained on (warned)
    cache_dir = "runs/data"  # token shards are built once here and reused (see below)
    intra_doc_mask = false # attend within documents only (and never train across a document boundary)
    packing = "stream"     # "stream": windows cut the token stream (pretraining); "documents": whole documents per
                           # window, the rest padded, so no window opens mid-document (SFT: no answer without its
                           # prompt); data/loader.py
    text_field = "text"    # JSONL/Parquet/HF field holding plain text
    chat_template = "auto" # chat/SFT records: "auto" (the tokenizer's template if it has one, else
                           # "plain"), "tokenizer" (required) or "plain" (role: content lines); data/chat.py

User data is tokenized once into `cache_dir/<key>/<split>/`. The key hashes the content of every source
file (digests are remembered by path, size and modification time in `cache_dir/source_digests.json`),
the tokenizer (its full tokenizer.json, or class and settings), the chat rendering, `text_field`
and the hold-out rule, so edited data or another tokenizer gets its own shards. Hugging Face datasets
("hf:<name>") are keyed by name: delete their cache folder after the dataset changes. Documents stream
from the source to the shard files (never one list in memory). With several ranks, rank 0 builds while
the others wait at `barrier` (run_training passes the process group's), then every rank opens the same
shards; without a barrier each rank builds into a private folder and the first complete split wins.
The barrier is a collective, so a first build longer than the process group's timeout (NCCL: 10
minutes by default) needs the cache built beforehand, e.g. by calling `build_loader` in one process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from dyndepth.data.chat import chat_fingerprint, chat_renderer
from dyndepth.data.loader import PACKINGS, PackedLoader
from dyndepth.data.shards import FORMAT_VERSION, MANIFEST, ShardSet, build_shards, open_shards, opening_bos
from dyndepth.data.sources import (
    HF_PREFIX,
    TEXT_SPLITS,
    DataError,
    Document,
    hf_parts,
    iter_documents,
    list_files,
)
from dyndepth.data.stdlib_corpus import stdlib_documents
from dyndepth.data.synthetic import TASKS, TERMINATOR, TaskMix, make_examples
from dyndepth.tokenizer import load_tokenizer

DEFAULTS = {"source": "embedded", "tokenizer": "byte", "tasks": [], "task_weights": [], "difficulty": {},
            "synthetic_examples": 20000, "examples_per_doc": 32, "synthetic_loss": "all", "stdlib_bytes": 2_000_000,
            "val_source": "", "cache_dir": "runs/data",
            "intra_doc_mask": False, "packing": "stream", "text_field": "text", "chat_template": "auto",
            "text_split": "file",
            "bpe_train_bytes": 64_000_000}
BPE_PREFIX = "bpe:"
HOLDOUT_EVERY = 100  # without data.val_source, documents 0, 100, 200, ... are the validation split
SINGLE_DOC_HOLDOUT = 0.1  # ... and of a one-document source, the last tenth of its text
# the two in words, for reports (a text with no document boundary, such as tinyshakespeare under text_split="eot",
# has no 1% of documents to hold out)
HELD_OUT = f"every {HOLDOUT_EVERY}th document; of a one-document text, its last {SINGLE_DOC_HOLDOUT:.0%}"
HOLDOUT_SCHEME = 3  # in the shard cache key: 1 served a one-document source whole to both splits, 2 counted empty
# documents (their splits differ from 3's wherever a source has one)
log = logging.getLogger(__name__)
EMBEDDED = ("embedded", "synthetic", "stdlib")
COUNTS = {"synthetic_examples": 0, "examples_per_doc": 1, "stdlib_bytes": 0, "bpe_train_bytes": 1}  # key: least value


def resolve_data_config(data_cfg: dict) -> dict:
    unknown = set(data_cfg) - set(DEFAULTS)
    if unknown:
        raise DataError(f"unknown data.{min(unknown)}; valid keys: {sorted(DEFAULTS)}.")
    cfg = {**DEFAULTS, **data_cfg}
    _check_types(cfg)
    if cfg["synthetic_loss"] not in ("all", "answer"):
        raise DataError(f"data.synthetic_loss={cfg['synthetic_loss']!r} is not 'all' or 'answer'.")
    if cfg["packing"] not in PACKINGS:
        raise DataError(f"data.packing={cfg['packing']!r} is not one of {PACKINGS}.")
    if cfg["text_split"] not in TEXT_SPLITS:  # (a jsonl-only source never read it, yet it changed the cache key)
        raise DataError(f"data.text_split={cfg['text_split']!r} is not one of {TEXT_SPLITS}.")
    for key in ("source", "val_source"):
        cfg[key] = _checked_source(cfg[key], key)
        for item in source_items(cfg[key]) if cfg[key] else []:
            if item.startswith(HF_PREFIX):
                hf_parts(item)  # its syntax, before any work
    if cfg["source"] in EMBEDDED and cfg["val_source"]:
        raise DataError(f"data.val_source is for user data; data.source={cfg['source']!r} holds its own "
                        "validation split: remove data.val_source.")
    _check_disjoint(cfg["source"], cfg["val_source"])
    return cfg


def _check_types(cfg: dict) -> None:
    """The typed keys of a `[data]` section, checked (and --set's comma lists read) in place: the section is a dict,
    so `--set data.synthetic_examples=abc` stopped in the generator with a TypeError, `data.tasks=add,mul` was read
    letter by letter ("unknown synthetic task 'a'") and `data.intra_doc_mask=x` switched the mask on."""
    for key, least in COUNTS.items():
        value = cfg[key]
        if isinstance(value, float) and value.is_integer():  # 1e6, as --set and TOML write a large count
            value = cfg[key] = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DataError(f"data.{key}={value!r} must be a whole number >= {least}.")
    if not isinstance(cfg["intra_doc_mask"], bool):
        raise DataError(f"data.intra_doc_mask={cfg['intra_doc_mask']!r} must be true or false.")
    for key, kind in (("tasks", str), ("task_weights", (int, float))):
        value = [] if cfg[key] is None else cfg[key]  # (an empty YAML key: the default)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):  # one item, or "add,mul" from --set
            value = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else [value]
            if kind is not str:
                try:
                    value = [float(v) for v in value]
                except ValueError:
                    value = None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                           for v in value):
            what, example = ("task names", "add,mul") if kind is str else ("numbers, one per task", "1,2")
            raise DataError(f"data.{key}={cfg[key]!r} must be a list of {what} (on the command line "
                            f"--set data.{key}={example}).")
        cfg[key] = list(value)
    cfg["difficulty"] = {} if cfg["difficulty"] is None else cfg["difficulty"]
    if not isinstance(cfg["difficulty"], dict):
        raise DataError(f"data.difficulty={cfg['difficulty']!r} must be a table of task -> knobs, e.g. "
                        "{ add = { digits = 2 } }.")
    if not isinstance(cfg["text_field"], str):
        raise DataError(f"data.text_field={cfg['text_field']!r} must be the name of a record field, e.g. \"text\".")


def check_sources_exist(cfg: dict) -> None:
    """Every local file or folder data.source and data.val_source name exists (a missing val_source was reported as
    data.source, after the training split had been tokenized)."""
    for key in ("source", "val_source"):
        value = cfg[key]
        for item in value if isinstance(value, list) else [value] if value else []:
            if item not in EMBEDDED and not item.startswith(HF_PREFIX) and not Path(item).exists():
                raise DataError(f"data.{key} {item!r}: no such file or folder. Check the path; for a Hugging Face "
                                f"dataset write '{HF_PREFIX}<name>'.")


def _checked_source(value, key: str) -> str | list[str]:
    """data.source / val_source as a string or a list of at least two strings (a one-item list is its item, so it
    keeps the item's shard cache); paths may be given as `Path`s. A val_source of None or [] is none ("")."""
    if key == "val_source" and (value is None or (isinstance(value, (list, tuple)) and not value)):
        return ""
    if isinstance(value, (list, tuple)):
        items = [str(v) if isinstance(v, Path) else v for v in value]
        if not items or not all(isinstance(v, str) and v for v in items):
            raise DataError(f"data.{key}={value!r}: a list of sources must hold file, folder or '{HF_PREFIX}<name>' "
                            "strings, at least one.")
        if any(v in EMBEDDED for v in items):
            raise DataError(f"data.{key}={value!r}: {EMBEDDED} name whole data sets and cannot be listed with others; "
                            "use one of them alone, or list your own files and folders.")
        return one_source(items)
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"data.{key}={value!r} is not a source: write a path, '{HF_PREFIX}<name>' or a list of those"
                        + (", or 'embedded'." if key == "source" else "."))
    return value


def source_items(source: str | list[str] | tuple) -> list[str]:
    """The sources a data.source value names, in order."""
    return [str(s) for s in source] if isinstance(source, (list, tuple)) else [str(source)]


def one_source(source):
    """A one-item list of sources as its item (it reads and caches as the item does); anything else as given."""
    return source[0] if isinstance(source, (list, tuple)) and len(source) == 1 else source


def _check_disjoint(source: str | list[str], val_source: str | list[str]) -> None:
    """A validation source inside the training source is also trained on: warned, once per pair (an overfitting
    check may want it; a held-out loss does not)."""
    if not val_source or source in EMBEDDED:
        return
    local = [Path(s).resolve() for s in source_items(source) if not s.startswith(HF_PREFIX) and Path(s).exists()]
    hub = {hf_parts(s) for s in source_items(source) if s.startswith(HF_PREFIX)}
    for val in source_items(val_source):
        if val.startswith(HF_PREFIX) and hf_parts(val) in hub:  # (the same split: name one, "hf:x:test")
            _warn_overlap(val, "the same dataset split in data.source (name another: hf:<name>[:<config>]:<split>)")
        if val.startswith(HF_PREFIX) or not Path(val).exists():
            continue
        v = Path(val).resolve()
        for s in local:
            if v == s or s in v.parents or v in s.parents:
                _warn_overlap(str(v), str(s))


@functools.cache
def _warn_overlap(val: str, source: str) -> None:
    if int(os.environ.get("RANK", 0)):  # once, from rank 0 of a torchrun job
        return
    log.warning("data.val_source %r overlaps data.source %r: the validation text is also trained on, so the "
                "validation loss is not held out. List the training files instead, e.g. data.source = "
                "[\"a.txt\", \"b.txt\"], without the validation file.", val, source)


def build_tokenizer(data_cfg: dict, rank: int = 0, barrier: Callable[[], None] | None = None):
    """The tokenizer `data.tokenizer` names. "bpe:N" trains a byte-level BPE of N tokens on the first
    `bpe_train_bytes` characters of the training documents once (rank 0, the others wait at `barrier`; jobs sharing
    the cache without one race, and the first folder renamed into place wins) and caches it in cache_dir under the
    source's content hash, so every later run and rank loads the same ids."""
    cfg = resolve_data_config(data_cfg)
    check_sources_exist(cfg)
    name = str(cfg["tokenizer"])
    if not name.startswith(BPE_PREFIX):
        return load_tokenizer(name)
    folder, vocab = bpe_folder(cfg)
    if (barrier is None or rank == 0) and not (folder / "tokenizer.json").is_file():
        _train_bpe(cfg, vocab, folder)
    if barrier is not None:
        barrier()
    return load_tokenizer(str(folder))


def bpe_folder(cfg: dict, digest: str | None = None) -> tuple[Path, int]:
    """Where a resolved data config's "bpe:N" tokenizer is cached (keyed by the source's content: `digest`, its
    `source_fingerprint` when the caller has it, e.g. from a run's loader state), and N."""
    name = str(cfg["tokenizer"])
    try:
        vocab = int(name[len(BPE_PREFIX):])
    except ValueError:
        raise DataError(f"data.tokenizer={name!r}: write bpe:N with N the vocabulary size, e.g. bpe:8192.") from None
    if cfg["source"] in EMBEDDED:
        raise DataError("data.tokenizer='bpe:N' trains on user data; the embedded data uses tokenizer='byte'.")
    digest = source_fingerprint(cfg["source"], cfg["cache_dir"]) if digest is None else digest
    key = f"{digest}-{cfg['text_split']}-{cfg['bpe_train_bytes']}"
    if cfg["text_field"] != DEFAULTS["text_field"]:  # another record field is another text (the default's key stays:
        key += f"-{cfg['text_field']}"  # tokenizers trained before keep their folder)
    if cfg["val_source"]:  # nothing held out: the BPE trains on every document (the held-out run's key stays; the two
        key += "-all"  # shared the folder, and the first run's held-out choice decided both tokenizers)
    return Path(cfg["cache_dir"]) / "tokenizers" / f"bpe{vocab}-{hashlib.sha256(key.encode()).hexdigest()[:12]}", vocab


def _train_bpe(cfg: dict, vocab: int, folder: Path) -> None:
    from dyndepth.tokenizer import train_bpe

    def texts():  # streamed: the first bpe_train_bytes characters (not bytes: a name kept, as it keys the BPE
        # cache; equal for ASCII text) of the training documents
        budget = cfg["bpe_train_bytes"]
        docs = iter_documents(cfg["source"], text_field=cfg["text_field"], text_split=cfg["text_split"])
        for doc in split_documents(docs, "train", not cfg["val_source"], cfg["source"]):
            text = doc.text if doc.prompt is None else doc.prompt + doc.text
            yield text[:budget]
            budget -= len(text)
            if budget <= 0:
                return

    tokenizer = train_bpe(texts(), vocab)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # (jobs on two hosts: one pid)
    tmp.mkdir(parents=True)
    try:
        tokenizer.backend.save(str(tmp / "tokenizer.json"))
        try:
            os.replace(tmp, folder)  # written, then renamed: a folder that exists is complete
        except OSError:  # (ENOTEMPTY/EEXIST) another job sharing the cache, no barrier between us, renamed first
            if not folder.is_dir():
                raise
            if not (folder / "tokenizer.json").is_file():
                raise DataError(f"{folder} exists but holds no tokenizer.json (an interrupted copy?): delete it "
                                "and rerun to train the BPE again.") from None
    finally:  # (theirs and ours are the same tokenizer: ours goes)
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_documents(cfg: dict, split: str, seed: int) -> list[Document]:
    """Synthetic-task documents (several examples each) and/or stdlib source files, interleaved."""
    docs: list[Document] = []
    if cfg["source"] in ("embedded", "synthetic"):
        n = cfg["synthetic_examples"] if split == "train" else max(cfg["synthetic_examples"] // 20, 64)
        examples = make_examples(task_mix(cfg), n, seed, split=split)
        if cfg["synthetic_loss"] == "answer":  # the prompt is read, not trained (loss mask 0)
            docs += [Document(e.answer + TERMINATOR, prompt=e.prompt) for e in examples]
        else:
            k = cfg["examples_per_doc"]
            docs += [Document("".join(e.text for e in examples[i:i + k])) for i in range(0, len(examples), k)]
    if cfg["source"] in ("embedded", "stdlib"):
        budget = cfg["stdlib_bytes"] if split == "train" else max(cfg["stdlib_bytes"] // 20, 50_000)
        stdlib = [Document(t) for t in stdlib_documents(budget, seed=seed, split=split)]
        docs = _interleave(docs, stdlib)
    return docs


def task_mix(cfg: dict) -> TaskMix:
    """The synthetic tasks, weights and difficulty a `[data]` section names."""
    cfg = resolve_data_config(cfg)
    weights = tuple(cfg["task_weights"]) or None
    return TaskMix(tasks=tuple(cfg["tasks"] or TASKS), weights=weights, difficulty=dict(cfg["difficulty"] or {}))


def _interleave(a: list, b: list) -> list:
    """Spread the shorter list evenly through the longer one, so every window mixes both kinds."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return list(a)
    out, j = [], 0
    for i, x in enumerate(a):
        out.append(x)
        if (i + 1) * len(b) // len(a) > j:  # integer steps: float ones dropped b's last item (186 and 89 items)
            out.append(b[j])
            j += 1
    return out


def _file_digest(file: Path, memo: dict[str, str]) -> str:
    """blake2b of a file's bytes, remembered in `memo` under (path, size, mtime): a file is read once."""
    stat = file.stat()
    key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in memo:
        digest = hashlib.blake2b(digest_size=16)
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        memo[key] = digest.hexdigest()
    return memo[key]


def source_fingerprint(source: str | list[str], cache_dir: str | Path | None = None) -> str:
    """A hash of the content (and relative names) of every file `iter_documents(source)` reads; of a list, of its
    items' fingerprints in order.

    With `cache_dir`, file digests are remembered in `cache_dir/source_digests.json` by (path, size,
    modification time), so an unchanged corpus is not read again at every start; an edit changes both.
    """
    if isinstance(source, list):
        parts = [source_fingerprint(item, cache_dir) for item in source]
        return hashlib.blake2b("\0".join(["list", *parts]).encode(), digest_size=16).hexdigest()
    if source.startswith(HF_PREFIX):
        return source
    path = Path(source)
    if not path.exists():
        raise DataError(f"data.source {source!r}: no such file or folder. Check the path; for a Hugging Face "
                        f"dataset write '{HF_PREFIX}<name>'.")
    memo_file = Path(cache_dir) / "source_digests.json" if cache_dir is not None else None
    memo = json.loads(memo_file.read_text()) if memo_file is not None and memo_file.is_file() else {}
    known = len(memo)
    files = list_files(path) if path.is_dir() else [path]
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        name = file.relative_to(path) if path.is_dir() else file.name
        digest.update(f"{name}\0{_file_digest(file, memo)}\0".encode())
    if memo_file is not None and len(memo) > known:  # write-then-rename: concurrent ranks never tear it
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the ids: the full tokenizer.json of a Hugging Face tokenizer, else the
    class and its plain settings (vocab size, special ids)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "to_str"):
        spec = backend.to_str()
    else:
        spec = json.dumps({k: v for k, v in sorted(vars(tokenizer).items())
                           if isinstance(v, (int, float, str, bool, type(None)))})
    spec += f"|{type(tokenizer).__name__}|{tokenizer.vocab_size}|{tokenizer.eos_token_id}"
    return hashlib.blake2b(spec.encode(), digest_size=16).hexdigest()


def _shard_dir(cfg: dict, tokenizer, source: str | list[str], holdout: bool, digest: str | None = None) -> Path:
    """The shard cache folder of `source` (`digest`: its `source_fingerprint`, when the caller has it)."""
    digest = source_fingerprint(source, cfg["cache_dir"]) if digest is None else digest
    chat = chat_fingerprint(cfg["chat_template"], tokenizer)
    key = json.dumps([FORMAT_VERSION, digest, tokenizer_fingerprint(tokenizer), chat, cfg["text_field"],
                      HOLDOUT_SCHEME if holdout else False]
                     + ([cfg["text_split"]] if cfg["text_split"] != "file" else [])
                     + (["single-eos"] if chat == "plain" and _eos_in_text(tokenizer) else [])  # (a text ending in
                     # the EOS's own text got a second EOS before, under the same key; a template's key says so in
                     # `chat`)
                     + (["bos"] if opening_bos(tokenizer) is not None else []))  # (documents opened without it before)
    return Path(cfg["cache_dir"]) / hashlib.sha256(key.encode()).hexdigest()[:16]


def _eos_in_text(tokenizer) -> bool:
    """Whether a text can encode to the EOS id (a Hugging Face tokenizer matches its special tokens in text; the byte
    tokenizer's EOS is no text's)."""
    eos = getattr(tokenizer, "eos_token", None)
    return eos is not None and tokenizer.eos_token_id is not None and tokenizer.encode(eos) == [tokenizer.eos_token_id]


def split_documents(docs: Iterator[Document], split: str, holdout: bool,
                    source: str | list[str] = "") -> Iterator[Document]:
    """Stream one split: with `holdout`, documents 0, 100, 200, ... are "val" and the rest "train"; a one-document
    source is split inside its text (`split_text`); without `holdout`, every document. Empty documents are not counted
    (they make no tokens: a folder of code whose first file is an empty __init__.py held out nothing, and the
    validation build failed as if the whole source were empty)."""
    count, first = 0, None
    for i, doc in enumerate(d for d in docs if d.text or d.prompt):
        count += 1
        if not holdout:
            yield doc
        elif i == 0:
            first = doc  # held until a second document shows whether it is the only one
        else:
            if i == 1 and split == "val":
                yield first
            if (i % HOLDOUT_EVERY == 0) == (split == "val"):
                yield doc
    if count == 0:
        raise DataError(f"data.source {source!r} has no documents: every document of the source was empty (an empty "
                        "file or folder?)")
    if holdout and count == 1:
        yield split_text(first, split, source)


def split_text(doc: Document, split: str, source: str | list[str] = "") -> Document:
    """A one-document source's split: "train" its text up to the last tenth, "val" the rest, cut at a line break
    when the last fifth has one (else at the tenth). A chat record cannot be cut: it serves both (warned)."""
    if doc.prompt:
        log.warning("data.source %r is one chat record: the validation split is that same record; set "
                    "data.val_source for a held-out loss.", source)
        return doc
    text = doc.text
    cut = len(text) - max(1, int(len(text) * SINGLE_DOC_HOLDOUT))
    line = text.rfind("\n", int(len(text) * (1 - 2 * SINGLE_DOC_HOLDOUT)), cut)
    cut = line + 1 if line >= 0 else cut
    if split == "train":
        log.info("data.source %r is one document: its last %d of %d characters are the validation split (set "
                 "data.val_source or data.text_split to hold out otherwise).", source, len(text) - cut, len(text))
    return Document(text[:cut] if split == "train" else text[cut:])


def user_shards(cfg: dict, tokenizer, split: str, rank: int = 0, barrier: Callable[[], None] | None = None,
                hold_out: bool = True) -> ShardSet:
    """Token shards for user data, built on first use (by rank 0 when a `barrier` is given) and reused
    from `cache_dir` afterwards; without `val_source` (and with `hold_out`) a part of the source is held out."""
    holdout = not cfg["val_source"] and hold_out
    source = cfg["val_source"] if split == "val" and cfg["val_source"] else cfg["source"]
    digest = source_fingerprint(source, cfg["cache_dir"])  # the shard cache's key, and the loader state's check
    folder = _shard_dir(cfg, tokenizer, source, holdout, digest)
    if (barrier is None or rank == 0) and not (folder / split / MANIFEST).is_file():
        docs = iter_documents(source, text_field=cfg["text_field"], text_split=cfg["text_split"],
                              chat_template=chat_renderer(cfg["chat_template"], tokenizer))
        build_shards(split_documents(docs, split, holdout, source), tokenizer, folder, split=split,
                     source=source, replace=False)
    if barrier is not None:
        barrier()
    shards = open_shards(folder, split=split)
    shards.source_digest = digest
    return shards


def holds_out(data_cfg: dict) -> bool:
    """Whether a run's training split depends on `eval.enabled`: a user source without `val_source` (a run that
    evaluates holds a part of it out)."""
    return data_cfg.get("source", "embedded") not in EMBEDDED and not data_cfg.get("val_source")


def build_loader(data_cfg: dict, *, split: str = "train", batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, tokenizer=None,
                 barrier: Callable[[], None] | None = None, hold_out: bool = True) -> PackedLoader:
    """The loader for one rank: packed (seq_len + 1)-token windows, disjoint across ranks, resumable.

    `barrier` (every rank calls it) lets rank 0 alone build a missing shard cache (and BPE). `hold_out=False` (a run
    that does not evaluate) trains on all of a user source that has no `val_source`. Without `tokenizer`, the one
    data.tokenizer names (`build_tokenizer`)."""
    cfg = resolve_data_config(data_cfg)
    check_sources_exist(cfg)
    tokenizer = tokenizer or build_tokenizer(cfg, rank, barrier)  # ("bpe:N": the cached BPE, trained if missing)
    if cfg["source"] in EMBEDDED:
        shards = ShardSet.from_documents(embedded_documents(cfg, split, seed), tokenizer)
    else:
        shards = user_shards(cfg, tokenizer, split, rank, barrier, hold_out)
    try:
        return PackedLoader(shards, seq_len, batch_size, rank=rank, world_size=world_size, seed=seed,
                            shuffle=split == "train", intra_doc_mask=cfg["intra_doc_mask"], packing=cfg["packing"])
    except DataError as e:
        if split != "val":
            raise
        if cfg["source"] in EMBEDDED:
            held, fix = ("the embedded source's validation examples and text",
                         "more data.synthetic_examples or data.stdlib_bytes")
        elif cfg["val_source"]:
            held, fix = "data.val_source", "a longer data.val_source"
        else:
            held = (f"every {HOLDOUT_EVERY}th document of data.source (of a one-document source, the last tenth of "
                    "its text)")
            fix = "data.val_source to a longer text"
        raise DataError(f"the validation split ({held}) is too small: {e}; or set {fix}, or eval.enabled=false.") \
            from None
