"""Two-rank checks run by test_parallel.py (one process group, several scenarios); results go to OUT_DIR.

python dist_checks.py OUT_DIR DATA_FILE   (under torchrun-style env vars RANK, WORLD_SIZE, MASTER_*)

1. grads_<mode>.pt: the gradient, grad norm (no clipping) and loss of one optimizer step with
   grad_accum=2 on the real packed loader over prompt-masked SFT rows, per mode (ddp, fsdp, ddp with
   activation checkpointing, fsdp under bf16 mixed precision); the test compares them with one process.
2. fsdp_run/: a 4-step FSDP run on the same loader with checkpoints at steps 2 and 4; the test resumes
   it in one process (another world size) and compares the losses of steps 3 and 4. The other way
   round, single_resumed/ (a copy of a single-process run's step-2 checkpoint, made by the test) is
   resumed here under FSDP to step 4.
0. reduced_stats.json: `reduce_stats` of dicts whose keys differ between the ranks.
4. resume_race.json: a DDP run whose newest checkpoint is damaged, resumed with resume=true: rank 1 holds its
   verification of that checkpoint until rank 0 enters a barrier, then records whether the checkpoint was still in
   place (rank 0 moved it to abandoned_0 while rank 1 was reading it: no barrier between verifying and moving).
5. nonfinite.json: DDP runs where rank 1 alone turns step 2's objective NaN: rank 0's skip warning and stop error
   (train.nonfinite=skip / stop), and the skipping run's logged losses.
3. run/: `run_training` under DDP on a user-data JSONL file: both ranks ask for the same shard cache
   (rank 0 builds it), and the final checkpoint is exported to run/model.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_loader import sft_loader
from train_script import tiny_train_config

from dyndepth import CausalLM, preset
from dyndepth.runconfig import RunConfig
from dyndepth.train import Hook, checkpoint, run_training, train
from dyndepth.train.parallel import DistInfo, init_distributed, reduce_stats
from dyndepth.train.trainer import optimizer_step, setup_model

PER_RANK_BATCH, GRAD_ACCUM = 2, 2
MODES = {"ddp": {"parallel": "ddp"}, "fsdp": {"parallel": "fsdp"},
         "ddp_ac": {"parallel": "ddp", "activation_checkpointing": True},
         "fsdp_bf16": {"parallel": "fsdp", "dtype": "bfloat16"}}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def one_step_gradients(out: Path, info) -> None:
    for name, kw in MODES.items():
        cfg = tiny_train_config(str(out / name), clip=0.0, grad_accum=GRAD_ACCUM, batch_size=PER_RANK_BATCH, **kw)
        torch.manual_seed(0)
        raw, wrapped, optimizer, scheduler = setup_model(CausalLM(preset("tiny-qwen3")), cfg, info)
        loader = sft_loader(PER_RANK_BATCH, rank=info.rank, world_size=info.world_size)
        stats, _, norm = optimizer_step(wrapped, raw, optimizer, scheduler, loader, [], cfg, info)
        grads = {n: _full(p.grad) for n, p in raw.named_parameters()}  # collective under FSDP
        loss = reduce_stats({"loss": float(stats["loss"])}, info)["loss"]
        policy = raw._get_fsdp_state()._mp_policy if "fsdp" in name else None  # what fully_shard was given
        if info.is_main:
            torch.save({"grads": grads, "grad_norm": float(norm), "loss": loss,
                        "param_dtype": str(getattr(policy, "param_dtype", None)),
                        "reduce_dtype": str(getattr(policy, "reduce_dtype", None))}, out / f"grads_{name}.pt")


def resume_race(out: Path, info) -> None:
    run = out / "race_run"
    cfg = tiny_train_config(str(run), steps=4, save_every=2, parallel="ddp", batch_size=PER_RANK_BATCH)
    torch.manual_seed(0)
    train(CausalLM(preset("tiny-qwen3")), sft_loader(PER_RANK_BATCH, rank=info.rank, world_size=info.world_size), cfg)
    newest, marker = run / "step_0000004", out / "race_rank0_at_barrier"
    if info.is_main:
        weights = newest / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x04  # one bit: the sha256 check fails
        weights.write_bytes(bytes(data))
    info.barrier()
    real_barrier, real_verify, seen = DistInfo.barrier, checkpoint.verify_checkpoint, {}

    def marked_barrier(self):  # rank 0: says when it waits for the other rank
        marker.touch()
        real_barrier(self)

    def held_verify(path, *a, **k):  # rank 1: finishes checking the damaged checkpoint once rank 0 waits
        try:
            return real_verify(path, *a, **k)
        finally:
            if Path(path) == newest:
                deadline = time.monotonic() + 60  # (a safety net against a hang, not a timing)
                while not marker.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                seen["in_place"] = newest.is_dir()

    if info.is_main:
        DistInfo.barrier = marked_barrier
    else:
        checkpoint.verify_checkpoint = held_verify
    try:
        resumed = train(CausalLM(preset("tiny-qwen3")),
                        sft_loader(PER_RANK_BATCH, rank=info.rank, world_size=info.world_size),
                        tiny_train_config(str(run), steps=4, save_every=2, parallel="ddp", batch_size=PER_RANK_BATCH,
                                          resume=True))
    finally:
        DistInfo.barrier, checkpoint.verify_checkpoint = real_barrier, real_verify
    if not info.is_main:
        (out / "resume_race.json").write_text(json.dumps({"in_place": seen.get("in_place"),
                                                          "steps": resumed.steps}))


class RankPoison(Hook):
    """Rank 1's auxiliary loss at optimizer step 2 (grad_accum=1) is NaN; zero everywhere else."""

    name = "rank_poison"

    def __init__(self, rank: int) -> None:
        self.rank, self.calls = rank, 0

    def aux_loss(self, model, batch, out):
        self.calls += 1
        scale = math.nan if self.calls == 2 and self.rank == 1 else 0.0
        return out.logits.float().mean() * scale, {}


def nonfinite_on_one_rank(out: Path, info) -> None:
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("dyndepth").addHandler(handler)
    try:
        runs = {}
        for policy in ("skip", "stop"):
            cfg = tiny_train_config(str(out / f"nonfinite_{policy}"), steps=3, save_every=0, parallel="ddp",
                                    batch_size=PER_RANK_BATCH, nonfinite=policy)
            torch.manual_seed(0)
            loader = sft_loader(PER_RANK_BATCH, rank=info.rank, world_size=info.world_size)
            try:
                runs[policy] = train(CausalLM(preset("tiny-qwen3")), loader, cfg, hooks=[RankPoison(info.rank)])
            except FloatingPointError as e:
                runs[policy] = str(e)
    finally:
        logging.getLogger("dyndepth").removeHandler(handler)
    if info.is_main:
        (out / "nonfinite.json").write_text(json.dumps({
            "warning": [m for m in said if "was skipped" in m], "error": runs["stop"],
            "losses": dict(runs["skip"].losses)}))


def main() -> None:
    out, data_file = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    info = init_distributed("ddp", "cpu")
    # a statistic only some ranks report (GateSkip's gateskip/packed when a rank's calls all kept every token)
    stats = {"loss": 1.0 + info.rank, **({"only_rank_1": 5.0} if info.rank else {"only_rank_0": 3.0})}
    reduced = reduce_stats(stats, info)
    if info.is_main:
        (out / "reduced_stats.json").write_text(json.dumps(reduced))
    one_step_gradients(out, info)
    resume_race(out, info)
    nonfinite_on_one_rank(out, info)
    cfg = tiny_train_config(str(out / "fsdp_run"), steps=4, save_every=2, parallel="fsdp", grad_accum=GRAD_ACCUM,
                            batch_size=PER_RANK_BATCH)
    torch.manual_seed(0)
    train(CausalLM(preset("tiny-qwen3")), sft_loader(PER_RANK_BATCH, rank=info.rank, world_size=info.world_size),
          cfg)
    resumed = out / "single_resumed"
    cfg = tiny_train_config(str(resumed), steps=4, save_every=2, parallel="fsdp", grad_accum=GRAD_ACCUM,
                            batch_size=PER_RANK_BATCH, resume=str(resumed / "step_0000002"))
    train(CausalLM(preset("tiny-qwen3")), sft_loader(PER_RANK_BATCH, rank=info.rank, world_size=info.world_size),
          cfg)
    rc = RunConfig(model={"preset": "tiny-qwen3", "vocab_size": 264},
                   train=tiny_train_config(str(out / "run"), steps=2, save_every=0, parallel="ddp", batch_size=2),
                   data={"source": data_file, "cache_dir": str(out / "cache"), "intra_doc_mask": True},
                   eval={"enabled": True})
    run_training(rc)
    if info.is_main:
        (out / "done.json").write_text(json.dumps({"world_size": info.world_size}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
