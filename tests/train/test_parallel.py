"""DDP and FSDP2 on gloo with 2 CPU processes match one process at the same global batch.

Loss curves (TinyLoader), and, on the real packed loader over prompt-masked SFT rows with grad_accum=2,
the gradient itself and its norm with clipping off (a constant scale error across ranks, which Adam
and clipping would hide in a loss curve, fails here), with activation checkpointing too. An FSDP
checkpoint resumes in one process; a DDP `run_training` on user data builds one shard cache and
exports its checkpoint. Tolerance: 1e-5 relative in fp32 (the all-reduce sums in another order).
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
from tiny_loader import TinyLoader, sft_loader, sft_pairs
from train_script import tiny_train_config

from dyndepth import CausalLM, preset
from dyndepth.train import train
from dyndepth.train.checkpoint import load_model_weights
from dyndepth.train.parallel import DistInfo, init_distributed, reduce_stats
from dyndepth.train.trainer import optimizer_step, setup_model

SCRIPT = Path(__file__).with_name("train_script.py")
CHECKS = Path(__file__).with_name("dist_checks.py")
STEPS, PER_RANK_BATCH, WORLD = 4, 2, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path, parallel: str, *extra: str) -> list[subprocess.Popen]:
    return _launch_script([str(SCRIPT), str(out_dir), "--steps", str(STEPS), "--save-every", "2",
                           "--parallel", parallel, "--batch-size", str(PER_RANK_BATCH), *extra])


def _launch_script(args: list[str]) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
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
        "config.yaml", "manifest.json", "model.safetensors", "model_config.json", "rank_0.pt", "rank_1.pt",
        "train_state.pt"]
    # the gathered weights load into a plain single-process model
    load_model_weights(out / "step_0000004", CausalLM(preset("tiny-qwen3")))
    # drop the last checkpoint and resume FSDP from step 2: steps 3-4 repeat the same losses
    before = _losses(out)
    shutil.rmtree(out / "step_0000004")
    _wait(_launch(out, "fsdp", "--resume"))
    after = _losses(out)
    for step in range(1, STEPS + 1):
        assert after[step] == pytest.approx(before[step], rel=1e-6), step


def test_fsdp_checkpoint_stores_a_tied_lm_head_once(runs):
    """FSDP2's gathered state gave the tied lm_head its own copy, so its checkpoints held the embedding twice (600 MB
    more per fp32 checkpoint of Qwen3-0.6B) where one process and DDP store it once and re-alias it on load."""
    from safetensors import safe_open

    root, _ = runs
    for mode in ("ddp", "fsdp"):
        with safe_open(str(root / mode / "step_0000002" / "model.safetensors"), "pt") as f:
            keys, aliases = set(f.keys()), json.loads(f.metadata()["aliases"])
        assert aliases == {"lm_head.weight": "model.embed_tokens.weight"} and "lm_head.weight" not in keys, mode
    model = CausalLM(preset("tiny-qwen3"))
    load_model_weights(root / "fsdp" / "step_0000002", model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_single_process_helpers_are_identities():
    info = init_distributed("none", "cpu")
    assert info == DistInfo() and info.is_main and not info.distributed
    assert reduce_stats({"loss": 2.0}, info) == {"loss": 2.0}
    t = torch.tensor([3.0])
    assert info.all_reduce_mean(t) is t and t.item() == 3.0


# ------------------------------------------------------------------- gradients, resume, data, export

@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """Runs dist_checks.py on 2 ranks while this process computes the single-process gradient."""
    root = tmp_path_factory.mktemp("checks")
    data = root / "sft.jsonl"
    records = [{"prompt": p, "response": r} if i % 2 else
               {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
               for i, (p, r) in enumerate(sft_pairs(300, seed=1))]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    single_run = tiny_train_config(str(root / "single_run"), steps=4, save_every=2, grad_accum=2, batch_size=2 * WORLD)
    torch.manual_seed(0)
    train(CausalLM(preset("tiny-qwen3")), sft_loader(2 * WORLD), single_run)
    shutil.copytree(root / "single_run", root / "single_resumed", ignore=shutil.ignore_patterns("step_0000004"))
    procs = _launch_script([str(CHECKS), str(root), str(data)])
    cfg = tiny_train_config(str(root / "single"), clip=0.0, grad_accum=2, batch_size=2 * WORLD)
    torch.manual_seed(0)
    raw, wrapped, optimizer, scheduler = setup_model(CausalLM(preset("tiny-qwen3")), cfg, DistInfo())
    stats, _, norm = optimizer_step(wrapped, raw, optimizer, scheduler, sft_loader(2 * WORLD), [], cfg, DistInfo())
    reference = {"grads": {n: p.grad.clone() for n, p in raw.named_parameters()}, "grad_norm": float(norm),
                 "loss": float(stats["loss"])}
    _wait(procs)
    return root, reference


def _rel_l2(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    diff = sum((got[n].float() - want[n]).pow(2).sum() for n in want)
    return (diff / sum(w.pow(2).sum() for w in want.values())).sqrt().item()


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp_ac"])
def test_one_step_gradient_and_norm_match_one_process(checks, mode):
    root, ref = checks
    got = torch.load(root / f"grads_{mode}.pt")
    assert _rel_l2(got["grads"], ref["grads"]) < 1e-5, mode  # a x2 or x0.5 scale gives 1 or 0.5
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_stats_only_some_ranks_report_are_averaged_over_those(checks):
    """Logged steps all-reduce the stats as one vector of the sorted keys: a key one rank lacked (GateSkip's
    gateskip/packed, which a rank whose branch calls all kept every token leaves out) made the ranks' vectors differ,
    and gloo aborted the run ("Received data size doesn't match"; NCCL would hang or mix values)."""
    root, _ = checks
    got = json.loads((root / "reduced_stats.json").read_text())
    assert got == {"loss": 1.5, "only_rank_0": 3.0, "only_rank_1": 5.0}


def test_ranks_verify_a_damaged_newest_checkpoint_before_rank_0_moves_it(checks):
    """resume=true under DDP: each rank verifies the newest checkpoint, and rank 0, finding it damaged, moved it to
    abandoned_N with no barrier in between, while rank 1 could still be reading it (a FileNotFoundError there)."""
    root, _ = checks
    got = json.loads((root / "resume_race.json").read_text())
    assert got == {"in_place": True, "steps": 4}  # still in place when rank 0 first waited; resumed and ran on
    assert [p.name for p in (root / "race_run" / "abandoned_0").iterdir()] == ["step_0000004"]


def test_a_non_finite_step_on_one_rank_is_reported_with_the_steps_values(checks):
    """Rank 1 alone had a NaN objective at step 2. Every rank skips (or stops) alike, but the messages quoted the
    rank's own numbers: rank 0 warned of a "non-finite objective (5.57: the loss 5.58 ...)", its finite share of
    the step (not even the step's loss), and its stop error said "the loss is 5.57"; now both quote the step's
    objective over every rank (NaN here) and the skip warning the step's loss as logged."""
    root, _ = checks
    got = json.loads((root / "nonfinite.json").read_text())
    logged = got["losses"]["2"]
    assert len(got["warning"]) == 1
    assert got["warning"][0].startswith(f"step 2: non-finite objective (nan: the loss {logged:.4g} plus"), got
    assert got["error"].startswith("step 2: the loss is nan and the gradient norm nan"), got


def test_fsdp_bf16_gathers_bf16_and_reduces_fp32(checks):
    root, ref = checks
    got = torch.load(root / "grads_fsdp_bf16.pt")
    assert (got["param_dtype"], got["reduce_dtype"]) == ("torch.bfloat16", "torch.float32")
    assert {g.dtype for g in got["grads"].values()} == {torch.float32}  # fp32 master weights and grads
    assert _rel_l2(got["grads"], ref["grads"]) < 5e-2  # bf16 compute: close, not equal
    fp32 = torch.load(root / "grads_fsdp.pt")
    assert fp32["param_dtype"] == "None"


def test_fsdp_checkpoint_resumes_in_one_process(checks, tmp_path):
    root, _ = checks
    run = tmp_path / "run"
    shutil.copytree(root / "fsdp_run", run)
    two_ranks = _losses(run)
    cfg = tiny_train_config(str(run), steps=4, save_every=2, grad_accum=2, batch_size=2 * WORLD,
                            resume=str(run / "step_0000002"))
    train(CausalLM(preset("tiny-qwen3")), sft_loader(2 * WORLD), cfg)
    resumed = _losses(run)
    assert two_ranks[4] != two_ranks[3]
    for step in (3, 4):  # the same global batches, the same weights and AdamW state
        assert resumed[step] == pytest.approx(two_ranks[step], rel=1e-5), step


def test_single_process_checkpoint_resumes_under_fsdp(checks):
    root, _ = checks
    single, resumed = _losses(root / "single_run"), _losses(root / "single_resumed")
    assert sorted(resumed) == [1, 2, 3, 4] and single[4] != single[3]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(single[step], rel=1e-5), step


def test_ddp_run_training_on_user_data_builds_one_cache_and_exports(checks):
    root, _ = checks
    run = root / "run"
    checkpoint = run / "step_0000002"
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("module.")]  # noqa: SIM118 (safe_open has no __iter__)
    from dyndepth.interop.hf import from_pretrained

    exported = from_pretrained(run / "model")  # written by run_training after DDP training
    plain = CausalLM(preset("tiny-qwen3", vocab_size=264))
    load_model_weights(checkpoint, plain)
    ours, theirs = plain.state_dict(), exported.state_dict()
    assert ours.keys() == theirs.keys()
    for name, a in ours.items():
        torch.testing.assert_close(a, theirs[name], rtol=0, atol=0, msg=name)
    caches = [p for p in (root / "cache").iterdir() if p.is_dir()]  # beside source_digests.json
    assert len(caches) == 1 and sorted(p.name for p in caches[0].iterdir()) == ["train", "val"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2]


# ------------------------------------------------------------------- compile with activation checkpointing

ROUTED = {"dnd": {"layers": [0, 1], "router_init_std": 0.3},  # nests 8 and 12 tokens of a row in its 2 layers
          "mod": {"capacity": 0.5}}  # a float knob: dynamo traced it as a symbolic float (and failed) when dynamic


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ROUTED))
def test_compile_with_activation_checkpointing_recomputes_a_routed_layer_as_its_forward(name, monkeypatch):
    """DND nests a data-dependent number of tokens per layer (K differs between the layers of one forward). The
    layers share one compiled function: layer 1's other K made dynamo compile a dynamic graph beside layer 0's static
    one, and the recomputation of layer 0 in backward took that newer graph, which saves other tensors than the one
    its forward ran: torch.utils.checkpoint's CheckpointError at the first backward. Now the checkpointed layers of a
    routed model compile dynamic from the start (one graph for every K), with a method's float knobs constant, and
    give eager's gradients."""
    from compiling import compiled_and_checkpointed
    from dyndepth.methods import attach_method

    def build():
        torch.manual_seed(0)
        model = CausalLM(preset("tiny-qwen3")).train()
        attach_method(model, name, dict(ROUTED[name]))
        return model

    eager = build()
    ids = torch.randint(0, 200, (2, 16))
    eager(ids).logits.square().mean().backward()
    compiled = build()
    with compiled_and_checkpointed(compiled, monkeypatch):
        compiled(ids).logits.square().mean().backward()
    grads = 0
    for (n, p), q in zip(compiled.named_parameters(), eager.parameters()):
        if q.grad is not None:  # (the compiled graph may give a parameter eager leaves without one a zero gradient)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
            grads += 1
        elif p.grad is not None:
            assert not p.grad.any(), n
    assert grads > 10


@pytest.mark.slow
def test_ddp_compile_with_activation_checkpointing_recomputes_the_graph_its_forward_ran(monkeypatch, tmp_path):
    """Under DDP, dynamo split a compiled layer's graph at DDP's bucket boundaries (optimize_ddp) in the forward, which
    runs inside DDP's forward, but not in the recomputation in backward, outside it: a Dreamer layer (past DDP's 1 MB
    first bucket) saved other tensors there, torch.utils.checkpoint's CheckpointError at the first backward. Per-layer
    compilation needs no split (DDP's own hooks overlap the all-reduce), so it is off with activation checkpointing.
    One gloo rank: DDP is active as it is on many."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from compiling import compiled_and_checkpointed
    from dyndepth import build_model

    def build():
        torch.manual_seed(0)
        # 2 recurrences (the preset's 4): every layer application compiles its own graphs
        return build_model(preset("dreamer-tiny", vocab_size=256, num_recurrences=2)).train()

    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    eager = build()
    eager(ids).logits.square().mean().backward()
    compiled = build()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:  # (torch's default, restored afterwards: monkeypatch deletes a config module's entry on undo)
        with torch._dynamo.config.patch(optimize_ddp=True), compiled_and_checkpointed(compiled, monkeypatch):
            DDP(compiled)(ids).logits.square().mean().backward()
    finally:
        dist.destroy_process_group()
    for (n, p), q in zip(compiled.named_parameters(), eager.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
