"""Checkpoint file integrity: the manifest (size and sha256 of every file), pickle-free state, fault hook.

`write_manifest` hashes each file of a finished checkpoint folder (read back and fsynced) into
`manifest.json`; `verify_checkpoint` checks a folder against it and names the first damaged file.
`plain_state` reduces a state to tensors, numbers, strings, None and lists/tuples/dicts (what
`torch.load(weights_only=True)` reads without running code) and `load_plain` reads it back, refusing
anything else. `fault_point` is the `DYNDEPTH_CHECKPOINT_FAULT` test hook (see train/checkpoint.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dyndepth.safetensors_io import CheckpointError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
REQUIRED_FILES = ("model.safetensors", "train_state.pt", "rank_0.pt")
FAULT_POINTS = ("before_weights", "after_weights", "before_manifest", "before_rename")


def sha256_file(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
        if sync:  # the bytes just read back are on disk before the manifest vouches for them
            os.fsync(f.fileno())
    return h.hexdigest()


def hash_files(paths: list[Path], sync: bool = False) -> list[str]:
    with ThreadPoolExecutor(max(1, min(8, len(paths)))) as pool:  # hashlib releases the GIL
        return list(pool.map(lambda p: sha256_file(p, sync), paths))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, step: int) -> Path:
    """`manifest.json` with the size and sha256 of every file in `folder`, each read back and fsynced."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    digests = hash_files(files, sync=True)
    manifest = {"format": "dyndepth-checkpoint", "version": FORMAT_VERSION, "step": step, "hash": "sha256",
                "files": {p.name: {"size": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)}}
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    fsync_dir(folder)
    return folder / MANIFEST


def read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not path.is_dir():  # (a mistyped train.resume read as a damaged checkpoint)
        what = "is a file, not a checkpoint folder" if path.exists() else "does not exist"
        raise CheckpointError(f"{path} {what}; check the path (checkpoints are out_dir/step_NNNNNNN folders).")
    if not file.exists():
        if (path / "train_state.pt").exists():
            raise CheckpointError(
                f"{path} has no {MANIFEST}: it is damaged, or was written by an older dyndepth whose pickled state "
                f"is no longer loaded (unpickling can run code). Re-run such a run, or start a new one from its "
                f"weights: `dyndepth convert {path} OUT`, then model.pretrained=OUT.")
        raise CheckpointError(f"{path} has no {MANIFEST}; it is not a complete dyndepth training checkpoint.")
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        ok = all(isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                 and Path(n).name == n and not n.startswith(".") for n, e in files.items())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is damaged ({type(e).__name__}: {e}).") from None
    if not ok:
        raise CheckpointError(f"{file} is damaged (an entry is not {{name: {{size, sha256}}}}).")
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise CheckpointError(f"{file} does not list {', '.join(missing)}; it is not a complete checkpoint.")
    return manifest


def check_files(path: Path, manifest: dict, names, hashes: bool) -> None:
    entries = {n: manifest["files"][n] for n in names}
    for name, entry in entries.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing ({MANIFEST} lists it).")
        size = file.stat().st_size
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "longer than written"
            raise CheckpointError(f"{file} is {what}: {size} bytes, {MANIFEST} says {entry['size']}.")
    if hashes:
        for (name, entry), digest in zip(entries.items(), hash_files([path / n for n in entries])):
            if digest != entry["sha256"]:
                raise CheckpointError(f"{path / name} is damaged: its sha256 differs from {MANIFEST}'s (the file "
                                      "changed after the save).")


def verify_checkpoint(path: str | Path, hashes: bool | tuple[str, ...] = True) -> dict:
    """Check every file of a checkpoint against its manifest: sizes, and sha256 of every file (`hashes=True`), of the
    files named (a tuple), or of none (False); returns the manifest. Raises a CheckpointError naming the file and the
    damage."""
    path = Path(path)
    manifest = read_manifest(path)
    names = list(manifest["files"])
    check_files(path, manifest, names, hashes is True)
    if isinstance(hashes, tuple):
        check_files(path, manifest, [n for n in names if n in hashes], True)
    return manifest


def fault_point(point: str, step: int, out_dir: Path) -> None:
    """`DYNDEPTH_CHECKPOINT_FAULT=POINT[@STEP][:sleep|:enospc]` (a test hook, see train/checkpoint.py): at
    POINT of the save of STEP, sleep after writing `out_dir/POINT.fault`, or raise OSError(ENOSPC)."""
    spec = os.environ.get("DYNDEPTH_CHECKPOINT_FAULT", "")
    if not spec:
        return
    where, _, action = spec.partition(":")
    name, _, at = where.partition("@")
    if name not in FAULT_POINTS or action not in ("", "sleep", "enospc"):
        raise ValueError(f"DYNDEPTH_CHECKPOINT_FAULT={spec!r}: use POINT[@STEP][:sleep|:enospc], POINT one of "
                         f"{FAULT_POINTS}.")
    if name != point or (at and int(at) != step):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    (out_dir / f"{point}.fault").write_text(str(step))
    time.sleep(600)


# ---------------------------------------------------------------------------- plain (pickle-free) state

def plain_state(obj, where: str):
    """`obj` as tensors, numbers, strings, None and lists/tuples/dicts of them, which torch.load reads back
    with weights_only=True (no code runs); numpy scalars become Python numbers, anything else is an error."""
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if type(obj) in (torch.Tensor, nn.Parameter):
        return obj.detach()
    if type(obj) in (list, tuple):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if type(obj) is list else tuple(items)
    if isinstance(obj, dict):
        bad = [k for k in obj if type(k) not in (str, int)]
        if bad:
            raise CheckpointError(f"{where} has a key of type {type(bad[0]).__qualname__} ({bad[0]!r}); checkpoint "
                                  "state keys must be str or int: make that state_dict() return plain keys.")
        return {k: plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    raise CheckpointError(f"{where} is a {type(obj).__qualname__}; checkpoint state may hold only tensors, numbers, "
                          "strings, None and lists/tuples/dicts of them (so that loading runs no code): make that "
                          "state_dict() return plain values.")


def load_plain(file: Path) -> dict:
    """torch.load with weights_only=True: a file holding other objects is refused, and nothing runs."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        first = reason[0] if reason else ""
        detail = next((line for line in reason if "Unsupported" in line or "GLOBAL" in line), first)
        raise CheckpointError(
            f"{file} was refused: it holds Python objects other than tensors, numbers, strings and containers "
            f"({detail.strip()[:200]}), and loading them could run code. Only load checkpoints written by this "
            "dyndepth version; older ones must be re-run (or restarted from their weights via `dyndepth convert`)."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable torch file ({e}).") from None
