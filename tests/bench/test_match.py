"""`dyndepth match` (bench/match.py): analytic counts equal the built models', the proposed baselines are within
tolerance where the table says so, their recipes rebuild them, and bad input is one clear error."""

import dataclasses
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dyndepth
from dyndepth.bench import match
from dyndepth.cli import app
from dyndepth.runconfig import load_run_config
from dyndepth.train.run import build_model


@pytest.fixture(scope="module")
def matched(tmp_path_factory):
    out = tmp_path_factory.mktemp("match")
    torch.manual_seed(0)
    cfg = match.MatchConfig(reference="dreamer-tiny", batch_size=2, seq_len=32, max_measured=4, out_dir=str(out))
    return match.main(cfg)


@pytest.mark.parametrize("family", match.FAMILIES)
def test_analytic_parameters_and_flops_equal_the_built_models(family):
    ref = dyndepth.preset("dreamer-tiny")
    grid, width = match.family_grid(family, ref)
    target = match.flops_per_token(ref, 32)
    solved = next(c for c in (match.solve_width(f, width, target, 32) for f in grid[::7]) if c is not None)
    config = match.config_of(solved)
    model = dyndepth.build_model(config)
    assert match.num_params(config) == model.num_params()
    assert match.flops_per_token(config, 32) * 32 == model.forward_flops(32)
    assert abs(match.flops_per_token(config, 32) / target - 1) < 0.05


def test_switchhead_moeut_candidates_count_their_attention_experts():
    ref = dyndepth.preset("dreamer-tiny")
    grid, width = match.family_grid("moeut", ref, switchhead=4)
    target = match.flops_per_token(ref, 32)
    solved = next(c for c in (match.solve_width(f, width, target, 32) for f in grid[::5]) if c is not None)
    config = match.config_of(solved)
    model = dyndepth.build_model(config)
    assert config.attn_num_experts == 4 and "SwitchHead E=4,k=2" in match.describe(config)
    assert match.num_params(config) == model.num_params()
    assert match.flops_per_token(config, 32) * 32 == model.forward_flops(32)
    with pytest.raises(ValueError, match="switchhead must be 0"):
        match.MatchConfig(switchhead=1)


def test_proposed_baselines_are_within_tolerance_and_their_recipes_rebuild_them(matched):
    ref = matched["reference"]
    by_family = {b["family"]: b for b in matched["baselines"]}
    assert set(by_family) == set(match.FAMILIES)
    assert by_family["dense"]["within"] and by_family["moeut"]["within"]
    for b in matched["baselines"]:
        worst = max(abs(v) for v in b["mismatch"].values())
        assert b["within"] == (worst <= 0.05)
        assert b["mismatch"]["params"] == pytest.approx(b["params"] / ref["params"] - 1)
        rc = load_run_config(b["recipe"])
        assert rc.train.batch_size == 2 and rc.train.seq_len == 32
        model = build_model(rc.model)
        assert model.config == b["config"] and model.num_params() == b["params"]
        assert model.forward_flops(32) / 32 == pytest.approx(b["flops"])
    dense = by_family["dense"]
    assert match.measure_memory(dense["config"], 2, 32) == dense["memory"]  # the CPU count is deterministic
    table = (Path(dense["recipe"]).parent / "match.md").read_text()
    assert "| dense |" in table and "d memory" in table and "d train FLOPs (not matched)" in table
    huginn = by_family["huginn"]  # reported, one convention: forward + 2 x forward of what takes gradients
    assert huginn["train_flops"] == pytest.approx(match.build_model(huginn["config"]).train_flops_per_token(32))
    bp = huginn["config"].mean_backprop_depth  # the training depth that sets its train FLOPs is in the table
    assert f"(backprop {bp or 'all'})" in match.describe(huginn["config"]) and f"(backprop {bp or 'all'})" in table
    assert dense["train_flops"] == pytest.approx(3 * dense["flops"]) and ref["train_flops"] > 0


def test_a_sampling_dreamer_reference_is_measured_at_its_evaluation_depth_as_huginn_is():
    """Its first training draw (14 steps at mean 4) set the memory every baseline was matched against (1.46x)."""
    import dataclasses

    fixed = dyndepth.preset("dreamer-tiny")
    sampled = dataclasses.replace(fixed, sample_recurrence=True)
    assert match.measure_memory(sampled, 2, 32) == match.measure_memory(fixed, 2, 32)


def test_a_recipe_references_train_and_data_sections_go_to_every_baseline_recipe(tmp_path):
    """The baselines of a recipe trained on the default data with the default lr (only model, batch and length
    were written): they now train as the reference does, each into its own out_dir."""
    ref = tmp_path / "ref.toml"
    ref.write_text('model = "dreamer-tiny"\n[train]\nlr = 3e-3\nsteps = 7\nout_dir = "runs/ref"\n'
                   '[data]\nsource = "synthetic"\ntasks = ["add"]\n[eval]\nenabled = false\n')
    cfg = match.MatchConfig(reference=str(ref), against=["dense"], batch_size=2, seq_len=32, max_measured=2,
                            out_dir=str(tmp_path / "out"))
    rc = load_run_config(match.main(cfg)["baselines"][0]["recipe"])
    assert (rc.train.lr, rc.train.steps, rc.train.batch_size, rc.train.seq_len) == (3e-3, 7, 2, 32)
    assert rc.train.out_dir.endswith("runs/ref-dense") and rc.data["tasks"] == ["add"] and not rc.eval["enabled"]
    # without a batch and length of its own, match measures and writes the reference recipe's (it used 8 x 256)
    ref.write_text(ref.read_text().replace("[train]\n", "[train]\nbatch_size = 3\nseq_len = 48\n"))
    cfg = match.MatchConfig(reference=str(ref), against=["dense"], max_measured=2, out_dir=str(tmp_path / "o2"))
    assert (cfg.batch_size, cfg.seq_len) == (3, 48)
    assert (match.MatchConfig().batch_size, match.MatchConfig().seq_len) == (8, 256)  # a preset reference


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'gpt' is not a baseline family"):
        match.MatchConfig(against=["gpt"])
    with pytest.raises(ValueError, match="tolerance must be in"):
        match.MatchConfig(tolerance=0)
    result = CliRunner().invoke(app, ["match", "no-such-model", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "neither a preset" in result.output


def test_device_auto_runs_on_the_device_it_resolves_to(tmp_path, monkeypatch):
    """`--device auto` (the trainer's default) measured every model, then crashed in torch.device("auto") while
    describing the machine; the device is resolved with the options, so the table names the one that measured."""
    monkeypatch.setattr(match, "measure_memory", lambda config, batch_size, seq_len, device="cpu": 2**20)
    result = CliRunner().invoke(app, ["match", "dreamer-tiny", "--against", "dense", "--batch-size", "1", "--seq-len",
                                      "16", "--device", "auto", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    kind = "CUDA peak" if torch.cuda.is_available() else "CPU bytes held by one step"
    assert f"memory = {kind}" in (tmp_path / "out" / "match.md").read_text()
    result = CliRunner().invoke(app, ["match", "dreamer-tiny", "--device", "foo", "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "device 'foo'" in result.output, result.output


def test_a_reference_with_a_method_is_refused_not_matched_as_its_plain_decoder(tmp_path):
    """A recipe with [method] dnd (or a checkpoint saved with a method) was matched as its plain decoder: the table
    showed the reference at demo-tiny's parameters, FLOPs and memory, and a "dense" baseline identical to it read
    "within: yes", while the DND model runs its nested passes and routers on top."""
    from dyndepth.methods import attach_dnd

    recipe = tmp_path / "dnd.toml"
    recipe.write_text('model = "demo-tiny"\n\n[method]\nname = "dnd"\nlayers = [1, 2]\nratio = 0.2\n')
    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
    attach_dnd(model, {"layers": [0, 1]})
    model.save_pretrained(tmp_path / "ckpt")
    for reference in (recipe, tmp_path / "ckpt"):
        with pytest.raises(ValueError, match="carries the method 'dnd'"):
            match.load_reference(str(reference))
    plain = tmp_path / "plain.toml"
    plain.write_text('model = "demo-tiny"\n\n[method]\nname = "none"\n')
    assert match.load_reference(str(plain)).hidden_size == 128


def test_a_mor_shape_names_its_own_unshared_layers():
    """A MoR reference of 2 unshared layers first and none last read "1 + 2 x R=3 + 1" in the table (and in the
    study's shapes): the description printed the grid's middle-cycle default whatever the config held."""
    config = dyndepth.preset("mor-tiny")
    assert "D=128, N=4/2, 1 + 2 x R=3 + 1, expert-choice" in match.describe(config)
    other = dataclasses.replace(config, n_layers_first=2, n_layers_last=0)
    assert ", 2 + 2 x R=3 + 0, expert-choice" in match.describe(other)


def test_a_huginn_shape_without_the_sampler_says_every_step_takes_gradients():
    """A Huginn reference with sample_recurrence = false read "(backprop 2)" at r = 4, though all 4 steps train (and
    its train FLOPs, in the same row, counted all 4)."""
    sampled = dyndepth.preset("huginn-tiny")
    assert "x r=4 (backprop 2)," in match.describe(sampled)
    fixed = dataclasses.replace(sampled, sample_recurrence=False)
    assert "x r=4 (backprop all)," in match.describe(fixed)
    assert match.train_flops_per_token(fixed, 32) == pytest.approx(3 * match.flops_per_token(fixed, 32))
