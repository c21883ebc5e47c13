"""Wall-clock measurement and result files shared by every `dyndepth bench` command.

Benchmarks report ratios measured side by side in one run, never a lone time: each measurement
here alternates the contenders round by round, so drift in machine load hits both equally.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5,
                       warmup: int = 2) -> dict[str, float]:
    """Median seconds of each callable, running them in turn (a, b, a, b, ...) after `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync_device(device)
            t0 = time.perf_counter()
            fn()
            sync_device(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_median_reported(fns: dict[str, Callable[[], float]], repeats: int = 5,
                                warmup: int = 2) -> dict[str, float]:
    """`interleaved_median` for callables that time their own critical section and return its seconds, so
    setup (a prefill before decode steps) stays out of the measurement."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            seconds = fn()
            if r >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def write_report(result: dict, markdown: str, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write `<name>.json` and `<name>.md` with the date, machine and library versions added."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "python": platform.python_version()}
    result = {**meta, **result}
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
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
