"""Training metrics: FLOPs/MFU, the JSONL log (+ optional TensorBoard / wandb), the loss-curve plot.

Only rank 0 writes. `metrics.jsonl` holds one JSON object per line: training records
`{"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", ...}` and evaluation records
`{"step", "eval_loss", "eval_ppl"}`, in strict JSON: a non-finite value (the NaN loss of a step that
train.nonfinite=skip skipped, an overflowed perplexity) is written as null (see `dyndepth.jsonio`). On resume,
records past the resumed step are dropped first, so the file of a resumed run reads like that of an uninterrupted
one; the whole old file is kept as `metrics.abandoned_N.jsonl` (as the abandoned run's checkpoints move to
`abandoned_N/`). TensorBoard hides the abandoned steps of a resumed run (`purge_step`); a new run sets an old
`tensorboard/` folder aside.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from dyndepth import jsonio
from dyndepth.figures import save_figure
from dyndepth.runconfig import TrainConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by device-name fragment (first match wins: a card's variants before its plain name, whose
# figure is the SXM card's).
PEAK_FLOPS = {"H200 NVL": 835e12, "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
              "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12, "V100": 125e12}
DEFAULT_CPU_PEAK = 1e12  # a nominal figure; set train.peak_tflops for your machine


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token for MFU: every model family counts its own (`model.train_flops_per_token`):
    the decoder from its trainable (6N) and frozen (4N) matmul parameters plus attention, Dreamer as 3x its
    forward over the R applications of its shared layer. Counts are dense-equivalent: a method that skips
    work (GateSkip, MoD) does fewer FLOPs than counted, so its MFU reads as if the skipped work had run."""
    return model.train_flops_per_token(seq_len)


def peak_flops(device: torch.device, peak_tflops: float | None) -> float:
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, flops in PEAK_FLOPS.items():
            if frag in name:
                return flops
        log.warning("unknown GPU %r: MFU uses 100 TFLOP/s; set train.peak_tflops", name)
        return 100e12
    return DEFAULT_CPU_PEAK


def _plain(v):
    return float(v.item()) if isinstance(v, torch.Tensor) else v


def set_aside(path: Path, *others: Path, label: str = "abandoned") -> Path:
    """Rename `path` (a replaced run's metrics.jsonl or config.yaml), and those of `others` that exist, to
    `<stem>.<label>_N<suffix>` beside them, N the first free for all; returns `path`'s new name."""
    paths = (path, *others)
    n = 0
    while any(p.with_name(f"{p.stem}.{label}_{n}{p.suffix}").exists() for p in paths):
        n += 1
    for p in filter(Path.exists, paths):
        p.rename(p.with_name(f"{p.stem}.{label}_{n}{p.suffix}"))
    return path.with_name(f"{path.stem}.{label}_{n}{path.suffix}")


LOGGER_PACKAGES = {"tensorboard": ("tensorboard", ""),
                   "wandb": ("wandb", "; WANDB_MODE=offline runs it without a network")}  # train.<key>: (package, note)


def check_logger_packages(cfg: TrainConfig) -> None:
    """train.tensorboard / train.wandb need their packages, checked before anything is built or written (a missing one
    stopped the run with a bare "No module named 'wandb'" once the model and data were built)."""
    for key, (package, note) in LOGGER_PACKAGES.items():
        if getattr(cfg, key) and importlib.util.find_spec(package) is None:
            raise ImportError(f"train.{key}=true needs the {package} package: pip install {package}{note}; or set "
                              f"train.{key}=false.")


class MetricsLogger:
    """JSONL (+ TensorBoard, wandb) writer; a no-op on ranks other than 0."""

    def __init__(self, out_dir: str | Path, cfg: TrainConfig, enabled: bool, resume_step: int = 0,
                 run_config: dict | None = None) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.records: list[dict] = []
        self._tb = self._wandb = None
        if not enabled:
            return
        check_logger_packages(cfg)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            old, torn = self._read()
            kept = [r for r in old if r.get("step", 0) <= resume_step] if resume_step else []
            if torn or len(kept) < len(old):  # the records of a run this one replaces: set aside, not lost
                aside = set_aside(self.path)
                log.warning("%s: %d record(s) past step %d of the run this one replaces (%d line(s) torn by a kill "
                            "mid-write) moved to %s", self.path, len(old) - len(kept), resume_step, torn, aside.name)
            tmp = self.path.with_name(self.path.name + ".tmp")  # written, then renamed: a kill mid-write left the
            tmp.write_text("".join(jsonio.dumps(r) + "\n" for r in kept))  # history truncated
            os.replace(tmp, self.path)
            self.records = kept
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs `pip install tensorboard`

            tb = Path(out_dir) / "tensorboard"
            if not resume_step and tb.is_dir() and any(tb.iterdir()):  # a replaced run's curves, as its metrics
                log.warning("%s: the TensorBoard events of the run this one replaces moved to %s", tb,
                            set_aside(tb).name)
            # resumed: TensorBoard hides the events at or past purge_step, those of the abandoned run (appended to,
            # the folder drew both runs' steps past the checkpoint over each other)
            self._tb = SummaryWriter(str(tb), purge_step=resume_step + 1 if resume_step else None)
        if cfg.wandb:
            import wandb  # needs `pip install wandb`; set WANDB_MODE=offline to run without network

            self._wandb = wandb.init(project=cfg.wandb_project, dir=str(out_dir), config=run_config,
                                     resume="allow")

    def _read(self) -> tuple[list[dict], int]:
        """The file's records, and how many lines are not JSON (a line torn by a kill while it was appended)."""
        records, torn = [], 0
        for line in filter(str.strip, self.path.read_text().splitlines()):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
        return records, torn

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(jsonio.dumps(record) + "\n")  # strict: a NaN loss as null
        step = record.get("step", 0)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def plot_loss(records: list[dict], path: str | Path) -> Path | None:
    """Training (and eval) loss against step as a PNG; None when there is nothing to plot."""
    train = [(r["step"], jsonio.number(r["loss"])) for r in records if "loss" in r]  # (null, read back: NaN, a gap)
    evals = [(r["step"], jsonio.number(r["eval_loss"])) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas by default

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if train:  # a marker while the points are few: a run that logged once drew a line of one point, nothing
        ax.plot(*zip(*train), marker="o" if len(train) < 3 else None, label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, 100, tight=False)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
