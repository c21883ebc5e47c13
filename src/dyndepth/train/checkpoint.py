"""Training checkpoints that are atomic, verified and never unpickle code.

Layout of one checkpoint `out_dir/step_XXXXXXX/` (written into `step_XXXXXXX.tmp/`, then renamed):
  model.safetensors   full model state with HF names, the same under DDP, FSDP2 or one process (the DDP
                      wrapper is unwrapped first; a tied lm_head is stored once and re-aliased on load)
  train_state.pt      step, optimizer, scheduler, world size, non-finite step count and the TrainConfig (rank 0)
  rank_{r}.pt         per-rank RNG states (python, numpy, torch, cuda), data-loader state and the training hooks'
                      state (a controller may keep rank-local statistics: DND's score buffer)
  config.yaml         the resolved run config (or the TrainConfig alone)
  model_config.json   the model's config.json, and generation_config.json when it had one: what export writes
  manifest.json       size and sha256 of every file above; written last

What is guaranteed:
- Atomic: a folder named `step_XXXXXXX` exists only once all its files and its manifest are written,
  hashed (read back from disk) and fsynced. A save killed at any point leaves a `.tmp` folder, which is
  never taken for a checkpoint and is removed by the next run; a save that fails (e.g. ENOSPC) removes
  its `.tmp` and raises a `CheckpointError`. keep_last pruning runs only after the new checkpoint was
  renamed and checked against its manifest, so a failed save never costs an older checkpoint.
- Verified: every load checks each file's size and sha256 against the manifest (`verify_checkpoint`).
  `train.resume=true` skips a damaged latest checkpoint with a warning naming the damage and resumes
  from the newest good one; an explicit `train.resume=<path>` to a damaged one is an error.
  sha256 (stdlib hashlib): it is strong, and with the SHA extensions of current x86 and ARM CPUs it is
  the fastest strong hash in the standard library (about twice blake2b here); files hash in parallel.
- No code runs on load: weights come only from safetensors, and the `.pt` files hold only tensors,
  numbers, strings, None and lists/tuples/dicts of them (numpy and python RNG states are converted to
  lists), checked when saving and read with `torch.load(weights_only=True)`. A file holding anything
  else is refused. Checkpoints of older dyndepth versions (no manifest.json, pickled RNG state) are
  refused with the way out: re-run, or start a new run from their weights (`dyndepth convert`).
- Test hook: `DYNDEPTH_CHECKPOINT_FAULT=POINT[@STEP][:sleep|:enospc]` makes the save (of STEP, or of
  every step) stop at POINT: before_weights, after_weights (model.safetensors written), before_manifest
  or before_rename. `sleep` (default) writes `out_dir/POINT.fault` and sleeps, so a test can SIGKILL the
  process there; `enospc` raises OSError(ENOSPC) as a full disk would. Unset, it costs one getenv.
The manifest, the plain-state check and the hook live in `train/integrity.py`.

DDP and FSDP2 checkpoints hold full (unsharded) states: under FSDP2 the model and optimizer states are
gathered with `torch.distributed.checkpoint.state_dict` and written by rank 0. So every checkpoint loads
into a plain model, exports to HF format, and resumes at any world size: the weights and AdamW state
are complete, and rank 0's loader state is handed to every rank's loader, which `PackedLoader` turns
into the same global position in the same window order (an error names the fix when world_size x
batch_size does not divide the windows already served). RNG streams of a different world size restart
from the seed. Gathering to rank 0 is simple and fine up to a few billion parameters on one node; beyond
that, a sharded DCP save would be the next step. On load, every rank reads the full files (a filesystem
shared by the ranks is assumed) and shards them.

Resuming with a changed TrainConfig (see `load_checkpoint`): the schedule and the optimizer
hyperparameters of the new config apply (steps, lr, min_lr, warmup, schedule, decay_frac, weight_decay,
betas, eps, lr_groups multipliers), each change logged; what cannot change (which parameters train
and how they are grouped: train.freeze, train.lr_groups globs) is an error naming the fields.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dyndepth.methods.registry import CALIBRATION_KNOBS, unshare_gates
from dyndepth.runconfig import TrainConfig, load_run_config
from dyndepth.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from dyndepth.train.integrity import (
    FORMAT_VERSION,
    MANIFEST,
    check_files,
    fault_point,
    fsync_dir,
    load_plain,
    plain_state,
    read_manifest,
    verify_checkpoint,
    write_manifest,
)
from dyndepth.train.parallel import DistInfo, is_fsdp, unwrap

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step:07d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Renamed checkpoint folders (holding a manifest, or train_state.pt of the old format), oldest first.
    `.tmp` folders of unfinished saves are never listed; damaged checkpoints are (see `verify_checkpoint`)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
             and ((p / MANIFEST).exists() or (p / "train_state.pt").exists())]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def latest_good_checkpoint(out_dir: str | Path, warn: bool = True, hashes: bool | tuple[str, ...] = True
                           ) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint(path, hashes)` (None when there is none at all); each
    damaged newer one is skipped with a warning naming the damage. All damaged: a CheckpointError."""
    damaged = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            verify_checkpoint(path, hashes)
            return path
        except CheckpointError as e:
            damaged.append(f"{path.name}: {e}")
            if warn:
                log.warning("skipping damaged checkpoint %s (%s); trying the one before it", path, e)
    if damaged:
        raise CheckpointError(f"no checkpoint in {out_dir} can be resumed ({'; '.join(damaged)}); resume an "
                              "undamaged copy with train.resume=<path>, or move them away and start a new run.")
    return None


def remove_stale_tmp(out_dir: str | Path) -> list[Path]:
    """Delete `step_*.tmp` folders left by saves that were killed (rank 0, before training starts)."""
    out = Path(out_dir)
    stale = sorted(p for p in out.glob("step_*.tmp") if p.is_dir()) if out.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
        log.info("removed %s, left by an unfinished save", p)
    return stale


# --------------------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """RNG states as tensors and plain numbers (the python and numpy tuples become dicts of lists)."""
    version, internal, gauss_next = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
             "numpy": {"kind": str(kind), "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((npy["kind"], np.asarray(npy["key"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------- model / optimizer
def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts; under FSDP, complete on rank 0 only."""
    model = unwrap(model)  # DDP: the wrapped model's keys, without the `module.` prefix
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=opts)
        # the gather gives each name of a tied parameter its own copy: point them at one tensor again, so that
        # `_dedupe` stores a tied lm_head once, as one process and DDP do
        first = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            key = first.setdefault(id(p), name)
            if key != name and key in state and name in state:
                state[name] = state[key]
        return state, get_optimizer_state_dict(model, optimizer, options=opts)
    return model.state_dict(), _keyed_by_name(optimizer.state_dict())


def _keyed_by_name(optim_state: dict) -> dict:
    """torch's optimizer state dict, keyed by parameter name instead of position, as the FSDP2 (DCP) save
    writes it, so that one checkpoint loads with and without FSDP2. Our groups record their names."""
    groups = optim_state["param_groups"]
    if not all("names" in g for g in groups) or all(isinstance(p, str) for g in groups for p in g["params"]):
        return optim_state
    name = {i: n for g in groups for i, n in zip(g["params"], g["names"])}
    return {"state": {name[i]: s for i, s in optim_state["state"].items()},
            "param_groups": [dict(g, params=[name[i] for i in g["params"]]) for g in groups]}


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
                    scheduler, loader, hook_states: dict, info: DistInfo, config_writer=None, keep_last: int = 0,
                    train_config: TrainConfig | None = None, extra_state: dict | None = None) -> Path:
    """Write `step_XXXXXXX.tmp/` on all ranks, its manifest last, then rename it (rank 0); prune to `keep_last`
    only after the renamed checkpoint checks out. Collective under DDP/FSDP. A failed write removes the
    `.tmp` folder and raises a CheckpointError; older checkpoints are left as they were.

    `model` is the plain, FSDP2-sharded or DDP-wrapped model; the file holds HF names in every case.
    `extra_state` (plain values) is stored in train_state.pt and returned by `load_checkpoint`."""
    out_dir = Path(out_dir)
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    model_state, optim_state = _full_state(model, optimizer)  # collective under FSDP
    # checked (and made plain) before anything is written: a state that would not load is never saved
    rank_state = plain_state({"rng": rng_state(), "loader": loader.state_dict() if loader is not None else None},
                             "loader/RNG state")
    rank_state["hooks"] = plain_state(hook_states, "hook state")  # every rank's: DND keeps rank-local scores
    if info.is_main:
        sched_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        cfg = dataclasses.asdict(train_config) if train_config is not None else None
        train_state = {"format": FORMAT_VERSION, "step": step, "world_size": info.world_size}
        for key, value in (("optimizer", optim_state), ("scheduler", sched_state), ("train_config", cfg),
                           *(extra_state or {}).items()):
            train_state[key] = plain_state(value, f"{key} state")
    try:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        info.barrier()
        torch.save(rank_state, tmp / f"rank_{info.rank}.pt")
        if info.is_main:
            fault_point("before_weights", step, out_dir)
            unique, aliases = _dedupe(model_state)
            write_safetensors(unique, tmp / "model.safetensors",
                              metadata={"format": "pt", "aliases": json.dumps(aliases)})
            fault_point("after_weights", step, out_dir)
            torch.save(train_state, tmp / "train_state.pt")
            if config_writer is not None:
                config_writer(tmp / "config.yaml")
        info.barrier()  # every rank's file is in tmp before the manifest
        if info.is_main:
            fault_point("before_manifest", step, out_dir)
            write_manifest(tmp, step)
            fault_point("before_rename", step, out_dir)
            _replace_dir(tmp, final)
            verify_checkpoint(final, hashes=False)  # hashed when read back for the manifest
    except BaseException as e:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            kept = latest_checkpoint(out_dir)
            raise CheckpointError(
                f"could not write checkpoint {final} ({e}); the earlier checkpoints are untouched (latest: "
                f"{kept.name if kept else 'none'}). Free disk space (or fix the cause) and continue with "
                "train.resume=true.") from e
        raise
    if info.is_main:
        if keep_last > 0:
            for old in list_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    info.barrier()
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` (moving an existing `final` aside first) and make the rename durable."""
    old = final.with_name(final.name + ".old.tmp")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


MODEL_CONFIG = "model_config.json"  # a checkpoint's model as config.json describes it (`pretrained_config`)
GENERATION_CONFIG = "generation_config.json"  # and its base checkpoint's, when it had one (export writes it back)


def load_model_weights(path: str | Path, model: nn.Module, verify: bool = True) -> None:
    """Load `model.safetensors` of a checkpoint folder into a plain, DDP-wrapped or FSDP-sharded model. In a
    training checkpoint (one with a manifest) the file is first checked against the manifest."""
    path = Path(path)
    file = path / "model.safetensors"
    if not file.exists():
        raise CheckpointError(f"{path} has no model.safetensors; is it a dyndepth training checkpoint?")
    if verify and (path / MANIFEST).exists():
        check_files(path, read_manifest(path), ["model.safetensors"], hashes=True)
    state = read_safetensors(file)
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state.update({alias: state[key] for alias, key in aliases.items()})
    if state and all(k.startswith("module.") for k in state):  # written by an older DDP run
        state = {k.removeprefix("module."): v for k, v in state.items()}
    model = unwrap(model)
    old = not (path / MANIFEST).exists()  # written before 2026-12-02
    if old and getattr(getattr(model, "model", None), "gateskip", None) is not None:
        unshare_gates(state)  # (a shared-gate GateSkip kept its gates in layer 0 then)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    if old:  # no calibration knob buffers then (not calibrated)
        missing = [k for k in missing if not k.endswith(CALIBRATION_KNOBS)]
    if missing or unexpected:
        raise CheckpointError(f"{file} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}.")


# ------------------------------------------------------------------------------------------ resume
def _group_layout(groups: list[dict]) -> list[list[str]] | None:
    """Parameter names per optimizer group (None for checkpoints that did not record them)."""
    if any("names" not in g for g in groups):
        return None
    return [sorted(g["names"]) for g in groups]


def _check_layout(path: Path, saved_groups: list[dict], optimizer: torch.optim.Optimizer) -> None:
    """The AdamW state is kept per group: the trainable parameters and their grouping must be unchanged."""
    old, new = _group_layout(saved_groups), _group_layout(optimizer.param_groups)
    if old is None or new is None or old == new:
        return
    old_names, new_names = {n for g in old for n in g}, {n for g in new for n in g}
    if old_names != new_names:
        what = (f"now trained: {sorted(new_names - old_names)[:3]}, no longer trained: "
                f"{sorted(old_names - new_names)[:3]}")
    else:
        what = f"the same parameters fall into {len(new)} LR/decay groups instead of {len(old)}"
    raise CheckpointError(
        f"{path}: train.freeze / train.lr_groups select other parameters than the checkpoint's ({what}). "
        "The optimizer state cannot follow; resume with the checkpoint's train.freeze and train.lr_groups "
        "(its config.yaml), or start a new run from its weights.")


def _without_stateless_frozen(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The saved optimizer state without the parameters this run freezes that hold no AdamW state (no gradient ever
    reached them: a method's `untrained_parameters`, which checkpoints from before the trainer froze them list)."""
    trained = {n for g in optimizer.param_groups for n in g.get("names", ())}
    if not trained or any("names" not in g for g in saved["param_groups"]):
        return saved
    groups = []
    for g in saved["param_groups"]:
        kept = [(p, n) for p, n in zip(g["params"], g["names"]) if n in trained or p in saved["state"]]
        if kept:
            groups.append(dict(g, params=[p for p, _ in kept], names=[n for _, n in kept]))
    return dict(saved, param_groups=groups)


def _apply_new_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, fresh: list[dict]) -> None:
    """Put this run's weight decay, betas, eps, LR multipliers and base LRs (from `fresh`, the groups
    the new config built) on the restored groups, and recompute the LR at the restored step."""
    for group, new in zip(optimizer.param_groups, fresh):
        for key in ("weight_decay", "betas", "eps", "lr_mult", "initial_lr"):
            if key in new:
                group[key] = new[key]
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _saved_train_config(path: Path, state: dict) -> dict | None:
    if state.get("train_config") is not None:
        return state["train_config"]
    if (path / "config.yaml").exists():  # checkpoints written before train_state held the config
        return dataclasses.asdict(load_run_config(path / "config.yaml").train)
    return None


def log_config_changes(path: Path, old: dict | None, new: TrainConfig) -> list[str]:
    """One log line per TrainConfig field that differs from the checkpoint's; returns the field names."""
    if old is None:
        return []
    changed = []
    for key, value in dataclasses.asdict(new).items():
        before = old.get(key)
        if key in ("resume",) or before == value or (isinstance(value, tuple) and list(value) == before):
            continue
        changed.append(key)
        log.info("resume from %s: train.%s %r -> %r (the new value applies)", path.name, key, before, value)
    return changed


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    loader, info: DistInfo, cfg: TrainConfig | None = None, verify: bool = True) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the train_state dict (step, hooks, ...).

    Every file is first checked against the manifest (sizes always; sha256 unless `verify=False`, for a
    checkpoint `latest_good_checkpoint` has just verified); a damaged checkpoint is a CheckpointError.
    Weights, AdamW moments and step counts, the scheduler's step, RNG and loader positions and hook
    states come from the checkpoint. The hyperparameters of `optimizer` and `scheduler` as this run built
    them (from `cfg`) are kept: lr, min_lr, warmup, schedule, decay_frac, steps, weight_decay, betas, eps
    and lr_groups multipliers may change on resume, and every changed field is logged.
    """
    path = Path(path)
    try:
        manifest = verify_checkpoint(path, hashes=verify)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume from {path}: {e} Resume from another checkpoint "
                              "(train.resume=true takes the newest undamaged one in train.out_dir).") from None
    state = load_plain(path / "train_state.pt")
    state["optimizer"] = _without_stateless_frozen(state["optimizer"], optimizer)
    _check_layout(path, state["optimizer"]["param_groups"], optimizer)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    load_model_weights(path, model, verify=False)  # checked above
    if is_fsdp(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, _keyed_by_name(state["optimizer"]),
                                 options=StateDictOptions(full_state_dict=True))
    else:  # matched by position within the groups, whatever the keys
        optimizer.load_state_dict(state["optimizer"])
    sched_state = dict(state["scheduler"], lr_lambdas=[None] * len(scheduler.lr_lambdas))
    scheduler.load_state_dict(sched_state)
    _apply_new_hyperparameters(optimizer, scheduler, fresh)
    if cfg is not None and info.is_main:
        log_config_changes(path, _saved_train_config(path, state), cfg)
    same_world = state["world_size"] == info.world_size
    rank_name = f"rank_{info.rank if same_world else 0}.pt"
    if rank_name not in manifest["files"]:
        raise CheckpointError(f"{path}/{MANIFEST} does not list {rank_name}, written by every rank of the "
                              f"{state['world_size']}-rank run; the checkpoint is incomplete.")
    rank_state = load_plain(path / rank_name)
    if "hooks" in rank_state:  # this rank's own hook state (checkpoints before 2026-12-04: rank 0's, in train_state)
        state["hooks"] = rank_state["hooks"]
        if not same_world:  # rank-local hook state (DND's scores): rank 0 takes every saved rank's, the others none,
            # so that the ranks pool it once (every rank took rank 0's: twice from 1 rank to 2; 2 to 1 lost rank 1's)
            saved = range(state["world_size"]) if info.is_main else []
            state["hooks_of_ranks"] = [load_plain(path / f"rank_{r}.pt")["hooks"] if r else rank_state["hooks"]
                                       for r in saved]
    if loader is not None and rank_state["loader"] is not None:
        loader.load_state_dict(rank_state["loader"])
    if same_world:
        set_rng_state(rank_state["rng"])
    elif info.is_main:
        log.warning("%s was written by %d rank(s), resuming with %d: weights and optimizer state are full, the "
                    "loader continues from the same global position, RNG streams restart from the seed.",
                    path, state["world_size"], info.world_size)
    return state


def set_aside_newer(out_dir: str | Path, step: int, info: DistInfo) -> list[Path]:
    """Move checkpoints past `step` (left by the run a resume abandons) to `out_dir/abandoned_N/`, so a
    later `resume=true` cannot pick them up. Rank 0 moves; collective under DDP/FSDP."""
    # every rank has verified (resume=true: the newest ones first, a damaged one among these) and loaded its
    # checkpoint before rank 0 moves any: a folder moved while another rank hashed it was a FileNotFoundError there
    info.barrier()
    newer = [p for p in list_checkpoints(out_dir) if int(_STEP_DIR.match(p.name).group(1)) > step]
    moved = []
    if info.is_main and newer:
        n = 0
        while (Path(out_dir) / f"abandoned_{n}").exists():
            n += 1
        dest = Path(out_dir) / f"abandoned_{n}"
        dest.mkdir()
        for p in newer:
            moved.append(Path(shutil.move(str(p), str(dest / p.name))))
        log.warning("resuming at step %d: moved %d newer checkpoint(s) of the abandoned run (%s) to %s",
                    step, len(newer), ", ".join(p.name for p in newer), dest)
    info.barrier()
    return moved
