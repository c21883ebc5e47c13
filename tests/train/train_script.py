"""Runs `train()` on the tiny model in a fresh process (used by the resume and distributed tests).

python train_script.py OUT_DIR [--steps 12] [--save-every 4] [--resume] [--sleep-at STEP]
    [--parallel none|ddp|fsdp|ddp,fsdp] [--batch-size 4] [--grad-accum 1]
Under torchrun-style env vars (RANK, WORLD_SIZE, ...) it trains one rank's shard. A comma list of
parallel modes trains once per mode (in OUT_DIR/<mode>) inside one process group.
With DYNDEPTH_CHECKPOINT_FAULT=POINT@STEP in the environment the save of STEP stops at POINT (it writes
OUT_DIR/POINT.fault, then sleeps) so a test can SIGKILL it there; see dyndepth/train/checkpoint.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_loader import TinyLoader

from dyndepth import CausalLM, preset
from dyndepth.runconfig import TrainConfig
from dyndepth.train import Hook, train


class SleepHook(Hook):
    """Stops the run at one step (so the parent can SIGKILL it there) after writing a marker file."""

    name = "sleep"

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def after_step(self, model, step, stats, dist):
        if step == self.step:
            self.marker.write_text(str(step))
            time.sleep(120)


class RankMeanHook(Hook):
    """A controller that all-reduces a per-rank statistic, as DND/MoE controllers do."""

    name = "rank_mean"

    def after_step(self, model, step, stats, dist):
        return {"mean_rank": dist.all_reduce_mean(torch.tensor([float(dist.rank)]))[0]}


def tiny_train_config(out_dir: str, **kw) -> TrainConfig:
    base = {"steps": 12, "batch_size": 4, "seq_len": 16, "lr": 3e-3, "min_lr": 3e-4, "warmup": 3,
            "log_every": 1, "save_every": 4, "keep_last": 5, "out_dir": out_dir, "progress": False,
            "device": "cpu", "clip": 1.0, "plot": False}
    return TrainConfig(**{**base, **kw})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep-at", type=int, default=0)
    ap.add_argument("--parallel", default="none")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    modes = args.parallel.split(",")
    for mode in modes:
        out_dir = args.out_dir if len(modes) == 1 else str(Path(args.out_dir) / mode)
        cfg = tiny_train_config(out_dir, steps=args.steps, save_every=args.save_every, resume=args.resume,
                                parallel=mode, batch_size=args.batch_size, grad_accum=args.grad_accum)
        torch.manual_seed(0)
        model = CausalLM(preset("tiny-qwen3"))
        loader = TinyLoader(args.batch_size, cfg.seq_len, rank=rank, world_size=world)
        hooks = [SleepHook(args.sleep_at, Path(out_dir) / "sleeping")] if args.sleep_at else []
        hooks += [RankMeanHook()] if world > 1 else []
        train(model, loader, cfg, hooks=hooks)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
