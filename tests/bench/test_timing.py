"""The timing helpers every bench uses: step-by-step interleaving (only the steps timed) and the greedy decode
stepper (the steps `generate` runs)."""

import contextlib
import re
from types import SimpleNamespace

import pytest
import torch

from dyndepth import CausalLM, preset
from dyndepth.bench import timing
from dyndepth.bench.timing import Stepper, greedy_stepper, interleaved_steps, stepper_stats


def test_interleaved_steps_alternates_the_contenders_and_times_their_steps_only(monkeypatch):
    clock, log = [0.0], []
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def contender(name: str, cost: float) -> Stepper:
        def start():
            log.append(f"{name}:start")
            clock[0] += 100.0  # a prefill: not timed
            return 0

        def step(state, i):
            log.append(f"{name}{i}")
            clock[0] += cost * (i + 1)
            return state + 1

        @contextlib.contextmanager
        def scope():
            clock[0] += 50.0  # entering a method override: not timed
            yield

        return Stepper(start, step, scope)

    t = interleaved_steps({"a": contender("a", 1.0), "b": contender("b", 2.0)}, steps=3,
                          device=torch.device("cpu"), rounds=2, warmup=1)
    assert log[:8] == ["a:start", "b:start", "a0", "b0", "b1", "a1", "a2", "b2"]  # the order alternates
    assert len(log) == 3 * 8  # one warm-up round and two timed ones
    assert t == {"a": 2.0, "b": 4.0}  # medians of the step costs (1, 2, 3) and (2, 4, 6)


def test_the_greedy_stepper_runs_the_steps_generate_runs():
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3")).eval()
    prompt = torch.randint(0, 256, (3, 7))
    stepper = greedy_stepper(model, prompt, steps=5)
    state, tokens = stepper.start(), []
    for i in range(5):
        tokens.append(state[1][:, 0])
        state = stepper.step(state, i)
    tokens.append(state[1][:, 0])
    assert torch.equal(torch.stack(tokens, 1), model.generate(prompt, 6, stop_tokens=[])[:, 7:])
    stats = stepper_stats(stepper, 5)
    assert len(stats) == 5 and all(float(s["flops/executed"]) > 0 for s in stats)


def test_a_compared_rows_latency_is_timed_in_turn_with_the_base(monkeypatch):
    """`bench.compare.latency_ratio`: the row's model and the base alternate (a, b, b, a, ...) in one loop and the
    ratio is of their medians; rows scored minutes apart were compared by lone times."""
    from dyndepth.bench import compare

    clock, log = [0.0], []
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def model(name: str, cost: float):
        def forward(ids, attention_mask=None):
            log.append(name)
            clock[0] += cost

        return forward

    probe = (torch.zeros(1, 4, dtype=torch.long), None)
    ratio = compare.latency_ratio(model("row", 3.0), model("base", 2.0), probe, repeats=3)
    assert log == ["row", "base", "base", "row", "row", "base", "base", "row"]  # one warm-up round, then three
    assert ratio == 1.5


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_every_contender_takes_every_position_equally_often(n):
    """Reversing alone kept the middle contender in the middle of every turn (a b c, c b a); rotating by the turn
    index kept an even number of contenders (bench core's six decode contenders) on fixed halves."""
    names = "abcdef"[:n]
    order = [[name for name, _ in timing._turns(dict.fromkeys(names, 0), i)] for i in range(2 * n)]
    for name in names:
        assert sorted(turn.index(name) for turn in order) == sorted(list(range(n)) * 2), (name, order)
    assert [[n for n, _ in timing._turns({"a": 0, "b": 0}, i)] for i in range(2)] == [["a", "b"], ["b", "a"]]


def test_machine_description_counts_threads_in_words(monkeypatch):
    monkeypatch.setattr(timing.torch, "get_num_threads", lambda: 1)
    assert " CPU, 1 thread, " in timing.machine_description(torch.device("cpu"))  # it said "1 threads"
    monkeypatch.setattr(timing.torch, "get_num_threads", lambda: 2)
    assert " CPU, 2 threads, " in timing.machine_description(torch.device("cpu"))


def test_device_auto_is_the_device_a_bench_runs_on(tmp_path):
    """`bench core / gateskip --device auto` crashed in `model.to("auto")` with torch's stack trace (bench dnd ran,
    but named its files dnd-auto-*): a bench's config names the device "auto" resolves to."""
    from dyndepth.bench.core import CoreBenchConfig
    from dyndepth.bench.dnd import DNDBenchConfig
    from dyndepth.bench.gateskip import GateSkipBenchConfig, main

    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert CoreBenchConfig(device="auto").device == DNDBenchConfig(device="auto").device == here
    cfg = GateSkipBenchConfig(model="tiny-qwen3", budgets=[0.0, 0.5], prefill_lens=[8], decode_batches=[1],
                              decode_prompt_len=4, new_tokens=2, repeats=1, device="auto", out_dir=str(tmp_path))
    assert len(main(cfg)["rows"]) == 4 and (tmp_path / f"gateskip-{here}-float32.md").exists()


@pytest.mark.parametrize("bench", ["core", "gateskip", "dnd"])
def test_a_length_past_the_models_positions_is_refused_before_anything_is_timed(tmp_path, monkeypatch, bench):
    # tiny-qwen3 places 512 positions: a prefill length of 600 (or a 500-token prompt decoding 40 more) failed inside
    # the model, after the lengths before it had been timed (gateskip, core) or the thresholds fitted (dnd)
    from dyndepth.bench import core, dnd, gateskip

    def timed(*args, **kwargs):
        raise AssertionError("timed before the lengths were checked")

    for module in (core, timing):
        monkeypatch.setattr(module, "interleaved_median", timed, raising=False)
    monkeypatch.setattr(timing, "interleaved_steps", timed)
    common = {"model": "tiny-qwen3", "repeats": 1, "out_dir": str(tmp_path)}
    run, cfg, flag = {
        "core": (core.main, core.CoreBenchConfig(**common, prompt_len=8, decode_prompt_len=500, new_tokens=40,
                                                 load_memory=False), "--decode-prompt-len + --new-tokens = 540"),
        "gateskip": (gateskip.main, gateskip.GateSkipBenchConfig(**common, budgets=[0.0, 0.5], prefill_lens=[8, 600],
                                                                 decode_batches=[1]), "--prefill-lens = 600"),
        "dnd": (dnd.main, dnd.DNDBenchConfig(**common, batches=[1], prefill_len=600), "--prefill-len = 600"),
    }[bench]
    with pytest.raises(ValueError, match=re.escape(flag) + " exceeds the model's max_position_embeddings \\(512\\)"):
        run(cfg)


def test_a_negative_warmup_is_refused_not_timed_as_fewer_rounds():
    """warmup=-1 ran repeats - 1 rounds and timed them all (the median of fewer timings than asked; none at repeats=1,
    a statistics error); both interleaving helpers refuse it before running anything."""
    calls = []
    with pytest.raises(ValueError, match=r"warmup must be >= 0 \(untimed rounds first\), got -1"):
        timing.interleaved_median({"a": lambda: calls.append(1)}, torch.device("cpu"), repeats=3, warmup=-1)
    stepper = Stepper(start=lambda: calls.append(1), step=lambda state, i: calls.append(1))
    with pytest.raises(ValueError, match=r"warmup must be >= 0 \(untimed rounds first\), got -1"):
        interleaved_steps({"a": stepper}, 2, torch.device("cpu"), rounds=3, warmup=-1)
    assert not calls


@pytest.mark.parametrize("bench", ["gateskip", "dnd"])
def test_the_flag_the_length_error_names_exists_on_the_command_line(tmp_path, bench):
    # bench gateskip / dnd refused a long decode naming "--decode-prompt-len + --new-tokens", a flag neither command
    # had (the 64-token prompt was fixed): the fix the error gave could not be typed
    from typer.testing import CliRunner

    from dyndepth.cli import app

    result = CliRunner().invoke(app, ["bench", bench, "--model", "tiny-qwen3", "--decode-prompt-len", "500",
                                      "--new-tokens", "40", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--decode-prompt-len + --new-tokens = 540 exceeds" in result.output, result.output
