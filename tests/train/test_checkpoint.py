import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_loader import TinyLoader
from train_script import tiny_train_config

from dyndepth import CausalLM, preset
from dyndepth.safetensors_io import CheckpointError
from dyndepth.train import train
from dyndepth.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, load_model_weights
from dyndepth.train.parallel import DistInfo
from dyndepth.train.trainer import setup_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_latest_ignores_tmp_and_incomplete_dirs_and_keep_last(tmp_path):
    cfg = tiny_train_config(str(tmp_path), steps=6, save_every=1, keep_last=2)
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3"))
    train(model, TinyLoader(2, 16), cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005", "step_0000006"]
    (tmp_path / "step_0000009.tmp").mkdir()  # a save killed before its rename
    (tmp_path / "step_0000009.tmp" / "train_state.pt").write_bytes(b"partial")
    (tmp_path / "step_0000008").mkdir()  # not a complete checkpoint (no train_state.pt)
    assert latest_checkpoint(tmp_path).name == "step_0000006"
    assert sorted(p.name for p in (tmp_path / "step_0000006").iterdir()) == [
        "config.yaml", "manifest.json", "model.safetensors", "model_config.json", "rank_0.pt", "train_state.pt"]
    # the weights (tied lm_head re-aliased) load into a fresh model and match the trained one
    fresh = CausalLM(preset("tiny-qwen3"))
    load_model_weights(tmp_path / "step_0000006", fresh)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    # a fresh (non-resume) run into a folder with checkpoints is refused instead of mixing runs
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16), cfg)


def _two_checkpoints(tmp_path, **kw) -> Path:
    """A 4-step run saving at steps 2 and 4; returns its out_dir."""
    torch.manual_seed(0)
    train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16), tiny_train_config(str(tmp_path), steps=4,
                                                                                 save_every=2, **kw))
    return tmp_path


def test_resume_applies_the_new_hyperparameters_and_logs_each_change(tmp_path, caplog):
    out = _two_checkpoints(tmp_path, lr_groups={"model.layers.1.*": 10.0})
    new = tiny_train_config(str(out), steps=8, lr=1e-3, min_lr=1e-4, weight_decay=0.05, betas=(0.8, 0.9),
                            lr_groups={"model.layers.1.*": 5.0}, warmup=1, schedule="constant")
    raw, _, opt, sched = setup_model(CausalLM(preset("tiny-qwen3")), new, DistInfo())
    saved = torch.load(out / "step_0000002" / "train_state.pt", weights_only=True)["optimizer"]
    with caplog.at_level(logging.INFO, logger="dyndepth"):
        state = load_checkpoint(out / "step_0000002", raw, opt, sched, TinyLoader(2, 16), DistInfo(), new)
    assert state["step"] == 2
    for group in opt.param_groups:  # this run's values, on the checkpoint's AdamW moments
        assert group["lr"] == pytest.approx(1e-3 * group["lr_mult"]) and group["lr_mult"] in (1.0, 5.0)
        assert group["betas"] == (0.8, 0.9) and group["eps"] == new.eps
        assert group["weight_decay"] == (0.05 if group["params"][0].ndim >= 2 else 0.0)
    first = saved["param_groups"][0]["params"][0]  # saved by parameter name
    assert first == opt.param_groups[0]["names"][0]
    torch.testing.assert_close(opt.state[opt.param_groups[0]["params"][0]]["exp_avg"], saved["state"][first]["exp_avg"])
    logged = caplog.text
    for field in ("train.lr ", "train.min_lr", "train.weight_decay", "train.betas", "train.steps",
                  "train.lr_groups", "train.schedule"):
        assert field in logged, field
    opt.step()  # the next step uses the new LR
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * opt.param_groups[0]["lr_mult"])
    # the RNG streams continue where the saved run left them (same world size)
    saved_rng = torch.load(out / "step_0000002" / "rank_0.pt", weights_only=True)["rng"]["torch"]
    torch.manual_seed(123)
    load_checkpoint(out / "step_0000002", raw, opt, sched, TinyLoader(2, 16), DistInfo(), new)
    assert torch.equal(torch.get_rng_state(), saved_rng)


def test_regrouped_or_unfrozen_parameters_are_a_clear_error(tmp_path):
    out = _two_checkpoints(tmp_path)
    for change in ({"lr_groups": {"model.layers.1.*": 10.0}}, {"freeze": ["model.layers.0.*"]}):
        cfg = tiny_train_config(str(out), steps=6, resume=True, **change)
        with pytest.raises(CheckpointError, match=r"train\.freeze / train\.lr_groups"):
            train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16), cfg)


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, caplog):
    out = _two_checkpoints(tmp_path)
    older = tiny_train_config(str(out), steps=3, resume=str(out / "step_0000002"))
    with caplog.at_level(logging.WARNING, logger="dyndepth"):
        train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16), older)
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002", "step_0000003"]
    assert [p.name for p in (out / "abandoned_0").iterdir()] == ["step_0000004"]
    assert "moved 1 newer checkpoint" in caplog.text
    assert latest_checkpoint(out).name == "step_0000003"  # resume=true continues the new branch


def test_checkpoint_with_ddp_prefixed_keys_still_loads(tmp_path):
    """Checkpoints written by DDP runs before the fix hold `module.`-prefixed keys."""
    from dyndepth.safetensors_io import write_safetensors

    model = CausalLM(preset("tiny-qwen3"))
    state = {f"module.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    (tmp_path / "ck").mkdir()
    aliases = json.dumps({"module.lm_head.weight": "module.model.embed_tokens.weight"})
    write_safetensors(state, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt", "aliases": aliases})
    fresh = CausalLM(preset("tiny-qwen3"))
    load_model_weights(tmp_path / "ck", fresh)
    torch.testing.assert_close(fresh.model.norm.weight, model.model.norm.weight)
    torch.testing.assert_close(fresh.lm_head.weight, model.lm_head.weight)


def test_resuming_from_a_path_that_does_not_exist_says_so(tmp_path):
    """train.resume=<a mistyped path> said "<path> has no manifest.json; it is not a complete dyndepth training
    checkpoint", as if the folder were there and damaged."""
    from dyndepth.train.integrity import verify_checkpoint

    missing = tmp_path / "run" / "step_0000005"
    with pytest.raises(CheckpointError, match=r"step_0000005 does not exist; check the path"):
        verify_checkpoint(missing)
    assert not missing.exists()
    missing.parent.mkdir()
    (missing.parent / "model.safetensors").write_bytes(b"")  # a file inside a checkpoint, not its folder
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a file, not a checkpoint folder"):
        verify_checkpoint(missing.parent / "model.safetensors")  # (was: "... does not exist")


def test_resuming_a_checkpoint_that_kept_never_trained_parameters_in_its_groups(tmp_path, monkeypatch):
    """Checkpoints from before the trainer froze a method's `untrained_parameters` list them in their AdamW groups
    with no state (no gradient reached them); resuming one was refused ("train.freeze / train.lr_groups select
    other parameters than the checkpoint's ... no longer trained: ['model.layers.1.mod.router.weight']")."""
    from dyndepth.methods.mod import MoD, attach_mod

    def mod_model():
        torch.manual_seed(0)
        model = CausalLM(preset("tiny-qwen3"))
        attach_mod(model, {"scale_by_router": False})
        return model

    with monkeypatch.context() as m:
        m.setattr(MoD, "untrained_parameters", lambda self: [])  # the trainer before it froze them
        train(mod_model(), TinyLoader(2, 16), tiny_train_config(str(tmp_path), steps=2, save_every=2))
    saved = torch.load(tmp_path / "step_0000002" / "train_state.pt", weights_only=True)["optimizer"]
    assert "model.layers.1.mod.router.weight" not in saved["state"]  # in a group, without AdamW state
    assert any("model.layers.1.mod.router.weight" in g["names"] for g in saved["param_groups"])
    result = train(mod_model(), TinyLoader(2, 16), tiny_train_config(str(tmp_path), steps=4, save_every=2,
                                                                       resume=True))
    assert result.steps == 4


def test_resuming_another_folders_checkpoint_into_a_used_out_dir_is_refused(tmp_path):
    """train.resume=A/step_2 with out_dir B holding another run's checkpoints continued in B: keep_last pruned B's
    steps as the resumed run saved (B's step_2 went) and B's config.yaml was overwritten."""
    a, b = _two_checkpoints(tmp_path / "a"), _two_checkpoints(tmp_path / "b", seed=7)
    before = (b / "config.yaml").read_text()
    cfg = tiny_train_config(str(b), steps=8, save_every=2, keep_last=2, resume=str(a / "step_0000002"))
    with pytest.raises(ValueError, match=r"already holds checkpoints of its own run \(latest step_0000004\)"):
        train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16), cfg)
    assert [p.name for p in list_checkpoints(b)] == ["step_0000002", "step_0000004"]
    assert (b / "config.yaml").read_text() == before
    with pytest.raises(CheckpointError, match=r"has no manifest.json"):  # the run's own folder, not a step: as before
        train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16), tiny_train_config(str(b), steps=8, resume=str(b)))
    fresh = tiny_train_config(str(tmp_path / "c"), steps=3, resume=str(a / "step_0000002"))  # a new folder: fine
    assert train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16), fresh).steps == 3


@pytest.mark.parametrize("kind", ["gateskip", "mod"])
def test_a_checkpoint_from_before_the_calibration_buffers_loads_its_weights_uncalibrated(tmp_path, kind):
    """Training checkpoints written before 2026-12-02 (no manifest.json) hold no *_ppm buffers: the knob a
    method's thresholds were calibrated at lived in its config then. Resuming them is refused with the advice to
    export them with `dyndepth convert`, which stopped on 'does not fit the model: missing [...tau_budget_ppm]'."""
    from dyndepth.methods import attach_method
    from dyndepth.safetensors_io import write_safetensors

    model = CausalLM(preset("tiny-qwen3"))
    attach_method(model, kind, {})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ppm = [k for k in state if k.endswith("_ppm")]
    assert ppm
    tmp_path.joinpath("step_0000004").mkdir()
    write_safetensors({k: v for k, v in state.items() if k not in ppm},
                      tmp_path / "step_0000004" / "model.safetensors")
    fresh = CausalLM(preset("tiny-qwen3"))
    attach_method(fresh, kind, {})
    load_model_weights(tmp_path / "step_0000004", fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())  # weights, and -1: not calibrated
    write_safetensors({k: v for k, v in state.items() if k not in ppm and "layers.1.mlp" not in k},
                      tmp_path / "step_0000004" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit the model: missing \['model.layers.1.mlp"):
        load_model_weights(tmp_path / "step_0000004", fresh)  # a weight missing is still an error


def test_a_shared_gate_gateskip_checkpoint_from_before_the_per_layer_thresholds_exports(tmp_path):
    """A shared-gate GateSkip training step from before 2026-12-02 (no manifest; its one gate pair and threshold pair
    under model.layers.0.gateskip) stopped `dyndepth convert` with 'does not fit the model': its gates load into
    model.gateskip, every layer's thresholds uncalibrated."""
    from dyndepth.methods import attach_method
    from dyndepth.safetensors_io import write_safetensors

    model = CausalLM(preset("tiny-qwen3"))
    attach_method(model, "gateskip", {"shared": True})
    with torch.no_grad():
        for p in model.model.gateskip.parameters():
            p.normal_(0, 0.5)
    state = {k.replace("model.gateskip.", "model.layers.0.gateskip."): v.clone() for k, v in model.state_dict().items()
             if "tau" not in k or k == "model.layers.0.gateskip.tau"}  # the old layout
    tmp_path.joinpath("step_0000004").mkdir()
    write_safetensors(state, tmp_path / "step_0000004" / "model.safetensors")
    fresh = CausalLM(preset("tiny-qwen3"))
    attach_method(fresh, "gateskip", {"shared": True})
    load_model_weights(tmp_path / "step_0000004", fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k  # (thresholds: zeros, knobs -1, as attach leaves them)
