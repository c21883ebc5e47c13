"""Real text that ships with every Python install: the standard library's own ``.py`` sources.

Good enough to train and evaluate a tiny byte-level language model with no network and no
downloaded data. The file set differs a little between Python versions, but within one version every
selection is deterministic: files are listed in sorted relative-path order, shuffled only by
``random.Random(seed)``, and assigned to 'train' or 'val' by a stable hash of their relative path
(independent of the seed, so a validation file is never in training, whatever seeds are used).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

VAL_FRACTION = 0.1  # share of files in the validation split
SPLITS = ("train", "val")
DOC_SEPARATOR = "\n\n"  # what stdlib_text puts between two files

# Directories that are not representative library code: installed packages, test suites, the IDLE
# app, the retired 2to3 tool, bytecode caches, huge generated tables (pydoc topics, codec maps),
# bundled wheels and build configuration.
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3",
    "__pycache__", "pydoc_data", "encodings", "ensurepip", "lib-dynload",
})
_EXCLUDED_DIR_PREFIXES = ("config-", ".")  # e.g. config-3.11-x86_64-linux-gnu, hidden dirs
_EXCLUDED_FILE_PREFIXES = ("_sysconfigdata", "test_")  # generated build data, stray tests
_EXCLUDED_FILES = frozenset({"this.py", "html/entities.py"})  # rot13 poem, 75 KB entity table


def stdlib_root() -> Path:
    """The directory holding this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIRS or name.startswith(_EXCLUDED_DIR_PREFIXES)


def _excluded_file(rel_path: str) -> bool:
    name = rel_path.rsplit("/", 1)[-1]
    return (not name.endswith(".py") or rel_path in _EXCLUDED_FILES
            or name.startswith(_EXCLUDED_FILE_PREFIXES))


@functools.lru_cache(maxsize=4)
def _list_files(root: str) -> tuple[str, ...]:
    """Relative posix paths of the representative ``.py`` files under ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _excluded_dir(d)]  # prune in place
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            path, rel = Path(dirpath) / name, (rel_dir / name).as_posix()
            if not _excluded_file(rel) and path.is_file() and not path.is_symlink():
                found.append(rel)
    return tuple(sorted(found))


def _resolve_root(root: Path | str | None) -> Path:
    path = stdlib_root() if root is None else Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"standard library directory {path} does not exist; this Python install "
                                f"ships no stdlib sources (embedded/frozen build?), pass root= explicitly")
    return path


def stdlib_files(max_files: int | None = None, root: Path | str | None = None) -> list[Path]:
    """The stdlib ``.py`` files (tests, site-packages and generated files excluded), sorted.

    ``max_files`` keeps the first that many in sorted order; ``root`` overrides the stdlib directory.
    """
    if max_files is not None and max_files < 0:
        raise ValueError(f"max_files must be >= 0 or None, got {max_files}")
    base = _resolve_root(root)
    files = _list_files(str(base))
    if not files:
        raise FileNotFoundError(f"no .py files found under {base}; pass root= pointing at a Python stdlib")
    return [base / rel for rel in files[:max_files]]


def file_split(rel_path: str) -> str:
    """The split ('train' or 'val') owning a file, from a stable hash of its relative posix path."""
    digest = hashlib.blake2b(rel_path.encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") % 10_000 < VAL_FRACTION * 10_000 else "train"


def _read(path: Path) -> str | None:
    """File contents as text with '\\n' line endings, or None when not utf-8 or empty."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        logger.debug("skipping %s: %s", path, err)
        return None
    text = text.replace("\r\n", "\n")
    return text if text.strip() else None


def _clip(text: str, budget: int) -> str:
    """The longest prefix of ``text`` ending at a newline whose utf-8 size is at most ``budget``."""
    data = text.encode("utf-8")[:budget]
    cut = data.rfind(b"\n")
    return data[: cut + 1].decode("utf-8") if cut >= 0 else ""


def _collect(
    max_bytes: int, seed: int, split: str | None, sep_bytes: int, root: Path | str | None
) -> list[str]:
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    base = _resolve_root(root)
    rel_paths = [p.relative_to(base).as_posix() for p in stdlib_files(root=base)]
    if split is not None:
        rel_paths = [rel for rel in rel_paths if file_split(rel) == split]
    random.Random(f"dyndepth.stdlib:{seed}").shuffle(rel_paths)
    docs: list[str] = []
    used = 0
    for rel in rel_paths:
        text = _read(base / rel)
        if text is None:
            continue
        overhead = sep_bytes if docs else 0
        size = len(text.encode("utf-8"))
        if used + overhead + size > max_bytes:  # fill the rest with a line-aligned prefix, then stop
            text = _clip(text, max_bytes - used - overhead)
            if text:
                docs.append(text)
            break
        docs.append(text)
        used += overhead + size
    return docs


def stdlib_documents(
    max_bytes: int, seed: int = 0, split: str | None = None, root: Path | str | None = None
) -> list[str]:
    """Whole stdlib files in a seeded random order, at most ``max_bytes`` of utf-8 in total.

    Undecodable and empty files are skipped; the last document may be cut at a line boundary to use
    the budget. ``split`` ('train'/'val') restricts to that split's files; None uses all files.
    """
    return _collect(max_bytes, seed, split, 0, root)


def stdlib_text(max_bytes: int, split: str = "train", seed: int = 0, root: Path | str | None = None) -> str:
    """One text stream of ``split``'s files joined by ``DOC_SEPARATOR``, at most ``max_bytes`` utf-8."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    sep_bytes = len(DOC_SEPARATOR.encode("utf-8"))
    return DOC_SEPARATOR.join(_collect(max_bytes, seed, split, sep_bytes, root))
