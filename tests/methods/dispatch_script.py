"""Trains the tiny model with an adaptive-depth method, or a tiny depth-recurrent baseline (`"model"` in the JSON,
a preset, with `"model_fields"` over it), under DDP or FSDP2 (2 gloo ranks; see test_dispatch.py).

python dispatch_script.py OUT_DIR RUNS_JSON, RUNS_JSON = {"<name>": [METHOD, "MODE[,MODE...]"], ...}
Each run trains in OUT_DIR/<name>/<mode>, all of them in one process group (the ranks start and import once,
which took longer than a run), and logs metrics.jsonl (rank 0).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from tiny_loader import TinyLoader  # noqa: E402
from train_script import tiny_train_config  # noqa: E402

from dyndepth import build_model, preset  # noqa: E402
from dyndepth.train import train  # noqa: E402
from dyndepth.train.run import build_hooks  # noqa: E402

STEPS, PER_RANK_BATCH = 3, 2


def run(out_dir: str, method: dict, mode: str, rank: int = 0, world: int = 1, **train_kw):
    """Train STEPS steps on a global batch of 4 rows (2 per rank under 2 ranks), clipping off."""
    cfg = tiny_train_config(out_dir, steps=STEPS, save_every=0, parallel=mode, batch_size=PER_RANK_BATCH * 2 // world,
                            clip=0.0, **train_kw)
    method = dict(method)
    torch.manual_seed(0)
    model = build_model(preset(method.pop("model", "tiny-qwen3"), **method.pop("model_fields", {})))
    hooks = build_hooks(method, model, STEPS)
    loader = TinyLoader(cfg.batch_size, cfg.seq_len, rank=rank, world_size=world)
    result = train(model, loader, cfg, hooks=hooks)
    taus = {name: buf.tolist() for name, buf in model.named_buffers() if name.endswith(".tau")}
    if taus:  # controller state (DND thresholds): every rank must end with the same values
        (Path(out_dir) / f"tau_rank{rank}.json").write_text(json.dumps(taus))
    return result


def main() -> None:
    out_dir, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for name, (method, modes) in runs.items():
        for mode in modes.split(","):
            run(str(out_dir / name / mode), method, mode, rank, world)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
