"""Device and dtype names from users (CLI flags, recipes, model arguments), checked in one place.

A leaf module: it imports nothing from dyndepth, so every layer may use it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """"auto" (or None): CUDA when visible, else CPU; "cuda" takes the local rank's GPU. A device that is not
    there is a ValueError naming the fix, not a torch error from deep inside."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda, cuda:N or auto.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for CUDA, but no CUDA device is visible to torch "
                             f"{torch.__version__}; use device cpu or auto.")
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
        return torch.device("cuda", index)
    if dev.type not in ("cpu", "mps", "meta"):
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or auto.")
    return dev


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype name (float32, bfloat16, float16) or dtype; None and "auto" (transformers' name, which eval's model
    arguments took and generate / from_pretrained refused) give None: the default, config.json's dtype."""
    if isinstance(name, torch.dtype) and not name.is_floating_point:
        raise ValueError(f"dtype {name} is not a floating-point dtype a model's weights can take; use one of "
                         f"{list(DTYPES)}.")
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)}.")
    return DTYPES[name]


_CPU_MEMORY = "system"  # how freed CPU memory is handled in this process: "system" | "retained"


def retain_freed_cpu_memory() -> bool:
    """Keep the memory CPU tensors free for the next allocation instead of handing it back to the OS: glibc's
    malloc serves large blocks from the main heap (no mmap) and trims its top only beyond 2 GiB (`mallopt`), the
    CPU counterpart of PyTorch's CUDA caching allocator. Without it, whether a step's activations page-fault in
    again depends on heap history (a model stepped after a larger one faults less), so a CPU training step varies
    by 10-25% with the process it runs in. The process keeps its peak memory until it ends.

    `dyndepth` commands call it first. DYNDEPTH_CPU_MEMORY says when it acts: "auto" (default) on hosts where
    torch sees no CUDA device, where tensors live in CPU memory; "retain" always; "system" never (GPU hosts keep
    glibc's default under auto, so torchrun ranks return a checkpoint load's host memory). It helps allocations
    of the main thread (glibc's per-thread arenas still map large blocks), and leaves a preloaded jemalloc or
    tcmalloc alone. Returns whether freed memory is retained (glibc on Linux only)."""
    global _CPU_MEMORY
    if _CPU_MEMORY == "retained":
        return True
    policy = os.environ.get("DYNDEPTH_CPU_MEMORY", "auto")
    if policy not in ("auto", "retain", "system"):
        raise ValueError(f"DYNDEPTH_CPU_MEMORY={policy!r} is not one of auto, retain, system.")
    if policy == "system" or (policy == "auto" and torch.cuda.is_available()):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False  # another allocator serves malloc: its own caching applies
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    if mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1:
        _CPU_MEMORY = "retained"
    return _CPU_MEMORY == "retained"


def cpu_memory_policy() -> str:
    """"retained" after `retain_freed_cpu_memory` took effect in this process, else "system" (for reports)."""
    return _CPU_MEMORY
