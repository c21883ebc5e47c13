"""`bench core` compares like with like: both sides run the same way in every row, and the reported
ratios are the recorded speeds' ratios. Nothing here is timed."""

import pytest

from dyndepth.bench.core import CoreBenchConfig, main, render_markdown


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True])
def test_both_sides_run_the_same_way_and_ratios_match_the_speeds(tmp_path, compile):
    cfg = CoreBenchConfig(model="tiny-qwen3", prompt_len=16, decode_prompt_len=8, new_tokens=48, repeats=3,
                          compile=compile, compile_backend="eager", load_memory=False, out_dir=str(tmp_path))
    r = main(cfg)  # "eager" backend: dynamo traces both sides (the code path under test) without inductor; 48
    # tokens: with 12, a loaded host's noise made generate(12) no slower than generate(1), which the bench refuses

    for phase in ("prefill", "decode"):
        ours, hf = r["runs"][phase]["ours"], r["runs"][phase]["hf"]
        for key in ("execution", "attends_over", "attention"):
            assert ours[key] == hf[key], (phase, key)
        assert ours["execution"].startswith("compiled" if compile else "eager"), phase
        assert ours["attention"] == "sdpa"
    assert r["runs"]["prefill"]["ours"]["cache"] == r["runs"]["prefill"]["hf"]["cache"] == "none"
    assert r["runs"]["decode"]["hf"]["cache"] == ("StaticCache" if compile else "DynamicCache")
    if compile:  # the same torch.compile options on both sides, read back from HF's own compiled call
        assert r["runs"]["decode"]["hf"]["execution"] == "compiled (eager, mode=default, dynamic=False)"

    prefill_tokens, decode_tokens = cfg.prompt_len * cfg.batch_size, (cfg.new_tokens - 1) * cfg.decode_batch_size
    for side in ("ours", "hf"):
        assert r["prefill_tokens_per_s"][side] == pytest.approx(prefill_tokens / r["prefill_s"][side])
        assert r["decode_tokens_per_s"][side] == pytest.approx(decode_tokens / r["decode_s"][side])
    tps = r["prefill_tokens_per_s"]
    assert r["prefill_speedup_vs_hf"] == pytest.approx(tps["ours"] / tps["hf"])
    tps = r["decode_tokens_per_s"]
    assert r["decode_speedup_vs_hf"] == pytest.approx(tps["ours"] / tps["hf"])
    assert set(r["prefill_s"]) == set(r["decode_s"]) == {"ours", "hf", "control"}  # HF timed twice: the noise
    assert r["prefill_control"] == pytest.approx(r["prefill_s"]["hf"] / r["prefill_s"]["control"])
    assert r["decode_control"] == pytest.approx(r["decode_s"]["hf"] / r["decode_s"]["control"])
    assert r["load_peak_over_weights"] is None and r["weight_bytes"] > 0

    md = (tmp_path / f"core-cpu-float32{'-compiled' if compile else ''}.md").read_text()  # an eager run's report kept
    assert md.strip().endswith(render_markdown(r).strip())
    assert f"| prefill | hf | {r['runs']['prefill']['hf']['execution']} | none |" in md
    assert f"| decode | hf | {r['runs']['decode']['hf']['execution']} | {r['runs']['decode']['hf']['cache']} |" in md
    assert "load peak RSS" not in md


def test_the_hf_cache_is_read_under_either_transformers_name():
    """transformers 5.2x returns the cache as `cache`, earlier 5.x (the GPU machine's 5.17) as `past_key_values`."""
    from types import SimpleNamespace

    from dyndepth.bench.core import _cache_name

    class StaticCache:
        pass

    assert _cache_name(SimpleNamespace(cache=StaticCache())) == "StaticCache"
    assert _cache_name(SimpleNamespace(past_key_values=StaticCache())) == "StaticCache"
    assert _cache_name(SimpleNamespace(past_key_values=None)) == "none"



def test_a_checkpoint_with_a_method_is_refused_not_compared_with_the_plain_hf_model(tmp_path):
    """HF loads a GateSkip checkpoint as plain Qwen3 (the gate weights dropped) while ours ran it with its gates:
    the ratio compared two different models and the table said nothing of it."""
    import dyndepth
    from dyndepth.methods import GateSkipConfig, attach_gateskip

    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
    attach_gateskip(model, GateSkipConfig())
    model.save_pretrained(tmp_path / "gated")
    cfg = CoreBenchConfig(model=str(tmp_path / "gated"), prompt_len=8, decode_prompt_len=4, new_tokens=2, repeats=1,
                          load_memory=False, out_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="carries the method 'gateskip'"):
        main(cfg)
    assert not (tmp_path / "out").exists()


def test_a_decode_time_lost_in_the_noise_is_an_error_not_a_negative_speed(tmp_path, monkeypatch):
    """Decode is timed as generate(n) - generate(1): at 2 new tokens and one repeat the noise outgrew the one step, and
    the table printed "decode tok/s ... -1,260" and a ratio of -0.327."""
    from dyndepth.bench import core

    monkeypatch.setattr(core, "interleaved_median", lambda fns, device, repeats: {  # generate(2) read faster
        k: (0.0010 if k.endswith(" x1") else 0.0009) if " x" in k else 0.01 for k in fns})
    cfg = CoreBenchConfig(model="tiny-qwen3", prompt_len=4, decode_prompt_len=4, new_tokens=2, repeats=1,
                          load_memory=False, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no slower than generate"):
        main(cfg)


def test_hf_decodes_every_prompt_token_as_ours_does_even_one_of_the_pad_id(tmp_path, monkeypatch):
    """HF's generate got no attention mask, so it inferred one from pad_token_id=0: a random prompt holding token id 0
    (6% of 16-token prompts at vocab 256) had that token masked out, and HF decoded through its explicit-mask attention
    path over fewer keys while ours ran the causal path over all of them: not like against like."""
    import torch
    from transformers.models.qwen3 import modeling_qwen3

    randint = torch.randint

    def with_pad_id(*args, **kwargs):  # every prompt the bench draws holds token id 0
        ids = randint(*args, **kwargs)
        if ids.dim() == 2:
            ids[:, 0] = 0
        return ids

    masks, forward = [], modeling_qwen3.Qwen3Attention.forward

    def recording(self, *args, **kwargs):
        masks.append(kwargs["attention_mask"] if "attention_mask" in kwargs else args[2])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(torch, "randint", with_pad_id)
    monkeypatch.setattr(modeling_qwen3.Qwen3Attention, "forward", recording)
    cfg = CoreBenchConfig(model="tiny-qwen3", prompt_len=8, decode_prompt_len=6, new_tokens=3, decode_batch_size=2,
                          repeats=1, load_memory=False, out_dir=str(tmp_path))
    try:
        main(cfg)
    except ValueError as e:  # a tiny run's decode time may drown in the noise; the masks are recorded by then
        assert "no slower than generate" in str(e)
    import transformers

    def masks_nothing(m) -> bool:  # (transformers 4.x's prefill without a cache passes the causal mask itself)
        q, k = m.shape[-2:]
        return m.dtype == torch.bool and torch.equal(m, torch.ones(q, k, dtype=torch.bool).tril(k - q).expand_as(m))

    v4 = int(transformers.__version__.split(".")[0]) < 5
    assert masks and all(m is None or (v4 and masks_nothing(m)) for m in masks)  # HF's causal path, no token masked


@pytest.mark.slow
def test_load_memory_warms_both_sides_alike_before_counting(tmp_path):
    """Only our side was warmed before the peak-RSS counter was reset: HF's first load also imported its model code
    (59 MB at transformers 5.25), counted as load memory, so bench-small read HF 1.39 x its weights against our
    1.02 (1.04 once warmed alike); a tiny model's HF figure was that import, 61 MB for 0.36 MB of weights."""
    import dyndepth
    from dyndepth.bench.core import _load_memory

    dyndepth.CausalLM(dyndepth.preset("tiny-qwen3")).save_pretrained(tmp_path)
    hf = _load_memory(tmp_path, "hf")
    assert hf["weight_bytes"] == dyndepth.CausalLM(dyndepth.preset("tiny-qwen3")).num_params() * 4
    assert hf["peak_bytes"] < 24 * 2**20  # a load's own buffers, not the import of transformers' model code
