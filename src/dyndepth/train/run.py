"""`run_training(run_config)`: build model, data and method hooks from a RunConfig, then `train()`.

This is the function `dyndepth train recipe.toml --set train.lr=3e-4` calls; under
`torchrun --nproc_per_node N` every rank calls it and gets its shard of the data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from dyndepth.config import position_limit, position_limit_name
from dyndepth.data.build import DEFAULTS as DATA_DEFAULTS
from dyndepth.data.build import (
    EMBEDDED,
    build_loader,
    build_tokenizer,
    holds_out,
    one_source,
    resolve_data_config,
    source_fingerprint,
)
from dyndepth.runconfig import RunConfig, RunConfigError, load_run_config
from dyndepth.tokenizer import ByteTokenizer, for_vocab, load_tokenizer
from dyndepth.train.metrics import check_logger_packages, set_aside
from dyndepth.train.parallel import init_distributed
from dyndepth.train.trainer import EXPORT, TrainResult, train

log = logging.getLogger(__name__)


def build_model(model_cfg: dict) -> nn.Module:
    """A model from a recipe's `[model]` section: `{"preset": name, **config overrides}`, a table of config
    fields (`type` or `model_type` picks the model family, default "qwen3"), or `{"pretrained":
    path_or_hub_id, "dtype": ...}`. Every family goes through the model registry (models/registry.py)."""
    from dyndepth.models import build_config, preset
    from dyndepth.models import build_model as build

    cfg = dict(model_cfg)
    if "pretrained" in cfg:
        from dyndepth.interop.hf import from_pretrained

        extra = set(cfg) - {"pretrained", "dtype", "output_router_logits"}
        if extra:
            raise RunConfigError(f"model.{min(extra)}: a pretrained model takes only 'pretrained', 'dtype' and "
                                 "'output_router_logits'; its shape comes from the checkpoint's config.json.")
        model = from_pretrained(cfg["pretrained"], dtype=cfg.get("dtype"))  # copy-on-write mmap: trainable
        if "output_router_logits" in cfg:  # train an MoE checkpoint's balancing loss its config.json turns off
            check_router_logits_flag(cfg["output_router_logits"], model.config)
            model.config.output_router_logits = cfg["output_router_logits"]
        return model
    if "type" in cfg:
        cfg["model_type"] = cfg.pop("type")
    if "preset" in cfg:
        config = preset(cfg.pop("preset"), **cfg)
    elif cfg:
        config = build_config(cfg)
    else:
        raise RunConfigError("the [model] section is empty; set model.preset (e.g. 'tiny-qwen3') or model.pretrained.")
    if "output_router_logits" in cfg:  # (a dense model took it without a word)
        check_router_logits_flag(cfg["output_router_logits"], config)
    return build(config)


def check_router_logits_flag(flag, config) -> None:
    """model.output_router_logits: a bool, for a model whose config has experts (a dense one has no balancing
    loss)."""
    if not isinstance(flag, bool) or not getattr(config, "num_experts", 0):
        raise RunConfigError(f"model.output_router_logits={flag!r}: it takes true or false, and only for a model with "
                             "experts (a Qwen3-MoE); it turns the balancing loss on or off.")


def attach_from_config(method_cfg: dict, model: nn.Module):
    """The method a recipe's `[method]` section names, attached to `model` (or, for a checkpoint that already
    carries that method, reconfigured with the section's options); None for no method ("none" or empty). A
    checkpoint's own method trains on, controllers included, under an empty section; naming "none" for it is an
    error (it cannot be removed, and training it without its controllers would freeze them). Unknown option keys
    are an error."""
    from dyndepth.methods import METHOD_NAMES, attach_method, reconfigure_method

    carried = getattr(model, "method", None)
    if getattr(carried, "name", None) not in METHOD_NAMES:  # none, or a family's built-in routing (MoR's)
        carried = None
    if not method_cfg and carried is not None:
        log.info("the checkpoint carries a %s method: training it with its controllers", carried.name)
        return carried
    name = method_cfg.get("name", "none" if carried is None else carried.name)  # options alone: the carried one's
    if name in ("none", "", None):  # --set method.name=none parses to None
        if carried is not None:
            raise RunConfigError(f"method.name=none, but the checkpoint carries a {carried.name} method, which a "
                                 f"recipe cannot remove: set method.name={carried.name!r} (or drop the [method] "
                                 "section) to train it with its controllers, or start from a checkpoint without it.")
        return None
    if name not in METHOD_NAMES:
        raise RunConfigError(f"method.name={name!r} is not one of {sorted(METHOD_NAMES)} (or 'none').")
    options = {k: v for k, v in method_cfg.items() if k != "name"}
    if carried is not None and carried.name == name:
        return reconfigure_method(model, name, options)
    return attach_method(model, name, options)


def build_hooks(method_cfg: dict, model: nn.Module, total_steps: int = 0) -> list:
    """Attach (or reconfigure) the method of `method_cfg` and return its trainer hooks, then the model family's
    own (`model.trainer_hooks(total_steps)`, e.g. Dreamer's expert-bias balancing)."""
    method = attach_from_config(method_cfg, model)
    return ([] if method is None else method.trainer_hooks(total_steps)) + model.trainer_hooks(total_steps)


def run_training(run_config: RunConfig | str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                 loader=None, eval_loader=None, hooks=None) -> TrainResult:
    """Build everything from `run_config` (a RunConfig or a recipe path + overrides) and train.

    `loader`, `eval_loader` and `hooks` replace what the config would build (tests, notebooks); the recipe's method
    is attached either way, and given `hooks` replace its controllers (and the family's own hooks). Under
    torchrun the process group is joined first, so that rank 0 alone tokenizes user data into the shard
    cache while the other ranks wait for it.
    """
    if not isinstance(run_config, RunConfig):
        run_config = load_run_config(run_config, overrides)
    run_config = pretrained_tokenizer(absolute_paths(run_config))  # the saved config.yaml works from any directory
    cfg = run_config.train
    check_out_dir(cfg.out_dir)
    data = resolve_data_config(run_config.data)
    if one_source(data["source"]) not in EMBEDDED:  # user data is tokenized into shards there
        check_out_dir(data["cache_dir"], "data.cache_dir", "the token shards", read_only_ok=True)
    check_logger_packages(cfg)
    check_resume_matches(run_config)
    info = init_distributed(cfg.parallel, cfg.device)
    if not info.is_main:  # rank-0 logging: other ranks report only warnings and errors
        logging.getLogger("dyndepth").setLevel(logging.WARNING)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(run_config.model)
    max_positions = position_limit(model.config) if hasattr(model.config, "max_position_embeddings") else None
    if max_positions is not None and cfg.seq_len > max_positions:  # (the first forward said so, after the data)
        raise RunConfigError(f"train.seq_len={cfg.seq_len} is longer than the model's "
                             f"{position_limit_name(model.config)}; lower train.seq_len, or use a model configured "
                             "for longer inputs (model.max_position_embeddings).")
    built = build_hooks(run_config.method, model, cfg.steps)  # attaches the method (it trained plain before)
    hooks = built if hooks is None else hooks
    data_kw = {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed, "rank": info.rank,
               "world_size": info.world_size, "barrier": info.barrier}
    tokenizer = None
    if loader is None or (eval_loader is None and run_config.eval.get("enabled", True)):
        tokenizer = build_tokenizer(run_config.data, rank=info.rank, barrier=info.barrier)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise RunConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                                 f"{model.config.vocab_size}; use a model with vocab_size >= {tokenizer.vocab_size} "
                                 f"(e.g. model = \"demo-tiny\" for the byte tokenizer, or --set "
                                 f"model.vocab_size={tokenizer.vocab_size}).")
        _default_stops(model, tokenizer)  # now, not at export: GateSkip never skips the EOS it names (packed
        # documents' separators), and a model trained from scratch names no other
        if loader is None:  # a run that does not evaluate holds nothing out
            loader = build_loader(run_config.data, split="train", tokenizer=tokenizer,
                                  hold_out=run_config.eval.get("enabled", True), **data_kw)
            if info.is_main:
                log_epochs(loader, cfg)
        if eval_loader is None and run_config.eval.get("enabled", True):
            eval_loader = build_loader(run_config.data, split="val", tokenizer=tokenizer, **data_kw)
            if holds_out(run_config.data) and info.is_main:  # (a warning: once, not once per rank)
                check_held_out_share(loader, eval_loader)
    result = train(model, loader, cfg, hooks=hooks, eval_loader=eval_loader, run_config=run_config)
    if info.is_main and result.last_checkpoint is not None:  # a HF-format model beside the checkpoints
        export, base = Path(cfg.out_dir) / EXPORT, run_config.model.get("pretrained")
        if base is not None and export.is_dir() and Path(base).resolve() == export.resolve():  # the run post-trained
            # out_dir/model itself, kept in place for a resume: the export would overwrite that base's files
            if tokenizer is None:  # (a given loader): read now, the export would read data.tokenizer, this folder,
                tokenizer = _run_tokenizer(run_config, result.last_checkpoint)[0]  # once moved: none was exported
            log.warning("%s, the model.pretrained this run started from, moved to %s: the export replaces it", export,
                        set_aside(export, label="base").name)
        result.exported = export_checkpoint(result.last_checkpoint, export, tokenizer)
    return result


HELD_OUT_WARNING = 0.2  # a held-out share of the training source above this is warned about (one document: <= 0.2)


def log_epochs(loader, cfg) -> None:
    """Say how many times the run reads its training data: past its end the loader starts another epoch without a
    word, so 200 steps on a small slice trained on it dozens of times where the user meant one pass."""
    per_epoch = getattr(loader, "batches_per_epoch", None)
    if not per_epoch:  # (a loader of another kind)
        return
    epochs = cfg.steps * cfg.grad_accum / per_epoch
    log.info("the training data fills %d batches per rank; train.steps=%d x train.grad_accum=%d reads it %.3g times "
             "(epochs)", per_epoch, cfg.steps, cfg.grad_accum, epochs)


def check_held_out_share(loader, eval_loader) -> None:
    """Log what the validation split took from the training source (documents 0, 100, 200, ...), and warn when it
    is more than a fifth of its tokens: with text_split="file" a document is a whole file, so a source of a few
    files (or a list of them) gave one whole file, maybe most of the data, to validation alone."""
    shards = [getattr(getattr(x, "shards", None), "num_tokens", None) for x in (loader, eval_loader)]
    if None in shards:  # (a loader of another kind)
        return
    share = shards[1] / max(1, sum(shards))
    log.info("the validation split holds %d of data.source's %d tokens (%.1f%%)", shards[1], sum(shards), 100 * share)
    if share > HELD_OUT_WARNING:
        log.warning("the validation split took %.0f%% of data.source's tokens (documents 0, 100, 200, ... are held "
                    "out, and with data.text_split='file' a document is a whole file): set data.val_source to the "
                    "text to validate on, or data.text_split='paragraph' (or 'eot', 'line') for smaller documents.",
                    100 * share)


def pretrained_tokenizer(run_config: RunConfig) -> RunConfig:
    """A post-training run reads its data with its checkpoint's own tokenizer: a local model.pretrained folder that
    holds one is data.tokenizer when the recipe sets none (the default, "byte", fed GPT-2 text as bytes to a BPE
    model and exported the byte tokenizer beside it); a different one set in the recipe is an error."""
    folder, own = _pretrained_folder_tokenizer(run_config)
    if own is None:
        return run_config
    given = run_config.data.get("tokenizer")
    if given is None:
        return dataclasses.replace(run_config, data={**run_config.data, "tokenizer": folder})
    try:
        named = None if str(given).startswith("bpe:") else load_tokenizer(given)
    except FileNotFoundError:  # a recipe's own tokenizer path (dnd_posttrain's checkpoints/Qwen3-1.7B), kept when
        # the user replaced only the model: the error named neither the key nor the fix
        # (a folder that exists but holds no tokenizer raises this too: "does not exist" sent the user to the path)
        what = "holds no tokenizer" if Path(given).exists() else "does not exist"
        raise RunConfigError(f"data.tokenizer={given!r} {what}; model.pretrained ({folder}) carries its own "
                             "tokenizer, which reads the data: drop data.tokenizer from the recipe, or --set "
                             f"data.tokenizer={folder}.") from None
    if named is None or not _same_tokenizer(named, own):
        raise RunConfigError(f"data.tokenizer={given!r} is not the tokenizer of model.pretrained ({folder}): the "
                             f"checkpoint was trained on its own ids; remove data.tokenizer (or set it to {folder}).")
    return run_config


def _pretrained_folder_tokenizer(run_config: RunConfig):
    """(model.pretrained, its folder's tokenizer), or (., None) for a hub id (its tokenizer is the user's to name) or
    a folder of weights alone."""
    folder = run_config.model.get("pretrained")
    if not isinstance(folder, str) or not Path(folder).is_dir():
        return folder, None
    try:
        return folder, load_tokenizer(folder)
    except FileNotFoundError:
        return folder, None


def _same_tokenizer_named(old: dict, new: dict) -> bool:
    """Whether two data sections' tokenizers (unset: the default) give the same ids; False when one cannot load."""
    names = [str(d.get("tokenizer", DATA_DEFAULTS["tokenizer"])) for d in (old, new)]
    if any(n.startswith("bpe:") for n in names):
        return False
    try:
        return _same_tokenizer(*(load_tokenizer(n) for n in names))
    except (OSError, ValueError):
        return False


def _same_tokenizer(a, b) -> bool:
    """The same ids for a probe text and the same vocabulary (byte tokenizers: any padding of it)."""
    probe = "Hello, world! 12 + 30 = 42.\n\u00e9t\u00e9"
    padded = isinstance(a, ByteTokenizer) and isinstance(b, ByteTokenizer)
    return a.encode(probe) == b.encode(probe) and (padded or a.vocab_size == b.vocab_size)


def check_own_tokenizer(model, tokenizer, option: str = "--tokenizer ") -> None:
    """A tokenizer named for a model folder may only be the one it carries, as data.tokenizer may for
    model.pretrained: another read the text as ids the model never saw (the byte tokenizer on a GPT-2 BPE model:
    garbage generations, meaningless scores, and calibrate saved it beside the weights in place of the model's own)."""
    if not isinstance(model, (str, Path)) or not isinstance(tokenizer, (str, Path)) or not Path(model).is_dir():
        return  # a hub id or a model object: its tokenizer is the user's to name
    try:
        own = load_tokenizer(model)
    except FileNotFoundError:  # weights alone (make demo's base_model): likewise
        return
    if not _same_tokenizer(load_tokenizer(tokenizer), own):
        raise ValueError(f"{option}{tokenizer} is not the tokenizer of {model}, which carries its own "
                         f"({type(own).__name__}, {own.vocab_size} ids) and was trained on its ids; leave "
                         f"{option.strip(' =')} out.")


def absolute_paths(run_config: RunConfig) -> RunConfig:
    """The run config with its relative local paths made absolute (model.pretrained, data.source / val_source /
    tokenizer when they name a file or folder here, data.cache_dir and train.out_dir always), so a run's saved
    config rebuilds its base, finds its data and resumes (`dyndepth train out/step_N/config.yaml --resume`) from
    wherever the command runs; a leading ~ is the home folder. Hub ids and names such as "embedded" or "byte" stay as
    they are."""
    cache = {"cache_dir": run_config.data.get("cache_dir", DATA_DEFAULTS["cache_dir"])}  # the default's too
    data = {**_absolute(run_config.data, "source", "val_source", "tokenizer"), **_absolute(cache, "cache_dir",
                                                                                           existing=False)}
    resume = run_config.train.resume  # (True / False, or a step folder)
    train = dataclasses.replace(run_config.train, out_dir=str(Path(run_config.train.out_dir).expanduser().resolve()),
                                resume=os.path.expanduser(resume) if isinstance(resume, str) else resume)
    return dataclasses.replace(run_config, model=_absolute(run_config.model, "pretrained"), data=data, train=train)


def _absolute(section: dict, *keys: str, existing: bool = True) -> dict:
    """`section` with the relative paths among `keys` resolved (only those that exist here, with `existing`)."""
    def resolved(value):
        value = one_source(value)
        if isinstance(value, (list, tuple)):  # a list of data sources: each item
            return [resolved(v) for v in value]
        if isinstance(value, str) and value.startswith("~"):  # ~/runs/x: the home folder, not a folder named ~ here
            value = os.path.expanduser(value)
        relative = isinstance(value, str) and value and not Path(value).is_absolute()
        return str(Path(value).resolve()) if relative and (Path(value).exists() or not existing) else value

    return {**section, **{key: resolved(section[key]) for key in keys if key in section}}


FIXED_ON_RESUME = {"model": None, "method": None, "data": ("source", "tokenizer", "tasks", "difficulty", "text_field",
                                                          "chat_template", "intra_doc_mask", "packing", "text_split",
                                                          "bpe_train_bytes", "task_weights", "synthetic_loss",
                                                          "synthetic_examples", "examples_per_doc", "stdlib_bytes")}


def _same_model_config(old: dict, new: dict) -> bool:
    """Whether two `[model]` sections of presets or fields build the same config (a pretrained one: compared as
    written, its shape is the checkpoint's)."""
    from dyndepth.models import build_config, preset

    def config(section: dict):
        cfg = dict(section)
        if "pretrained" in cfg:
            return None
        cfg["model_type"] = cfg.pop("type", cfg.get("model_type"))
        cfg = {k: v for k, v in cfg.items() if v is not None}
        try:
            return preset(cfg.pop("preset"), **cfg) if "preset" in cfg else build_config(cfg)
        except (ValueError, TypeError, KeyError):  # (an invalid section: the field-by-field comparison names it)
            return None

    old_config = config(old)
    return old_config is not None and old_config == config(new)


def _shown(section: dict, key: str) -> str:
    """A recipe value for a message: unset keys take the preset's or the default."""
    return repr(section[key]) if key in section else "unset (the preset's or default value)"


def check_out_dir(out_dir: str | os.PathLike, key: str = "train.out_dir", holds: str = "the checkpoints",
                  read_only_ok: bool = False) -> None:
    """train.out_dir (and data.cache_dir) must be a folder, or a path where one can be made: a file at it, or at one
    of its parents, stopped the run with a FileExistsError / NotADirectoryError traceback once the model (and, for
    out_dir, the data) were built. `read_only_ok`: a folder that exists may be one this user cannot write in (a shard
    cache built once and shared read-only is only read)."""
    path = Path(out_dir)
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise RunConfigError(f"{key}={str(out_dir)!r} cannot be a folder: {blocked} is a file. Set {key} to a new or "
                             f"existing folder for {holds}.")
    # a folder it cannot write in (read-only, another user's) stopped the run with a PermissionError traceback from
    # the metrics logger, after the model and the data (a bpe:N tokenizer trained on them) were built
    nearest = next(p for p in (path, *path.parents) if p.exists())
    if read_only_ok and nearest == path:  # (what it lacks fails as it is built, naming the file)
        return
    try:
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as e:
        raise RunConfigError(f"{key}={str(out_dir)!r}: cannot write in {nearest} ({e.strerror}). Set {key} to a "
                             "folder this user can write in.") from None


def check_resume_matches(run_config: RunConfig) -> None:
    """A resumed run must build the same model, method and data as its checkpoint: otherwise a RunConfigError
    that lists every field that differs (training hyperparameters may change; the trainer logs them)."""
    from dyndepth.train.checkpoint import latest_good_checkpoint
    from dyndepth.train.integrity import CheckpointError

    run_config = absolute_paths(run_config)
    cfg = run_config.train
    if cfg.resume in (False, ""):
        return
    try:  # the checkpoint the trainer will resume from, the newest undamaged one (a damaged config.yaml read here
        # stopped the run with a made-up difference instead of the trainer skipping it): every file's size and the
        # config's sha256 here; the trainer hashes the rest
        ckpt = (latest_good_checkpoint(cfg.out_dir, warn=False, hashes=("config.yaml",)) if cfg.resume is True
                else Path(str(cfg.resume)))
    except CheckpointError:  # none can be resumed: the trainer says so
        return
    if ckpt is None or not (ckpt / "config.yaml").exists():
        return
    saved = absolute_paths(load_run_config(ckpt / "config.yaml"))  # (saved before paths were made absolute)
    diffs = []
    for section, keys in FIXED_ON_RESUME.items():
        old, new = getattr(saved, section), getattr(run_config, section)
        if section == "model" and _same_model_config(old, new):
            continue  # (written otherwise: a field stated at its preset's value was refused as a change)
        default = DATA_DEFAULTS if section == "data" else {}  # (an unset key and its default value are the same)
        for key in sorted(set(old) | set(new)):
            if (keys is None or key in keys) and old.get(key, default.get(key)) != new.get(key, default.get(key)):
                if section == "data" and key == "tokenizer" and _same_tokenizer_named(old, new):
                    continue  # (a run from before post-training read the folder's tokenizer: the same ids)
                diffs.append(f"{section}.{key}: checkpoint {_shown(old, key)}, recipe {_shown(new, key)}")
    diffs += _held_out_diffs(saved, run_config)
    if diffs:
        raise RunConfigError(f"cannot resume from {ckpt}: the recipe no longer matches it ({'; '.join(diffs)}). "
                             "Restore those values, or train into a new train.out_dir.")
    # the training files' content, checked here: the loader checks it too, but only after a bpe:N tokenizer had been
    # trained and the whole source tokenized anew for the changed files (up to an hour of a base recipe's CPU run)
    digest, data = _saved_source_digest(ckpt), resolve_data_config(run_config.data)
    if digest is not None and data["source"] not in EMBEDDED and \
            source_fingerprint(data["source"], data["cache_dir"]) != digest:
        raise RunConfigError(f"cannot resume from {ckpt}: the training data changed since (a file of data.source "
                             f"{data['source']!r} edited, renamed, added or removed). Restore it, or train into a new "
                             "train.out_dir.")


def _held_out_diffs(saved: RunConfig, run_config: RunConfig) -> list[str]:
    """What changes the held-out part of a user source: eval.enabled without data.val_source (the training shards),
    and data.val_source given or dropped (the shards of an evaluating run, and a bpe:N's training text)."""
    if run_config.data.get("source", "embedded") in EMBEDDED:
        return []
    held = [rc.eval.get("enabled", True) for rc in (saved, run_config)]
    given = [bool(rc.data.get("val_source")) for rc in (saved, run_config)]
    holdout = [h and not g for h, g in zip(held, given)]  # the training shards hold a part out
    bpe = str(run_config.data.get("tokenizer", "")).startswith("bpe:")  # its text holds a part out without val_source
    if holdout[0] == holdout[1] and not (bpe and given[0] != given[1]):
        return []
    if given[0] == given[1]:
        return [(f"eval.enabled: checkpoint {held[0]}, recipe {held[1]} (without data.val_source it decides what the "
                 "training split holds out)")]
    return [(f"data.val_source: checkpoint {_shown(saved.data, 'val_source')}, recipe "
             f"{_shown(run_config.data, 'val_source')} (without it a part of data.source is held out of training)")]


def _saved_source_digest(checkpoint: str | os.PathLike) -> str | None:
    """The training source's content hash a step's loader recorded (rank 0's state), or None (no such state, an
    older step, a loader of another kind, a damaged file: the trainer reports that one)."""
    from dyndepth.train.integrity import CheckpointError, load_plain

    file = Path(checkpoint) / "rank_0.pt"
    try:
        loader = load_plain(file).get("loader") if file.is_file() else None
    except (CheckpointError, RuntimeError, OSError, EOFError):
        return None
    return loader.get("source_digest") if isinstance(loader, dict) else None


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, tokenizer=None,
                      plain: bool = False) -> Path:
    """A training checkpoint (single-process, DDP or FSDP2) as a HF checkpoint folder (config.json +
    safetensors, method included unless `plain`: the base model's folder, for transformers), saved in the run's
    `model.dtype` when it names one, with `tokenizer` (the run's, at its end) or the one the run's data section
    names."""
    from dyndepth.interop.hf import model_from_config, save_model
    from dyndepth.train.checkpoint import GENERATION_CONFIG, MODEL_CONFIG, load_model_weights

    rc = load_run_config(Path(checkpoint) / "config.yaml")
    dtype = rc.model.pop("dtype", None)
    saved = Path(checkpoint) / MODEL_CONFIG
    if saved.is_file():  # the model as it trained (a `model.pretrained` folder may have changed or moved since)
        model = model_from_config(json.loads(saved.read_text()), str(saved))
        generation = Path(checkpoint) / GENERATION_CONFIG  # the base's stop ids, which from_pretrained had read
        if generation.is_file():
            model.generation_config = json.loads(generation.read_text())
    else:  # a checkpoint written before the file was
        model = build_model(rc.model)
        attach_from_config(rc.method, model)
    load_model_weights(checkpoint, model)
    missing = None
    if tokenizer is None:
        tokenizer, missing = _run_tokenizer(rc, checkpoint)
    if tokenizer is not None:
        tokenizer = for_vocab(tokenizer, model.config.vocab_size)  # (a padded vocabulary: a widened byte tokenizer)
        _default_stops(model, tokenizer)
    out = save_model(model, out, dtype=getattr(torch, dtype) if dtype else None, plain=plain)
    if tokenizer is not None:
        tokenizer.save(out)
    else:
        log.warning("the exported %s has no tokenizer (%s): pass --tokenizer to generate, --model-args tokenizer=DIR "
                    "to eval, or use the run's out_dir/model, which carries it.", out, missing)
    return out


def _run_tokenizer(rc: RunConfig, checkpoint: str | os.PathLike | None = None):
    """The run's tokenizer for an exported step (the byte tokenizer, a folder, the BPE the run trained, from the
    data cache where the run left it, or, with no data.tokenizer, model.pretrained's own), and None; or None and
    why it cannot be found.

    The BPE's cache folder is keyed by the training data's content: the one the step's loader recorded, not the
    files as they are now (after data.source was edited, and a run on the edited files trained its own BPE, the
    step was exported with that other tokenizer, silently)."""
    from dyndepth.data.build import bpe_folder, resolve_data_config

    own = _pretrained_folder_tokenizer(rc)[1] if "tokenizer" not in rc.data else None
    if own is not None:  # (a run whose config holds no data section: `repro`'s contenders, post-trained from a folder)
        return own, None
    cfg = resolve_data_config(rc.data)
    name = str(cfg["tokenizer"])
    try:
        if name.startswith("bpe:"):
            digest = _saved_source_digest(checkpoint) if checkpoint is not None else None
            return load_tokenizer(str(bpe_folder(cfg, digest)[0])), None
        return load_tokenizer(name), None
    except (OSError, ValueError) as e:
        return None, f"{name}: {e}"


def _default_stops(model, tokenizer) -> None:
    """A model trained from scratch names no EOS: its export stops generation at the tokenizer's EOS (and pads with
    its pad id) through generation_config.json, as transformers' generate reads it; a checkpoint's own stays."""
    if model.config.eos_token_id is not None or getattr(model, "generation_config", None) or \
            tokenizer.eos_token_id is None:
        return
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.generation_config = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
