"""The training loop: `train(model, loader, cfg, hooks, eval_loader) -> TrainResult`.

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences per rank. The loss of a
micro-batch is `lm_loss + out.aux_loss + sum(hook aux losses)`, divided by `grad_accum`. Under DDP/FSDP
gradients are averaged over ranks, so the global batch is `batch_size * grad_accum * world_size` and
every rank's mean loss has equal weight (exact when ranks count the same number of labelled tokens).

Resume: `cfg.resume` restores model, optimizer, scheduler, RNG, loader and hook states from the latest
(or the named) checkpoint and continues at the next step, so a killed run follows the same loss curve.
Optimizer hyperparameters (per-group lr multipliers, weight decay) come back from the checkpoint too.
A fresh run refuses an out_dir that already holds checkpoints.

Batches: `input_ids`, `labels` (-100 = ignore) and optional `positions` and `doc_ids` (intra-document
attention masking) are used. Under torchrun the process group is left initialized for the
caller to destroy.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dyndepth.runconfig import RunConfig, TrainConfig, save_run_config
from dyndepth.train import checkpoint as ckpt
from dyndepth.train import parallel
from dyndepth.train.hooks import (
    check_hooks,
    hooks_after_step,
    hooks_aux_loss,
    hooks_load_state_dict,
    hooks_state_dict,
)
from dyndepth.train.loss import lm_loss
from dyndepth.train.metrics import MetricsLogger, flops_per_token, peak_flops, perplexity, plot_loss
from dyndepth.train.optim import apply_freeze, build_optimizer, build_scheduler

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int  # the last completed step
    losses: list[tuple[int, float]] = field(default_factory=list)  # logged (step, train loss)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    out_dir: Path | None = None
    last_checkpoint: Path | None = None


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_backward(model: nn.Module, raw: nn.Module, batches: list[dict], hooks, cfg: TrainConfig,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Accumulate gradients of the mean micro-batch loss over `batches`; returns detached mean stats."""
    n = len(batches)
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        batch = _to_device(batch, device)
        with parallel.grad_sync(model, sync=i == n - 1), _autocast(cfg, device):
            out = model(batch["input_ids"], positions=batch.get("positions"), doc_ids=batch.get("doc_ids"))
            loss = lm_loss(out.logits, batch["labels"])
            total = loss + out.aux_loss
            hook_loss, stats = hooks_aux_loss(hooks, raw, batch, out)
            if hook_loss is not None:
                total = total + hook_loss
        (total / n).backward()
        stats = {"loss": loss.detach(), "aux_loss": out.aux_loss.detach(), **out.stats, **stats}
        for k, v in stats.items():
            v = torch.as_tensor(v, dtype=torch.float32).to(device) / n
            sums[k] = sums[k] + v if k in sums else v
    return sums


@torch.no_grad()
def evaluate(model: nn.Module, eval_loader, num_batches: int, cfg: TrainConfig, info: parallel.DistInfo) -> float:
    """Token-weighted mean loss over `num_batches` batches (summed over ranks). Restores the loader state
    afterwards, so every evaluation sees the same batches."""
    state = eval_loader.state_dict() if hasattr(eval_loader, "state_dict") else None
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)  # (sum of CE, token count)
    for _ in range(num_batches):
        batch = _to_device(eval_loader.next_batch(), info.device)
        with _autocast(cfg, info.device):
            out = model(batch["input_ids"], positions=batch.get("positions"), doc_ids=batch.get("doc_ids"))
        totals[0] += lm_loss(out.logits, batch["labels"], reduction="sum").double()
        totals[1] += (batch["labels"] != -100).sum()
    info.all_reduce_sum(totals)
    if state is not None:
        eval_loader.load_state_dict(state)
    model.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item()


def _setup(model: nn.Module, cfg: TrainConfig, info: parallel.DistInfo):
    """Move, freeze, checkpoint/compile and wrap the model; build optimizer and scheduler."""
    raw = model.to(info.device)
    raw.train()
    if cfg.freeze:
        frozen = apply_freeze(raw, cfg.freeze)
        log.info("froze %d parameter tensors", len(frozen))
    if cfg.activation_checkpointing:
        parallel.apply_activation_checkpointing(raw)
    if cfg.compile:
        parallel.apply_compile(raw)
    wrapped = parallel.wrap_model(raw, cfg.parallel, info)
    optimizer = build_optimizer(raw, cfg)
    return raw, wrapped, optimizer, build_scheduler(optimizer, cfg)


def _resume_path(cfg: TrainConfig) -> Path | None:
    if cfg.resume is False or cfg.resume == "":
        existing = ckpt.latest_checkpoint(cfg.out_dir)
        if existing is not None:  # a fresh run would mix its checkpoints (and keep_last) with these
            raise ValueError(f"train.out_dir {cfg.out_dir} already holds checkpoints (latest {existing.name}); "
                             "set train.resume=true to continue that run, or choose a new train.out_dir.")
        return None
    if cfg.resume is True:
        return ckpt.latest_checkpoint(cfg.out_dir)  # None: nothing saved yet, start fresh
    return Path(cfg.resume)


def _set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Meter:
    """Throughput and MFU between two logged steps."""

    def __init__(self, cfg: TrainConfig, raw: nn.Module, info: parallel.DistInfo) -> None:
        self.info = info
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.world_size
        self.flops_per_step = flops_per_token(raw, cfg.seq_len) * self.tokens_per_step
        self.peak = peak_flops(info.device, cfg.peak_tflops) * info.world_size
        self.t_last, self.steps = time.perf_counter(), 0

    def record(self, step: int, stats: dict, lr: float, grad_norm: torch.Tensor) -> dict:
        """All-reduced stats plus lr, grad norm, tokens/s and MFU since the previous record."""
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        now = time.perf_counter()
        dt, self.t_last = max(now - self.t_last, 1e-9), now
        reduced = parallel.reduce_stats({k: float(v) for k, v in stats.items()}, self.info)
        record = {"step": step, **reduced, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": step * self.tokens_per_step,
                  "tokens_per_s": self.tokens_per_step * self.steps / dt,
                  "mfu": self.flops_per_step * self.steps / dt / self.peak}
        self.steps = 0
        return record


def _optimizer_step(wrapped, raw, optimizer, scheduler, loader, hooks, cfg: TrainConfig, device):
    """One optimizer step over `grad_accum` micro-batches; returns (stats, base lr used, grad norm)."""
    optimizer.zero_grad(set_to_none=True)
    batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
    stats = forward_backward(wrapped, raw, batches, hooks, cfg, device)
    grad_norm = parallel.clip_grad_norm(wrapped, cfg.clip)
    lr = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_mult", 1.0)
    optimizer.step()
    scheduler.step()
    return stats, lr, grad_norm


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train(model: nn.Module, loader, cfg: TrainConfig, hooks=(), eval_loader=None,
          run_config: RunConfig | None = None) -> TrainResult:
    """Train `model` for `cfg.steps` optimizer steps on batches from `loader.next_batch()`."""
    info = parallel.init_distributed(cfg.parallel, cfg.device)
    hooks = check_hooks(hooks)
    _set_seed(cfg.seed + info.rank)
    raw, wrapped, optimizer, scheduler = _setup(model, cfg, info)
    out_dir, run_config = Path(cfg.out_dir), run_config or RunConfig(train=cfg)
    result = TrainResult(steps=0, out_dir=out_dir)
    resume = _resume_path(cfg)
    if resume is not None:
        state = ckpt.load_checkpoint(resume, wrapped, optimizer, scheduler, loader, info)
        hooks_load_state_dict(hooks, state["hooks"])
        result.steps, result.last_checkpoint = state["step"], resume
        log.info("resumed from %s at step %d", resume, result.steps)
    logger = MetricsLogger(out_dir, cfg, info.is_main, resume_step=result.steps, run_config=run_config.to_dict())
    if info.is_main:
        save_run_config(run_config, out_dir / "config.yaml")
    meter, bar = _Meter(cfg, raw, info), _progress(cfg, info, result.steps)
    for step in range(result.steps + 1, cfg.steps + 1):
        stats, lr, grad_norm = _optimizer_step(wrapped, raw, optimizer, scheduler, loader, hooks, cfg,
                                               info.device)
        stats.update(hooks_after_step(hooks, raw, step, stats, info))
        meter.steps += 1
        if _due(step, cfg.log_every, cfg.steps):
            record = meter.record(step, stats, lr, grad_norm)
            logger.log(record)
            result.losses.append((step, record["loss"]))
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"training loss is {record['loss']} at step {step}; lower train.lr "
                                         "or check the data.")
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                mfu=f"{record['mfu']:.1%}")
        if bar is not None:
            bar.update(1)
        if eval_loader is not None and _due(step, cfg.eval_every, cfg.steps):
            eval_loss = evaluate(wrapped, eval_loader, cfg.eval_batches, cfg, info)
            logger.log({"step": step, "eval_loss": eval_loss, "eval_ppl": perplexity(eval_loss)})
            result.evals.append((step, eval_loss))
        if _due(step, cfg.save_every, cfg.steps):
            result.last_checkpoint = ckpt.save_checkpoint(
                out_dir, step, wrapped, optimizer, scheduler, loader, hooks_state_dict(hooks), info,
                lambda path: save_run_config(run_config, path), cfg.keep_last)
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
