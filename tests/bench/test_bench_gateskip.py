import math

import pytest
import torch

from dyndepth.bench.gateskip import GateSkipBenchConfig, main


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_gateskip_reports_consistent_ratios(tmp_path, dtype):
    cfg = GateSkipBenchConfig(model="tiny-qwen3", budgets=[0.0, 0.5], prefill_lens=[64], decode_batches=[4],
                              decode_prompt_len=8, new_tokens=3, dtype=dtype, repeats=1, out_dir=str(tmp_path))
    rows = main(cfg)["rows"]
    assert [(r["phase"], r["budget"]) for r in rows] == [("prefill", 0.0), ("prefill", 0.5), ("decode", 0.0),
                                                         ("decode", 0.5)]
    for r in rows:
        if r["budget"] == 0.0:  # the baseline against itself, and against a second, identical contender
            assert r["realized_speedup"] == r["executed_speedup"] == r["ideal_speedup"] == 1.0
            control = float(r["control"])  # a time ratio of the same work: any bound on it is a timed assert
            assert control > 0 and math.isfinite(control)  # (a loaded host read 9x once)
        else:
            # skipping half the tokens of every branch removes work, ideally at least what ran
            assert r["control"] == "-"
            assert 1.0 <= r["executed_speedup"] < r["ideal_speedup"]
        assert r["realized_over_ideal"] == pytest.approx(r["realized_speedup"] / r["ideal_speedup"])
    # prefill: 64 tokens, 32 skip: the cost rule packs and the work that ran falls;
    # decode: 4 tokens a step, 2 skip (< pack_min_skipped): dense with a masked output, so what ran is the baseline
    assert rows[1]["packed"] == "100%" and rows[1]["executed_speedup"] > 1.2
    assert rows[3]["packed"] == "0%" and rows[3]["executed_speedup"] == 1.0
    assert (tmp_path / f"gateskip-cpu-{dtype}.md").read_text().count("| decode |") == 2
    assert rows[0]["skipped"] == rows[2]["skipped"] == 0.0 and rows[1]["skipped"] == 0.5  # floor(0.5 * 64) of 64
    assert 0.0 < rows[3]["skipped"] < 1.0  # by thresholds calibrated on random ids (what the row says it used)


def test_a_checkpoint_is_calibrated_and_prompted_from_a_text(tmp_path, monkeypatch):
    """A trained checkpoint's gates score real text, not random ids: calibrated on random ids, one read 83% skipped
    at "budget 0.3". With a calibration text the thresholds and prompts come from it, and the table says so."""
    import dyndepth
    import dyndepth.bench.gateskip as gateskip_bench
    from dyndepth.methods import GateSkipConfig, attach_gateskip, calibrate
    from dyndepth.tokenizer import ByteTokenizer

    model = dyndepth.CausalLM(dyndepth.preset("demo-tiny"))
    attach_gateskip(model, GateSkipConfig())
    for layer in model.model.layers:  # spread gates, so rankings differ by token
        for gate in (layer.gateskip.attn_gate, layer.gateskip.mlp_gate):
            torch.nn.init.normal_(gate.proj.weight, std=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    ByteTokenizer(264).save(tmp_path / "ckpt")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. 12 + 30 = 42.\n" * 80)
    cfg = dict(model=str(tmp_path / "ckpt"), budgets=[0.0, 0.3], prefill_lens=[32], decode_batches=[4],
               decode_prompt_len=16, new_tokens=3, repeats=1, out_dir=str(tmp_path / "out"))
    seen = []  # what the thresholds were fitted on: windows of the text's ids, not random ids
    monkeypatch.setattr(gateskip_bench, "calibrate", lambda model, batches, **knobs: (
        seen.extend(batches), calibrate(model, batches, **knobs))[1])
    rows = main(GateSkipBenchConfig(**cfg, calibration_text=str(text)))["rows"]
    assert 0.0 < rows[-1]["skipped"] < 1.0
    ids = ByteTokenizer().encode(text.read_text())
    assert seen and all(any(ids[s:s + 256] == row for s in range(len(ids) - 255)) for b in seen for row in b.tolist())
    assert f"calibrated on {text}" in (tmp_path / "out" / "gateskip-cpu-float32.md").read_text()
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="has 9 tokens; it needs at least 256"):
        main(GateSkipBenchConfig(**cfg, calibration_text=str(short)))


def test_bench_gateskip_refuses_a_calibration_text_that_is_not_a_file(tmp_path):
    # a folder stopped with an IsADirectoryError traceback, a missing file with a bare "[Errno 2] ...", after the
    # model was built
    import dyndepth.bench.gateskip as gateskip_bench

    for path in (tmp_path, tmp_path / "missing.txt"):
        with pytest.raises(ValueError, match=rf"calibration_text {path}: no such file; give a UTF-8 text file"):
            GateSkipBenchConfig(calibration_text=str(path))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=rf"calibration_text {latin} is not UTF-8 text"):
        gateskip_bench._text_ids(GateSkipBenchConfig(calibration_text=str(latin)), 256)


def test_bench_gateskip_refuses_a_baseline_other_than_zero():
    with pytest.raises(ValueError, match="start with 0"):
        GateSkipBenchConfig(budgets=[0.3, 0.5])


def test_a_checkpoint_of_another_method_is_named_as_such(tmp_path):
    """A MoD checkpoint was refused as having 'no dyndepth_method' (it has one: mod)."""
    import dyndepth
    from dyndepth.methods import attach_mod

    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
    attach_mod(model)
    model.save_pretrained(tmp_path / "mod")
    with pytest.raises(ValueError, match="names the method 'mod'"):
        main(GateSkipBenchConfig(model=str(tmp_path / "mod"), budgets=[0, 0.5], prefill_lens=[8], decode_batches=[1],
                                 repeats=1, out_dir=str(tmp_path)))


def test_compiled_decode_steps_run_masked_and_say_so(tmp_path):
    """`compile=True`: decode steps go through torch.compile over a static cache (dynamo only here), where a
    partially kept branch always runs dense with a masked output: the FLOPs that ran are the baseline's, the
    tokens still skip."""
    torch._dynamo.reset()  # the path counts are read while dynamo traces: a graph cached by an earlier test of the
    # process (same code, guards passing) was replayed without them and the row read "-"; a fresh bench traces
    cfg = GateSkipBenchConfig(model="tiny-qwen3", budgets=[0.0, 0.5], prefill_lens=[16], decode_batches=[1, 4],
                              decode_prompt_len=8, new_tokens=3, repeats=1, compile=True, compile_backend="eager",
                              out_dir=str(tmp_path))
    rows = [r for r in main(cfg)["rows"] if r["phase"] == "decode" and r["budget"] == 0.5]
    assert [r["shape"] for r in rows] == ["B=1, 3 new", "B=4, 3 new"]
    for r in rows:
        assert r["packed"] == "0%" and r["executed_speedup"] == 1.0  # no whole skip, no packing: one graph
    assert rows[1]["skipped"] > 0 and rows[1]["ideal_speedup"] > 1.0
    md = (tmp_path / "gateskip-cpu-float32-compiled.md").read_text()
    assert "decode compiled (eager, static cache)" in md


def test_the_heading_names_the_checkpoints_gates_not_the_option(tmp_path):
    """A scalar-gated checkpoint ran with its own gates (--gate is for presets), but the heading read "incl. vector
    gates", the option's default."""
    import dyndepth
    from dyndepth.methods import GateSkipConfig, attach_gateskip

    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
    attach_gateskip(model, GateSkipConfig(gate="scalar"))
    model.save_pretrained(tmp_path / "ckpt")
    cfg = GateSkipBenchConfig(model=str(tmp_path / "ckpt"), budgets=[0.0, 0.5], prefill_lens=[8], decode_batches=[1],
                              decode_prompt_len=4, new_tokens=2, repeats=1, out_dir=str(tmp_path / "out"))
    assert main(cfg)["gate"] == "scalar"
    assert "incl. scalar gates" in (tmp_path / "out" / "gateskip-cpu-float32.md").read_text()


def test_a_checkpoint_of_fewer_than_256_positions_is_calibrated_within_its_context(tmp_path):
    """A 128-position checkpoint, every option within its context, failed after its prefill rows were timed: "the
    input has 256 tokens, more than max_position_embeddings (128)", the decode thresholds' calibration windows."""
    import dyndepth
    from dyndepth.methods import GateSkipConfig, attach_gateskip

    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3", max_position_embeddings=128))
    attach_gateskip(model, GateSkipConfig())
    model.save_pretrained(tmp_path / "ckpt")
    cfg = GateSkipBenchConfig(model=str(tmp_path / "ckpt"), budgets=[0.0, 0.5], prefill_lens=[16], decode_batches=[1],
                              decode_prompt_len=8, new_tokens=2, repeats=1, out_dir=str(tmp_path / "out"))
    rows = main(cfg)["rows"]
    assert [r["phase"] for r in rows] == ["prefill", "prefill", "decode", "decode"]
