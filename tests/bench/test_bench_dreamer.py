import json

import pytest
import torch

from dyndepth.bench.dreamer import ALIGN, DreamerBenchConfig, main, matched_dense
from dyndepth.models.dreamer import DreamerConfig, DreamerLM


def test_the_dense_baseline_matches_dreamers_flops_per_token():
    config = DreamerConfig(vocab_size=512, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                           num_recurrences=6, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=64)
    dense = matched_dense(config)
    assert dense.num_hidden_layers == 6 and dense.hidden_size == 128
    from dyndepth import CausalLM

    gap = DreamerLM(config).forward_flops(256) - CausalLM(dense).forward_flops(256)
    assert dense.intermediate_size % ALIGN == 0  # an aligned width, as real models have
    assert abs(gap) <= ALIGN / 2 * 6 * 128 * 6 * 256  # only that rounding differs: half a step, 6 layers, 256 tokens


@pytest.mark.parametrize("name", ["moeut-switchhead-tiny", "moeut-tiny"])
def test_the_dense_baseline_of_a_moeut_preset_pays_for_switchhead_attention_too(name):
    """SwitchHead's routers and value / output experts cost more than plain projections: the baseline ignored them and
    ran 18% fewer FLOPs per token than the MoEUT-SwitchHead preset it was said to equal."""
    import dyndepth

    ref = dyndepth.build_model(dyndepth.preset(name))
    dense = dyndepth.CausalLM(matched_dense(ref.config))
    step = ALIGN / 2 * 6 * ref.config.hidden_size * ref.config.num_hidden_layers  # the width's rounding, per token
    assert abs(ref.forward_flops(32) - dense.forward_flops(32)) / 32 <= step


def test_main_writes_json_and_markdown_with_consistent_ratios(tmp_path, capsys):
    cfg = DreamerBenchConfig(model="dreamer-tiny", batch_size=2, seq_len=16, steps=1, warmup_steps=0,
                             decode_batches=[1, 2], prompt_len=4, new_tokens=3, repeats=1, out_dir=str(tmp_path))
    result = main(cfg)
    saved = json.loads((tmp_path / "dreamer-cpu-float32.json").read_text())
    assert set(saved["decode_tokens_per_s"]) == {"1", "2"} and saved["date"]
    step = result["train_step_seconds"]
    assert result["train_ratio"] == pytest.approx(step["dense"] / step["dreamer"], rel=1e-9)
    assert set(step) == {"dreamer", "dense"} and 0 < result["train_control"] < float("inf")  # the noise, not a model
    assert result["flops_ratio"] == pytest.approx(1.0, abs=0.02)
    assert result["kv_bytes_per_token"]["dreamer"] == result["kv_bytes_per_token"]["dense"]
    assert min(result["memory_bytes"].values()) > 0
    out = capsys.readouterr().out
    assert "| decode tok/s (B=2, prompt 4) |" in out and "| metric | dreamer | dense | ratio | control |" in out


def test_decode_rows_have_a_control_timed_alongside(tmp_path, monkeypatch):
    """The decode rows had no control (a lone ratio): a second dense stepper, a cache of its own, is timed in the
    same interleaved loop, and the row's control is the dense step time over it."""
    from dyndepth.bench import timing

    seen = []

    def fake(steppers, steps, device, rounds=3, warmup=1):  # stub timings: dreamer 4 ms, dense 2 ms, control 2.5
        seen.append(dict(steppers))
        return {"dreamer": 0.004, "dense": 0.002, timing.CONTROL: 0.0025}

    monkeypatch.setattr(timing, "interleaved_steps", fake)
    cfg = DreamerBenchConfig(model="dreamer-tiny", batch_size=2, seq_len=16, steps=1, warmup_steps=0,
                             decode_batches=[2], prompt_len=4, new_tokens=3, repeats=1, out_dir=str(tmp_path))
    result = main(cfg)
    steppers = seen[0]
    assert set(steppers) == {"dreamer", "dense", timing.CONTROL}
    assert steppers[timing.CONTROL] is not steppers["dense"]  # its own stepper (its own cache)
    assert result["decode_control"][2] == pytest.approx(0.002 / 0.0025)
    assert result["decode_tokens_per_s"][2] == pytest.approx({"dreamer": 2 / 0.004, "dense": 2 / 0.002})
    md = (tmp_path / "dreamer-cpu-float32.md").read_text()
    assert "| decode tok/s (B=2, prompt 4) | 500 | 1,000 | 0.5 | 0.8 |" in md


def test_compiled_training_and_decode_steps_are_timed_and_said(tmp_path, monkeypatch):
    compile_ = torch.nn.Module.compile  # the trainer's per-layer compile, with dynamo's eager backend (fast)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager"))
    cfg = DreamerBenchConfig(model="dreamer-tiny", batch_size=2, seq_len=16, steps=1, warmup_steps=0,
                             decode_batches=[2], prompt_len=4, new_tokens=3, repeats=1, compile=True,
                             compile_backend="eager", out_dir=str(tmp_path))
    result = main(cfg)
    assert min(result["decode_tokens_per_s"][2].values()) > 0
    md = (tmp_path / "dreamer-cpu-float32-compiled.md").read_text()
    assert "training compiled per layer, decode compiled (eager, static cache)" in md


def test_a_non_dreamer_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="not a Dreamer preset; use one of"):
        DreamerBenchConfig(model="tiny-qwen3")


def test_a_negative_warmup_is_a_clear_error():  # it timed fewer rounds than steps (none at steps = 1: a median error)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        DreamerBenchConfig(model="dreamer-tiny", warmup_steps=-1)
