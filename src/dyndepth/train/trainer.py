"""The training loop: `train(model, loader, cfg, hooks, eval_loader) -> TrainResult`.

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences per rank, so the global batch
is `batch_size * grad_accum * world_size` sequences. The LM loss of a step is token-weighted over all of
them: the sum of token losses over every micro-batch and rank, divided once by the number of labelled
tokens (labels != -100) over every micro-batch and rank. That count is all-reduced before the first
backward; each micro-batch then back-propagates `sum of its token losses / global count * world_size`
(DDP and FSDP2 average gradients over ranks). So the gradient equals that of one process on the whole
global batch, whatever the accumulation and the world size, and a micro-batch without labelled tokens
weighs 0. Auxiliary losses (the model's `out.aux_loss`, e.g. MoE balancing, and hook losses) are
per-micro-batch means, divided by `grad_accum` (and averaged over ranks by the gradient averaging).

Precision: trainable weights are fp32 master weights. A model handed over in another dtype (e.g.
`model.dtype="bfloat16"`) is upcast to fp32 in place, with a warning, because AdamW steps applied to
bf16 weights round most small updates away; `train.dtype="bfloat16"` runs forward and backward under
bf16 autocast (and FSDP2 gathers bf16 parameters and reduces fp32 gradients).

Resume: `cfg.resume` restores model, optimizer, scheduler, RNG, loader and hook states from the latest
(or the named) checkpoint and continues at the next step, so a killed run follows the same loss curve.
The new config's schedule and optimizer hyperparameters apply (each change is logged; see
`checkpoint.load_checkpoint`); a changed set or grouping of trained parameters is an error. Checkpoints
newer than the resumed one (from the abandoned run) are moved to `out_dir/abandoned_N/`. A fresh run
refuses an out_dir that already holds checkpoints. `resume=true` takes the newest checkpoint that passes
its manifest check, skipping damaged newer ones with a warning; `.tmp` folders of killed saves are removed.

Non-finite steps: the loss (LM plus auxiliary terms) and the gradient norm are checked once per optimizer
step, after clipping computed the norm (one host sync per step, none per micro-batch; one all-reduce of both
under DDP/FSDP2 so every rank decides alike, and messages quote the step's values, not a rank's share).
`train.nonfinite="stop"` (default) raises a FloatingPointError naming the step before the optimizer steps, so
no update and no checkpoint come from it and the last checkpoint stays the last good one. `"skip"` zeroes the
gradients and leaves weights, AdamW state and hook controllers as they were (no hook's `after_step` runs, but
`after_skipped_step` does, for work scheduled by step number: DND's threshold sync; DND's score buffer, filled by
the forwards, keeps their finite scores; the schedule still advances with the step number), counts the step in
`nonfinite_steps` (logged with every record, kept in checkpoints) and logs a warning.

Batches: `input_ids`, `labels` (-100 = ignore) and optional `attention_mask` (padding), `positions` and `doc_ids`
(intra-document attention masking) are used. Under torchrun the process group is left initialized for the
caller to destroy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dyndepth.runconfig import RunConfig, TrainConfig, run_config_text, save_run_config
from dyndepth.train import checkpoint as ckpt
from dyndepth.train import parallel
from dyndepth.train.hooks import (
    check_hooks,
    hooks_after_step,
    hooks_aux_loss,
    hooks_load_state_dict,
    hooks_state_dict,
)
from dyndepth.train.loss import IGNORE_INDEX, lm_loss
from dyndepth.train.metrics import MetricsLogger, flops_per_token, peak_flops, perplexity, plot_loss, set_aside
from dyndepth.train.optim import apply_freeze, build_optimizer, build_scheduler

log = logging.getLogger(__name__)
EXPORT = "model"  # out_dir/model: the HF-format folder run_training exports the last checkpoint to


@dataclass
class TrainResult:
    steps: int  # the last completed step
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient (train.nonfinite="skip")
    losses: list[tuple[int, float]] = field(default_factory=list)  # logged (step, train loss)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    out_dir: Path | None = None
    last_checkpoint: Path | None = None
    exported: Path | None = None  # last_checkpoint as a HF folder (run_training writes out_dir/model)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_backward(model: nn.Module, raw: nn.Module, batches: list[dict], hooks, cfg: TrainConfig,
                     info: parallel.DistInfo) -> dict[str, torch.Tensor]:
    """Accumulate the gradient of one optimizer step over this rank's `batches`; returns detached stats.

    The LM loss is token-weighted over all micro-batches and ranks (module docstring). `stats["loss"]`
    is this rank's share, scaled so that its mean over ranks is the global token-weighted loss; the other
    stats are means over the micro-batches that report them. `stats["objective"]` is what was back-propagated
    (this rank's LM share plus the auxiliary terms), for the non-finite check.
    """
    n = len(batches)
    batches = [_to_device(b, info.device) for b in batches]
    local = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in batches]).sum()  # labelled tokens
    count = info.all_reduce_sum(local.to(torch.float64).reshape(1))[0]  # over micro-batches and ranks
    per_rank = count.clamp(min=1) / info.world_size  # gradients are averaged over ranks: undo that
    sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), dtype=torch.float32, device=info.device)}
    reported: dict[str, int] = {}  # micro-batches that reported each stat (some report one only sometimes)
    objective = torch.zeros((), dtype=torch.float32, device=info.device)
    for i, batch in enumerate(batches):
        with parallel.grad_sync(model, sync=i == n - 1), _autocast(cfg, info.device):
            out = _forward(model, batch)
            loss = lm_loss(out.logits, batch["labels"], reduction="sum") / per_rank.float()
            aux = out.aux_loss
            hook_loss, stats = hooks_aux_loss(hooks, raw, batch, out)
            if hook_loss is not None:
                aux = aux + hook_loss
        total = loss + aux / n
        total.backward()
        sums["loss"] += loss.detach()
        objective += total.detach().float()
        stats = {"aux_loss": out.aux_loss.detach(), **out.stats, **stats}
        for k, v in stats.items():
            v = torch.as_tensor(v, dtype=torch.float32).to(info.device)
            sums[k], reported[k] = (sums[k] + v, reported[k] + 1) if k in sums else (v, 1)
    for k, m in reported.items():  # the mean over the micro-batches that report it, as reduce_stats over ranks
        sums[k] = sums[k] / m
    sums["trained_tokens"] = count.float()
    sums["objective"] = objective
    return sums


def _forward(model: nn.Module, batch: dict):
    """The model on a loader batch: its padding (`attention_mask`, packing="documents") and document layout
    (`positions`, `doc_ids`, intra_doc_mask) when it has them."""
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), positions=batch.get("positions"),
                 doc_ids=batch.get("doc_ids"))


@torch.no_grad()
def evaluate(model: nn.Module, eval_loader, num_batches: int, cfg: TrainConfig, info: parallel.DistInfo) -> float:
    """Token-weighted mean loss over `num_batches` batches (summed over ranks), at most one pass over the split (more
    served its windows twice, so the loss moved with eval_batches). Restores the loader state afterwards, so every
    evaluation sees the same batches."""
    num_batches = min(num_batches, getattr(eval_loader, "batches_per_epoch", num_batches))
    state = eval_loader.state_dict() if hasattr(eval_loader, "state_dict") else None
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)  # (sum of CE, token count)
    for _ in range(num_batches):
        batch = _to_device(eval_loader.next_batch(), info.device)
        with _autocast(cfg, info.device):
            out = _forward(model, batch)
        totals[0] += lm_loss(out.logits, batch["labels"], reduction="sum").double()
        totals[1] += (batch["labels"] != -100).sum()
    info.all_reduce_sum(totals)
    if state is not None:
        eval_loader.load_state_dict(state)
    model.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item()


def ensure_fp32_master(model: nn.Module, warn: bool = True) -> None:
    """Upcast a model whose parameters are not all float32 (e.g. loaded in bf16) in place, with a warning (`warn`:
    rank 0 only under torchrun, where every rank upcasts its own copy)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not dtypes - {torch.float32}:
        return
    if warn:
        log.warning("model weights are %s; training keeps fp32 master weights, so they are upcast to float32 "
                    "(AdamW steps on bf16 weights round most updates away). Compute precision is train.dtype; "
                    "load the model with model.dtype='float32' to skip this copy.",
                    ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes)))
    model.float()


def setup_model(model: nn.Module, cfg: TrainConfig, info: parallel.DistInfo):
    """Move, upcast to fp32, freeze, checkpoint/compile and wrap the model; build optimizer and scheduler.

    Returns `(raw, wrapped, optimizer, scheduler)`: `raw` is the plain model (parameters updated in place),
    `wrapped` the module to call (the DDP wrapper, or `raw` itself, sharded in place under FSDP2).
    """
    raw = model.to(info.device)
    ensure_fp32_master(raw, warn=info.is_main)
    raw.train()
    if cfg.freeze:
        frozen = apply_freeze(raw, cfg.freeze)
        log.info("froze %d parameter tensors", len(frozen))
    idle = raw.method.untrained_parameters() if getattr(raw, "method", None) is not None else []
    if idle:  # no gradient would reach them (AdamW leaves them as they are), and DDP refuses a parameter without one
        log.info("froze %d parameter tensors no training forward of %s reaches (%s)",
                 len(apply_freeze(raw, idle)), raw.method.name, ", ".join(idle))
    if cfg.compile:  # inside the checkpoint when both are on (see apply_compile)
        parallel.apply_compile(raw, checkpointed=cfg.activation_checkpointing)
    if cfg.activation_checkpointing:
        parallel.apply_activation_checkpointing(raw)
    wrapped = parallel.wrap_model(raw, cfg.parallel, info, cfg.dtype)
    optimizer = build_optimizer(raw, cfg)
    if cfg.warmup > cfg.steps and info.is_main:  # (a recipe's warm-up left in place by --set train.steps=2)
        log.warning("train.warmup=%d is longer than the run (train.steps=%d): the learning rate only rises to %.3g x "
                    "train.lr; lower train.warmup.", cfg.warmup, cfg.steps, cfg.steps / cfg.warmup)
    return raw, wrapped, optimizer, build_scheduler(optimizer, cfg)


def _write_configs(run_config: RunConfig, model: nn.Module, path: Path) -> None:
    """A checkpoint's config.yaml (the run) and, beside it, the model's own config.json contents
    (`ckpt.MODEL_CONFIG`): export builds the model from it, not from a `model.pretrained` folder that may have
    changed or moved since."""
    save_run_config(run_config, path)
    if hasattr(model, "pretrained_config"):
        (path.parent / ckpt.MODEL_CONFIG).write_text(json.dumps(model.pretrained_config(), indent=2) + "\n")
    if getattr(model, "generation_config", None):  # a pretrained base's stop ids (Llama 3's <|eot_id|> is there)
        (path.parent / ckpt.GENERATION_CONFIG).write_text(json.dumps(model.generation_config, indent=2) + "\n")


def _save_config(run_config: RunConfig, path: Path, resumed: bool) -> None:
    """The run's config.yaml; a fresh run into a folder holding another run's config sets that one aside
    (config.abandoned_N.yaml, as its metrics), so what the earlier run was is not lost."""
    if not resumed and path.is_file() and path.read_text() != run_config_text(run_config):
        log.warning("%s: the config of the run this one replaces moved to %s", path, set_aside(path).name)
    save_run_config(run_config, path)


def _as_saved(run_config: RunConfig) -> RunConfig:
    """The run config written beside the checkpoints: train.resume says how this invocation started, not what the run
    is (a saved `train.resume=<step_2>` made `dyndepth train step_6/config.yaml` resume step 2 again and move steps 4
    and 6 aside); continuing a saved config takes --resume, as for a recipe."""
    return dataclasses.replace(run_config, train=dataclasses.replace(run_config.train, resume=False))


def _resume_path(cfg: TrainConfig, info: parallel.DistInfo) -> Path | None:
    if cfg.resume is False or cfg.resume == "":
        existing = ckpt.latest_checkpoint(cfg.out_dir)
        if existing is not None:  # a fresh run would mix its checkpoints (and keep_last) with these
            raise ValueError(f"train.out_dir {cfg.out_dir} already holds checkpoints (latest {existing.name}); "
                             "set train.resume=true to continue that run, or choose a new train.out_dir.")
        return None
    if cfg.resume is True:  # the newest undamaged one; None: nothing saved yet, start fresh
        found = ckpt.latest_good_checkpoint(cfg.out_dir, warn=info.is_main)
        if found is None and info.is_main:
            log.warning("train.resume=true, but %s holds no checkpoint: starting a new run there.",
                        Path(cfg.out_dir).resolve())
        return found
    path, existing = Path(cfg.resume), ckpt.latest_checkpoint(cfg.out_dir)
    inside = Path(cfg.out_dir).resolve() in (path.resolve(), *path.resolve().parents)  # (abandoned_N/: its own steps)
    if existing is not None and not inside:
        # another run's checkpoints: keep_last pruned them as this run saved, and its config.yaml was overwritten
        raise ValueError(f"train.resume={cfg.resume} is a checkpoint of another folder, but train.out_dir "
                         f"{cfg.out_dir} already holds checkpoints of its own run (latest {existing.name}), which "
                         "this run would prune and overwrite; choose a new train.out_dir to continue that checkpoint "
                         "in, or set train.resume=true to continue the run in train.out_dir.")
    return path


def _resume(path: Path, wrapped, optimizer, scheduler, loader, hooks, cfg: TrainConfig,
            info: parallel.DistInfo) -> dict:
    """Restore a checkpoint, set newer ones of the abandoned run aside; returns its train state."""
    verified = cfg.resume is True  # latest_good_checkpoint has just hashed every file
    state = ckpt.load_checkpoint(path, wrapped, optimizer, scheduler, loader, info, cfg, verify=not verified)
    hooks_load_state_dict(hooks, state["hooks"], state.get("hooks_of_ranks"), warn=info.is_main)
    log.info("resumed from %s at step %d", path, state["step"])
    ckpt.set_aside_newer(cfg.out_dir, state["step"], info)
    if state["step"] >= cfg.steps and info.is_main:  # (once, not once per rank)
        log.warning("the checkpoint is at step %d and train.steps=%d: nothing left to train; raise "
                    "train.steps to continue.", state["step"], cfg.steps)
    return state


def _set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Meter:
    """Throughput and MFU of the training steps between two logged steps (eval and checkpoint time,
    spent inside `paused()`, is left out), and the run's token count (`tokens`: earlier steps at their own layout,
    from the checkpoint's `tokens`; None: a fresh run, or a checkpoint without it: every step at this one)."""

    def __init__(self, cfg: TrainConfig, raw: nn.Module, info: parallel.DistInfo, start_step: int = 0,
                 tokens: int | None = None) -> None:
        self.info = info
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.world_size
        self.tokens = start_step * self.tokens_per_step if tokens is None else tokens
        self.flops_per_step = flops_per_token(raw, cfg.seq_len) * self.tokens_per_step
        self.peak = peak_flops(info.device, cfg.peak_tflops) * info.world_size
        self.t_last, self.steps, self.excluded = time.perf_counter(), 0, 0.0

    @contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def record(self, step: int, stats: dict, lr: float, grad_norm: torch.Tensor) -> dict:
        """All-reduced stats plus lr, grad norm, tokens/s and MFU since the previous record."""
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        now = time.perf_counter()
        dt = max(now - self.t_last - self.excluded, 1e-9)
        self.t_last, self.excluded = now, 0.0
        scalars = {k: float(v) for k, v in stats.items() if torch.as_tensor(v).numel() == 1}  # vectors: hooks only
        reduced = parallel.reduce_stats(scalars, self.info)
        record = {"step": step, **reduced, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": self.tokens,
                  "tokens_per_s": self.tokens_per_step * self.steps / dt,
                  "mfu": self.flops_per_step * self.steps / dt / self.peak}
        self.steps = 0
        return record


def _all_finite(objective: torch.Tensor, grad_norm: torch.Tensor, info: parallel.DistInfo) -> tuple[bool, float]:
    """Whether the objective and grad norm are finite on every rank, and the step's objective: the mean of the ranks'
    (their LM shares average to the step's loss), non-finite when any rank's is, so a message quotes what the step
    had, not rank 0's share of it (one host sync; one all-reduce if distributed)."""
    both = torch.stack([objective.float(), grad_norm.float().to(objective.device)])  # (2,)
    info.all_reduce_mean(both)  # (in place) a NaN on any rank reaches every rank's mean
    objective, norm = both.tolist()
    return math.isfinite(objective) and math.isfinite(norm), objective


def _schedule_lr(optimizer) -> float:
    """The schedule's LR: a group's lr over its lr_groups multiplier (a group at multiplier 0 says nothing)."""
    return next((g["lr"] / g["lr_mult"] for g in optimizer.param_groups if g.get("lr_mult", 1.0) > 0), 0.0)


def optimizer_step(wrapped, raw, optimizer, scheduler, loader, hooks, cfg: TrainConfig, info: parallel.DistInfo):
    """One optimizer step over `grad_accum` micro-batches; returns (stats, base lr used, grad norm).

    A non-finite objective or grad norm (module docstring) raises a FloatingPointError before the optimizer
    steps (`cfg.nonfinite="stop"`), or zeroes the gradients, skips the optimizer step and sets
    `stats["nonfinite"]` to the objective (`"skip"`)."""
    optimizer.zero_grad(set_to_none=True)
    batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
    stats = forward_backward(wrapped, raw, batches, hooks, cfg, info)
    objective = stats.pop("objective")
    grad_norm = parallel.clip_grad_norm(wrapped, cfg.clip)
    lr = _schedule_lr(optimizer)
    finite, objective = _all_finite(objective, grad_norm, info)
    if finite:
        optimizer.step()
    elif cfg.nonfinite == "stop":
        raise FloatingPointError(
            f"step {scheduler.last_epoch + 1}: the loss is {objective:.6g} and the gradient norm "
            f"{float(grad_norm):.6g}; the step was not applied and no checkpoint is written from it. Lower "
            "train.lr or check the data, or set train.nonfinite=skip to skip such steps.")
    else:
        optimizer.zero_grad(set_to_none=True)
        stats["nonfinite"] = objective  # the step's objective (loss + auxiliary losses), for the warning
    scheduler.step()
    return stats, lr, grad_norm


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _check_loader(loader) -> None:
    """Every run saves at least its last step, and a checkpoint holds the loader's position (exact resume)."""
    missing = [name for name in ("next_batch", "state_dict", "load_state_dict") if not hasattr(loader, name)]
    if missing:
        raise ValueError(f"the training loader ({type(loader).__name__}) has no {'(), '.join(missing)}(): checkpoints "
                         "keep its data position so that a resumed run continues the same batches; give it "
                         "state_dict() / load_state_dict() (as dyndepth.data.loader.PackedLoader has).")


def train(model: nn.Module, loader, cfg: TrainConfig, hooks=(), eval_loader=None,
          run_config: RunConfig | None = None) -> TrainResult:
    """Train `model` for `cfg.steps` optimizer steps on batches from `loader.next_batch()` (the loader's
    `state_dict()` / `load_state_dict()` go into checkpoints)."""
    _check_loader(loader)
    info = parallel.init_distributed(cfg.parallel, cfg.device)
    hooks = check_hooks(hooks)
    _set_seed(cfg.seed + info.rank)
    raw, wrapped, optimizer, scheduler = setup_model(model, cfg, info)
    out_dir, run_config = Path(cfg.out_dir), _as_saved(run_config or RunConfig(train=cfg))
    result, tokens = TrainResult(steps=0, out_dir=out_dir), None
    resume = _resume_path(cfg, info)
    if resume is not None:
        state = _resume(resume, wrapped, optimizer, scheduler, loader, hooks, cfg, info)
        result.steps, result.nonfinite_steps, tokens = state["step"], state.get("nonfinite_steps", 0), state.get("tokens")
        result.last_checkpoint = resume
    if info.is_main:
        ckpt.remove_stale_tmp(out_dir)
        held, left = getattr(eval_loader, "batches_per_epoch", None), getattr(eval_loader, "left_out", 0)
        if held is not None and (cfg.eval_batches > held or cfg.eval_batches == held and left):  # (the whole split
            # looks scored; its last windows were silently never)
            tail = (f", and its last {left} window(s) never: they fill no whole batch of {info.world_size} rank(s) x "
                    f"batch_size {eval_loader.batch_size}" if left else "")
            log.warning("train.eval_batches=%d: the validation split holds %d batch(es) per rank; each evaluation "
                        "scores those once%s.", cfg.eval_batches, held, tail)
    logger = MetricsLogger(out_dir, cfg, info.is_main, resume_step=result.steps, run_config=run_config.to_dict())
    if info.is_main:
        _save_config(run_config, out_dir / "config.yaml", resumed=resume is not None)
        base = run_config.model.get("pretrained")  # (this run's own base when it post-trains that export: it stays,
        # or a resume after a kill found no base)
        own_base = base is not None and Path(base).resolve() == (out_dir / EXPORT).resolve()
        if resume is None and (out_dir / EXPORT).is_dir() and not own_base:  # this run's end overwrote it, maybe the
            # last copy of an earlier run's weights (its step folders removed to save space): set aside, as its
            # config and metrics are
            log.warning("%s: the model the run this one replaces exported moved to %s", out_dir / EXPORT,
                        set_aside(out_dir / EXPORT).name)
    meter, bar = _Meter(cfg, raw, info, result.steps, tokens), _progress(cfg, info, result.steps)
    shown: dict[str, str] = {}  # the progress bar's postfix: the last logged step's figures and the last eval
    for step in range(result.steps + 1, cfg.steps + 1):
        try:
            stats, lr, grad_norm = optimizer_step(wrapped, raw, optimizer, scheduler, loader, hooks, cfg, info)
        except FloatingPointError as e:
            last = result.last_checkpoint
            raise FloatingPointError(f"{e} The last checkpoint, {last}, is intact: resume from it with "
                                     "train.resume=true." if last else f"{e} No checkpoint was written yet.") from None
        skipped = "nonfinite" in stats
        nonfinite = stats.pop("nonfinite", None)  # the step's objective, over every rank
        if skipped:
            result.nonfinite_steps += 1
        stats.update(hooks_after_step(hooks, raw, step, stats, info, skipped=skipped))
        meter.steps, meter.tokens = meter.steps + 1, meter.tokens + meter.tokens_per_step
        if _due(step, cfg.log_every, cfg.steps) or skipped:
            record = meter.record(step, stats, lr, grad_norm)
            if cfg.nonfinite == "skip":
                record["nonfinite_steps"] = result.nonfinite_steps
            logger.log(record)
            result.losses.append((step, record["loss"]))
            if bar is not None:
                shown.update(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                             mfu=f"{record['mfu']:.1%}")
                bar.set_postfix(**shown)
        if skipped and info.is_main:  # (every rank skips the same step: the flag is all-reduced; say so once, with
            # the step's loss as logged: this rank's share of it, stats["loss"], is not that under DDP / FSDP2)
            log.warning("step %d: non-finite objective (%.4g: the loss %.4g plus auxiliary losses) or gradient "
                        "norm (%.4g); the step was skipped (train.nonfinite=skip), %d so far", step,
                        nonfinite, record["loss"], float(grad_norm), result.nonfinite_steps)
        if bar is not None:
            bar.update(1)
        with meter.paused():
            if eval_loader is not None and _due(step, cfg.eval_every, cfg.steps):
                eval_loss = evaluate(wrapped, eval_loader, cfg.eval_batches, cfg, info)
                logger.log({"step": step, "eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)})
                result.evals.append((step, eval_loss))
                if bar is not None:  # now: shown at the next log step only, the last step's eval never was
                    shown["eval"] = f"{eval_loss:.4f}"
                    bar.set_postfix(**shown)
                if info.is_main:
                    log.info("step %d: eval loss %.4f (perplexity %.4g)", step, eval_loss, perplexity(eval_loss))
            if _due(step, cfg.save_every, cfg.steps):
                result.last_checkpoint = ckpt.save_checkpoint(
                    out_dir, step, wrapped, optimizer, scheduler, loader, hooks_state_dict(hooks), info,
                    functools.partial(_write_configs, run_config, raw), cfg.keep_last, train_config=cfg,
                    extra_state={"nonfinite_steps": result.nonfinite_steps, "tokens": meter.tokens})
        result.steps = step
    if bar is not None:
        bar.close()
    if info.is_main and cfg.plot:
        plot_loss(logger.records, out_dir / "loss.png")
    logger.close()
    return result


def _progress(cfg: TrainConfig, info: parallel.DistInfo, start: int):
    if not (cfg.progress and info.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
