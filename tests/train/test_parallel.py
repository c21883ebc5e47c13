"""DDP and FSDP2 on gloo with 2 CPU processes give the single-process loss curve at the same global batch.

Tolerance: 1e-5 relative in fp32 (the all-reduce sums gradients in a different order than one process).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_loader import TinyLoader
from train_script import tiny_train_config

from dyndepth import CausalLM, preset
from dyndepth.train import train
from dyndepth.train.parallel import DistInfo, init_distributed, reduce_stats

SCRIPT = Path(__file__).with_name("train_script.py")
STEPS, PER_RANK_BATCH, WORLD = 4, 2, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path, parallel: str, *extra: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(SCRIPT), str(out_dir), "--steps", str(STEPS), "--save-every", "2",
               "--parallel", parallel, "--batch-size", str(PER_RANK_BATCH), *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            out, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, out.decode()[-3000:]


def _losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    procs = _launch(root, "ddp,fsdp")  # one process group, one run per mode
    torch.manual_seed(0)
    single = train(CausalLM(preset("tiny-qwen3")), TinyLoader(PER_RANK_BATCH * WORLD, 16),
                   tiny_train_config(str(root / "single"), steps=STEPS, batch_size=PER_RANK_BATCH * WORLD,
                                     save_every=0))
    _wait(procs)
    return root, dict(single.losses)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(runs, mode):
    root, single = runs
    got = _losses(root / mode)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in single.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), (mode, step)
    assert got[STEPS] != got[1]  # it did train
    records = [json.loads(x) for x in (root / mode / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rank_mean/mean_rank"] == 0.5 for r in records if "loss" in r)  # hook all-reduced


def test_fsdp_checkpoint_is_full_and_resumes(runs):
    root, _ = runs
    out = root / "fsdp"
    assert sorted(p.name for p in (out / "step_0000004").iterdir()) == [
        "config.yaml", "model.safetensors", "rank_0.pt", "rank_1.pt", "train_state.pt"]
    # the gathered weights load into a plain single-process model
    from dyndepth.train.checkpoint import load_model_weights

    load_model_weights(out / "step_0000004", CausalLM(preset("tiny-qwen3")))
    # drop the last checkpoint and resume FSDP from step 2: steps 3-4 repeat the same losses
    before = _losses(out)
    shutil.rmtree(out / "step_0000004")
    _wait(_launch(out, "fsdp", "--resume"))
    after = _losses(out)
    for step in range(1, STEPS + 1):
        assert after[step] == pytest.approx(before[step], rel=1e-6), step


def test_single_process_helpers_are_identities():
    info = init_distributed("none", "cpu")
    assert info == DistInfo() and info.is_main and not info.distributed
    assert reduce_stats({"loss": 2.0}, info) == {"loss": 2.0}
    t = torch.tensor([3.0])
    assert info.all_reduce_mean(t) is t and t.item() == 3.0
