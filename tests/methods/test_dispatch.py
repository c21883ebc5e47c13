"""Methods run inside the layer call, so everything wrapped around a layer covers them: activation
checkpointing, torch.compile, DDP and FSDP2 (2 gloo processes) train GateSkip, MoD and DND to the same losses
and gradient norms as one eager process (and DND's ranks end with the same thresholds); the Huginn, MoR and
Dreamer models train under DDP and FSDP2 like one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dispatch_script import STEPS, run

from dyndepth.methods import DND, GateSkip, MoD

METHODS = {
    # sequence scope: ranking within each row, so a rank's half batch ranks as the whole batch does
    "gateskip": {"name": "gateskip", "scope": "sequence", "ramp_end": 0.5, "ramp_steps": 1},
    "mod": {"name": "mod", "capacity": 0.5},
    # spread routers select from step 1; no EMA sync in 3 steps: 2 ranks move tau by the proportional step as one
    # process does (test_dnd_ranks_hold_equal_thresholds_through_the_ema_sync covers the sync)
    "dnd": {"name": "dnd", "layers": [0, 1], "ratio": 0.3, "router_init_std": 0.3, "beta_init": 0.5},
}
CLASSES = {"gateskip": GateSkip, "mod": MoD, "dnd": DND}
# the depth-recurrent models train under torchrun like the decoder (Huginn's and a sampling Dreamer's recurrence
# draws are the same on every rank; MoR's routers choose within each row)
# (each layer application compiles its own graphs: Huginn's mean depth and Dreamer's recurrences are 2, the presets' 4)
BASELINES = {"huginn": {"name": "none", "model": "huginn-tiny", "model_fields": {"mean_recurrence": 2}},
             "mor": {"name": "none", "model": "mor-tiny"},
             "dreamer": {"name": "none", "model": "dreamer-tiny", "model_fields": {"num_recurrences": 2}},
             # randomised depth, truncated backprop: 8, 3 and 2 steps drawn (the preset's mean 4 drew 14 first)
             "dreamer-sampled": {"name": "none", "model": "dreamer-tiny",
                                 "model_fields": {"sample_recurrence": True, "backprop_depth": 2,
                                                  "num_recurrences": 2}},
             # MoEUT is a Dreamer configuration; this one with SwitchHead's attention experts
             "moeut-switchhead": {"name": "none", "model": "moeut-switchhead-tiny"}}


def curve(out_dir: Path) -> list[dict]:
    """Per step: loss, grad_norm (clipping is off: the raw gradient's) and the method's statistics (means over
    tokens, so rank-averaged they equal one process's), from metrics.jsonl."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    keep = ("loss", "grad_norm", "gateskip/gate_sq", "gateskip/attn_skipped", "mod/predictor_loss",
            "mod/routed_fraction", "dnd/selected", "dnd/sd_loss", "dnd/tau/L1")
    return [{k: r[k] for k in keep if k in r} for r in records if "loss" in r]


def spy_layer_forward(monkeypatch, cls) -> list[bool]:
    """Record every call of the method's layer_forward (True when it runs while dynamo traces)."""
    calls = []
    inner = cls.layer_forward

    def spy(self, layer, x, ctx, slot):
        calls.append(torch.compiler.is_compiling())
        return inner(self, layer, x, ctx, slot)

    monkeypatch.setattr(cls, "layer_forward", spy)
    return calls


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    root = tmp_path_factory.mktemp("eager")
    for name, method in METHODS.items():
        run(str(root / name), method, "none")
    return {name: curve(root / name) for name in METHODS}


def assert_same_curve(got, ref, rel=1e-5, min_keys=4):
    assert len(got) == len(ref) == STEPS
    for step, ref_step in zip(got, ref):
        assert set(step) == set(ref_step) and len(step) >= min_keys
        assert step == pytest.approx(ref_step, rel=rel)


@pytest.mark.parametrize("name", list(METHODS))
def test_activation_checkpointing_recomputes_the_method_inside_each_layer(name, eager, tmp_path, monkeypatch):
    calls = spy_layer_forward(monkeypatch, CLASSES[name])
    run(str(tmp_path), METHODS[name], "none", activation_checkpointing=True)
    assert_same_curve(curve(tmp_path), eager[name], rel=1e-6)
    assert len(calls) == 2 * 2 * STEPS  # 2 layers: forward and recomputation in backward, every step


@pytest.mark.parametrize("name", list(METHODS))
def test_compiled_layers_trace_the_method_and_train_the_same(name, eager, tmp_path, monkeypatch):
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager"))
    torch._dynamo.reset()
    calls = spy_layer_forward(monkeypatch, CLASSES[name])
    run(str(tmp_path), METHODS[name], "none", compile=True)
    assert_same_curve(curve(tmp_path), eager[name], rel=1e-5)
    assert any(calls)  # dynamo traced the method's code as part of the compiled layer


@pytest.mark.parametrize("name", list(METHODS))
def test_compile_with_activation_checkpointing_compiles_the_layer_inside_the_checkpoint(name, eager, tmp_path,
                                                                                         monkeypatch):
    """Both on: the layer (method included) is traced by dynamo inside the checkpoint, forward and recomputation.
    Compiling the module traced the checkpoint instead, refused the layer's ledger entries (a side effect inside
    the checkpoint) and ran every layer eager: no call was ever traced."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager"))
    torch._dynamo.reset()
    calls = spy_layer_forward(monkeypatch, CLASSES[name])
    run(str(tmp_path), METHODS[name], "none", compile=True, activation_checkpointing=True)
    assert_same_curve(curve(tmp_path), eager[name], rel=1e-5)
    assert sum(calls) >= 2 * STEPS  # traced: at least the forward of both layers at the first step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(out_dir: Path, runs: dict[str, tuple[dict, str]]) -> None:
    """Run dispatch_script.py on 2 gloo ranks: each run {name: (method, "mode,mode")} in out_dir/name/mode."""
    port, script = _free_port(), Path(__file__).with_name("dispatch_script.py")
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(out_dir), json.dumps(runs)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out.decode()[-3000:]


# scale_by_router=False gives MoD's router no gradient and predictor_loss_weight=0 its predictor none
MOD_UNTRAINED = {**METHODS["mod"], "scale_by_router": False, "predictor_loss_weight": 0.0}
# DND with the EMA sync every step; routers spread wider, so the targets lie far from tau_init
DND_SYNCED = {t: {**METHODS["dnd"], "router_init_std": 3.0, "sync_every": 1, "ema_target": t}
              for t in ("quantile", "topk_mean")}
# every 2-rank run of this file, in one launch: starting the 2 ranks (imports, process group) took longer than a
# run, once per test
RANKED = {**{name: (method, "ddp,fsdp") for name, method in METHODS.items()},
          "mod-untrained": (MOD_UNTRAINED, "ddp"),
          **{f"dnd-{t}": (method, "ddp,fsdp") for t, method in DND_SYNCED.items()},
          **{f"baseline-{name}": (method, "ddp,fsdp") for name, method in BASELINES.items()}}


@pytest.fixture(scope="module")
def ranked(tmp_path_factory) -> Path:
    """The folder of every run in RANKED, trained on 2 ranks."""
    root = tmp_path_factory.mktemp("ranked")
    two_ranks(root, RANKED)
    return root


def one_thread_run(out_dir: Path, method: dict) -> None:
    """One process at one thread, as each rank runs: the same kernels, so only the ranks' gradient sum rounds
    apart."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(str(out_dir), method, "none")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(METHODS))
def test_ddp_and_fsdp2_on_two_ranks_match_one_process(name, eager, ranked):
    for mode in ("ddp", "fsdp"):
        assert_same_curve(curve(ranked / name / mode), eager[name])
        taus = [ranked / name / mode / f"tau_rank{r}.json" for r in range(2)]
        if name == "dnd":  # the ranks saw different rows, and the controller's all-reduce kept tau equal
            ranks = [json.loads(t.read_text()) for t in taus]
            assert ranks[0] == ranks[1] and set(ranks[0].values()) != {0.5}


def test_mod_options_that_leave_its_router_and_predictor_untrained_run_under_ddp(tmp_path, ranked):
    """scale_by_router=False gives the router no gradient and predictor_loss_weight=0 the predictor none: DDP stopped
    at step 2 ("parameters that were not used in producing loss"); the trainer freezes them, and 2 ranks train as
    one process does."""
    one_thread_run(tmp_path / "one", MOD_UNTRAINED)
    assert_same_curve(curve(ranked / "mod-untrained" / "ddp"), curve(tmp_path / "one"), min_keys=3)


@pytest.mark.parametrize("ema_target", ["quantile", "topk_mean"])
def test_dnd_ranks_hold_equal_thresholds_through_the_ema_sync(ema_target, tmp_path, ranked):
    # sync_every=1: every step the target comes from the buffered scores of both ranks pooled, so tau is equal on
    # both ranks and equal to one process's (a mean of per-rank quantiles, as before, moved tau 6e-5 off at the first
    # sync and the loss after it)
    one_thread_run(tmp_path / "one", DND_SYNCED[ema_target])
    for mode in ("ddp", "fsdp"):
        out = ranked / f"dnd-{ema_target}" / mode
        ranks = [json.loads((out / f"tau_rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0] == ranks[1]
        taus = [step["dnd/tau/L1"] for step in curve(out)]
        assert len(taus) == STEPS  # the quantile's sync moved tau, not only alpha (0.01) steps:
        assert abs(taus[0] - 0.5) > 0.02 or ema_target != "quantile"
        assert_same_curve(curve(out), curve(tmp_path / "one"))  # tau, loss and statistics


@pytest.mark.parametrize("name", list(BASELINES))
def test_baselines_train_on_two_ranks_like_one_process(name, tmp_path, ranked):
    one_thread_run(tmp_path / "one", BASELINES[name])
    for mode in ("ddp", "fsdp"):  # loss and grad norm
        assert_same_curve(curve(ranked / f"baseline-{name}" / mode), curve(tmp_path / "one"), min_keys=2)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baselines_train_the_same_compiled_and_with_activation_checkpointing(name, tmp_path, monkeypatch):
    """Dynamo traces every family (Dreamer's fp32 experts once failed: grouped_mm has a bf16-only shape rule)."""
    compile_ = torch.nn.Module.compile  # the eager backend: dynamo's tracing is what is tested, and it is fast
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager"))
    run(str(tmp_path / "one"), BASELINES[name], "none")
    run(str(tmp_path / "compiled"), BASELINES[name], "none", compile=True)
    run(str(tmp_path / "checkpointed"), BASELINES[name], "none", activation_checkpointing=True)
    # compiled code rotates by RoPE's formula where float32 eager runs the fused rotation (an ulp apart, core/layers
    # apply_rope); over 3 steps at one thread that moved Dreamer's grad norm by 1.2e-5 relative
    assert_same_curve(curve(tmp_path / "compiled"), curve(tmp_path / "one"), rel=5e-5, min_keys=2)
    assert_same_curve(curve(tmp_path / "checkpointed"), curve(tmp_path / "one"), min_keys=2)


DEEP = {"decoder": ("tiny-qwen3", {"num_hidden_layers": 4}, None),  # positions past the limit the test sets
        "gateskip": ("tiny-qwen3", {"num_hidden_layers": 2}, {"name": "gateskip"}),
        "dreamer": ("dreamer-tiny", {"num_recurrences": 2}, None)}


@pytest.mark.parametrize("name", list(DEEP))
def test_per_layer_compile_traces_every_position_of_a_deep_model(name, monkeypatch):
    """dynamo runs a function eager (one easily missed warning) once it has compiled it `recompile_limit` times
    (8 by default: a 9-layer model would reach it). Here the limit starts one below the number of positions:
    `apply_compile` must raise it (dynamo is told to fail instead of falling back, so falling back fails the
    test), and a plain decoder's layers share one graph set (the first compile specializes the slot number)."""
    from torch._dynamo.utils import counters

    from dyndepth import build_model, preset
    from dyndepth.methods import attach_method
    from dyndepth.train.parallel import apply_compile

    config = torch._dynamo.config
    saved = {k: getattr(config, k) for k in ("recompile_limit", "accumulated_recompile_limit",
                                             "fail_on_recompile_limit_hit")}
    compile_ = torch.nn.Module.compile  # the eager backend: dynamo's tracing is what is tested
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager"))
    preset_name, fields, method = DEEP[name]
    torch.manual_seed(0)
    model = build_model(preset(preset_name, **fields)).train()
    if method is not None:
        method = dict(method)
        attach_method(model, method.pop("name"), method)
    ids = torch.randint(0, 200, (2, 16))
    torch._dynamo.reset()
    counters.clear()
    try:
        config.fail_on_recompile_limit_hit, config.recompile_limit = True, len(model.schedule) - 1
        apply_compile(model)
        out = model(ids)
        (out.logits.float().square().mean() + out.aux_loss).backward()
        model.eval()  # evaluation forwards compile their own graphs too: with and without gradients
        model(ids)
        with torch.no_grad():
            model(ids)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        for k, v in saved.items():
            setattr(config, k, v)
        torch._dynamo.reset()
    assert graphs >= 1
    if name == "decoder":
        assert graphs <= 3  # training and evaluation (no-grad) share the graph set, bar the grad mode


@pytest.mark.parametrize("preset_name", ["dreamer-tiny", "huginn-tiny"])
def test_compile_room_covers_drawn_depths(preset_name):
    """With a depth drawn per training forward, the compile limit is sized from the sampler's 1 - 1e-6 quantile:
    above every one of 20,000 draws."""
    from dyndepth import build_model, preset
    from dyndepth.models.huginn import sample_recurrence

    fields = {"sample_recurrence": True}
    model = build_model(preset(preset_name, **fields))
    mean = getattr(model.config, "num_recurrences", None) or model.config.mean_recurrence
    g = torch.Generator().manual_seed(3)
    deepest = max(sum(sample_recurrence(mean, 0, g)) for _ in range(20000))
    per_step = len(model.model.layers) if preset_name == "dreamer-tiny" else model.config.n_layers_in_recurrent_block
    assert model.max_applications() >= deepest * per_step > len(model.schedule)


@pytest.mark.parametrize("preset_name, method", [("huginn-tiny", None), ("dreamer-tiny", None), ("mor-tiny", None),
                                                 ("tiny-qwen3", {"layers": (0, 1), "ratio": 0.3,
                                                                 "router_init_std": 0.3})])
def test_layer_hooks_fire_once_per_application_as_docs_design_says(preset_name, method):
    """docs/design.md: a layer's hooks fire once per application of the schedule (every recurrence step), and the
    recomputation of activation checkpointing does not fire them; DND's nested pass (inside the layer call) and the
    recomputation fire its submodules' hooks only."""
    from dyndepth import build_model, preset
    from dyndepth.methods import attach_method
    from dyndepth.train.parallel import apply_activation_checkpointing

    torch.manual_seed(0)
    model = build_model(preset(preset_name)).eval()  # (a fixed schedule: training draws Huginn's depth)
    if method is not None:
        attach_method(model, "dnd", method)
    apply_activation_checkpointing(model)
    layer, calls = model.model.layers[-1], {"pre": 0, "post": 0, "attn": 0}
    layer.register_forward_pre_hook(lambda m, args: calls.__setitem__("pre", calls["pre"] + 1))
    layer.register_forward_hook(lambda m, args, out: calls.__setitem__("post", calls["post"] + 1))
    layer.self_attn.register_forward_hook(lambda m, args, out: calls.__setitem__("attn", calls["attn"] + 1))
    out = model(torch.randint(0, 200, (2, 16)))
    forward = dict(calls)
    out.logits.float().square().mean().backward()
    applications = sum(app.layer == len(model.model.layers) - 1 for app in model.schedule)
    nested = method is not None
    assert not nested or bool(out.stats["dnd/selected/L1"] > 0)  # (the nested pass ran)
    assert forward == {"pre": applications, "post": applications, "attn": applications + nested}
    assert calls == {"pre": applications, "post": applications, "attn": 2 * forward["attn"]}  # recomputed: attn only
