"""Training: loss, optimizer and schedules, the loop, checkpoints, DDP/FSDP2, method hooks."""

from dyndepth.train.hooks import Hook, TrainHook
from dyndepth.train.loss import lm_loss
from dyndepth.train.run import build_hooks, build_loader, build_model, run_training
from dyndepth.train.trainer import TrainResult, train

__all__ = ["Hook", "TrainHook", "TrainResult", "build_hooks", "build_loader", "build_model", "lm_loss",
           "run_training", "train"]
