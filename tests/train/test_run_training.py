import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_loader import TinyLoader

import dyndepth
from dyndepth import CausalLM, preset
from dyndepth.runconfig import RunConfigError, load_run_config
from dyndepth.safetensors_io import read_safetensors
from dyndepth.tokenizer import ByteTokenizer
from dyndepth.train import build_hooks, build_model, run_training


def test_build_model_from_preset_overrides_and_pretrained(tmp_path):
    model = build_model({"preset": "tiny-qwen3", "num_hidden_layers": 3})
    assert len(model.model.layers) == 3 and model.config.hidden_size == 64
    src = CausalLM(preset("tiny-qwen3"))
    src.save_pretrained(tmp_path / "hf")
    loaded = build_model({"pretrained": str(tmp_path / "hf")})
    torch.testing.assert_close(loaded.lm_head.weight, src.lm_head.weight)
    with pytest.raises(ValueError, match="pretrained model takes only"):
        build_model({"pretrained": str(tmp_path / "hf"), "hidden_size": 8})


def test_run_training_end_to_end_on_embedded_data(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "demo-tiny"\n[train]\nsteps = 2\nbatch_size = 2\nseq_len = 32\nwarmup = 1\n'
                      'progress = false\nplot = false\ndevice = "cpu"\neval_batches = 1\n'
                      '[data]\nsource = "embedded"\nsynthetic_examples = 200\nstdlib_bytes = 20000\n')
    result = run_training(recipe, [f"train.out_dir={tmp_path / 'out'}"])
    assert result.steps == 2 and len(result.evals) == 1 and result.losses[-1][1] > 0
    assert build_hooks({}, CausalLM(preset("tiny-qwen3"))) == []


def test_a_from_scratch_run_with_gateskip_never_skips_its_tokenizers_eos(tmp_path):
    """A model built from a preset names no EOS; its tokenizer's reached it at export only (generation_config.json),
    so GateSkip, trained in the same run, ranked and skipped the EOS between packed documents (257, byte tokenizer)."""
    pools = []

    class Probe:  # after the training step: does GateSkip rank the EOS?
        def after_step(self, model, step, stats, dist):
            trace = dyndepth.Trace()
            model(torch.tensor([[104, 105, 257, 106]]), trace=trace)
            pools.append(trace.ctx.state.pool[0].tolist())

    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "demo-tiny"\n[method]\nname = "gateskip"\n[train]\nsteps = 1\nbatch_size = 2\n'
                      'seq_len = 32\nprogress = false\nplot = false\ndevice = "cpu"\n[data]\nsource = "embedded"\n'
                      'synthetic_examples = 100\nstdlib_bytes = 10000\n[eval]\nenabled = false\n')
    run_training(recipe, [f"train.out_dir={tmp_path / 'out'}"], hooks=[Probe()])
    assert pools == [[True, True, False, True]]


def test_tokenizer_larger_than_the_model_vocab_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "tiny-qwen3"\n[train]\nsteps = 1\ndevice = "cpu"\n[data]\nsource = "embedded"\n')
    with pytest.raises(RunConfigError, match="vocab_size >= 259 .e.g. model = \"demo-tiny\""):
        run_training(recipe, [f"train.out_dir={tmp_path / 'out'}"])


def test_given_hooks_replace_the_controllers_but_the_recipes_method_is_attached(tmp_path):
    """run_training(hooks=...) skipped attaching the method: the run trained the plain model, and exporting its
    step (config.yaml names gateskip) failed on the missing gates."""
    from dyndepth.train import Hook
    from dyndepth.train.run import export_checkpoint

    seen = []

    class Spy(Hook):
        def after_step(self, model, step, stats, dist):
            seen.append(model.method.name)
            return {}

    run_training(None, [f"train.out_dir={tmp_path / 'out'}", "method.name=gateskip", "train.steps=2",
                        "train.batch_size=2", "train.seq_len=16", "train.progress=false", "train.plot=false",
                        "train.device=cpu", "eval.enabled=false", "model.preset=tiny-qwen3"],
                 loader=TinyLoader(2, 16), hooks=[Spy()])
    assert seen == ["gateskip", "gateskip"]
    exported = export_checkpoint(tmp_path / "out" / "step_0000002", tmp_path / "exported")
    assert dyndepth.from_pretrained(exported).method.name == "gateskip"


def test_a_recipe_without_a_model_trains_the_default_preset_on_the_default_data(tmp_path):
    """Every recipe section is optional: the default model (tiny-qwen3, vocab 256) could not hold the default byte
    tokenizer's 259 ids, so an empty recipe failed."""
    recipe = tmp_path / "empty.toml"
    recipe.write_text("")
    result = run_training(recipe, [f"train.out_dir={tmp_path / 'out'}", "train.steps=1", "train.batch_size=2",
                                   "train.seq_len=16", "train.progress=false", "train.plot=false",
                                   "train.device=cpu", "eval.enabled=false"])
    assert result.steps == 1 and load_run_config(tmp_path / "out" / "config.yaml").model == {"preset": "demo-tiny"}


def test_run_training_from_a_recipe_with_an_injected_loader(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "tiny-qwen3"\n[train]\nsteps = 3\nbatch_size = 2\nseq_len = 16\n'
                      'log_every = 1\nwarmup = 1\nprogress = false\nplot = false\ndevice = "cpu"\n')
    result = run_training(recipe, [f"train.out_dir={tmp_path / 'out'}", "train.lr=1e-3"],
                          loader=TinyLoader(2, 16), eval_loader=TinyLoader(2, 16, seed=1))
    assert result.steps == 3 and len(result.evals) == 1
    saved = load_run_config(tmp_path / "out" / "step_0000003" / "config.yaml")
    assert saved.train.lr == pytest.approx(1e-3) and saved.model == {"preset": "tiny-qwen3"}
    lrs = [json.loads(x).get("lr") for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(1e-3)


def test_a_base_recipe_trains_its_own_bpe_and_exports_a_self_contained_folder(tmp_path):
    import gzip

    import dyndepth
    from dyndepth.tokenizer import load_tokenizer

    corpus = tmp_path / "books.txt.gz"
    with gzip.open(corpus, "wt") as f:
        for i in range(30):
            f.write(f"Chapter {i}. " + "The quick brown fox jumps over the lazy dog. " * 20 + "\n<|endoftext|>\n")
    overrides = [f"train.out_dir={tmp_path / 'out'}", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'c'}",
                 "data.tokenizer=bpe:300", "model.vocab_size=300", "model.num_hidden_layers=1", "model.hidden_size=64",
                 "model.intermediate_size=64", "model.head_dim=16", "train.steps=2", "train.batch_size=2",
                 "train.seq_len=32", "train.eval_batches=1", "train.progress=false", "train.plot=false"]
    result = run_training("recipes/base_cpu.toml", overrides)
    assert result.steps == 2
    folder = tmp_path / "out" / "model"
    tok, model = load_tokenizer(str(folder)), dyndepth.from_pretrained(folder)
    text = "The quick brown fox."
    assert tok.decode(tok.encode(text)) == text and tok.vocab_size <= model.config.vocab_size == 300
    from dyndepth.train.run import export_checkpoint  # a step exports with the run's BPE too (it had none)

    step = export_checkpoint(tmp_path / "out" / "step_0000002", tmp_path / "step2")
    assert load_tokenizer(str(step)).encode(text) == tok.encode(text)
    # the corpus edited since, and a BPE trained on the edited one: the step keeps the tokenizer it trained with
    # (the folder was found by the files' content now: the step was exported with the other run's tokenizer)
    with gzip.open(corpus, "at") as f:
        f.write("Zebra quagga xylophone, jazzy vixens whiz by. " * 200 + "\n<|endoftext|>\n")
    from dyndepth.data.build import build_tokenizer

    other = build_tokenizer({"source": str(corpus), "tokenizer": "bpe:300", "text_split": "eot",
                             "cache_dir": str(tmp_path / "c")})
    assert other.backend.to_str() != tok.backend.to_str()
    again = export_checkpoint(tmp_path / "out" / "step_0000002", tmp_path / "step2-again")
    assert (again / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()


def test_a_byte_tokenizer_run_exports_its_tokenizer_so_generate_needs_no_flag(tmp_path):
    """The CPU recipes' byte tokenizer is saved beside the exported weights (it was not: `dyndepth generate
    out/model` asked for --tokenizer byte)."""
    from typer.testing import CliRunner

    from dyndepth.cli import app
    from dyndepth.tokenizer import load_tokenizer

    overrides = [f"train.out_dir={tmp_path / 'out'}", "train.steps=1", "train.batch_size=2", "train.seq_len=32",
                 "train.eval_batches=1", "train.progress=false", "train.plot=false", "data.synthetic_examples=100",
                 "data.stdlib_bytes=10000"]
    run_training("recipes/tiny_cpu.toml", overrides)
    folder = tmp_path / "out" / "model"
    assert (folder / "byte_tokenizer.json").exists()
    assert load_tokenizer(folder).vocab_size == 264  # demo-tiny's padded vocabulary: a sampled id 260 decodes
    stops = json.loads((folder / "generation_config.json").read_text())  # generate (ours, HF's) stops at its EOS
    assert stops == {"eos_token_id": 257, "pad_token_id": 258} and dyndepth.from_pretrained(folder).generation_config
    result = CliRunner().invoke(app, ["generate", str(folder), "-p", "12+3=", "-n", "4"])
    assert result.exit_code == 0 and "12+3=" in result.output, result.output
    for src, dst in ((folder, "converted"), (tmp_path / "out" / "step_0000001", "exported")):  # both keep it
        result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / dst)])
        assert result.exit_code == 0 and (tmp_path / dst / "byte_tokenizer.json").exists(), (dst, result.output)
        assert load_tokenizer(tmp_path / dst).vocab_size == 264


def test_a_relative_pretrained_path_is_saved_absolute_so_steps_export_and_resume_from_anywhere(tmp_path, monkeypatch):
    # config.yaml kept `pretrained = "base"` as written: exporting a step (or resuming) from another directory
    # looked for ./base there and failed
    from dyndepth.train.run import export_checkpoint

    CausalLM(preset("tiny-qwen3")).save_pretrained(tmp_path / "work" / "base")
    monkeypatch.chdir(tmp_path / "work")
    args = ['model.pretrained=base', "train.out_dir=out", "train.steps=2", "train.batch_size=2", "train.seq_len=16",
            "train.warmup=1", "train.progress=false", "train.plot=false", "train.device=cpu", "eval.enabled=false"]
    run_training(None, args, loader=TinyLoader(2, 16))
    step = (tmp_path / "work" / "out" / "step_0000002").resolve()
    saved = load_run_config(step / "config.yaml")
    assert saved.model == {"pretrained": str(tmp_path / "work" / "base")}
    assert saved.data["cache_dir"] == str(tmp_path / "work" / "runs" / "data")  # the default's too: a resume
    # elsewhere built a second data cache there
    monkeypatch.chdir(tmp_path)
    exported = export_checkpoint(step, tmp_path / "exported")
    assert (exported / "config.json").is_file()
    monkeypatch.chdir(tmp_path / "work")  # resuming with the relative recipe matches the saved absolute path
    result = run_training(None, [*args, "train.steps=3", "train.resume=true", "train.save_every=1"],
                          loader=TinyLoader(2, 16))
    assert result.steps == 3
    # the saved config resumes from anywhere: its out_dir is absolute (it trained a new run in ./out before)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "work" / "out" / "step_0000003" / "config.yaml"
    result = run_training(config, ["train.steps=4", "train.resume=true"], loader=TinyLoader(2, 16))
    assert result.steps == 4 and (tmp_path / "work" / "out" / "step_0000004").is_dir()
    assert not (tmp_path / "out").exists()


def test_a_step_exports_the_model_it_trained_after_the_base_folder_changed_or_went(tmp_path):
    """Export built the model from the `model.pretrained` folder as it was then: a base whose config.json changed in
    a field of no tensor shape (rope_theta) exported logits 1.15 off the run's own; a moved base could not export."""
    from dyndepth.train.run import export_checkpoint

    CausalLM(preset("tiny-qwen3")).save_pretrained(tmp_path / "base")
    args = [f"model.pretrained={tmp_path / 'base'}", f"train.out_dir={tmp_path / 'out'}", "train.steps=2",
            "train.batch_size=2", "train.seq_len=16", "train.warmup=1", "train.progress=false", "train.plot=false",
            "train.device=cpu", "eval.enabled=false", "method.name=gateskip"]
    run_training(None, args, loader=TinyLoader(2, 16))
    step = tmp_path / "out" / "step_0000002"
    assert json.loads((step / "model_config.json").read_text())["dyndepth_method"]["name"] == "gateskip"
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "rope_theta": 500000.0}))
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        want = dyndepth.from_pretrained(tmp_path / "out" / "model")(ids).logits  # the run's own export
        assert torch.equal(dyndepth.from_pretrained(export_checkpoint(step, tmp_path / "a"))(ids).logits, want)
        shutil.rmtree(tmp_path / "base")
        assert torch.equal(dyndepth.from_pretrained(export_checkpoint(step, tmp_path / "b"))(ids).logits, want)


def test_a_post_trained_export_keeps_the_base_checkpoints_generation_config(tmp_path):
    """The export built the model from model_config.json, which holds config.json only: a base's
    generation_config.json (Llama 3 Instruct's <|eot_id|>, Qwen3's <|endoftext|>) was not in out_dir/model or a step's
    export, so generate stopped only at config.json's eos_token_id."""
    from dyndepth.train.run import export_checkpoint

    CausalLM(preset("tiny-qwen3", eos_token_id=5)).save_pretrained(tmp_path / "base")
    stops = {"eos_token_id": [5, 6], "pad_token_id": 6}
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps(stops))
    args = [f"model.pretrained={tmp_path / 'base'}", f"train.out_dir={tmp_path / 'out'}", "train.steps=1",
            "train.batch_size=2", "train.seq_len=16", "train.warmup=1", "train.progress=false", "train.plot=false",
            "train.device=cpu", "eval.enabled=false"]
    run_training(None, args, loader=TinyLoader(2, 16))
    assert dyndepth.from_pretrained(tmp_path / "out" / "model").generation_config == stops
    exported = export_checkpoint(tmp_path / "out" / "step_0000001", tmp_path / "step1")
    assert dyndepth.from_pretrained(exported).generation_config == stops


def test_resuming_with_evaluation_switched_names_it_when_it_changes_the_training_split(tmp_path):
    # a user source without val_source holds a part out only when the run evaluates: switching eval.enabled on a
    # resume changed the training shards, and the resume failed with a loader num_tokens mismatch that never named it
    from dyndepth.runconfig import save_run_config
    from dyndepth.train.run import check_resume_matches

    text = tmp_path / "corpus.txt"
    text.write_text("some text\n" * 50)
    ckpt = tmp_path / "step_0000002"
    ckpt.mkdir()
    save_run_config(load_run_config(None, [f"data.source={text}", "eval.enabled=false"]), ckpt / "config.yaml")
    with pytest.raises(RunConfigError, match=r"eval\.enabled: checkpoint False, recipe True \(without data\.val"):
        check_resume_matches(load_run_config(None, [f"data.source={text}", f"train.resume={ckpt}"]))
    check_resume_matches(load_run_config(None, [f"data.source={text}", f"train.resume={ckpt}", "eval.enabled=false"]))
    save_run_config(load_run_config(None, ["eval.enabled=false"]), ckpt / "config.yaml")  # embedded: no matter
    check_resume_matches(load_run_config(None, [f"train.resume={ckpt}"]))


def test_resuming_after_the_training_files_changed_is_refused_before_any_data_is_built(tmp_path):
    # the loader's check came after a bpe:N tokenizer was trained and the whole source tokenized for the edited files
    import torch

    from dyndepth.data.build import source_fingerprint
    from dyndepth.runconfig import save_run_config
    from dyndepth.train.run import check_resume_matches

    text, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    text.write_text("some text\n" * 50)
    ckpt = tmp_path / "step_0000002"
    ckpt.mkdir()
    args = [f"data.source={text}", f"data.cache_dir={cache}", "data.tokenizer=bpe:300"]
    save_run_config(load_run_config(None, args), ckpt / "config.yaml")
    torch.save({"loader": {"source_digest": source_fingerprint(str(text), cache)}}, ckpt / "rank_0.pt")
    check_resume_matches(load_run_config(None, [*args, f"train.resume={ckpt}"]))  # unchanged: resumes
    text.write_text("some edited text\n" * 50)
    with pytest.raises(RunConfigError, match=r"the training data changed since \(a file of data.source"):
        check_resume_matches(load_run_config(None, [*args, f"train.resume={ckpt}"]))
    assert not (cache / "tokenizers").exists()  # nothing trained or tokenized


def test_an_out_dir_at_a_file_is_refused_before_any_data_is_built(tmp_path):
    # a file at train.out_dir (or above it) stopped the run with a FileExistsError / NotADirectoryError traceback
    # from the metrics logger's mkdir, after the model and the data were built
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    for out_dir in (afile, afile / "run"):
        recipe = load_run_config(None, [f"train.out_dir={out_dir}"])
        with pytest.raises(RunConfigError, match=rf"train.out_dir='{out_dir}' cannot be a folder: {afile} is a file"):
            run_training(recipe)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="procfs stands in for a folder no file can be made in")
def test_an_out_dir_it_cannot_write_in_is_refused_before_any_data_is_built(tmp_path):
    # a read-only out_dir (or one under a folder of another user) stopped the run with a PermissionError traceback
    # from the metrics logger's mkdir, after the model and the data were built; as root only such a filesystem shows
    # it (procfs: no file can be created in it)
    recipe = load_run_config(None, ["train.out_dir=/proc/dyndepth_run", f"data.cache_dir={tmp_path}/cache"])
    with pytest.raises(RunConfigError, match=r"train.out_dir='/proc/dyndepth_run': cannot write in /proc "):
        run_training(recipe)
    assert not (tmp_path / "cache").exists()  # before any data was built


def test_a_data_cache_dir_at_a_file_is_refused_before_anything_is_built(tmp_path):
    # user data is tokenized into data.cache_dir: a file there stopped the run with a FileExistsError traceback once
    # the model was built (an unwritable folder: a bare "[Errno 2] No such file or directory")
    text, afile = tmp_path / "text.txt", tmp_path / "notes.txt"
    text.write_text("some text to train on\n" * 50)
    afile.write_text("x")
    for cache in (afile, afile / "cache"):
        recipe = load_run_config(None, [f"data.source={text}", f"data.cache_dir={cache}", f"train.out_dir={tmp_path}"])
        with pytest.raises(RunConfigError, match=rf"data.cache_dir='{cache}' cannot be a folder: {afile} is a file"):
            run_training(recipe)
    run_training(load_run_config(None, [f"data.cache_dir={afile}", f"train.out_dir={tmp_path / 'run'}", "train.steps=1",
                                        "train.progress=false", "train.plot=false", "eval.enabled=false"]),
                 loader=TinyLoader(2, 16))  # the embedded data uses no cache


def test_a_list_of_relative_sources_is_saved_absolute_and_given_on_the_command_line(tmp_path, monkeypatch):
    from dyndepth.train.run import absolute_paths

    monkeypatch.chdir(tmp_path)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("text\n")
    config = absolute_paths(load_run_config(None, ['data.source=["a.txt", "b.txt", "hf:org/name"]']))
    assert config.data["source"] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "hf:org/name"]


def test_a_fresh_run_into_a_used_folder_sets_the_old_config_aside(tmp_path):
    # a run killed before its first checkpoint left config.yaml and metrics.jsonl; a new run into the folder kept the
    # metrics aside but overwrote the config, so what the earlier run was went missing
    args = [f"train.out_dir={tmp_path / 'out'}", "train.steps=1", "train.batch_size=2", "train.seq_len=16",
            "train.warmup=1", "train.progress=false", "train.plot=false", "train.device=cpu", "eval.enabled=false",
            "train.save_every=0"]

    def killed_before_its_checkpoint(*overrides):
        run_training(None, [*args, *overrides], loader=TinyLoader(2, 16))
        shutil.rmtree(tmp_path / "out" / "step_0000001")

    killed_before_its_checkpoint("train.lr=1e-3")
    first = (tmp_path / "out" / "config.yaml").read_text()
    killed_before_its_checkpoint("train.lr=2e-3")
    assert (tmp_path / "out" / "config.abandoned_0.yaml").read_text() == first
    assert "lr: 0.002" in (tmp_path / "out" / "config.yaml").read_text()
    killed_before_its_checkpoint("train.lr=2e-3")  # the same config again: nothing set aside
    assert not (tmp_path / "out" / "config.abandoned_1.yaml").exists()


def test_a_fresh_run_into_a_folder_with_an_exported_model_sets_that_model_aside(tmp_path):
    # a run's step folders removed to save space left out_dir/model, its weights' last copy; a new run into the folder
    # set its config and metrics aside but exported over that model
    args = [f"train.out_dir={tmp_path}", "train.steps=1", "train.batch_size=2", "train.seq_len=16", "train.warmup=0",
            "train.progress=false", "train.plot=false", "train.device=cpu", "eval.enabled=false"]
    run_training(None, [*args, "train.seed=1"], loader=TinyLoader(2, 16))
    first = (tmp_path / "model" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "step_0000001")
    run_training(None, [*args, "train.seed=2"], loader=TinyLoader(2, 16))
    assert (tmp_path / "model.abandoned_0" / "model.safetensors").read_bytes() == first
    assert (tmp_path / "model" / "model.safetensors").read_bytes() != first
    run_training(None, [*args, "train.steps=2", "train.resume=true"], loader=TinyLoader(2, 16))  # its own: replaced
    assert not (tmp_path / "model.abandoned_1").exists()


def test_a_recipes_missing_tokenizer_kept_under_model_pretrained_names_the_key_and_the_fix(tmp_path):
    """recipes/dnd_posttrain.toml with only model.pretrained replaced stopped on its own data.tokenizer
    ("tokenizer path 'checkpoints/Qwen3-1.7B' does not exist; pass a tokenizer folder or 'byte'"): neither the key
    the user never set nor that the model folder's own tokenizer is the one to use."""
    from dyndepth.tokenizer import train_bpe

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    base = tmp_path / "base"
    CausalLM(preset("tiny-qwen3", vocab_size=300)).save_pretrained(base)
    train_bpe([text], vocab_size=300).save(base)
    with pytest.raises(RunConfigError) as e:
        run_training("recipes/dnd_posttrain.toml", [f"model.pretrained={base}", f"data.source={text}",
                                                   f"train.out_dir={tmp_path / 'out'}"])
    assert str(e.value) == (f"data.tokenizer='checkpoints/Qwen3-1.7B' does not exist; model.pretrained ({base}) "
                            "carries its own tokenizer, which reads the data: drop data.tokenizer from the recipe, or "
                            f"--set data.tokenizer={base}.")


def test_a_data_tokenizer_folder_without_a_tokenizer_is_not_said_not_to_exist(tmp_path):
    # an existing folder holding no tokenizer files was reported as "does not exist"
    base, empty = tmp_path / "base", tmp_path / "empty"
    CausalLM(preset("tiny-qwen3", vocab_size=300)).save_pretrained(base)
    ByteTokenizer().save(base)
    empty.mkdir()
    with pytest.raises(RunConfigError, match=f"data.tokenizer='{empty}' holds no tokenizer; model.pretrained"):
        run_training(None, [f"model.pretrained={base}", f"data.tokenizer={empty}", f"train.out_dir={tmp_path / 'out'}"])


def test_post_training_a_folder_reads_its_data_with_the_folders_tokenizer(tmp_path):
    """`--set model.pretrained=DIR` with no data.tokenizer tokenized the text with the default byte tokenizer (a BPE
    model trained on byte ids, and exported with byte_tokenizer.json); now the folder's own tokenizer reads it, and
    a different one named in the recipe is an error."""
    from dyndepth.tokenizer import ByteTokenizer, load_tokenizer, train_bpe

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    base = tmp_path / "base"
    CausalLM(preset("tiny-qwen3", vocab_size=300)).save_pretrained(base)
    train_bpe([text], vocab_size=300).save(base)
    args = [f"model.pretrained={base}", f"data.source={text}", f"train.out_dir={tmp_path / 'out'}", "train.steps=1",
            "train.batch_size=2", "train.seq_len=16", "train.progress=false", "train.plot=false", "eval.enabled=false",
            f"data.cache_dir={tmp_path / 'cache'}"]
    run_training(None, args)
    saved = load_run_config(tmp_path / "out" / "step_0000001" / "config.yaml")
    assert saved.data["tokenizer"] == str(base)
    exported = tmp_path / "out" / "model"
    assert (exported / "tokenizer.json").is_file() and not (exported / "byte_tokenizer.json").exists()
    assert load_tokenizer(exported).encode("the lazy dog") == load_tokenizer(base).encode("the lazy dog")
    with pytest.raises(RunConfigError, match=r"data.tokenizer='byte' is not the tokenizer of model.pretrained"):
        run_training(None, [*args, "data.tokenizer=byte", f"train.out_dir={tmp_path / 'out2'}"])
    # a run that saved no data section (repro's contenders train from a folder with their own loader) exports with
    # the folder's tokenizer (it exported a byte tokenizer widened to the BPE's 300 ids)
    from dyndepth.runconfig import RunConfig, TrainConfig
    from dyndepth.train import train
    from dyndepth.train.run import export_checkpoint

    tcfg = TrainConfig(steps=1, batch_size=2, seq_len=16, out_dir=str(tmp_path / "bare"), progress=False, plot=False)
    train(dyndepth.from_pretrained(base), TinyLoader(2, 16), tcfg,
          run_config=RunConfig(model={"pretrained": str(base)}, data={}, train=tcfg))
    bare = export_checkpoint(tmp_path / "bare" / "step_0000001", tmp_path / "bare_export")
    assert (bare / "tokenizer.json").is_file() and not (bare / "byte_tokenizer.json").exists()
    # a run saved before its data.tokenizer was filled in resumes when the ids are the same (a byte folder), and is
    # refused when they are not (it read the BPE folder's text as bytes)
    ByteTokenizer().save(tmp_path / "bytes")
    CausalLM(preset("tiny-qwen3", vocab_size=300)).save_pretrained(tmp_path / "bytes")
    for folder, resumes in ((tmp_path / "bytes", True), (base, False)):
        out = tmp_path / f"old_{folder.name}"
        run_training(None, [*args, f"model.pretrained={folder}", f"train.out_dir={out}"])
        for config in out.glob("step_*/config.yaml"):  # as saved before 2026-12-05 (its manifest entry to match)
            config.write_text("\n".join(line for line in config.read_text().splitlines() if "tokenizer:" not in line))
            manifest = json.loads((config.parent / "manifest.json").read_text())
            manifest["files"]["config.yaml"] = {"sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
                                                "size": config.stat().st_size}
            (config.parent / "manifest.json").write_text(json.dumps(manifest))
        resume = [*args, f"model.pretrained={folder}", f"train.out_dir={out}", "train.steps=2", "train.resume=true"]
        if resumes:
            assert run_training(None, resume).steps == 2
        else:
            with pytest.raises(RunConfigError, match="data.tokenizer: checkpoint unset"):
                run_training(None, resume)


def test_a_hold_out_that_takes_a_whole_file_of_a_few_is_warned_about(tmp_path, caplog):
    """Documents 0, 100, ... are the validation split; with text_split="file" a document is a file, so a list of two
    files held the first one out whole (half the data) without a word."""
    files = []
    for i in range(2):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text(f"text number {i}, " * 300)
    args = [f"data.source={json.dumps([str(f) for f in files])}", f"train.out_dir={tmp_path / 'out'}", "train.steps=1",
            "train.batch_size=2", "train.seq_len=16", "train.progress=false", "train.plot=false",
            "train.eval_batches=1", f"data.cache_dir={tmp_path / 'cache'}"]
    with caplog.at_level("WARNING"):
        run_training("recipes/tiny_cpu.toml", args)
    assert "the validation split took 50% of data.source's tokens" in caplog.text and "data.val_source" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # one file: its last tenth, not warned
        run_training("recipes/tiny_cpu.toml", [*args[2:], f"data.source={files[0]}", f"train.out_dir={tmp_path / 'o2'}",
                                               "train.steps=1"])
    assert "validation split took" not in caplog.text


def test_a_run_says_how_many_times_it_reads_its_training_data(tmp_path, caplog):
    """Past the end of its data the loader starts another epoch without a word: 12 steps on a slice of 3 batches
    trained on it 4 times, and nothing in the output said so."""
    text = tmp_path / "slice.txt"
    text.write_text("a few words of text. " * 40)  # 840 bytes and EOS: 52 windows of 16 + 1 tokens, 3 batches of 16
    args = [f"data.source={text}", "data.tokenizer=byte", f"train.out_dir={tmp_path / 'out'}", "train.steps=12",
            "train.batch_size=16", "train.seq_len=16", "train.progress=false", "train.plot=false",
            "train.save_every=0", f"data.cache_dir={tmp_path / 'cache'}"]
    with caplog.at_level("INFO"):
        run_training("recipes/tiny_cpu.toml", [*args, "eval.enabled=false"])
    assert ("the training data fills 3 batches per rank; train.steps=12 x train.grad_accum=1 reads it 4 times "
            "(epochs)") in caplog.text, caplog.text


def test_a_steps_saved_config_does_not_pin_the_checkpoint_its_run_resumed_from(tmp_path):
    """A run resumed with train.resume=<step_2> saved that path in every later step's config.yaml: running step 6's
    config to extend the run (without --resume) resumed step 2 again and moved steps 4 and 6 to abandoned_0/."""
    out = tmp_path / "out"
    args = ["model.preset=tiny-qwen3", f"train.out_dir={out}", "train.steps=6", "train.save_every=2", "train.keep_last=0",
            "train.batch_size=2", "train.seq_len=16", "train.warmup=1", "train.progress=false", "train.plot=false",
            "train.device=cpu", "eval.enabled=false"]
    run_training(None, args[:3] + ["train.steps=2"] + args[4:], loader=TinyLoader(2, 16))
    run_training(None, [*args, f"train.resume={out / 'step_0000002'}"], loader=TinyLoader(2, 16))
    config = out / "step_0000006" / "config.yaml"
    assert load_run_config(config).train.resume is False
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run_training(config, ["train.steps=8"], loader=TinyLoader(2, 16))
    assert [p.name for p in sorted(out.glob("step_*"))] == ["step_0000002", "step_0000004", "step_0000006"]
    assert run_training(config, ["train.steps=8", "train.resume=true"], loader=TinyLoader(2, 16)).steps == 8


def test_resuming_with_data_settings_that_change_the_tokens_is_refused_before_any_data_is_built(tmp_path):
    # data.text_split, bpe_train_bytes and a val_source given or dropped (which part of the source is held out) were
    # not compared: a bpe:N resume trained a new BPE and tokenized the whole source before the loader's token count
    # refused it (or, at an equal count, trained on other ids); an unset key and its default value are the same
    from dyndepth.runconfig import save_run_config
    from dyndepth.train.run import check_resume_matches

    text, val, cache = tmp_path / "corpus.txt", tmp_path / "val.txt", tmp_path / "cache"
    text.write_text("some text\n" * 50)
    val.write_text("held out\n")
    ckpt = tmp_path / "step_0000002"
    ckpt.mkdir()
    args = [f"data.source={text}", f"data.cache_dir={cache}", "data.tokenizer=bpe:300", f"train.resume={ckpt}"]
    save_run_config(load_run_config(None, args), ckpt / "config.yaml")
    check_resume_matches(load_run_config(None, [*args, "data.text_split=file", "data.bpe_train_bytes=64000000"]))
    for change, message in (("data.text_split=line", r"data\.text_split: checkpoint unset .*, recipe 'line'"),
                            ("data.bpe_train_bytes=1000", r"data\.bpe_train_bytes: checkpoint unset"),
                            (f"data.val_source={val}", r"data\.val_source: checkpoint unset .*recipe '.*val\.txt'")):
        with pytest.raises(RunConfigError, match=message):
            check_resume_matches(load_run_config(None, [*args, change]))
    save_run_config(load_run_config(None, [*args, f"data.val_source={val}"]), ckpt / "config.yaml")
    (tmp_path / "other.txt").write_text("held out too\n")  # another held-out file: the same training split and BPE
    check_resume_matches(load_run_config(None, [*args, f"data.val_source={tmp_path / 'other.txt'}"]))
    assert not (cache / "tokenizers").exists()


def test_a_val_source_given_on_resume_where_no_part_was_held_out_anyway_resumes(tmp_path):
    # a run without evaluation trains on all of data.source; resumed with evaluation on data.val_source it still does
    # (with byte ids: no BPE's training text changes either)
    from dyndepth.runconfig import save_run_config
    from dyndepth.train.run import check_resume_matches

    text, val = tmp_path / "corpus.txt", tmp_path / "val.txt"
    text.write_text("some text\n" * 50)
    val.write_text("held out\n")
    ckpt = tmp_path / "step_0000002"
    ckpt.mkdir()
    args = [f"data.source={text}", f"train.resume={ckpt}"]
    save_run_config(load_run_config(None, [*args, "eval.enabled=false"]), ckpt / "config.yaml")
    check_resume_matches(load_run_config(None, [*args, f"data.val_source={val}"]))
    with pytest.raises(RunConfigError, match=r"data\.val_source: checkpoint unset"):  # a BPE's text would change
        save_run_config(load_run_config(None, [*args, "eval.enabled=false", "data.tokenizer=bpe:300"]),
                        ckpt / "config.yaml")
        check_resume_matches(load_run_config(None, [*args, "data.tokenizer=bpe:300", f"data.val_source={val}"]))


def test_a_leading_tilde_is_the_home_folder(tmp_path, monkeypatch):
    # `--set train.out_dir=~/runs/x` (the shell leaves a ~ after = alone) trained into a folder named ~ in the working
    # directory, while model.pretrained=~/... read the home folder's
    from dyndepth.train.run import absolute_paths

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home" / "text.txt").parent.mkdir()
    (tmp_path / "home" / "text.txt").write_text("text\n")
    config = absolute_paths(load_run_config(None, ["train.out_dir=~/runs/x", "data.source=~/text.txt",
                                                   "data.cache_dir=~/cache", "train.resume=~/runs/y/step_2"]))
    home = tmp_path / "home"
    assert (config.train.out_dir, config.data["source"], config.data["cache_dir"], config.train.resume) == \
        (str(home / "runs" / "x"), str(home / "text.txt"), str(home / "cache"), str(home / "runs" / "y" / "step_2"))


def test_a_model_field_stated_at_its_presets_value_resumes_and_a_change_is_refused(tmp_path):
    # the [model] sections were compared as written: --set model.vocab_size=264 on a demo-tiny run (its value) was
    # refused as a change
    from dyndepth.runconfig import save_run_config
    from dyndepth.train.run import check_resume_matches

    ckpt = tmp_path / "step_0000002"
    ckpt.mkdir()
    args = ["model=demo-tiny", f"train.resume={ckpt}"]
    save_run_config(load_run_config(None, args), ckpt / "config.yaml")
    vocab = dyndepth.preset("demo-tiny").vocab_size
    check_resume_matches(load_run_config(None, [*args, f"model.vocab_size={vocab}"]))
    with pytest.raises(RunConfigError, match=r"model\.vocab_size: checkpoint unset .*, recipe 512"):
        check_resume_matches(load_run_config(None, [*args, "model.vocab_size=512"]))


def test_a_read_only_data_cache_that_holds_the_shards_is_used(tmp_path, monkeypatch):
    # a shard cache built once and shared read-only (another user's, a read-only mount) needs no write: the run reads
    # its shards. The writability check made for an unwritable cache refused it before anything was read.
    from readonly import simulate_read_only

    text = tmp_path / "text.txt"
    text.write_text("some text to train on\n" * 200)
    cache = tmp_path / "cache"
    args = [f"data.source={text}", f"data.cache_dir={cache}", "train.steps=1", "train.batch_size=2",
            "train.seq_len=16", "train.progress=false", "train.plot=false", "eval.enabled=false"]
    run_training(load_run_config(None, [*args, f"train.out_dir={tmp_path / 'a'}"]))  # builds the shards
    simulate_read_only(monkeypatch, cache)
    assert run_training(load_run_config(None, [*args, f"train.out_dir={tmp_path / 'b'}"])).steps == 1
    with pytest.raises(RunConfigError, match="data.cache_dir=.*: cannot write in"):  # a new cache it cannot make
        run_training(load_run_config(None, [*args, f"data.cache_dir={cache / 'new'}",
                                            f"train.out_dir={tmp_path / 'c'}"]))



def test_a_run_from_its_out_dirs_own_export_resumes_after_a_kill(tmp_path):
    # post-training a run's export into the same out_dir (model.pretrained = out_dir/model): the new run moved that
    # folder aside as an earlier run's model, and a resume of the killed run stopped at "no such folder: out/model"
    class Kill:
        def after_step(self, model, step, stats, dist):
            if step == 2:
                raise KeyboardInterrupt

    out = tmp_path / "run"
    args = [f"train.out_dir={out}", "train.progress=false", "train.plot=false", "eval.enabled=false"]
    run_training(None, [*args, "train.steps=1"], loader=TinyLoader(2, 16))
    for step in out.glob("step_*"):  # (its checkpoints deleted: the export is what is kept)
        shutil.rmtree(step)
    args += [f"model.pretrained={out / 'model'}", "train.save_every=1", "train.steps=3"]
    with pytest.raises(KeyboardInterrupt):
        run_training(None, args, loader=TinyLoader(2, 16), hooks=[Kill()])
    assert run_training(None, [*args, "train.resume=true"], loader=TinyLoader(2, 16)).steps == 3


def test_a_run_from_its_out_dirs_own_export_keeps_that_base_beside_its_export(tmp_path):
    # model.pretrained = out_dir/model stays in place while the run trains (a resume reads it), and the export at the
    # end wrote over its files: the base weights were gone
    out = tmp_path / "run"
    args = [f"train.out_dir={out}", "train.progress=false", "train.plot=false", "eval.enabled=false"]
    run_training(None, [*args, "train.steps=1"], loader=TinyLoader(2, 16))
    for step in out.glob("step_*"):  # (its checkpoints deleted: the export is what is kept)
        shutil.rmtree(step)
    base = {k: v.clone() for k, v in read_safetensors(out / "model" / "model.safetensors").items()}
    run_training(None, [*args, f"model.pretrained={out / 'model'}", "train.steps=1", "train.lr=1e-2"],
                 loader=TinyLoader(2, 16))
    kept = read_safetensors(out / "model.base_0" / "model.safetensors")
    assert kept.keys() == base.keys() and all(torch.equal(kept[k], base[k]) for k in base)
    new = read_safetensors(out / "model" / "model.safetensors")
    assert not all(torch.equal(new[k], base[k]) for k in base)  # the post-trained export


def test_a_pretrained_moe_takes_output_router_logits_to_train_the_balancing_loss_its_config_json_turns_off(tmp_path):
    # Qwen3-30B-A3B's config.json says output_router_logits=false (no balancing loss, as in transformers); the DND
    # recipe's MoE line turns it on, and a pretrained [model] took only 'pretrained' and 'dtype'
    moe = CausalLM(preset("tiny-qwen3-moe", output_router_logits=False))
    moe.save_pretrained(tmp_path / "moe")
    ids = torch.randint(0, 256, (2, 9))
    assert build_model({"pretrained": str(tmp_path / "moe")}).train()(ids).aux_loss == 0
    model = build_model({"pretrained": str(tmp_path / "moe"), "output_router_logits": True}).train()
    out = model(ids)
    torch.testing.assert_close(out.aux_loss, model.config.router_aux_loss_coef * out.stats["moe/balance_loss"])
    CausalLM(preset("tiny-qwen3")).save_pretrained(tmp_path / "dense")
    for bad in ({"pretrained": str(tmp_path / "dense"), "output_router_logits": True},
                {"pretrained": str(tmp_path / "moe"), "output_router_logits": "yes"}):
        with pytest.raises(RunConfigError, match="only for a model with experts"):
            build_model(bad)
    with pytest.raises(RunConfigError, match="only for a model with experts"):  # a preset without experts too
        build_model({"preset": "tiny-qwen3", "output_router_logits": True})
    assert build_model({"preset": "tiny-qwen3-moe", "output_router_logits": False}).config.output_router_logits is False
    with pytest.raises(RunConfigError, match="takes only 'pretrained', 'dtype' and 'output_router_logits'"):
        build_model({"pretrained": str(tmp_path / "moe"), "hidden_size": 8})


def test_a_run_from_its_out_dirs_own_export_exports_that_bases_tokenizer(tmp_path):
    # data.tokenizer is the base folder, out_dir/model; a run given its loader (no tokenizer built) exported after that
    # folder moved to model.base_0 and found no tokenizer there: the export carried none, and a resume of the run
    # stopped on data.tokenizer (the export, now model.pretrained, carries no tokenizer to match)
    out = tmp_path / "run"
    args = [f"train.out_dir={out}", "train.progress=false", "train.plot=false", "eval.enabled=false"]
    run_training(None, [*args, "train.steps=1"], loader=TinyLoader(2, 16))
    for step in out.glob("step_*"):
        shutil.rmtree(step)
    again = [*args, f"model.pretrained={out / 'model'}", "train.lr=1e-2"]
    run_training(None, [*again, "train.steps=1"], loader=TinyLoader(2, 16))
    assert (out / "model.base_0" / "byte_tokenizer.json").is_file()
    assert (out / "model" / "byte_tokenizer.json").is_file()
    assert run_training(None, [*again, "train.steps=2", "train.resume=true"], loader=TinyLoader(2, 16)).steps == 2
