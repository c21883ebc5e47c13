"""Bad input gets one clear line at the boundary: what is wrong and how to fix it (the CLI prints it with no
trace). Each case names the message it must carry; BAD_INPUTS counts them for the issue note."""

import pytest
import torch
from typer.testing import CliRunner

import dyndepth
from dyndepth import CausalLM, KVCache, preset
from dyndepth.cli import app
from dyndepth.devices import resolve_device, resolve_dtype
from dyndepth.methods import GateSkipConfig, MoDConfig, attach_gateskip, attach_mod


@pytest.fixture(scope="module")
def model():
    return CausalLM(preset("tiny-qwen3")).eval()


FORWARD_CASES = [  # (what, kwargs for model(...), message)
    ("id >= vocab_size", dict(input_ids=torch.tensor([[1, 2, 256]])), r"\[0, 256\).*got ids from 1 to 256"),
    ("negative id", dict(input_ids=torch.tensor([[-1, 2]])), r"\[0, 256\)"),
    ("float ids", dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer token ids.*use .long"),
    ("1-D ids", dict(input_ids=torch.tensor([1, 2, 3])), r"\(batch, time\).*input_ids\[None\]"),
    ("empty input", dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
    ("empty batch", dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), "empty"),
    ("longer than max_position_embeddings", dict(input_ids=torch.zeros(1, 513, dtype=torch.long)),
     r"513 tokens, more than max_position_embeddings \(512\)"),
    ("positions past the limit", dict(input_ids=torch.zeros(1, 2, dtype=torch.long),
                                      positions=torch.tensor([[600, 601]])), "beyond max_position_embeddings"),
    ("attention_mask of another shape", dict(input_ids=torch.zeros(2, 4, dtype=torch.long),
                                             attention_mask=torch.ones(2, 5)), r"attention_mask must have the shape"),
    ("attention_mask not 0/1", dict(input_ids=torch.zeros(1, 3, dtype=torch.long),
                                    attention_mask=torch.tensor([[0.5, 1.0, 1.0]])), "1 for real tokens and 0"),
    ("num_logits past the input", dict(input_ids=torch.zeros(1, 3, dtype=torch.long), num_logits=4),
     r"num_logits must lie in \[1, 3\]"),
    ("ids not a tensor", dict(input_ids=[[1, 2]]), "torch.Tensor"),
]


@pytest.mark.parametrize("what,kwargs,message", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_rejects_bad_input_at_the_boundary(model, what, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_generation_rejects_bad_requests(model):
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number >= 0"):
        model.generate(ids, -1)
    with pytest.raises(ValueError, match="right-padded.*left padding"):
        model.generate(ids, 2, attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model.generate(ids, 600)
    with pytest.raises(ValueError, match="method attached"):
        model.generate(ids, 2, skip_budget=0.3)


def test_budgets_and_ratios_outside_their_range():
    gated = CausalLM(preset("tiny-qwen3"))
    method = attach_gateskip(gated)
    with pytest.raises(ValueError, match=r"budget=1.5 must lie in \[0, 1\)"):
        GateSkipConfig(budget=1.5)
    with pytest.raises(ValueError, match="must lie in"):
        with method.override(budget=-0.1):
            pass
    with pytest.raises(ValueError, match=r"capacity=0.0 must lie in \(0, 1\]"):
        MoDConfig(capacity=0.0)
    with pytest.raises(ValueError, match="no runtime knob 'ratio'"):
        with method.override(ratio=0.2):
            pass


def test_a_method_on_a_model_it_cannot_handle():
    with pytest.raises(ValueError, match="attaches to decoder models.*Linear has none"):
        attach_gateskip(torch.nn.Linear(4, 4))
    gated = CausalLM(preset("tiny-qwen3"))
    attach_gateskip(gated)
    with pytest.raises(ValueError, match="already carries method 'gateskip'"):
        attach_mod(gated)
    with pytest.raises(ValueError, match="is not one of"):
        dyndepth.methods.attach_method(CausalLM(preset("tiny-qwen3")), "gatesk1p")
    with pytest.raises(ValueError, match=r"gateskip.path=None is not one of \('auto', 'packed', 'dense'\)"):
        dyndepth.methods.attach_method(CausalLM(preset("tiny-qwen3")), "gateskip", {"path": None})  # --set ...=none


def test_devices_and_dtypes_by_name():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible.*use device cpu"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of"):
        resolve_dtype("fp8")
    assert resolve_device("auto").type in ("cpu", "cuda") and resolve_dtype("bfloat16") == torch.bfloat16


def test_cache_requests_are_checked():
    with pytest.raises(ValueError, match="window length"):
        KVCache(1, 1, 4, 1, 2).window(9)
    m = CausalLM(preset("tiny-qwen3"))
    with pytest.raises(ValueError, match="positions are required with a KV cache"):
        m(torch.zeros(1, 2, dtype=torch.long), cache=KVCache.for_model(m.config, 1, 4))


def test_positions_past_the_caches_length_are_named():
    """Position S of an S-position cache landed in its scratch column (the token never saw its own K/V: logits 0.09
    off, no error); S + 1 raised an IndexError from deep inside."""
    m = CausalLM(preset("tiny-qwen3")).eval()
    ids = torch.randint(0, 256, (1, 9))
    cache = KVCache.for_model(m.config, 1, 8)
    with torch.no_grad():
        m(ids[:, :8], positions=torch.arange(8)[None], cache=cache)
        for pos in (8, 9):
            with pytest.raises(ValueError, match=f"positions reach {pos}, but the KV cache holds positions 0..7"):
                m(ids[:, 8:], positions=torch.tensor([[pos]]), cache=cache)
        with pytest.raises(ValueError, match="positions reach 5, but the KV cache holds positions 0..3"):
            m(ids[:, 8:], positions=torch.tensor([[5]]), cache=cache.window(4))


def test_a_cache_of_another_dtype_than_the_model_computes_in_is_named_outside_autocast():
    """It failed inside attention ("Expected query, key, and value to have the same dtype"); under autocast, which
    casts what attention reads, it runs."""
    m = CausalLM(preset("tiny-qwen3")).eval().to(torch.bfloat16)
    ids, pos = torch.zeros(1, 2, dtype=torch.long), torch.arange(2)[None]
    with pytest.raises(ValueError, match=r"holds torch.float32 but the model computes in torch.bfloat16.*dtype="):
        m(ids, positions=pos, cache=KVCache.for_model(m.config, 1, 4))
    with pytest.raises(ValueError, match="holds torch.bfloat16 but the model computes in torch.float32"):
        m.float().generate(ids, 2, cache_dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.generate(ids, 2, cache_dtype=torch.bfloat16).shape == (1, 4)
        assert torch.equal(m.generate(ids, 2, cache_dtype="bfloat16"), m.generate(ids, 2, cache_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype 'bf16' is not one of"):
        m.generate(ids, 2, cache_dtype="bf16")
        assert m(ids, positions=pos, cache=KVCache.for_model(m.config, 1, 4)).logits.shape == (1, 2, 256)


def _recipe(tmp_path, source: str, **train) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in train.items())
    text = (f'[model]\npreset = "tiny-qwen3"\nvocab_size = 300\n[train]\nsteps = 2\nbatch_size = 2\nseq_len = 8\n'
            f'out_dir = "{tmp_path / "run"}"\nprogress = false\nplot = false\ndevice = "cpu"\nsave_every = 1\n{extra}'
            f'[data]\nsource = "{source}"\ncache_dir = "{tmp_path / "cache"}"\n[eval]\nenabled = false\n')
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return str(path)


def _cli_error(args) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_cli_data_files_that_cannot_be_read(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 8)
    (tmp_path / "broken.txt.gz").write_bytes(b"not a gzip stream")
    cases = {"empty.txt": "every document of the source was empty", "binary.txt": "not UTF-8 text",
             "broken.txt.gz": "damaged or truncated gzip", "missing.txt": "no such file or folder"}
    for name, message in cases.items():
        line = _cli_error(["train", _recipe(tmp_path, str(tmp_path / name))])
        assert message in line and (name in line or name == "empty.txt"), line


def test_cli_a_missing_val_source_and_a_seq_len_past_the_model_are_named_before_any_data_is_built(tmp_path):
    (tmp_path / "t.txt").write_text("some text " * 200)
    recipe = _recipe(tmp_path, str(tmp_path / "t.txt"))
    line = _cli_error(["train", recipe, "--set", f"data.val_source={tmp_path / 'vall.txt'}"])
    assert line.startswith("error: data.val_source ") and "vall.txt" in line and "no such file" in line
    line = _cli_error(["train", recipe, "--set", "train.seq_len=5000"])
    assert "train.seq_len=5000 is longer than the model's max_position_embeddings" in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing tokenized or written


def test_cli_recipe_values_of_the_wrong_type(tmp_path):
    (tmp_path / "t.txt").write_text("some text " * 200)
    recipe = _recipe(tmp_path, str(tmp_path / "t.txt"))
    assert "train.lr: expected float, got 'abc'" in _cli_error(["train", recipe, "--set", "train.lr=abc"])
    assert "train.steps: expected int" in _cli_error(["train", recipe, "--set", "train.steps=1.5"])
    assert "unknown" in _cli_error(["train", recipe, "--set", "train.learning_rate=1e-3"]).lower()
    line = _cli_error(["train", recipe, "--set", "model.hidden=64"])  # a model field that does not exist
    assert "ModelConfig has no field 'hidden'" in line and "'hidden_size'" in line


def test_cli_resume_with_a_recipe_that_no_longer_matches_names_the_fields(tmp_path):
    (tmp_path / "t.txt").write_text("some text for a tiny run " * 100)
    recipe = _recipe(tmp_path, str(tmp_path / "t.txt"))
    ok = CliRunner().invoke(app, ["train", recipe])
    assert ok.exit_code == 0, ok.output
    line = _cli_error(["train", recipe, "--resume", "--set", "model.hidden_size=128", "--set", "method.name=gateskip"])
    assert "model.hidden_size: checkpoint unset (the preset's or default value), recipe 128" in line
    assert "method.name" in line
    assert "new train.out_dir" in line


def test_cli_resume_compares_the_recipe_with_the_checkpoint_it_resumes_from(tmp_path):
    """A damaged config.yaml in the latest checkpoint: the trainer skips that checkpoint, so the recipe check must
    read the one it resumes from (it read the damaged file and stopped the run with a difference that was not)."""
    (tmp_path / "t.txt").write_text("some text for a tiny run " * 100)
    recipe = _recipe(tmp_path, str(tmp_path / "t.txt"))
    assert CliRunner().invoke(app, ["train", recipe]).exit_code == 0
    config = tmp_path / "run" / "step_0000002" / "config.yaml"
    config.write_text(config.read_text().replace("tiny-qwen3", "tiny-qwen4"))
    resumed = CliRunner().invoke(app, ["train", recipe, "--resume", "--set", "train.steps=3"])
    assert resumed.exit_code == 0, resumed.output
    assert [p.name for p in (tmp_path / "run" / "abandoned_0").iterdir()] == ["step_0000002"]  # resumed at step 1
    assert (tmp_path / "run" / "step_0000003").is_dir()


@pytest.mark.parametrize("kwargs, message", [({"temperature": -1.0}, "temperature must be a finite number >= 0"),
                                             ({"temperature": float("nan")}, "temperature must be a finite"),
                                             ({"temperature": 1e-40}, "too small to divide logits by"),  # NaN, late
                                             ({"temperature": 1.0, "top_k": 0}, "top_k must be a whole number >= 1"),
                                             ({"temperature": 1.0, "top_p": 1.5}, r"top_p must lie in \(0, 1\]")])
def test_sampling_settings_are_checked_before_any_forward(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[1, 2, 3]]), 4, **kwargs)


def test_cli_checkpoint_paths_that_are_not_model_folders(tmp_path):
    assert f"no such folder: {tmp_path}/missing" in _cli_error(["generate", str(tmp_path / "missing"), "-p", "hi"])
    (tmp_path / "out" / "step_0000002").mkdir(parents=True)  # a training checkpoint, not an exported model
    (tmp_path / "out" / "step_0000002" / "train_state.pt").write_bytes(b"")
    line = _cli_error(["generate", str(tmp_path / "out" / "step_0000002"), "-p", "hi"])
    assert "is a training checkpoint: load the run's exported out_dir/model" in line and "dyndepth convert" in line
    # the run's folder itself (its out_dir), the path `dyndepth train` names, said only "has no config.json"
    line = _cli_error(["generate", str(tmp_path / "out"), "-p", "hi"])
    assert f"out is a training run's folder, not a model, and holds no export: export its last checkpoint with " \
           f"`dyndepth convert {tmp_path}/out/step_0000002 OUT`" in line
    (tmp_path / "out" / "model").mkdir()
    (tmp_path / "out" / "model" / "config.json").write_text("{}")
    line = _cli_error(["eval", str(tmp_path / "out"), "--perplexity", str(tmp_path / "out" / "model" / "config.json")])
    assert f"out is a training run's folder, not a model: load its exported model, {tmp_path}/out/model." in line


def test_cli_device_and_dtype(tmp_path):
    if not torch.cuda.is_available():
        assert "no CUDA device" in _cli_error(["generate", "tiny-qwen3", "-p", "hi", "--device", "cuda"])
    assert "dtype 'fp8'" in _cli_error(["generate", "tiny-qwen3", "-p", "hi", "--dtype", "fp8"])


# the cases above, counted for the issue note
GENERATE_CASES = [
    # each of these failed inside torch or Python (TypeError, AttributeError, an embedding RuntimeError)
    ((torch.zeros(1, 3, dtype=torch.uint8), 2), {}, "as int64"),
    (([[1, 2, 3]], 2), {}, "must be a torch.Tensor"),
    ((None, 2.5), {}, "whole number"), ((None, "3"), {}, "whole number"), ((None, None), {}, "whole number"),
    ((None, 2), {"attention_mask": [[1, 1, 1]]}, "attention_mask must be a torch.Tensor"),
    ((None, 2), {"attention_mask": torch.tensor([[1, 0, 1]])}, "padding between real tokens"),
    ((None, 2), {"attention_mask": torch.tensor([[1, 2, 1]])}, "1 for real tokens and 0 for padding"),
    ((None, 2), {"temperature": "0.7"}, "temperature must be"), ((None, 2), {"top_k": 1.5}, "top_k must be"),
    ((None, 2), {"stop_tokens": [1, 999]}, r"stop_tokens \[999\] lie outside"),
    ((None, 2), {"stop_tokens": ["a"]}, "token id or a list"),
    ((None, 2), {"pad_token_id": -5}, "pad_token_id must be a token id"),
    ((torch.full((1, 3), 999), 0), {}, "token ids must lie in"),  # no forward runs: checked all the same
]


@pytest.mark.parametrize("args, kwargs, message", GENERATE_CASES)
def test_generate_arguments_are_checked_at_the_boundary(model, args, kwargs, message):
    ids = torch.tensor([[1, 2, 3]]) if args[0] is None else args[0]
    with pytest.raises(ValueError, match=message):
        model.generate(ids, *args[1:], **kwargs)


def test_generate_takes_one_stop_token_as_an_int_and_any_iterable_or_scalar_tensor(model):
    ids = torch.tensor([[1, 2, 3]])
    first = int(model.generate(ids, 1)[0, -1])
    out = model.generate(ids, 4, stop_tokens=first, pad_token_id=0)  # (an int: a TypeError before)
    assert out.shape[1] == 4 and int(out[0, -1]) == first  # stopped at once: the loop ends when every row stopped
    for stops in ((t for t in [first]), torch.tensor([first]), torch.tensor(first)):  # a one-shot iterator too
        assert torch.equal(model.generate(ids, 4, stop_tokens=stops, pad_token_id=0), out)
    assert torch.equal(model.generate(ids, torch.tensor(4), stop_tokens=[first], pad_token_id=torch.tensor(0),
                                      temperature=torch.tensor(0.0)), out)


def test_other_bad_values_are_named():
    from dyndepth.config import ConfigError, ModelConfig
    from dyndepth.devices import resolve_dtype
    from dyndepth.methods import attach_dnd

    with pytest.raises(ValueError, match="not a floating-point dtype"):
        resolve_dtype(torch.int8)
    with pytest.raises(ConfigError, match=r"needs \['low_freq_factor', 'high_freq_factor'\]"):
        ModelConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    dnd = CausalLM(preset("tiny-qwen3"))
    method = attach_dnd(dnd, {"layers": (0, 1)})
    for bad in (float("nan"), float("inf")):
        message = "tau_offset=(nan|inf) must be a number, not nan or inf"
        with pytest.raises(ValueError, match=message), method.override(tau_offset=bad):
            pass


def test_a_skip_budget_for_a_dreamer_names_its_own_knobs():
    from dyndepth import build_model

    dreamer = build_model(preset("dreamer-tiny")).eval()
    with pytest.raises(ValueError, match=r"a DreamerLM has no skip budget .* its own knobs are \['exit_kl'"):
        dreamer.generate(torch.tensor([[1, 2]]), 2, skip_budget=0.3)  # (it said: attach one, attach_gateskip)




CONFIG_CASES = [
    # configs built in Python skip the recipes' coercion: these failed inside torch, or ran wrong
    (lambda: dyndepth.ModelConfig(rms_norm_eps="abc"), "model.rms_norm_eps='abc' must be a finite number"),
    (lambda: dyndepth.ModelConfig(head_dim=32.5), "model.head_dim=32.5 must be a whole number or None"),
    (lambda: dyndepth.ModelConfig(decoder_sparse_step=0), "decoder_sparse_step must be >= 1"),
    (lambda: dyndepth.ModelConfig(num_experts=4, num_experts_per_tok=0), "num_experts_per_tok must be >= 1"),
    (lambda: dyndepth.ModelConfig(mlp_only_layers=5), "mlp_only_layers=5 must be a list"),
    (lambda: dyndepth.ModelConfig(num_hidden_layers=2, mlp_only_layers=[7]), r"mlp_only_layers \[7\] name no layer"),
    (lambda: dyndepth.ModelConfig(rope_theta=-5.0), "model.rope_theta must be > 0, got -5.0"),
    (lambda: dyndepth.ModelConfig(rope_scaling="linear"), "rope_scaling='linear' must be a table"),
    (lambda: dyndepth.ModelConfig(rope_scaling={"rope_type": "linear", "factor": 0}), "finite numbers > 0"),
    (lambda: dyndepth.ModelConfig(tie_word_embeddings="false"), "must be true or false"),
    (lambda: dyndepth.build_model(preset("dreamer-tiny", num_key_value_heads=0)).config,
     "num_key_value_heads must be >= 1"),
    (lambda: preset("dreamer-tiny", num_recurrences=2.5), "num_recurrences=2.5 must be a whole number"),
    (lambda: preset("dreamer-tiny", da_num_heads=0), "da_num_heads must be >= 1"),
    (lambda: preset("mor-tiny", capacity=0.5), "capacity=0.5 must be a list"),
    (lambda: preset("huginn-tiny", mean_recurrence=2.5), "mean_recurrence=2.5 must be a whole number"),
    (lambda: GateSkipConfig(budget="0.3"), "gateskip.budget='0.3' must be a finite number"),
    (lambda: GateSkipConfig(ramp_steps=-5), "ramp_steps must be >= 0"),
    (lambda: GateSkipConfig(skip_branches="attn", budget=0.5), "budget=0.5 with skip_branches='attn'"),
    (lambda: dyndepth.build_model(preset("huginn-tiny", num_attention_heads=0)), "num_attention_heads must be >= 1"),
    (lambda: dyndepth.build_model(preset("mor-tiny", num_attention_heads=0)), "num_attention_heads must be >= 1"),
    (lambda: MoDConfig(capacity=None), "mod.capacity=None must be a finite number"),
    (lambda: MoDConfig(anneal_period=-2), "anneal_period must be >= 0"),
    (lambda: MoDConfig(predictor_hidden=-1), "predictor_hidden must be >= 0"),
]


@pytest.mark.parametrize("make, message", CONFIG_CASES)
def test_configs_check_their_fields(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_method_configs_take_ints_for_floats_and_refuse_nan():
    from dyndepth.methods import DNDConfig, attach_dnd

    config = DNDConfig(layers=[0, 1], beta_init=0)  # an int parameter failed: "Only Tensors of floating point ..."
    assert config.layers == (0, 1) and isinstance(config.beta_init, float)
    attach_dnd(CausalLM(preset("tiny-qwen3")), config)
    with pytest.raises(ValueError, match="dnd.alpha=nan must be a finite number"):  # tau went nan: nothing nested
        DNDConfig(alpha=float("nan"))
    method = attach_gateskip(CausalLM(preset("tiny-qwen3")), GateSkipConfig(skip_branches="mlp"))
    with pytest.raises(ValueError, match="every token would skip it"), method.override(budget=0.7):
        pass
    # values that stay valid: whole floats for ints (recipes coerce them too), a MoD offset below 0 (taken modulo
    # `every`: saved checkpoints hold it), no clipping as clip=inf, a single-branch ramp to 0.5 in a checkpoint
    # that decodes (the ramp is checked when training starts)
    from dyndepth.methods import MoDConfig as Mod
    from dyndepth.methods.gateskip import GateSkipHook
    from dyndepth.runconfig import load_run_config

    assert preset("dreamer-tiny", num_recurrences=8.0).num_recurrences == 8
    assert Mod(offset=-1).routed_layers(6) == Mod(offset=1).routed_layers(6) == [1, 3, 5]
    assert load_run_config(None, ["train.clip=inf"]).train.clip == float("inf")
    ramped = attach_gateskip(CausalLM(preset("tiny-qwen3")), GateSkipConfig(skip_branches="attn", ramp_end=0.5))
    for ramp in ({"ramp_end": 0.5}, {"ramp_start": 0.6, "ramp_end": 0.2}):
        ramped.config = GateSkipConfig(skip_branches="attn", **ramp)
        with pytest.raises(ValueError, match=f"{next(iter(ramp))}=.* every token would skip it"):
            GateSkipHook(ramped, 10)


@pytest.mark.parametrize("overrides, message", [
    (["train.min_lr=-1"], "train.min_lr must be >= 0"), (["train.peak_tflops=0"], "train.peak_tflops must be > 0"),
    (["train.lr=inf"], "train.lr=inf must be a finite number"), (["train.eps=0"], "train.eps"),
    (["train.betas=[1.5, 0.9]"], r"train.betas \[1.5, 0.9\] must lie in \[0, 1\)"), (["train.seed=-3"], "train.seed"),
])
def test_train_settings_are_checked(overrides, message):
    from dyndepth.runconfig import RunConfigError, load_run_config

    with pytest.raises(RunConfigError, match=message):
        load_run_config(None, overrides)


def test_bench_options_are_checked():
    from dyndepth.bench.dnd import DNDBenchConfig
    from dyndepth.bench.dreamer import DreamerBenchConfig
    from dyndepth.bench.gateskip import GateSkipBenchConfig

    for make, message in ((lambda: DNDBenchConfig(new_tokens=1), "new_tokens must be >= 2"),
                          (lambda: DNDBenchConfig(dtype="foo"), "dtype 'foo' is not one of"),
                          (lambda: DNDBenchConfig(prefill_len=-3), "prefill_len must be >= 1"),
                          (lambda: DNDBenchConfig(batches=[-1]), "batches must be a non-empty list"),
                          (lambda: DNDBenchConfig(device="foo"), "device 'foo'"),
                          (lambda: DNDBenchConfig(model="dreamer-tiny"), "attaches DND to a decoder preset"),
                          (lambda: GateSkipBenchConfig(prefill_lens=[-4]), "prefill_lens must be a non-empty"),
                          (lambda: GateSkipBenchConfig(budgets=[0, 0.3, 0.3]), "repeat a value"),
                          (lambda: DreamerBenchConfig(model="dreamer-tiny", prompt_len=1100),
                           "must fit dreamer-tiny's max_position_embeddings")):
        with pytest.raises(ValueError, match=message):
            make()


BAD_INPUTS = (len(FORWARD_CASES) + 4 + 4 + 3 + 3 + 2 + 4 + 4 + 1 + 2 + 2 + 4 + len(GENERATE_CASES) + 4 + 1
              + len(CONFIG_CASES) + 4 + 6 + 9 + 5 + 1 + 1)


def test_a_cli_list_option_with_a_repeated_value_is_named():
    result = CliRunner().invoke(app, ["bench", "gateskip", "--budgets", "0,0.3,0.3"])  # two rows of one measurement
    assert result.exit_code == 2 and "--budgets lists 0.3 twice; give each value once." in result.output, result.output


def test_analysis_tools_name_bad_input(tmp_path):
    from dyndepth.methods import DNDConfig, attach_dnd
    from dyndepth.methods.dnd_analysis import entropy_correlation, plot_controller
    from dyndepth.methods.prune import prune_layers
    from dyndepth.methods.quantize import quantize_weights

    with pytest.raises(ValueError, match="group_size=0 must be a whole number >= 1"):  # (0 meant the default)
        quantize_weights(CausalLM(preset("tiny-qwen3")), bits=4, group_size=0)
    with pytest.raises(ValueError, match="n=1.5"):
        prune_layers(CausalLM(preset("tiny-qwen3")), 1.5, scores=[0.0, 1.0])
    dnd = CausalLM(preset("tiny-qwen3"))
    attach_dnd(dnd, DNDConfig(layers=(0, 1)))
    with pytest.raises(ValueError, match="at least one batch"):
        entropy_correlation(dnd, [])
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl line 2 is not JSON"):
        plot_controller(bad, tmp_path / "c.png")
    with pytest.raises(ValueError, match="no such file"):
        plot_controller(tmp_path / "missing.jsonl", tmp_path / "c.png")


def test_plots_make_their_folder(tmp_path):
    from dyndepth.methods.dnd_analysis import plot_controller

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "dnd/selected/L0": 0.2, "dnd/tau/L0": 0.5}\n')
    assert plot_controller(metrics, tmp_path / "new" / "folder" / "c.png").is_file()  # (FileNotFoundError before)
