"""Memory-mapped safetensors reading (zero copy) and atomic writing of files and HF checkpoint folders.

The reader parses the safetensors header itself and views each tensor straight out of a private
(copy-on-write) memory map, so loading a checkpoint never holds the weights twice: a tensor's pages are read from
disk on first touch and shared with the page cache until someone writes to them. Our writer puts tensors on 64-byte
boundaries (`ALIGN`), where CPU kernels round as they do in torch's own memory; the few of our files' tensors off it
are copied.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


_LFS_POINTER = b"version https://git-lfs."  # how a git-lfs pointer file starts
# Alignment (bytes) of a tensor viewed straight from the map. CPU kernels pick their code path by their operands'
# alignment, so a weight at an 8-byte-aligned address (where safetensors' own files put most) rounded otherwise than
# the same weight in torch's 64-byte-aligned memory: a saved and reloaded model's float32 logits moved by ~1e-7. A
# tensor off this alignment in a file of ours is copied; `write_safetensors` lays our files out so that (almost) none
# is, and marks them with this metadata key.
ALIGN = 64
ALIGNED = "dyndepth_align"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names what and why."""


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file as CPU tensors viewed in a private memory map (no copy). In a file our
    writer laid out (`ALIGNED`) the few tensors off the `ALIGN` boundary are copied into aligned memory; another
    writer's file (safetensors' own aligns its data to 8 bytes) stays mapped whole: copying it would hold a hub
    checkpoint in every process's anonymous memory (each torchrun rank its own copy, where the map's pages are shared),
    and its float32 CPU logits may then differ from an in-memory model's by a rounding."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(len(_LFS_POINTER)) == _LFS_POINTER:  # a repository cloned without git-lfs
            raise CheckpointError(f"{path} is a git-lfs pointer, not the weights: fetch them (`git lfs pull` in the "
                                  "clone, or download the checkpoint with huggingface_hub).")
        f.seek(0)
        try:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:  # (read as a length, a text file's first bytes asked for exabytes: MemoryError)
                raise ValueError(f"its header length, {header_len}, runs past the file's {size} bytes")
            header = json.loads(f.read(header_len))
        except (ValueError, struct.error, UnicodeDecodeError) as e:  # (JSONDecodeError is a ValueError)
            raise CheckpointError(f"{path} is not a valid safetensors file ({e}).") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    base = 8 + header_len
    ours = (header.get("__metadata__") or {}).get(ALIGNED) == str(ALIGN)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
        dtype = _DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        numel = 1
        for s in info["shape"]:
            numel *= s
        if base + end > size:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends past the end of the file.")
        if not 0 <= start <= end or end - start != numel * dtype.itemsize:  # (a short range read the next tensor's)
            raise CheckpointError(f"{path} is damaged: tensor {name!r} spans bytes {start}-{end}, but its shape "
                                  f"{info['shape']} of {info['dtype']} needs {numel * dtype.itemsize}.")
        if numel == 0:
            t = torch.empty(info["shape"], dtype=dtype)
        elif (base + start) % (ALIGN if ours else dtype.itemsize) == 0:
            t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=base + start)
        else:  # misaligned: a copy of this one tensor, which torch's allocator aligns
            t = torch.frombuffer(memoryview(buf)[base + start:base + end], dtype=dtype, count=numel).clone()
        tensors[name] = t.view(info["shape"])
    return tensors


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically: to a temporary name in the same folder, then rename over `path`."""
    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    for k, v in cpu.items():
        if v.dtype not in _NAMES:
            raise ValueError(f"tensor {k!r} has dtype {v.dtype}, which safetensors does not store.")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _save(cpu, tmp, metadata or {"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())  # the mode a plain file gets
    os.replace(tmp, path)


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """The safetensors file of contiguous CPU `tensors`, laid out so that every tensor whose size is a multiple of
    `ALIGN` bytes sits at an `ALIGN`-aligned offset and the reader maps it without a copy: the header is padded with
    spaces (as the format allows) to end on the boundary, and those tensors come first (the format leaves no gaps
    between tensors, so the odd-sized rest, norms of odd widths say, follow them and are copied when read)."""
    order = sorted(tensors, key=lambda k: (tensors[k].numel() * tensors[k].element_size() % ALIGN != 0, k))
    header: dict = {"__metadata__": {**metadata, ALIGNED: str(ALIGN)}}
    offset = 0
    for k in order:
        nbytes = tensors[k].numel() * tensors[k].element_size()
        header[k] = {"dtype": _NAMES[tensors[k].dtype], "shape": list(tensors[k].shape),
                     "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # (8 + header) % ALIGN == 0: the data starts on the boundary
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for k in order:
            if tensors[k].numel():
                f.write(memoryview(tensors[k].view(-1).view(torch.uint8).numpy()))


def _umask() -> int:
    """The process umask, read without changing it (os.umask sets while it reads: a race for other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(obj: dict, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


_WEIGHT_FILE = re.compile(r"model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")  # ours only


def write_pretrained(state: dict[str, torch.Tensor], config: dict, path: str | Path,
                     max_shard_bytes: int = 5 * 2**30, generation_config: dict | None = None) -> Path:
    """A HF checkpoint folder: `config.json` and `model.safetensors`, or shards plus their index above
    `max_shard_bytes`, and `generation_config.json` when given (a loaded checkpoint's, kept; else a previous save's
    is removed); every file written atomically. `state` is already in the on-disk layout."""
    quantized = sorted(k for k in state if k.endswith(".qweight"))
    if quantized:  # checked before anything is written: such a folder would not load
        raise ValueError(f"the model's weights are quantized in memory ({quantized[0]}, ...: methods/quantize.py), "
                         "a layout no checkpoint loader reads; save the model before quantize_weights and quantize "
                         "after loading.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(shards[0], path / "model.safetensors")
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, path / name)
            weight_map.update(dict.fromkeys(shard, name))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                   path / "model.safetensors.index.json")
    write_json(config, path / "config.json")
    if generation_config is not None:
        write_json(generation_config, path / "generation_config.json")
    elif (path / "generation_config.json").is_file():  # a previous save's: its stop ids would be read back
        (path / "generation_config.json").unlink()
    written = {"model.safetensors"} if len(shards) == 1 else {*weight_map.values(), "model.safetensors.index.json"}
    for stale in path.iterdir():  # a previous save's weights in another sharding: loaders would read its index
        if _WEIGHT_FILE.fullmatch(stale.name) and stale.name not in written:
            stale.unlink()
    return path
