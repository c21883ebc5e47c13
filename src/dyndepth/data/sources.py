"""Documents from user data: text files, folders, JSONL, Parquet, gzip, chat/SFT records, HF datasets.

Everything here is a generator, so a corpus far larger than memory streams through one record at a
time (Parquet is read in record batches, text and JSONL line by line where the split allows it).

A `Document` is the unit the shard builder tokenizes. Pretraining text has `prompt=None`: every token
is trained. Chat/SFT records carry the context in `prompt` (its tokens get loss mask 0, i.e. label
-100) and the answer in `text` (trained).

Record formats understood in JSONL, Parquet and HF datasets (checked in this order):
- `{"prompt": ..., "response": ...}`            -> Document(text=response, prompt=prompt); with a chat
  template that sets `renders_pairs` (a tokenizer's own, see `data/chat.py`) the pair is rendered as
  one user turn and one assistant turn instead
- `{"messages": [{"role": ..., "content": ...}, ...]}` -> the last assistant message is trained; every
  message before it is rendered into the prompt (see `render_chat`, or pass your own `chat_template`)
- `{text_field: ...}` (default `"text"`)        -> Document(text=...)
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".rs", ".go", ".java")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
DEFAULT_GLOBS = tuple(f"*{s}" for s in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES) + tuple(
    f"*{s}.gz" for s in TEXT_SUFFIXES + JSONL_SUFFIXES
)
FORMAT_BY_SUFFIX = {
    **{s: "text" for s in TEXT_SUFFIXES},
    **{s: "jsonl" for s in JSONL_SUFFIXES},
    **{s: "parquet" for s in PARQUET_SUFFIXES},
}
TEXT_SPLITS = ("file", "line", "paragraph", "eot")
EOT_LINE = "<|endoftext|>"  # text_split "eot": a line holding only this separates documents (GPT-2 style corpora)
HF_PREFIX = "hf:"

ChatTemplate = Callable[[Sequence[dict]], tuple[str, str]]


class DataError(ValueError):
    """Bad training data or data settings; the message names the file/record and the fix."""


def read_utf8(path: str | Path, what: str = "") -> str:
    """A whole UTF-8 text file; text in another encoding is a DataError naming the file and a fix."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{what + ' ' if what else ''}{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"convert it, e.g. iconv -f latin1 -t utf-8 {path}.") from None


@dataclass(frozen=True)
class Document:
    text: str  # trained text (the response, for chat/SFT records)
    prompt: str | None = None  # context that is read but not trained (loss mask 0), or None

    def segments(self) -> list[tuple[str, bool]]:
        """The document as `(text, trained)` pieces, in order."""
        return ([(self.prompt, False)] if self.prompt else []) + [(self.text, True)]


def render_chat(messages: Sequence[dict]) -> tuple[str, str]:
    """Default chat rendering: `(prompt, response)`, training the last assistant message only.

    Each earlier message becomes `"<role>: <content>\\n"`; the prompt ends with `"assistant: "`. Use a
    tokenizer's own chat template (pass `chat_template=`) to match a pretrained chat model exactly.
    """
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise DataError("chat record has no message with role 'assistant' to train on")
    context = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:last])
    return context + "assistant: ", str(messages[last]["content"])


def record_to_document(
    record: dict, where: str, text_field: str = "text", chat_template: ChatTemplate = render_chat
) -> Document:
    """Turn one JSON/Parquet/HF record into a Document; `where` names it in errors (file:line)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object per record, got {type(record).__name__}")
    nulls = sorted(k for k, v in record.items() if v is None)
    record = {k: v for k, v in record.items() if v is not None}  # null columns count as absent
    for key in ("prompt", "response", text_field):  # (a list, number or object was trained on as its Python repr)
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{where}: field {key!r} holds a {type(record[key]).__name__}, not text; give it as a "
                            "string (chat turns go in 'messages' as {'role': ..., 'content': ...} objects).")
    if "prompt" in record and "response" in record:
        if not getattr(chat_template, "renders_pairs", False):
            return Document(text=str(record["response"]), prompt=str(record["prompt"]))
        record = {"messages": [{"role": "user", "content": str(record["prompt"])},
                               {"role": "assistant", "content": str(record["response"])}]}
    if "messages" in record:
        messages = record["messages"]
        bad = not isinstance(messages, list) or any(
            not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str) for m in messages
        )  # a content given as a list of parts (multimodal style) was trained on as its Python repr
        if bad:
            raise DataError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects, each "
                            "content a string")
        try:
            prompt, response = chat_template(messages)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        return Document(text=response, prompt=prompt)
    if text_field in record:
        return Document(text=str(record[text_field]))
    if text_field in nulls:  # (the fix is the record's, not data.text_field)
        raise DataError(f"{where}: field {text_field!r} is null; give it text (an empty string for an empty "
                        "document, which is skipped) or leave the record out.")
    raise DataError(
        f"{where}: record has no {text_field!r} field (fields: {sorted(record)}). Set data.text_field=<name> "
        "for plain text, or use 'prompt'+'response' or 'messages' fields for chat/SFT data."
    )


def _open_text(path: Path) -> TextIO:
    """UTF-8, a leading byte-order mark dropped (it was trained on as a character; JSON lines refused it)."""
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _inner_suffix(path: Path) -> str:
    """The format suffix, looking through a trailing `.gz` (`a.jsonl.gz` -> `.jsonl`)."""
    return Path(path.stem).suffix.lower() if path.suffix.lower() == ".gz" else path.suffix.lower()


def iter_text_file(path: Path, split: str = "file") -> Iterator[Document]:
    """A text file (optionally .gz): one document per file, per non-empty line, per paragraph, or per
    `<|endoftext|>`-separated block ("eot", the layout of the offline Gutenberg shards)."""
    if split not in TEXT_SPLITS:
        raise DataError(f"text_split={split!r} is not one of {TEXT_SPLITS}")
    with _open_text(path) as f:
        if split == "file":
            text = f.read()
            # a GPT-2 style corpus read whole: intra_doc_mask never separates its documents, and no warning said why
            if EOT_LINE in text and re.search(rf"^[ \t]*{re.escape(EOT_LINE)}\s*$", text, re.MULTILINE):
                logger.warning("%s holds %s separator lines but is read as one document (data.text_split='file'); "
                               "set data.text_split='eot' to read each block as its own document.", path, EOT_LINE)
            yield Document(text=text)
            return
        if split == "eot":
            block: list[str] = []
            for line in f:
                if line.strip() == EOT_LINE:  # (trailing spaces or a CR kept two documents as one)
                    if "".join(block).strip():
                        yield Document(text="".join(block))
                    block = []
                else:
                    block.append(line)
            if "".join(block).strip():
                yield Document(text="".join(block))
            return
        paragraph: list[str] = []
        for line in f:
            if split == "line":
                if line.strip():
                    yield Document(text=line.rstrip("\n"))
            elif line.strip():
                paragraph.append(line)
            elif paragraph:
                yield Document(text="".join(paragraph).rstrip("\n"))
                paragraph = []
        if paragraph:
            yield Document(text="".join(paragraph).rstrip("\n"))


def iter_jsonl(
    path: Path, text_field: str = "text", chat_template: ChatTemplate = render_chat
) -> Iterator[Document]:
    """One JSON object per line (optionally .gz); blank lines are skipped."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); JSONL needs one object per line"
                ) from None
            yield record_to_document(record, f"{path}:{lineno}", text_field, chat_template)


def iter_parquet(
    path: Path, text_field: str = "text", chat_template: ChatTemplate = render_chat, batch_size: int = 1024
) -> Iterator[Document]:
    """A Parquet file, read in record batches (never whole) with pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dev dependency
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    if path.suffix.lower() == ".gz":  # pyarrow reads Parquet's own compression, not a gzip around the file
        raise DataError(f"{path}: a gzipped Parquet file; Parquet compresses its columns itself: gunzip it (or write "
                        "it with compression='gzip') and give the .parquet file.")
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid: not Parquet, or damaged
        raise DataError(f"{path}: not a readable Parquet file ({e}); re-create it or leave it out") from None
    names = set(pf.schema_arrow.names)
    wanted = [c for c in ("prompt", "response", "messages", text_field) if c in names]
    if not wanted:
        raise DataError(
            f"{path}: no {text_field!r} column (columns: {sorted(names)}). Set data.text_field=<name>, or provide "
            "'prompt'+'response' or 'messages' columns for chat/SFT data."
        )
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=wanted):
        for record in batch.to_pylist():
            yield record_to_document(record, f"{path}: row {row}", text_field, chat_template)
            row += 1


def iter_file(
    path: Path,
    text_field: str = "text",
    text_split: str = "file",
    chat_template: ChatTemplate = render_chat,
    fmt: str | None = None,
) -> Iterator[Document]:
    """One file, dispatched by extension (`.gz` looked through) or by `fmt` ('text'|'jsonl'|'parquet')."""
    suffix = _inner_suffix(path)
    kind = fmt or FORMAT_BY_SUFFIX.get(suffix)
    if kind == "jsonl":
        yield from iter_jsonl(path, text_field, chat_template)
    elif kind == "parquet":
        yield from iter_parquet(path, text_field, chat_template)
    elif kind == "text":
        yield from iter_text_file(path, text_split)
    else:
        raise DataError(
            f"{path}: unknown file type {suffix!r}. Known: text {TEXT_SUFFIXES} and JSONL {JSONL_SUFFIXES} (each "
            f"also .gz), Parquet {PARQUET_SUFFIXES}. Rename the file (from Python, "
            "iter_documents(fmt='text'|'jsonl'|'parquet') reads it as one)."
        )


def list_files(folder: Path, globs: str | Sequence[str] = DEFAULT_GLOBS) -> list[Path]:
    """Files under `folder` (recursive) matching any glob, sorted by relative path for determinism. Letters match
    either case, as a file's type is read from its extension in either case ("*.txt" also finds NOTES.TXT, which
    a folder source skipped silently while the same file given alone was read).

    Hidden files and folders (a name starting with ".") are left out, as `datasets` leaves them out of a data folder:
    Jupyter's .ipynb_checkpoints/ holds a copy of each notebook's text files, which trained every such document
    twice, and put a copy of a held-out document in training."""
    patterns = [globs] if isinstance(globs, str) else list(globs)
    found = {p for pattern in patterns for p in folder.rglob(_any_case(pattern))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _any_case(pattern: str) -> str:
    """A glob whose letters match either case ("*.txt" -> "*.[tT][xX][tT]"); one with its own [...] is kept."""
    if "[" in pattern:
        return pattern
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() and c.lower() != c.upper() else c for c in pattern)


def iter_hf_dataset(
    name: str,
    split: str = "train",
    text_field: str = "text",
    chat_template: ChatTemplate = render_chat,
    *,
    config: str | None = None,
    **load_kwargs: Any,
) -> Iterator[Document]:
    """Records of `datasets.load_dataset(name, config, split=split, streaming=True, **load_kwargs)`; `config` is the
    dataset's configuration (datasets' `name` argument: wikitext's "wikitext-2-raw-v1"), None for its only one."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"loading dataset {name!r} needs the Hugging Face `datasets` package: pip install datasets"
        ) from None
    load_kwargs.setdefault("streaming", True)
    what = f"{name!r}" + (f" (configuration {config!r}, split {split!r})" if config else f" (split {split!r})")
    # a streamed split takes no slice (datasets: "Bad split: train[:1000]"): its rows start..stop are taken here
    sliced = re.fullmatch(r"([^\[\]]+)\[(\d*):(\d*)\]", split) if load_kwargs["streaming"] else None
    if load_kwargs["streaming"] and "[" in split and sliced is None:
        raise DataError(f"the Hugging Face dataset {what}: a streamed split takes a slice of row numbers only, "
                        "'<split>[start:stop]' (e.g. 'train[:1000]'), not percentages.")
    start, stop = (int(sliced[2] or 0), int(sliced[3]) if sliced[3] else None) if sliced else (0, None)
    split = sliced[1] if sliced else split
    try:  # (streaming: the first record is where a missing network shows)
        records = itertools.islice(datasets.load_dataset(name, config, split=split, **load_kwargs), start, stop)
        first = next(records, None)
    except (OSError, ValueError) as e:  # no network (ConnectionError is an OSError), no such dataset, config or split
        raise DataError(f"could not load the Hugging Face dataset {what}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}. A dataset with several configurations needs "
                        f"one named: '{HF_PREFIX}<name>:<config>:<split>'. Without a network, download it where there "
                        "is one (it stays in datasets' cache; HF_DATASETS_OFFLINE=1 reads it from there), or give "
                        "data.source local files.") from None
    label = f"{name}{f'/{config}' if config else ''}[{split}]"
    for i, record in enumerate(itertools.chain([] if first is None else [first], records), start):
        yield record_to_document(dict(record), f"{label} row {i}", text_field, chat_template)


def hf_parts(source: str, default_split: str = "train") -> tuple[str, str | None, str]:
    """`"hf:<name>"`, `"hf:<name>:<split>"` or `"hf:<name>:<config>:<split>"` -> (name, config or None, split), as
    `datasets.load_dataset(name, config, split=split)` takes them: `"hf:wikitext:wikitext-2-raw-v1:validation"`.
    An empty field takes its default (`"hf:wikitext:wikitext-2-raw-v1:"`: the train split); a split's slice may hold
    colons (`"hf:org/set:train[:1000]"`: only colons outside brackets separate; `iter_hf_dataset` takes its rows)."""
    fields = re.split(r":(?![^\[]*\])", source[len(HF_PREFIX):])
    if not fields[0] or len(fields) > 3:
        raise DataError(f"{source!r}: write '{HF_PREFIX}<name>', '{HF_PREFIX}<name>:<split>' or "
                        f"'{HF_PREFIX}<name>:<config>:<split>' "
                        f"(e.g. '{HF_PREFIX}wikitext:wikitext-2-raw-v1:validation').")
    name, config = fields[0], fields[1] if len(fields) == 3 else ""
    return name, config or None, fields[-1] if len(fields) > 1 and fields[-1] else default_split


def iter_documents(
    source: str | Path | Sequence[str | Path],
    *,
    text_field: str = "text",
    glob: str | Sequence[str] = DEFAULT_GLOBS,
    text_split: str = "file",
    chat_template: ChatTemplate = render_chat,
    fmt: str | None = None,
    hf_split: str = "train",
) -> Iterator[Document]:
    """Stream Documents from a file, a folder (recursive), a list of those, or `"hf:<name>"` (datasets; its split is
    `hf_split`, or the one named after a colon, `"hf:<name>:validation"`: a data.val_source of the same dataset read
    its train split; a dataset's configuration goes before the split, `"hf:wikitext:wikitext-2-raw-v1:validation"`).

    Folders yield every file matching `glob`, sorted, each read by its extension. `text_split` says how
    plain text files become documents: 'file' (whole file), 'line' or 'paragraph' (blank-line separated).
    """
    if isinstance(source, (list, tuple)):
        for item in source:
            yield from iter_documents(
                item,
                text_field=text_field,
                glob=glob,
                text_split=text_split,
                chat_template=chat_template,
                fmt=fmt,
                hf_split=hf_split,
            )
        return
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        name, config, split = hf_parts(source, hf_split)
        yield from iter_hf_dataset(name, split, text_field, chat_template, config=config)
        return
    path = Path(source)
    if path.is_dir():
        files = list_files(path, glob)
        if not files:
            raise DataError(
                f"{path}: folder has no files matching {glob!r}; point data.source at a file or a folder of such "
                "files; from Python, iter_documents(glob='*.ext') selects others"
            )
        logger.info("reading %d files under %s", len(files), path)
        for file in files:
            yield from _read_checked(file, text_field, text_split, chat_template, fmt)
    elif path.is_file():
        yield from _read_checked(path, text_field, text_split, chat_template, fmt)
    else:
        raise DataError(
            f"{path}: no such file or folder. Check the path; for a Hugging Face dataset write "
            f"'{HF_PREFIX}<name>' (needs `pip install datasets`)."
        )


def _read_checked(path: Path, *args) -> Iterator[Document]:
    """`iter_file`, with files that cannot be read as text reported by name, with the fix."""
    try:
        yield from iter_file(path, *args)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (a binary file? byte {e.start} does not decode); convert it to "
                        "UTF-8 or leave it out of data.source") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: a damaged or truncated gzip file ({e}); re-create it or leave it out") from None
    except PermissionError:
        raise DataError(f"{path}: cannot be read (permission denied); fix its permissions or leave it out") from None


def as_documents(items: Iterable[Document | str | tuple[str, str]]) -> Iterator[Document]:
    """Normalize in-memory data: strings are plain text, `(prompt, response)` pairs are SFT documents."""
    for item in items:
        if isinstance(item, Document):
            yield item
        elif isinstance(item, str):
            yield Document(text=item)
        elif isinstance(item, tuple) and len(item) == 2:
            yield Document(text=item[1], prompt=item[0])
        else:
            raise DataError(
                f"cannot use {type(item).__name__} as a document; give str, (prompt, response) or Document"
            )
