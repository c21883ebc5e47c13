import json

import pytest
import torch

from dyndepth.bench.train import TrainBenchConfig, build_loops, main, render_markdown


def _tiny(tmp_path, **kw) -> TrainBenchConfig:
    base = {"model": "tiny-qwen3", "batch_size": 2, "seq_len": 16, "steps": 2, "warmup_steps": 0,
            "out_dir": str(tmp_path)}
    return TrainBenchConfig(**{**base, **kw})


def test_main_writes_json_and_markdown_with_sane_numbers(tmp_path, capsys):
    result = main(_tiny(tmp_path))
    saved = json.loads((tmp_path / "train-cpu-float32.json").read_text())
    for key in ("tokens_per_s", "ratio_ours_over_plain", "mfu", "flops_per_token", "final_loss", "losses",
                "date", "torch", "machine"):
        assert key in saved, key
    for name in ("ours", "plain"):
        assert result["tokens_per_s"][name] > 0 and result["mfu"][name] > 0
        assert len(result["losses"][name]) == 2
    seconds = result["step_seconds"]  # the ratio is the one of the measured step times
    assert result["ratio_ours_over_plain"] == pytest.approx(seconds["plain"] / seconds["ours"], rel=1e-9)
    assert result["tokens_per_s"]["ours"] == pytest.approx(2 * 16 / seconds["ours"], rel=1e-9)
    assert result["flops_per_token"] > result["flops_per_token_causal"] > 0  # non-causal attention counts more
    assert result["peak_memory_bytes"] is None and result["process_peak_rss_bytes"] > 0  # CPU
    md = (tmp_path / "train-cpu-float32.md").read_text()
    assert "| ratio | control |" in md and f"{result['ratio_ours_over_plain']:.3g}" in md
    # the last loss is the one step 2 computed, after one update: the row said "loss after 2 steps"
    assert "flops_per_token" in md and "| loss of step 2 |" in md and md.count("loss after") == 0
    assert f"| {result['losses']['ours'][1]:.5f} |" in md
    assert "### bench train: tiny-qwen3" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe", "dreamer-tiny", "huginn-tiny"])
def test_both_loops_train_the_same_thing(tmp_path, name):  # any family's preset (Dreamer's crashed)
    ours, plain = build_loops(_tiny(tmp_path, model=name), torch.device("cpu"))
    start = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    for _ in range(3):
        ours.step()
        plain.step()
    moved = max((p - start[n]).abs().max().item() for n, p in ours.model.named_parameters())
    assert moved > 1e-4  # the weights were updated, so agreeing losses mean something
    torch.testing.assert_close(torch.stack(ours.losses), torch.stack(plain.losses), atol=1e-5, rtol=0)
    p_ours, p_plain = dict(ours.model.named_parameters()), dict(plain.model.named_parameters())
    assert p_ours.keys() == p_plain.keys()
    for n, p in p_ours.items():  # same updates: same weight decay groups, clipping and AdamW hyperparameters
        torch.testing.assert_close(p, p_plain[n], atol=1e-6, rtol=0, msg=n)


def test_a_control_is_timed_alongside_and_the_losses_stay_comparable(tmp_path, monkeypatch):
    """The ratio had no control (a lone ratio): the plain loop's step is timed again as a third contender, and the
    control is the plain time over it; the plain loop then steps twice a round, but the losses compared are each
    loop's first steps, on the same batches."""
    import dyndepth.bench.train as bench_train
    from dyndepth.bench.timing import CONTROL

    seen = {}

    def fake(fns, device, repeats=5, warmup=2):  # runs each contender as often as the real loop, stub timings
        seen.update(fns)
        for _ in range(warmup + repeats):
            for fn in fns.values():
                fn()
        return {"ours": 0.010, "plain": 0.012, CONTROL: 0.015}

    monkeypatch.setattr(bench_train, "interleaved_median", fake)
    result = main(_tiny(tmp_path, steps=2))
    assert set(seen) == {"ours", "plain", CONTROL} and seen[CONTROL] == seen["plain"]  # identical to the baseline
    assert result["control"] == pytest.approx(0.012 / 0.015)
    assert result["step_seconds"] == {"ours": 0.010, "plain": 0.012}
    assert result["ratio_ours_over_plain"] == pytest.approx(0.012 / 0.010)
    assert len(result["losses"]["plain"]) == 2 and result["max_loss_abs_diff"] < 1e-5  # first steps, same batches
    md = (tmp_path / "train-cpu-float32.md").read_text()
    assert "| 1.2 | 0.8 |" in md
    assert f"MFU: {result['flops_per_token']:,.0f} FLOPs/token" in md and "{" not in md  # every field filled in


def test_cuda_memory_row_only_on_gpu(tmp_path):
    result = main(_tiny(tmp_path, steps=1))
    result["peak_memory_bytes"] = {"ours": 3 * 2**20, "plain": 2 * 2**20}
    result["process_peak_rss_bytes"] = None
    md = render_markdown(result)
    assert "peak CUDA memory (MiB)" in md and "| 1.5 |" in md


@pytest.mark.parametrize("bad", [{"model": "nope"}, {"dtype": "float16"}, {"steps": 0}, {"warmup_steps": -1}])
def test_bad_config_names_the_problem(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainBenchConfig(**bad)
