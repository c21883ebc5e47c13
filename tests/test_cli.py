import itertools
import json

import pytest
import torch
from typer.testing import CliRunner

import dyndepth
from dyndepth.cli import app
from dyndepth.tokenizer import ByteTokenizer

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "convert", "train", "demo", "bench"):
        assert command in result.output


def test_version_names_the_package_and_torch():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"dyndepth {dyndepth.__version__} (torch {torch.__version__})"


def test_option_set_is_deliberate():
    """A snapshot of every command's options: a new flag must be an intentional edit here."""
    import typer.main

    group = typer.main.get_command(app)
    snapshot = {}
    for name, cmd in sorted(group.commands.items()):
        subs = cmd.commands.items() if hasattr(cmd, "commands") else [("", cmd)]
        for sub, c in subs:
            snapshot[f"{name} {sub}".strip()] = sorted(p.name for p in c.params)
    assert snapshot == {
        "bench core": ["batch_size", "compile", "decode_batch_size", "decode_prompt_len", "device", "dtype",
                       "load_memory", "model", "new_tokens", "out", "prompt_len", "repeats"],
        "bench dnd": ["base", "batches", "compile", "decode_prompt_len", "device", "dtype", "model", "new_tokens", "out",
                      "prefill_len", "quality", "ratio", "repeats", "steps", "throughput"],
        "bench dreamer": ["batch_size", "compile", "decode_batches", "device", "dtype", "model", "new_tokens", "out",
                          "prompt_len", "repeats", "seq_len", "steps"],
        "bench gateskip": ["budgets", "calibration_text", "compile", "decode_batches", "decode_prompt_len", "device",
                           "dtype", "gate", "model", "new_tokens", "out", "path", "prefill_lens", "repeats"],
        "bench quality": ["base", "out", "steps"],
        "bench train": ["batch_size", "compile", "device", "dtype", "model", "out", "seq_len", "steps"],
        "calibrate": ["batch_size", "batches", "device", "knobs", "model", "out", "seq_len", "text", "tokenizer"],
        "convert": ["dst", "dtype", "max_shard_gb", "plain", "src"],
        "demo": ["eval_examples", "out", "post_steps", "steps"],
        "eval": ["apply_chat_template", "batch_size", "data_dir", "limit", "max_length", "model", "model_args",
                 "num_fewshot", "out", "perplexity", "stride", "tasks"],
        "generate": ["compile", "device", "dtype", "knobs", "max_new_tokens", "model", "prompt", "repetition_penalty",
                     "seed", "skip_budget", "stream", "temperature", "tokenizer", "top_k", "top_p"],
        "match": ["against", "batch_size", "config", "device", "out", "seq_len", "switchhead", "tolerance"],
        "study tokens": ["against", "budgets", "device", "out", "profile", "reference", "seeds", "text", "text_val"],
        "repro": ["base", "cache_dir", "data_dir", "limit", "out", "profile", "render_only", "steps", "study", "tasks",
                  "train_data", "val_data"],
        "train": ["method", "recipe", "resume", "set_"],
    }


def test_generate_with_a_saved_model_and_byte_tokenizer(tmp_path):
    dyndepth.CausalLM(dyndepth.preset("demo-tiny")).save_pretrained(tmp_path)
    result = runner.invoke(app, ["generate", str(tmp_path), "-p", "hello", "-p", "hi", "-n", "5",
                                 "--tokenizer", "byte"])
    assert result.exit_code == 0, result.output
    assert result.output.count("---") == 2 and "hello" in result.output
    for flags, message in ((["--temperature", "-1"], "temperature must be"), (["--top-p", "2"], "top_p must"),
                           (["-n", "-1"], "--max-new-tokens must be >= 0"),
                           (["--repetition-penalty", "0"], "repetition_penalty must be")):
        bad = runner.invoke(app, ["generate", str(tmp_path), "-p", "abc", "--tokenizer", "byte", *flags])
        assert bad.exit_code == 2 and bad.output.startswith("error:") and message in bad.output, bad.output



def test_generate_prompts_with_bos_when_the_tokenizer_adds_it(tmp_path):
    """A Llama tokenizer's post-processor prepends <s>, as transformers encodes a prompt; `dyndepth generate` encoded
    prompts without it, so a Llama checkpoint continued another text than transformers' generate does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    torch.manual_seed(0)
    model = dyndepth.CausalLM(dyndepth.preset("tiny-llama", vocab_size=300, bos_token_id=0, eos_token_id=1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    ids = tok.encode("The quick", add_special_tokens=False).ids
    with_bos, without = (model.generate(torch.tensor([prefix + ids]), 6, stop_tokens=[])[0, len(prefix + ids):]
                         for prefix in ([0], []))
    assert with_bos.tolist() != without.tolist()  # (the test tells the two apart)
    result = runner.invoke(app, ["generate", str(tmp_path), "-p", "The quick", "-n", "6", "--no-stream"])
    assert result.exit_code == 0, result.output
    assert result.output == "The quick" + tok.decode(with_bos.tolist()) + "\n---\n"


def test_generate_pads_a_batch_for_a_vocabulary_smaller_than_the_byte_tokenizers():
    # tiny-qwen3 has 256 ids and the byte tokenizer pads with 258: two prompts of different lengths failed with
    # "token ids must lie in [0, 256) ..., got ids from 101 to 258", though every real token was a byte
    one = [runner.invoke(app, ["generate", "tiny-qwen3", "-p", p, "-n", "3", "--no-stream"]) for p in ("hello", "hi")]
    both = runner.invoke(app, ["generate", "tiny-qwen3", "-p", "hello", "-p", "hi", "-n", "3"])
    assert both.exit_code == 0, both.output
    assert both.output == one[0].output + one[1].output  # each row as alone: the padding is masked out

def test_streaming_prints_multi_byte_characters_whole_and_a_presets_padded_vocab_decodes(tmp_path, monkeypatch):
    # streaming decoded each new token alone, so a character of several byte tokens printed as U+FFFD marks; and
    # a preset's vocabulary past the byte tokenizer's 259 ids (demo-tiny: 264) crashed the decode of such an id
    def scripted(model, input_ids, max_new_tokens, *args, callback=None, **kwargs):  # the model "emits" these ids
        out = [0xC3, 0xA9, 0xE2, 0x82, 0xAC, 262, 0x21][:max_new_tokens]
        for step, token in enumerate(out):
            if callback is not None:
                callback(step, torch.tensor([token]))
        return torch.cat([input_ids, torch.tensor([out])], 1)

    monkeypatch.setattr("dyndepth.generation.generate", scripted)
    dyndepth.CausalLM(dyndepth.preset("demo-tiny")).save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)  # a folder whose byte tokenizer has 259 ids (exports before 2026-12-05)
    for model, stream in itertools.product(("demo-tiny", str(tmp_path)), ("--stream", "--no-stream")):
        result = runner.invoke(app, ["generate", model, "-p", "caf", "-n", "7", stream])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("caf\u00e9\u20ac!"), result.output  # (262: an unused id, decoded to nothing)


def test_generate_keeps_the_space_a_llama_tokenizer_decodes_before_the_first_new_word(tmp_path, monkeypatch):
    """A Llama-2 / Mistral tokenizer.json decodes with Strip(left=1): any decoded text loses one leading space. The
    new tokens were decoded alone, so their first word ("\u2581brown") lost its space and was glued to the prompt
    ("The quickbrown fox"), streamed or not, where decoding the whole output (tokenizer.decode) keeps the space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "\u2581The", "\u2581quick", "\u2581brown", "\u2581fox"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # Llama-2's decoder
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    dyndepth.CausalLM(dyndepth.preset("tiny-llama", vocab_size=len(words))).save_pretrained(tmp_path)
    assert tok.encode("The quick").ids == [3, 4] and tok.decode([5, 6]) == "brown fox"  # (alone: no space)

    def scripted(model, input_ids, max_new_tokens, *args, callback=None, **kwargs):  # "emits" brown fox
        for step, token in enumerate([5, 6]):
            if callback is not None:
                callback(step, torch.tensor([token]))
        return torch.cat([input_ids, torch.tensor([[5, 6]])], 1)

    monkeypatch.setattr("dyndepth.generation.generate", scripted)
    streamed = runner.invoke(app, ["generate", str(tmp_path), "-p", "The quick", "-n", "2"])
    assert streamed.exit_code == 0, streamed.output
    assert streamed.output == "The quick brown fox\n"
    printed = runner.invoke(app, ["generate", str(tmp_path), "-p", "The quick", "-n", "2", "--no-stream"])
    assert printed.output == "The quick brown fox\n---\n", printed.output


def test_streaming_goes_on_after_the_decoder_rewrites_printed_text(capsys):
    """A decoder that cleans up text (" ." -> ".", as WordPiece's does) made the printed text no prefix of the
    decoded one: nothing more was printed, not at the line's end nor at the finish ("a " of "a. b\nc b")."""
    from dyndepth.cli import _TextStream

    class Cleaning:
        pieces = ("a", " ", ".", " b", "\n", "c")

        def decode(self, ids):
            return "".join(self.pieces[i] for i in ids).replace(" .", ".")

    stream = _TextStream(Cleaning())
    for step, token in enumerate([0, 1, 2, 3, 4, 5, 3]):
        stream(step, torch.tensor([token]))
    stream.finish()
    assert capsys.readouterr().out == "a . b\nc b\n"  # every token's text, the printed " " kept


def test_a_presets_random_weights_are_the_same_every_run():
    """torch seeds its default generator at random per process, so `generate PRESET` printed other text each run."""
    from dyndepth.cli import _load_model

    a, b = _load_model("demo-tiny", None, "cpu"), _load_model("demo-tiny", None, "cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_generate_compiles_the_decode_step_when_asked(monkeypatch):
    seen = []

    def scripted(model, input_ids, max_new_tokens, *args, compile=False, **kwargs):
        seen.append(compile)
        return torch.cat([input_ids, input_ids[:, :max_new_tokens]], 1)

    monkeypatch.setattr("dyndepth.generation.generate", scripted)
    for flag in ("--compile", "--no-compile"):
        result = runner.invoke(app, ["generate", "demo-tiny", "-p", "abc", "-n", "2", flag])
        assert result.exit_code == 0, result.output
    assert seen == [True, False]


def test_generate_passes_the_repetition_penalty(tmp_path):
    dyndepth.CausalLM(dyndepth.preset("demo-tiny")).save_pretrained(tmp_path)
    outputs = [runner.invoke(app, ["generate", str(tmp_path), "-p", "hello", "-n", "12", "--tokenizer", "byte",
                                   "--no-stream", *flags]) for flags in ([], ["--repetition-penalty", "3"])]
    assert all(r.exit_code == 0 for r in outputs), outputs[1].output
    assert outputs[0].output != outputs[1].output  # (random weights repeat bytes; a strong penalty changes them)



def test_generate_on_device_auto_decodes_where_the_model_loaded():
    # the model loaded on "auto" (CUDA when visible, else the CPU), then the prompt's ids went .to("auto"): a torch
    # RuntimeError traceback after the load
    args = ["generate", "demo-tiny", "-p", "hello", "-n", "4", "--temperature", "0.8", "--no-stream"]
    auto, cpu = (runner.invoke(app, [*args, "--device", device]) for device in ("auto", "cpu"))
    assert auto.exit_code == 0, auto.output
    if not torch.cuda.is_available():  # the same device: the same seeded tokens
        assert auto.output == cpu.output


def test_calibrate_on_device_auto_fits_where_the_model_loaded(tmp_path):
    # as generate's: the model loaded on "auto", then the text's batches went .to("auto") (a torch traceback)
    from dyndepth.methods import attach_gateskip

    model = dyndepth.CausalLM(dyndepth.preset("demo-tiny"))
    attach_gateskip(model)
    model.save_pretrained(tmp_path / "gated")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 20)
    result = runner.invoke(app, ["calibrate", str(tmp_path / "gated"), "--text", str(text), "--tokenizer", "byte",
                                 "--knobs", "budget=0.3", "--out", str(tmp_path / "q30"), "--batches", "1",
                                 "--seq-len", "32", "--device", "auto"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "q30" / "calibration.json").is_file()


def test_generate_says_that_top_k_and_top_p_need_a_temperature():
    # `--top-p 0.9` without `--temperature` decoded greedily without a word (transformers warns of it): the user
    # believed the text sampled
    base = ["generate", "demo-tiny", "-p", "hello", "-n", "3", "--no-stream"]
    for flags in (["--top-p", "0.9"], ["--top-k", "5"]):
        result = runner.invoke(app, [*base, *flags])
        assert result.exit_code == 0 and "only act when sampling (--temperature > 0)" in result.output, result.output
    sampled = runner.invoke(app, [*base, "--top-p", "0.9", "--temperature", "0.7"])
    assert sampled.exit_code == 0 and "only act when sampling" not in sampled.output

def test_generate_checks_the_length_and_a_methods_thresholds_before_echoing_the_prompt(tmp_path):
    from dyndepth.methods import MoDConfig, attach_mod

    model = dyndepth.CausalLM(dyndepth.preset("demo-tiny"))
    attach_mod(model, MoDConfig(capacity=0.5))
    model.save_pretrained(tmp_path)
    long = runner.invoke(app, ["generate", str(tmp_path), "-p", "abc", "--tokenizer", "byte", "-n", "5000"])
    assert long.exit_code == 2 and long.output.startswith("error: prompt (3) + max_new_tokens (5000) exceeds"), \
        long.output
    uncalibrated = runner.invoke(app, ["generate", str(tmp_path), "-p", "abc", "--tokenizer", "byte",
                                       "--knobs", "capacity=0.3,mode=router_threshold"])
    assert uncalibrated.exit_code == 2 and uncalibrated.output.startswith("error: ") and \
        "calibrated" in uncalibrated.output, uncalibrated.output
    saved = dyndepth.CausalLM(dyndepth.preset("demo-tiny"))  # its saved settings need thresholds: no knobs given
    attach_mod(saved, MoDConfig(capacity=0.5, decode_mode="router_threshold"))
    saved.save_pretrained(tmp_path / "needs")
    needs = runner.invoke(app, ["generate", str(tmp_path / "needs"), "-p", "abc", "--tokenizer", "byte", "-n", "2"])
    assert needs.exit_code == 2 and needs.output.startswith("error: mode 'router_threshold'"), needs.output


def test_generate_takes_a_dreamers_own_knobs(tmp_path):
    """`--knobs steps=2` sets a recurrent model's own knob (eval --model-args did; generate asked for a method)."""
    torch.manual_seed(0)
    model = dyndepth.build_model(dyndepth.preset("dreamer-tiny")).eval()
    model.save_pretrained(tmp_path)
    ids = torch.tensor([list(b"12+34=")])
    with model.override(steps=2):
        want = dyndepth.tokenizer.load_tokenizer("byte").decode(model.generate(ids, 4, stop_tokens=[])[0, 6:].tolist())
    result = runner.invoke(app, ["generate", str(tmp_path), "-p", "12+34=", "-n", "4", "--tokenizer", "byte",
                                 "--knobs", "steps=2", "--no-stream"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("12+34=" + want)
    bad = runner.invoke(app, ["generate", str(tmp_path), "-p", "x", "--tokenizer", "byte", "--knobs", "depth=2"])
    assert bad.exit_code == 2 and "Dreamer has no knob 'depth'" in bad.output, bad.output


def test_calibrate_then_generate_with_a_skip_budget_from_the_shell(tmp_path):
    # GateSkip decoding needs thresholds calibrated at its budget, and the shell had no way to fit them (nor
    # generate a flag to pass a budget): `dyndepth calibrate` fits and saves them, `generate --skip-budget` uses them
    from dyndepth.methods import GateSkipConfig, attach_gateskip
    from dyndepth.tokenizer import load_tokenizer

    model = dyndepth.CausalLM(dyndepth.preset("demo-tiny"))
    method = attach_gateskip(model, GateSkipConfig())
    model.save_pretrained(tmp_path / "gated")
    text = tmp_path / "calib.txt"
    text.write_text("12+30=42. 7*6=42. The quick brown fox jumps over the lazy dog.\n" * 40)
    gen = ["generate", "-p", "12+3=", "-n", "4", "--tokenizer", "byte", "--skip-budget", "0.3", "--no-stream"]
    uncalibrated = runner.invoke(app, [gen[0], str(tmp_path / "gated"), *gen[1:-1]])  # streaming: no prompt echoed
    assert uncalibrated.exit_code == 2 and uncalibrated.output.startswith("error: ") and \
        "dyndepth calibrate MODEL --text FILE --knobs budget=0.3" in uncalibrated.output, uncalibrated.output
    dyndepth.CausalLM(dyndepth.preset("demo-tiny")).save_pretrained(tmp_path / "plain")
    plain = runner.invoke(app, [gen[0], str(tmp_path / "plain"), *gen[1:]])
    assert plain.exit_code == 2 and "has no method attached: post-train one (dyndepth train" in plain.output
    no_method = runner.invoke(app, ["calibrate", str(tmp_path / "plain"), "--text", str(text), "--tokenizer", "byte",
                                    "--knobs", "budget=0.3", "--out", str(tmp_path / "never")])
    assert no_method.exit_code == 2 and "post-train one (dyndepth train RECIPE --method gateskip" in no_method.output
    mod = dyndepth.CausalLM(dyndepth.preset("demo-tiny"))
    dyndepth.methods.attach_method(mod, "mod", {})
    mod.save_pretrained(tmp_path / "mod")  # a skip budget is GateSkip's: MoD's knob was not named
    wrong = runner.invoke(app, [gen[0], str(tmp_path / "mod"), *gen[1:]])
    assert wrong.exit_code == 2 and "GateSkip's knob; mod decodes with its own knobs ['capacity', 'mode']" in \
        wrong.output, wrong.output
    empty = runner.invoke(app, [gen[0], str(tmp_path / "plain"), "-p", "ab", "-p", "", "--tokenizer", "byte"])
    assert empty.exit_code == 2 and "prompt 2 is empty" in empty.output, empty.output  # (it named attention_mask)
    result = runner.invoke(app, ["calibrate", str(tmp_path / "gated"), "--text", str(text), "--knobs", "budget=0.3",
                                 "--out", str(tmp_path / "calibrated"), "--tokenizer", "byte", "--seq-len", "64",
                                 "--batches", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    layers = model.config.num_hidden_layers
    assert f"calibrated {2 * layers} thresholds at {{'budget': 0.3}} on 4 windows of 64 tokens" in result.output
    saved = json.loads((tmp_path / "calibrated" / "calibration.json").read_text())
    assert saved["knobs"] == {"budget": 0.3} and len(saved["thresholds"]) == 2 * layers
    out = runner.invoke(app, [gen[0], str(tmp_path / "calibrated"), *gen[1:5], *gen[7:]])  # its own tokenizer
    assert out.exit_code == 0 and out.output.startswith("12+3="), out.output
    loaded, tok = dyndepth.from_pretrained(tmp_path / "calibrated"), load_tokenizer("byte")
    expected = loaded.generate(torch.tensor([tok.encode("12+3=")]), 4, skip_budget=0.3)  # as the command runs it
    assert out.output.split("\n---")[0] == "12+3=" + tok.decode(expected[0, 5:].tolist())
    assert method.name == "gateskip"
    bad = runner.invoke(app, ["calibrate", str(tmp_path / "gated"), "--text", str(text), "--knobs", "budget",
                              "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "must look like key=value" in bad.output
    zero = runner.invoke(app, ["calibrate", str(tmp_path / "gated"), "--text", str(text), "--knobs", "budget=0",
                               "--out", str(tmp_path / "x"), "--tokenizer", "byte", "--seq-len", "64"])
    assert zero.exit_code == 2 and "budget=0 has no threshold to fit" in zero.output, zero.output
    word = runner.invoke(app, ["calibrate", str(tmp_path / "gated"), "--text", str(text), "--knobs", "budget=abc",
                               "--out", str(tmp_path / "x"), "--tokenizer", "byte", "--seq-len", "64"])
    assert word.exit_code == 2 and "gateskip knob budget='abc' must be a number" in word.output, word.output
    moded = runner.invoke(app, ["calibrate", str(tmp_path / "gated"), "--text", str(text), "--knobs",
                                "budget=0.3,mode=threshold", "--out", str(tmp_path / "m"), "--tokenizer", "byte",
                                "--seq-len", "64"])  # a mode among the knobs: calibration records in its own
    assert moded.exit_code == 0, moded.output
    again = runner.invoke(app, ["calibrate", str(tmp_path / "gated"), "--text", str(text), "--knobs", "budget=0.5",
                                "--out", str(tmp_path / "m"), "--tokenizer", "byte", "--seq-len", "64"])
    assert again.exit_code == 2 and "already holds files" in again.output  # it replaced the 0.3 calibration
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe caf\xe9")
    bad = runner.invoke(app, ["calibrate", str(tmp_path / "gated"), "--text", str(binary), "--knobs", "budget=0.3",
                              "--out", str(tmp_path / "b"), "--tokenizer", "byte"])
    assert bad.exit_code == 2 and f"--text {binary} is not UTF-8 text" in bad.output, bad.output


def test_convert_changes_dtype_and_keeps_logits(tmp_path):
    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "dst" / "tokenizer.json").exists()
    ids = torch.randint(0, 256, (1, 5))
    ref = model.to(torch.bfloat16)(ids).logits
    torch.testing.assert_close(dyndepth.from_pretrained(tmp_path / "dst")(ids).logits, ref)
    # into a folder holding another checkpoint: refused, nothing touched (its old shards and tokenizer stayed
    # beside the new files and were loaded)
    other = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert other.exit_code == 2 and "already holds files" in other.output, other.output
    # in place (a sharded folder re-saved whole in bfloat16): the old shards and index go (it crashed half-way)
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    (tmp_path / "sharded" / "generation_config.json").write_text("{}")
    same = runner.invoke(app, ["convert", str(tmp_path / "sharded"), str(tmp_path / "sharded"), "--dtype", "bfloat16"])
    assert same.exit_code == 0, same.output
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["config.json", "generation_config.json",
                                                                        "model.safetensors"]
    torch.testing.assert_close(dyndepth.from_pretrained(tmp_path / "sharded")(ids).logits, ref)
    # a training step is never converted in place: its weights and manifest would no longer match
    step = tmp_path / "step_0000001"
    model.save_pretrained(step)
    (step / "train_state.pt").write_bytes(b"")  # what marks a training checkpoint
    inplace = runner.invoke(app, ["convert", str(step), str(step)])
    assert inplace.exit_code == 2 and "never in place" in inplace.output, inplace.output
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in runner.invoke(app, ["convert", str(tmp_path / "src"), str(afile)]).output


def _tiny_recipe(tmp_path, steps: int):
    """A demo-tiny recipe of `steps` steps on the embedded data, into tmp_path / "out", without eval or plots."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "demo-tiny"\n[train]\nsteps = {steps}\nbatch_size = 2\nseq_len = 16\nprogress = false\n'
                      f'plot = false\ndevice = "cpu"\neval_every = 0\nout_dir = "{tmp_path / "out"}"\n'
                      '[data]\nsource = "embedded"\nsynthetic_examples = 50\nstdlib_bytes = 5000\n'
                      '[eval]\nenabled = false\n')
    return recipe


def test_train_names_the_model_it_exported(tmp_path):
    """`dyndepth train` ended with the last training checkpoint only, which generate and eval refuse; the HF folder
    they load, out_dir/model, was named nowhere a new user would look."""
    recipe = _tiny_recipe(tmp_path, steps=1)
    trained = runner.invoke(app, ["train", str(recipe)])
    assert trained.exit_code == 0, trained.output
    model = tmp_path / "out" / "model"
    assert f"exported model: {model} (dyndepth generate {model} -p TEXT)" in trained.output
    generated = runner.invoke(app, ["generate", str(model), "-p", "ab", "-n", "2", "--no-stream"])
    assert generated.exit_code == 0, generated.output


def test_an_interrupted_train_names_the_checkpoint_it_keeps_and_how_to_resume(tmp_path, monkeypatch):
    """Ctrl-C ended `dyndepth train` with a blank line and exit 130: nothing said which checkpoint survived (the steps
    after it were lost) nor that --resume continues the run."""
    from dyndepth.train import run

    real = run.run_training

    def interrupted_after_two_steps(recipe, overrides):  # a real run that saves step 2, then Ctrl-C
        real(recipe, [*overrides, "train.steps=2"])
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_training", interrupted_after_two_steps)
    recipe = _tiny_recipe(tmp_path, steps=4)
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 130, result.output
    assert (f"interrupted: its last checkpoint is {tmp_path / 'out' / 'step_0000002'} (the steps after it are lost); "
            f"continue with `dyndepth train {recipe} --resume`") in result.output, result.output


def test_an_interrupted_train_resumed_from_a_named_step_says_to_leave_that_step_out(tmp_path, monkeypatch):
    # a run started with --set train.resume=STEP was told to continue with --resume "and the same --set options",
    # a command train refuses (--resume and train.resume=STEP name two checkpoints)
    from dyndepth.train import checkpoint, run

    def interrupted(recipe, overrides):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_training", interrupted)
    monkeypatch.setattr(checkpoint, "latest_checkpoint", lambda out_dir: tmp_path / "out" / "step_0000004")
    (tmp_path / "out").mkdir()
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "demo-tiny"\n[train]\nout_dir = "{tmp_path / "out"}"\n')
    step = tmp_path / "out" / "step_0000002"
    result = runner.invoke(app, ["train", str(recipe), "--set", f"train.resume={step}"])
    assert result.exit_code == 130, result.output
    told = f"`dyndepth train {recipe} --resume` and the same --set options, leaving out train.resume={step}"
    assert told in " ".join(result.output.split()), result.output


def test_convert_shards_a_training_step_and_refuses_a_shard_size_of_zero(tmp_path):
    """`convert STEP DST --max-shard-gb X` exported the step in one file and ignored X unless --dtype was given;
    --max-shard-gb 0 or -1 wrote one shard per tensor (46 files for demo-tiny)."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "tiny-qwen3"\n[train]\nsteps = 1\nbatch_size = 2\nseq_len = 16\nprogress = false\n'
                      f'plot = false\ndevice = "cpu"\neval_every = 0\nout_dir = "{tmp_path / "out"}"\n'
                      '[data]\nsource = "embedded"\nsynthetic_examples = 50\nstdlib_bytes = 5000\ntokenizer = "byte"\n'
                      '[eval]\nenabled = false\n')
    trained = runner.invoke(app, ["train", str(recipe), "--set", "model.vocab_size=264"])
    assert trained.exit_code == 0, trained.output
    step = tmp_path / "out" / "step_0000001"
    result = runner.invoke(app, ["convert", str(step), str(tmp_path / "dst"), "--max-shard-gb", "0.00002"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "dst" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 256, (1, 5))
    torch.testing.assert_close(dyndepth.from_pretrained(tmp_path / "dst")(ids).logits,
                               dyndepth.from_pretrained(tmp_path / "out" / "model")(ids).logits)
    for size in ("0", "-1"):
        bad = runner.invoke(app, ["convert", str(step), str(tmp_path / f"bad{size}"), "--max-shard-gb", size])
        assert bad.exit_code == 2 and "--max-shard-gb must be > 0" in bad.output, bad.output
        assert not (tmp_path / f"bad{size}").exists()


@pytest.mark.parametrize("args", [["eval", "demo-tiny", "--perplexity", "README.md", "--limit", "1"],
                                  ["match", "dreamer-tiny", "--against", "dense"], ["bench", "train", "--steps", "1"],
                                  ["demo", "--steps", "1"], ["study", "tokens", "--profile", "smoke"]])
def test_an_out_that_is_a_file_is_refused_before_the_work(args, tmp_path):
    """`eval --out FILE` scored every task, then ended in "FileExistsError: [Errno 17] File exists" when it
    wrote results.json (the scores lost); match after its 80-second search, bench after its timings."""
    afile = tmp_path / "afile"
    afile.write_text("kept")
    result = runner.invoke(app, [*args, "--out", str(afile)])
    assert result.exit_code == 2 and f"--out {afile} is a file" in result.output, result.output
    assert afile.read_text() == "kept"
    # a folder under a file: a NotADirectoryError traceback as the results were written, after the work
    result = runner.invoke(app, [*args, "--out", str(afile / "results")])
    assert result.exit_code == 2 and result.output.startswith(f"error: --out='{afile}/results' cannot be a folder: "
                                                              f"{afile} is a file"), result.output


def test_a_convert_or_calibrate_output_under_a_file_is_refused_before_the_work(tmp_path):
    # a NotADirectoryError traceback once the checkpoint was loaded (calibrate: and its thresholds fitted)
    afile = tmp_path / "afile"
    afile.write_text("kept")
    result = runner.invoke(app, ["convert", str(tmp_path / "ckpt"), str(afile / "dst")])
    assert result.exit_code == 2 and result.output.startswith(f"error: DST='{afile}/dst' cannot be a folder"), \
        result.output
    result = runner.invoke(app, ["calibrate", str(tmp_path / "ckpt"), "--text", str(afile), "--knobs", "budget=0.3",
                                 "--out", str(afile / "out")])
    assert result.exit_code == 2 and result.output.startswith(f"error: --out='{afile}/out' cannot be a folder"), \
        result.output


def test_bad_input_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path / "missing"), "-p", "x"])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output


def test_dyndepth_debug_0_keeps_the_one_line_error_and_1_shows_the_trace(tmp_path, monkeypatch):
    # any value turned the trace on, DYNDEPTH_DEBUG=0 (set to switch it off) too
    args = ["generate", str(tmp_path / "missing"), "-p", "x"]
    monkeypatch.setenv("DYNDEPTH_DEBUG", "0")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.output.startswith("error: no such folder"), result.output
    monkeypatch.setenv("DYNDEPTH_DEBUG", "1")
    assert "no such folder" in str(runner.invoke(app, args).exception)  # raised, with its trace


@pytest.mark.parametrize("args,message", [
    (["bench", "gateskip", "--budgets", "abc"], "--budgets takes comma-separated numbers"),
    (["bench", "gateskip", "--budgets", "0.3,0"], "budgets must start with 0"),
    (["bench", "gateskip", "--model", "tiny-qwen3", "--budgets", "0,0.5", "--prefill-lens", "8", "--decode-batches",
      "1", "--repeats", "0"], "repeats must be >= 1"),
    (["bench", "train", "--steps", "0"], "steps must be >= 1"),
    (["bench", "core", "--decode-batch-size", "-1"], "decode_batch_size must be >= 1"),
    (["bench", "core", "--model", "dreamer-tiny"], "HF transformers, which has no 'dreamer' model"),
    (["bench", "dnd", "--batches", "x"], "--batches takes comma-separated whole numbers"),
    (["bench", "dnd", "--batches", "1.7"], "--batches takes comma-separated whole numbers"),  # ran B = 1
    (["bench", "dnd", "--batches", "inf"], "--batches takes comma-separated whole numbers"),  # a traceback
    (["study", "tokens", "--seeds", "x"], "--seeds takes comma-separated whole numbers"),
    (["train", "recipes/tiny_cpu.toml", "--method", "gateskip", "--set", "method.name=mod"], "name two methods"),
    # --resume replaced the step asked for with the newest checkpoint (and --resume=false with a resume)
    (["train", "recipes/tiny_cpu.toml", "--resume", "--set", "train.resume=runs/x/step_0000100"],
     "--resume (the newest checkpoint) and --set train.resume=runs/x/step_0000100 name two checkpoints"),
    (["train", "recipes/tiny_cpu.toml", "--resume", "--set", "train.resume=false"], "name two checkpoints"),
])
def test_bad_bench_and_study_options_are_one_line_naming_the_option(args, message, tmp_path):
    """These raised from the config's constructor, outside the command's error handling: a traceback."""
    result = runner.invoke(app, [*args, *([] if args[0] == "train" else ["--out", str(tmp_path)])])
    assert result.exit_code == 2 and result.output.startswith("error:") and message in result.output, result.output


def test_train_reports_its_result_once_under_torchrun(tmp_path, monkeypatch):
    """Every torchrun rank runs the CLI; only rank 0 prints the closing line (each rank printed it)."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "tiny-qwen3"\n[train]\nsteps = 1\nbatch_size = 2\nseq_len = 16\nprogress = false\n'
                      f'plot = false\ndevice = "cpu"\neval_every = 0\nout_dir = "{tmp_path / "out"}"\n'
                      '[data]\nsource = "embedded"\nsynthetic_examples = 50\nstdlib_bytes = 5000\ntokenizer = "byte"\n'
                      '[eval]\nenabled = false\n')
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)  # WORLD_SIZE unset: one process that reads as rank `rank`
        result = CliRunner().invoke(app, ["train", str(recipe), "--set", f"train.out_dir={tmp_path / rank}",
                                          "--set", "model.vocab_size=264"])
        assert result.exit_code == 0, result.output
        assert ("trained 1 steps" in result.output) is shown, (rank, result.output)


def test_eval_without_data_dir_names_the_offline_option_when_a_download_fails(monkeypatch):
    # lm-eval's own task fetched its data set, and offline the command ended in a ConnectionError traceback
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'super_glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr("dyndepth.eval.run.run_eval", offline)
    result = runner.invoke(app, ["eval", "demo-tiny", "--tasks", "copa"])
    assert result.exit_code == 2 and result.output.startswith("error: ConnectionError: Couldn't reach"), result.output
    assert "pass --data-dir ../shared/data" in result.output


def test_repro_takes_its_token_cache_folder(tmp_path, monkeypatch):
    # repro tokenized its text into ./runs/data of wherever it ran (the repository, from its root), with no option
    seen = []
    monkeypatch.setattr("dyndepth.repro.run_repro", seen.append)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")  # (BASE must be a model folder)
    args = ["repro", str(tmp_path / "base"), "--data-dir", str(tmp_path), "--train-data", str(tmp_path / "t.txt")]
    assert runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "c")]).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0
    assert [cfg.cache_dir for cfg in seen] == [str(tmp_path / "c"), "runs/data"]


def test_calibrating_mod_at_capacity_one_writes_strict_json_and_keeps_every_token(tmp_path):
    """Capacity 1.0 keeps every token, so its recorded threshold is -inf; calibration.json held `-Infinity`, which
    strict JSON readers (jq, JS, json.loads with parse_constant) refuse. Now it holds null, and the saved checkpoint
    (whose buffer keeps -inf) decodes by threshold exactly as top-k at capacity 1.0."""
    from dyndepth.methods import attach_method

    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
    method = attach_method(model, "mod")
    model.save_pretrained(tmp_path / "mod")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    result = runner.invoke(app, ["calibrate", str(tmp_path / "mod"), "--text", str(text), "--knobs", "capacity=1.0",
                                 "--out", str(tmp_path / "c"), "--tokenizer", "byte", "--seq-len", "32",
                                 "--batches", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    saved = json.loads((tmp_path / "c" / "calibration.json").read_text(), parse_constant=refuse)
    assert saved["thresholds"] == {str(s): None for s in sorted(method.routed)}
    loaded = dyndepth.from_pretrained(tmp_path / "c")
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad(), loaded.method.override(capacity=1.0, mode="router_threshold"):
        by_threshold = loaded.eval()(ids).logits
    with torch.no_grad(), loaded.method.override(capacity=1.0, mode="topk"):
        by_topk = loaded(ids).logits
    torch.testing.assert_close(by_threshold, by_topk)


def test_convert_plain_leaves_the_method_out_of_a_folder_and_of_a_training_step(tmp_path):
    """`convert --plain` writes the base model of a post-trained checkpoint (a folder or a training step) without
    the method's tensors and config.json's dyndepth_method, for transformers; a family without a transformers class
    is refused by name."""
    from dyndepth.safetensors_io import read_safetensors

    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "tiny-qwen3"\n[train]\nsteps = 1\nbatch_size = 2\nseq_len = 16\nprogress = false\n'
                      f'plot = false\ndevice = "cpu"\neval_every = 0\nout_dir = "{tmp_path / "out"}"\n'
                      '[data]\nsource = "embedded"\nsynthetic_examples = 50\nstdlib_bytes = 5000\ntokenizer = "byte"\n'
                      '[eval]\nenabled = false\n')
    trained = runner.invoke(app, ["train", str(recipe), "--method", "gateskip", "--set", "model.vocab_size=264"])
    assert trained.exit_code == 0, trained.output
    model = dyndepth.from_pretrained(tmp_path / "out" / "model")
    assert model.method.name == "gateskip"
    for src in (tmp_path / "out" / "model", tmp_path / "out" / "step_0000001"):
        dst = tmp_path / f"plain-{src.name}"
        result = runner.invoke(app, ["convert", str(src), str(dst), "--plain"])
        assert result.exit_code == 0, result.output
        assert "dyndepth_method" not in json.loads((dst / "config.json").read_text())
        assert not [k for k in read_safetensors(dst / "model.safetensors") if ".gateskip." in k]
        plain = dyndepth.from_pretrained(dst)
        assert plain.method is None and (dst / "byte_tokenizer.json").exists()
        base = {k: v for k, v in model.state_dict().items() if ".gateskip." not in k}  # every other tensor, as trained
        assert plain.state_dict().keys() == base.keys()
        assert all(torch.equal(plain.state_dict()[k], v) for k, v in base.items())
    dyndepth.build_model(dyndepth.preset("dreamer-tiny")).save_pretrained(tmp_path / "dreamer")
    refused = runner.invoke(app, ["convert", str(tmp_path / "dreamer"), str(tmp_path / "d2"), "--plain"])
    assert refused.exit_code == 2 and "DreamerLM has no transformers class" in refused.output, refused.output


def test_a_tokenizer_other_than_the_models_own_is_refused(tmp_path):
    """`--tokenizer byte` on a model folder carrying its own BPE: generate printed garbage (the prompt read as ids
    the model never saw), and calibrate fitted its thresholds on them and saved the byte tokenizer beside the
    weights in place of the model's own, so every later `generate OUT` read bytes too."""
    from dyndepth.methods import attach_gateskip
    from dyndepth.tokenizer import train_bpe

    model = tmp_path / "model"
    lm = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3", vocab_size=300))
    attach_gateskip(lm)
    lm.save_pretrained(model)
    train_bpe(iter(["some text to learn a few merges from"] * 20), 300).save(model)
    (tmp_path / "calib.txt").write_text("some text to learn a few merges from. " * 200)
    generated = runner.invoke(app, ["generate", str(model), "-p", "some", "-n", "2", "--tokenizer", "byte"])
    calibrated = runner.invoke(app, ["calibrate", str(model), "--text", str(tmp_path / "calib.txt"), "--knobs",
                                     "budget=0.3", "--out", str(tmp_path / "out"), "--tokenizer", "byte"])
    for result in (generated, calibrated):
        assert result.exit_code == 2, result.output
        assert f"--tokenizer byte is not the tokenizer of {model}, which carries its own (HFTokenizer" in result.output
    assert not (tmp_path / "out" / "byte_tokenizer.json").exists()
    own = runner.invoke(app, ["generate", str(model), "-p", "some", "-n", "2", "--tokenizer", str(model)])
    assert own.exit_code == 0, own.output
    scored = runner.invoke(app, ["eval", str(model), "--perplexity", str(tmp_path / "calib.txt"), "--limit", "1",
                                 "--model-args", "tokenizer=byte", "--out", str(tmp_path / "eval")])
    assert scored.exit_code == 2 and f"tokenizer=byte is not the tokenizer of {model}" in scored.output, scored.output
