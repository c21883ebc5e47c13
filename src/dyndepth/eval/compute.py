"""One compute report for every model and method: `compute_report(model, ids)`.

Per forward over the given tokens: executed and ideal FLOPs (the forward's ledger, see core/accounting.py)
by part (attention, MLP, gates, routers, lm_head, ...) and per layer application with the fraction of valid
tokens each processed, FLOPs per valid token next to the plain model's (`flops/dense`), KV-cache bytes per
token (every slot the model and its method write), and the measured wall-clock latency of the same forward
(median of `repeats`). Evaluation, the benchmarks and `dyndepth repro` all report through this one format.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from dyndepth.core.cache import KVCache


@dataclass
class ComputeReport:
    tokens: int  # valid (non-PAD) tokens of the forward
    executed_per_token: float  # FLOPs the kernels ran, per valid token
    ideal_per_token: float  # FLOPs the routing allows, per valid token
    dense_per_token: float  # FLOPs the plain model needs for the same tokens, per valid token
    parts: dict = field(default_factory=dict)  # part -> {"executed", "ideal"} FLOPs
    slots: dict = field(default_factory=dict)  # slot -> part -> {"executed", "ideal", "processed"}
    kv_bytes_per_token: int = 0
    latency_s: float = 0.0  # median wall-clock seconds of the forward
    stats: dict = field(default_factory=dict)  # the forward's other statistics (method metrics), as floats

    @property
    def executed_fraction(self) -> float:
        """Executed FLOPs relative to the plain model's: < 1 saves, > 1 costs extra (DND, gates)."""
        return self.executed_per_token / self.dense_per_token

    @property
    def ideal_fraction(self) -> float:
        return self.ideal_per_token / self.dense_per_token

    def to_dict(self) -> dict:
        return {**asdict(self), "executed_fraction": self.executed_fraction, "ideal_fraction": self.ideal_fraction}

    def summary(self) -> str:
        return (f"{self.tokens} tokens: executed {self.executed_fraction:.1%} and ideal {self.ideal_fraction:.1%} "
                f"of the plain model's {self.dense_per_token / 1e6:.2f} MFLOP/token; KV {self.kv_bytes_per_token:,} "
                f"B/token; {self.latency_s * 1e3:.1f} ms")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def compute_report(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   repeats: int = 3) -> ComputeReport:
    """Run `model(input_ids, attention_mask)` `repeats` times (after one warm-up) and report its compute."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    device = input_ids.device
    out = model(input_ids, attention_mask=attention_mask)  # warm-up, and the ledger of this forward
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids, attention_mask=attention_mask)
        _sync(device)
        times.append(time.perf_counter() - t0)
    n = float(out.stats["tokens/valid"])
    ledger = out.compute.report(valid_tokens=n)
    dtype = next(model.parameters()).dtype
    kv = KVCache.for_model(model.config, 1, 1, num_slots=model.num_slots(), dtype=dtype).nbytes_per_token()
    skip = {"flops/executed", "flops/ideal", "flops/dense", "tokens/valid"}
    return ComputeReport(
        tokens=int(n), executed_per_token=ledger["executed"] / n, ideal_per_token=ledger["ideal"] / n,
        dense_per_token=float(out.stats["flops/dense"]) / n, parts=ledger["parts"], slots=ledger["slots"],
        kv_bytes_per_token=kv, latency_s=statistics.median(times),
        stats={k: float(v) for k, v in out.stats.items() if k not in skip and torch.as_tensor(v).numel() == 1})
