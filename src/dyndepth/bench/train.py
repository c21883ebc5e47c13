"""`dyndepth bench train`: our trainer's step against a minimal plain PyTorch loop, in one run.

Both loops start from identical weights (a deepcopy), see the same random batches in the same order
and use the same optimizer hyperparameters: AdamW (lr, betas, eps; weight decay on matrices only),
gradient clipping at `clip`, a constant learning rate. They run step by step in turn (ours, plain,
ours, ...), so drift in machine load hits both equally.

- ours: what `train()` runs per optimizer step (`optimizer_step`: zero_grad, `forward_backward`,
  `parallel.clip_grad_norm`, AdamW from `build_optimizer`, the LambdaLR from `build_scheduler`), plus
  the hook call; none of train()'s logging, progress bar or checkpoint I/O is timed.
- plain: `model(input_ids).logits -> F.cross_entropy -> backward -> clip_grad_norm_ -> AdamW.step`.
- control: the plain loop's step timed a second time in each round, as a third contender (that loop takes two
  steps a round; the losses compared are each loop's first steps, on the same batches): the noise of the ratio.

With `compile=True` both loops compile each decoder layer the way the trainer does, so the ratio
measures the trainer's overhead, not a compile strategy. MFU uses the trainer's `flops_per_token`
(6 x trainable matmul parameters + 12 L N H T attention, i.e. non-causal attention, as the training logs
report; every parameter trains here).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import dyndepth
from dyndepth.bench.timing import CONTROL, interleaved_median, machine_description, markdown_table, publish
from dyndepth.runconfig import DTYPES, TrainConfig
from dyndepth.train import parallel
from dyndepth.train.hooks import hooks_after_step
from dyndepth.train.metrics import flops_per_token, peak_flops
from dyndepth.train.trainer import optimizer_step, setup_model


@dataclass
class TrainBenchConfig:
    model: str = "demo-tiny"  # a preset name (random weights)
    batch_size: int = 8
    seq_len: int = 256
    steps: int = 20  # timed optimizer steps per loop
    warmup_steps: int = 3  # untimed steps per loop first (compile, allocator, optimizer state)
    dtype: str = "float32"  # float32 | bfloat16 (autocast, as the trainer does)
    device: str = "cpu"  # cpu | cuda | auto
    compile: bool = False  # compile each decoder layer (the trainer's per-layer compile), both loops
    out_dir: str = "runs/bench"

    def __post_init__(self) -> None:
        if self.model not in dyndepth.PRESETS:
            raise ValueError(f"bench train model {self.model!r} is not a preset; use one of "
                             f"{sorted(dyndepth.PRESETS)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"bench train dtype {self.dtype!r} is not one of {DTYPES}.")
        for name in ("batch_size", "seq_len", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench train {name} must be >= 1, got {getattr(self, name)}.")
        if self.warmup_steps < 0:
            raise ValueError(f"bench train warmup_steps must be >= 0, got {self.warmup_steps}.")


@dataclass
class Loop:
    """One training loop under test: `step()` takes one optimizer step on the next batch."""

    step: Callable[[], None]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    losses: list[torch.Tensor] = field(default_factory=list)  # detached loss of each step taken


class _CycleLoader:
    """`next_batch()` over a fixed list of batches (already on the device), in order, wrapping around."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.cursor = batches, 0

    def next_batch(self) -> dict:
        batch = self.batches[self.cursor % len(self.batches)]
        self.cursor += 1
        return batch


def train_config(cfg: TrainBenchConfig) -> TrainConfig:
    """The trainer settings both loops share: default AdamW hyperparameters and clip, constant LR."""
    return TrainConfig(steps=cfg.warmup_steps + cfg.steps + 1, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                       schedule="constant", warmup=0, dtype=cfg.dtype, compile=cfg.compile, device=cfg.device,
                       progress=False, plot=False)


def random_batches(vocab_size: int, cfg: TrainBenchConfig, n: int, device: torch.device) -> list[dict]:
    """`n` batches of uniform random tokens; labels are the inputs shifted by one."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        rows = torch.randint(0, vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=g)  # (B, T+1)
        batches.append({"input_ids": rows[:, :-1].contiguous().to(device),  # (B, T)
                        "labels": rows[:, 1:].contiguous().to(device)})  # (B, T)
    return batches


def ours_loop(model: nn.Module, batches: list[dict], tcfg: TrainConfig, device: torch.device,
              hooks: list | None = None) -> Loop:
    """The trainer's per-step code path (as `train()` calls it, with `hooks`), without its logging and I/O."""
    info = parallel.DistInfo(device=device)
    raw, wrapped, optimizer, scheduler = setup_model(model, tcfg, info)
    loader, hooks, losses = _CycleLoader(batches), list(hooks or []), []

    def step() -> None:
        stats, _, _ = optimizer_step(wrapped, raw, optimizer, scheduler, loader, hooks, tcfg, info)
        stats.update(hooks_after_step(hooks, raw, len(losses) + 1, stats, info))
        losses.append(stats["loss"])

    return Loop(step, raw, optimizer, losses)


def plain_loop(model: nn.Module, batches: list[dict], tcfg: TrainConfig, device: torch.device) -> Loop:
    """A minimal PyTorch loop with the same hyperparameters: decay on matrices only, clip, AdamW."""
    model = model.to(device).train()
    if tcfg.compile:
        parallel.apply_compile(model)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps, fused=True if device.type == "cuda" else None)
    loader = _CycleLoader(batches)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if tcfg.dtype == "bfloat16" \
        else nullcontext
    losses = []

    def step() -> None:
        batch = loader.next_batch()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = model(batch["input_ids"])
            logits = out.logits.float()  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), batch["labels"].view(-1))
            total = loss + out.aux_loss  # the MoE balancing loss; zero for dense models
        total.backward()
        if tcfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip)
        optimizer.step()
        losses.append(loss.detach())

    return Loop(step, model, optimizer, losses)


def build_loops(cfg: TrainBenchConfig, device: torch.device) -> tuple[Loop, Loop]:
    """(ours, plain) on the same initial weights and the same batches."""
    torch.manual_seed(0)
    model = dyndepth.build_model(dyndepth.preset(cfg.model))  # any family (Dreamer, Huginn, MoEUT, ...)
    plain_model = copy.deepcopy(model)
    tcfg = train_config(cfg)
    batches = random_batches(model.config.vocab_size, cfg, cfg.warmup_steps + cfg.steps + 1, device)
    return ours_loop(model, batches, tcfg, device), plain_loop(plain_model, batches, tcfg, device)


def _state_bytes(loop: Loop) -> int:
    """CUDA bytes a loop holds between steps: parameters, gradients and optimizer state."""
    tensors = list(loop.model.parameters()) + [p.grad for p in loop.model.parameters() if p.grad is not None]
    tensors += [v for s in loop.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)


def _peak_memory(loops: dict[str, Loop], device: torch.device) -> dict[str, int] | None:
    """CUDA peak bytes of one more step of each loop, less what the other loop holds (None on CPU)."""
    if device.type != "cuda":
        return None
    peaks = {}
    for name, loop in loops.items():
        others = sum(_state_bytes(other) for n, other in loops.items() if n != name)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        loop.step()
        torch.cuda.synchronize(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) - others
    return peaks


def _process_peak_rss() -> int | None:
    try:
        import resource
    except ImportError:  # not on Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def run_train_bench(cfg: TrainBenchConfig) -> dict:
    device = parallel.resolve_device(cfg.device)
    ours, plain = build_loops(cfg, device)
    loops = {"ours": ours, "plain": plain}
    fns = {k: v.step for k, v in loops.items()}
    fns[CONTROL] = plain.step  # the plain step once more: how far two identical contenders read apart
    times = interleaved_median(fns, device, repeats=cfg.steps, warmup=cfg.warmup_steps)
    control = times.pop(CONTROL)
    n_steps = cfg.warmup_steps + cfg.steps
    losses = {k: [float(x) for x in v.losses[:n_steps]] for k, v in loops.items()}
    memory = _peak_memory(loops, device)

    tokens = cfg.batch_size * cfg.seq_len
    fpt = flops_per_token(ours.model, cfg.seq_len)
    peak = peak_flops(device, None)
    tps = {k: tokens / t for k, t in times.items()}
    return {
        "config": asdict(cfg),
        "device": device.type,
        "machine": machine_description(device),
        "model_params": ours.model.num_params(),
        "step_seconds": times,
        "tokens_per_s": tps,
        "ratio_ours_over_plain": tps["ours"] / tps["plain"],
        "control": times["plain"] / control,  # 1 +- this run's timing noise
        "flops_per_token": fpt,
        "flops_per_token_source": "train.metrics.flops_per_token (6 x trainable matmul params + 12 L N H T)",
        "flops_per_token_causal": 3 * ours.model.forward_flops(cfg.seq_len) / cfg.seq_len,  # the family's own count
        "peak_flops": peak,
        "mfu": {k: v * fpt / peak for k, v in tps.items()},
        "peak_memory_bytes": memory,
        "process_peak_rss_bytes": _process_peak_rss() if memory is None else None,
        "steps_taken": n_steps,
        "final_loss": {k: v[-1] for k, v in losses.items()},
        "max_loss_abs_diff": max(abs(a - b) for a, b in zip(losses["ours"], losses["plain"])),
        "losses": losses,
    }


def render_markdown(r: dict) -> str:
    c, tps, mfu, loss = r["config"], r["tokens_per_s"], r["mfu"], r["final_loss"]
    rows = [
        {"metric": f"train tok/s (B={c['batch_size']}, T={c['seq_len']})", "ours": tps["ours"],
         "plain": tps["plain"], "ratio": r["ratio_ours_over_plain"], "control": r["control"]},
        {"metric": "MFU", "ours": f"{mfu['ours']:.2%}", "plain": f"{mfu['plain']:.2%}", "ratio": ""},
    ]
    mem = r["peak_memory_bytes"]
    if mem is not None:
        rows.append({"metric": "peak CUDA memory (MiB)", "ours": mem["ours"] / 2**20,
                     "plain": mem["plain"] / 2**20, "ratio": mem["ours"] / mem["plain"]})
    # the loss step n computed (before its update: n - 1 updates in), each loop's n-th step on the same batch
    rows.append({"metric": f"loss of step {r['steps_taken']}", "ours": f"{loss['ours']:.5f}",
                 "plain": f"{loss['plain']:.5f}", "ratio": f"max diff {r['max_loss_abs_diff']:.1e}"})
    head = (f"### bench train: {c['model']} ({r['model_params'] / 1e6:.1f}M params), {c['dtype']}, "
            f"{r['machine']}{', compiled' if c['compile'] else ''}\n\n")
    peak_note = " (a nominal CPU figure)" if r["device"] == "cpu" else ""
    tail = (f"\n\nratio = ours / plain tokens/s (median of {c['steps']} interleaved steps after "
            f"{c['warmup_steps']} warm-up); control = the plain step's time / that of the plain loop's step timed "
            "again as a third contender (its distance from 1 is this run's timing noise). "
            f"MFU: {r['flops_per_token']:,.0f} FLOPs/token from "
            f"{r['flops_per_token_source']} over a peak of {r['peak_flops'] / 1e12:g} TFLOP/s{peak_note}.")
    if r["process_peak_rss_bytes"] is not None:
        tail += f" Process peak RSS (both loops): {r['process_peak_rss_bytes'] / 2**20:,.0f} MiB."
    else:
        tail += " Peak memory: one step's CUDA peak less the other loop's parameters, gradients and AdamW state."
    return head + markdown_table(rows, ["metric", "ours", "plain", "ratio", "control"]) + tail


def main(cfg: TrainBenchConfig) -> dict:
    result = run_train_bench(cfg)
    name = f"train-{parallel.resolve_device(cfg.device).type}-{cfg.dtype}" + ("-compiled" if cfg.compile else "")
    return publish(result, render_markdown(result), cfg.out_dir, name)
