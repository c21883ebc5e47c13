"""Atomic training checkpoints: `out_dir/step_0000040/` appears complete or not at all.

Layout of one checkpoint (written into `step_XXXXXXX.tmp/`, then renamed):
  model.safetensors   full model state (HF names; a tied lm_head is stored once and re-aliased on load)
  train_state.pt      step, optimizer, scheduler, hook states, world size (global: written by rank 0)
  rank_{r}.pt         per-rank RNG states (python, numpy, torch, cuda) and data-loader state
  config.yaml         the resolved run config (or the TrainConfig alone)

FSDP2: the model and optimizer states are gathered to full (unsharded) state dicts with
`torch.distributed.checkpoint.state_dict` and written by rank 0, so an FSDP checkpoint is an ordinary
checkpoint that any world size (or a single process) can resume or export. This is simple and fine up
to a few billion parameters on one node; beyond that, a sharded DCP save would be the next step.
On load, every rank reads the full files (a filesystem shared by the ranks is assumed) and shards them.

`train_state.pt` holds Python objects (RNG states, loader state), so it is loaded with
`weights_only=False`: only resume from checkpoints you wrote.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dyndepth.interop.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from dyndepth.train.parallel import DistInfo, is_fsdp

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step:07d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed from .tmp and holding train_state.pt), oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir() and (p / "train_state.pt").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


# --------------------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------- model / optimizer

def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; under FSDP, complete on rank 0 only."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    return model.state_dict(), optimizer.state_dict()


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier key (tied embeddings); returns (unique tensors, alias -> key)."""
    seen, unique, aliases = {}, {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            unique[key] = t
    return unique, aliases


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, loader, hook_states: dict, info: DistInfo,
                    config_writer=None, keep_last: int = 0) -> Path:
    """Write `step_XXXXXXX.tmp/` on all ranks, then rename it (rank 0). Collective under DDP/FSDP."""
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    model_state, optim_state = _full_state(model, optimizer)  # collective under FSDP
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    info.barrier()
    torch.save({"rng": rng_state(), "loader": loader.state_dict() if loader is not None else None},
               tmp / f"rank_{info.rank}.pt")
    if info.is_main:
        unique, aliases = _dedupe(model_state)
        write_safetensors(unique, tmp / "model.safetensors", metadata={"format": "pt", "aliases": json.dumps(aliases)})
        sched_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        torch.save({"step": step, "optimizer": optim_state, "scheduler": sched_state, "hooks": hook_states,
                    "world_size": info.world_size}, tmp / "train_state.pt")
        if config_writer is not None:
            config_writer(tmp / "config.yaml")
    info.barrier()  # every rank's file is in tmp before the rename
    if info.is_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last > 0:
            for old in list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    info.barrier()
    return final


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Load `model.safetensors` of a checkpoint folder into a plain or FSDP-sharded model."""
    file = Path(path) / "model.safetensors"
    if not file.exists():
        raise CheckpointError(f"{path} has no model.safetensors; is it a dyndepth training checkpoint?")
    state = read_safetensors(file)
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state.update({alias: state[key] for alias, key in aliases.items()})
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    loader, info: DistInfo) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the train_state dict (step, hooks, ...)."""
    path = Path(path)
    if not (path / "train_state.pt").exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no train_state.pt).")
    state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
    if state["world_size"] != info.world_size:
        raise CheckpointError(f"{path} was written by {state['world_size']} ranks; resuming with "
                              f"{info.world_size} would change the data order. Use the same world size.")
    load_model_weights(path, model)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    sched_state = dict(state["scheduler"], lr_lambdas=[None] * len(scheduler.lr_lambdas))
    scheduler.load_state_dict(sched_state)
    rank_state = torch.load(path / f"rank_{info.rank}.pt", map_location="cpu", weights_only=False)
    if loader is not None and rank_state["loader"] is not None:
        loader.load_state_dict(rank_state["loader"])
    set_rng_state(rank_state["rng"])
    return state
