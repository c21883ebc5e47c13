"""Wall-clock measurement and result files shared by every `dyndepth bench` command.

Benchmarks report ratios measured side by side in one run, never a lone time: each measurement
here alternates the contenders round by round, so drift in machine load hits both equally.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dyndepth import jsonio
from dyndepth.config import position_limit, position_limit_name
from dyndepth.core.accounting import accounting, accounting_off_by_default
from dyndepth.core.cache import KVCache
from dyndepth.devices import DTYPES, cpu_memory_policy, resolve_device
from dyndepth.generation import decode_compile_options, decode_step

CONTROL = "control"  # a second, identical baseline contender: the timing noise, measured in the same run


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                       warmup: int = 2) -> dict[str, float]:
    """Median seconds of each callable, running them in turn after `warmup` rounds, in an order that changes every
    round (a, b, then b, a; more contenders rotate too, see `_turns`)."""
    _check_repeats(repeats, warmup)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in _turns(fns, r):
            sync_device(device)
            t0 = time.perf_counter()
            fn()
            sync_device(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def check_bench_config(cfg, bench: str, positive: tuple[str, ...] = (), positive_lists: tuple[str, ...] = ()) -> None:
    """The checks every bench's options share, as one-line errors: `dtype` one of DTYPES and `device` one that is
    here (when the config has them; "auto" becomes the device it resolves to), each of `positive` >= 1 and each
    list of `positive_lists` non-empty with entries >= 1 (lengths, batch sizes: a negative one failed inside torch)."""
    if hasattr(cfg, "dtype") and cfg.dtype not in DTYPES:
        raise ValueError(f"{bench} dtype {cfg.dtype!r} is not one of {list(DTYPES)}.")
    if hasattr(cfg, "device"):
        device = resolve_device(cfg.device)
        if cfg.device == "auto":  # the device that runs: models moved to "auto" failed in torch
            cfg.device = device.type
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{bench} {name} must be >= 1, got {getattr(cfg, name)}.")
    for name in positive_lists:
        values = getattr(cfg, name)
        if not values or min(values) < 1:
            raise ValueError(f"{bench} {name} must be a non-empty list of values >= 1, got {values}.")


def check_positions(config, bench: str, lengths: dict[str, int]) -> None:
    """Refuse, before anything is timed, a length the model cannot place: each of `lengths` (flag -> tokens) must
    fit `config.max_position_embeddings` (a long prefill length failed only after the shorter ones were timed)."""
    limit = position_limit(config) if hasattr(config, "max_position_embeddings") else None
    over = [f"{name} = {n}" for name, n in lengths.items() if limit is not None and n > limit]
    if over:
        raise ValueError(f"{bench}: {', '.join(over)} exceeds the model's {position_limit_name(config)}; pass "
                         "shorter lengths, or a model configured for longer inputs.")


def _check_repeats(repeats: int, warmup: int = 0) -> None:
    if repeats < 1:  # no median of no timings
        raise ValueError(f"repeats must be >= 1 (timed rounds per contender), got {repeats}; pass --repeats 1 or more.")
    if warmup < 0:  # it ran warmup + repeats rounds and timed them all: fewer timed rounds than repeats
        raise ValueError(f"warmup must be >= 0 (untimed rounds first), got {warmup}.")


@dataclass
class Stepper:
    """One contender of `interleaved_steps`: `start()` (untimed: a prefill) returns the state its steps carry;
    `step(state, i)` (timed) runs step i and returns the next state; `scope()` is entered around both, untimed
    (a method's runtime knobs, or the method detached)."""

    start: Callable[[], Any]
    step: Callable[[Any, int], Any]
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def interleaved_steps(steppers: dict[str, Stepper], steps: int, device: torch.device, rounds: int = 3,
                      warmup: int = 1) -> dict[str, float]:
    """Median seconds per step. Each round starts every contender, then times their steps in turn (a0, b0, b1,
    a1, a2, b2, ...: the order changes every step, see `_turns`), so the contenders' steps are measured
    milliseconds apart: load drift that moves a whole decode run by 10% on a shared CPU hits each pair of steps
    alike. Contenders
    take the same steps, so their medians compare like with like."""
    _check_repeats(rounds, warmup)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for r in range(warmup + rounds):
        states = {}
        for name, s in steppers.items():
            with s.scope():
                states[name] = s.start()
        for i in range(steps):
            for name, s in _turns(steppers, i):
                with s.scope():
                    sync_device(device)
                    t0 = time.perf_counter()
                    states[name] = s.step(states[name], i)
                    sync_device(device)
                    seconds = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _turns(contenders: dict, i: int) -> list:
    """Turn i's order. Where a contender runs in a turn matters on a CPU (the first one of a turn read 2% slower
    than an identical last one, cache state after the previous turn), so a fixed order would bias every ratio.
    Two contenders alternate (a b, b a, ...). More are rotated by one every second turn and reversed on odd turns,
    so over 2n turns each runs in every position exactly twice: reversing alone kept the middle one in the middle
    of every turn (and rotating by i, with i's parity tied to the reversal, kept an even count on fixed halves)."""
    items = list(contenders.items())
    if len(items) > 2:
        k = (i // 2) % len(items)
        items = items[k:] + items[:k]
    return items if i % 2 == 0 else items[::-1]


def greedy_stepper(model, prompt: torch.Tensor, steps: int,
                   scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   compile: dict | None = None) -> Stepper:
    """Cached greedy decoding as `generate` runs it: an untimed prefill of `prompt` (B, T), then `steps` steps,
    each feeding the previous step's argmax, without a FLOP ledger unless the caller asks for one
    (`stepper_stats`). Eager steps read the cache up to its filled length; with `compile` (torch.compile options,
    `generation.decode_compile_options`) the step is compiled over the full static cache, as
    `generate(compile=...)` runs it, and every round reuses one cache (CUDA graphs replay on its addresses). A
    step's state is (cache, next token (B, 1), output): the token is read from the logits as soon as the forward
    returns, because CUDA graphs reuse a compiled output's memory once another compiled call runs (the contenders'
    steps interleave), so the output is for reading before any other contender steps (`stepper_stats`)."""
    B, T = prompt.shape
    dtype = next(model.parameters()).dtype
    kept: list[KVCache] = []  # made by the first start(), inside the scope (a method's slots count)
    run = decode_step(model, False if compile is None else compile)

    @torch.no_grad()
    def start():
        if not kept:
            kept.append(KVCache.for_model(model.config, B, T + steps, num_slots=model.num_slots(), dtype=dtype,
                                          device=prompt.device))
            if compile is not None and prompt.is_cuda:
                for t in kept[0].buffers():
                    torch._dynamo.mark_static_address(t)
        cache = kept[0]
        cache.reset()
        positions = torch.arange(T, device=prompt.device).expand(B, T)
        with accounting_off_by_default():
            out = model(prompt, positions=positions, cache=cache.window(T), num_logits=1)
        return cache, out.logits[:, -1].argmax(-1, keepdim=True), out

    @torch.no_grad()
    def step(state, i: int):
        cache, nxt, _ = state
        positions = torch.full((B, 1), T + i, device=prompt.device)
        with accounting_off_by_default():
            out = run(nxt, positions, cache if compile is not None else cache.window(T + i + 1))
        return cache, out.logits[:, -1].argmax(-1, keepdim=True), out  # (B, 1): read now (see the docstring)

    return Stepper(start, step, scope)


def decode_compile(model, cfg) -> dict | None:
    """A bench config's decode compile options (its `compile` and `compile_backend`), as `generate` takes them."""
    return decode_compile_options(model, {"backend": cfg.compile_backend}) if cfg.compile else None


def decode_execution(config: dict) -> str:
    """How a bench's decode steps ran, for its table's heading."""
    return f"compiled ({config['compile_backend']}, static cache)" if config.get("compile") else "eager"


def compiled_decoding(compile: bool):
    """The context a bench's compiled decode steps run in: dynamo may compile the one step function once per
    contender, batch size and ledger state (each a guard), more than its default limit of 8 per function."""
    if not compile:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=256)


def stepper_stats(stepper: Stepper, steps: int) -> list[dict]:
    """Run a `greedy_stepper` once, untimed, and return each step's output stats (what its steps computed)."""
    with stepper.scope(), accounting(True):
        state = stepper.start()
        stats = []
        for i in range(steps):
            state = stepper.step(state, i)
            stats.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state[2].stats.items()})
    return stats


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    memory = "freed memory retained" if cpu_memory_policy() == "retained" else "system malloc"
    n = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} CPU, {n} thread{'s' if n != 1 else ''}, {memory}"


def write_report(result: dict, markdown: str, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write `<name>.json` and `<name>.md` with the date, machine and library versions added."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "python": platform.python_version()}
    result = {**meta, **result}
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(jsonio.dumps(result, indent=2) + "\n")
    md_path.write_text(f"<!-- {meta['date']}, torch {meta['torch']} -->\n{markdown}\n")
    return json_path, md_path


def publish(result: dict, markdown: str, out_dir: str | Path, name: str) -> dict:
    """Write the JSON + markdown report and print the markdown: every bench command ends here."""
    write_report(result, markdown, out_dir, name)
    print(markdown)
    return result


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
