"""Self-speculative GateSkip decoding: greedy output == full-compute generate, stats, the sampling rule."""

import math

import pytest
import torch

from dyndepth import CausalLM, preset
from dyndepth.methods import GateSkipConfig, attach_gateskip, calibrate
from dyndepth.methods.speculative import (
    SpecStats,
    benchmark_speculative,
    greedy_accept,
    speculative_accept,
    speculative_generate,
)


def spec_model(budget=0.5, eos=None):
    """Tiny GateSkip model with spread-out random gates, calibrated at `budget` for drafting. Weights are
    a bit larger than the default init so branches matter (the draft then disagrees sometimes) without
    the greedy output collapsing to one repeated token."""
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3", eos_token_id=eos)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0, 0.05)
    method = attach_gateskip(model, GateSkipConfig())
    with torch.no_grad():
        for layer in model.model.layers:
            for gate in (layer.gateskip.attn_gate, layer.gateskip.mlp_gate):
                gate.proj.weight.normal_(0, 0.5)
                gate.proj.bias.zero_()
    if budget:
        calibrate(model, [torch.randint(0, 256, (4, 24)) for _ in range(2)], budget=budget)
    return model, method


def left_padded_pair():
    ids = torch.randint(0, 256, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("cache_mode", ["shared", "separate"])
@pytest.mark.parametrize("num_draft", [1, 3])
def test_greedy_equals_full_compute_generate_batch_1(num_draft, cache_mode):
    model, _ = spec_model()
    ids = torch.randint(0, 256, (1, 6))
    ref = model.generate(ids, 20, stop_tokens=[])
    out, stats = speculative_generate(model, ids, 20, draft_budget=0.5, num_draft=num_draft, stop_tokens=[],
                                      cache_mode=cache_mode)
    assert torch.equal(out, ref)
    assert 0.0 < stats.acceptance_rate < 1.0  # the skipping draft is right sometimes, not always
    assert stats.new_tokens == 20


@pytest.mark.parametrize("cache_mode", ["shared", "separate"])
@pytest.mark.parametrize("num_draft", [1, 3])
def test_greedy_equals_full_compute_generate_left_padded_batch(num_draft, cache_mode):
    model, _ = spec_model()
    ids, mask = left_padded_pair()
    ref = model.generate(ids, 16, attention_mask=mask, stop_tokens=[])
    out, stats = speculative_generate(model, ids, 16, attention_mask=mask, num_draft=num_draft,
                                      stop_tokens=[],
                                      cache_mode=cache_mode)
    assert torch.equal(out, ref)
    assert stats.new_tokens == 2 * 16


@pytest.mark.parametrize("cache_mode", ["shared", "separate"])
def test_zero_draft_budget_accepts_everything(cache_mode):
    """draft == target, so every draft passes; in "separate" mode this also checks that the draft cache
    has no hole after a fully accepted step."""
    model, _ = spec_model(budget=0.0)  # no calibration needed: budget 0 is full compute
    ids, mask = left_padded_pair()
    n, k = 17, 3
    out, stats = speculative_generate(model, ids, n, attention_mask=mask, draft_budget=0.0, num_draft=k,
                                      stop_tokens=[], cache_mode=cache_mode)
    assert torch.equal(out, model.generate(ids, n, attention_mask=mask, stop_tokens=[]))
    assert stats.acceptance_rate == 1.0 and stats.accepted == stats.drafted
    assert stats.verify_forwards == math.ceil((n - 1) / (k + 1))  # each verify gains k + 1 tokens


def test_stats_add_up():
    model, _ = spec_model()
    ids, mask = left_padded_pair()
    k = 3
    _, stats = speculative_generate(model, ids, 15, attention_mask=mask, num_draft=k, stop_tokens=[])
    assert 0 <= stats.accepted <= stats.drafted
    assert stats.drafted <= 2 * k * stats.verify_forwards
    assert stats.draft_forwards <= k * stats.verify_forwards
    # every verify emits accepted + 1 tokens per unfinished row, the prefill one more (last step may cut)
    assert stats.new_tokens <= 2 + stats.accepted + 2 * stats.verify_forwards
    assert stats.draft_flops > 0 and stats.verify_flops > 0 and stats.prefill_flops > 0
    keys = {"accepted", "drafted", "acceptance_rate", "draft_forwards", "verify_forwards"}
    assert set(stats.to_dict()) >= keys
    assert SpecStats().acceptance_rate == 1.0


@pytest.mark.parametrize("cache_mode", ["shared", "separate"])
def test_stop_tokens_end_rows_like_generate(cache_mode):
    model, _ = spec_model()
    ids, mask = left_padded_pair()
    free = model.generate(ids, 12, attention_mask=mask, stop_tokens=[])
    stop = int(free[0, 7 + 4])  # row 0's fifth new token
    ref = model.generate(ids, 12, attention_mask=mask, stop_tokens=[stop], pad_token_id=255)
    out, _ = speculative_generate(model, ids, 12, attention_mask=mask, num_draft=3, stop_tokens=[stop],
                                  pad_token_id=255, cache_mode=cache_mode)
    assert torch.equal(out, ref)
    first = int((out[0, 7:] == stop).nonzero()[0])
    assert (out[0, 7 + first + 1:] == 255).all()


def test_all_rows_stopping_early_shortens_the_output():
    model, _ = spec_model()
    ids = torch.randint(0, 256, (1, 5))
    free = model.generate(ids, 10, stop_tokens=[])
    stop = int(free[0, 5 + 2])
    out, stats = speculative_generate(model, ids, 10, num_draft=4, stop_tokens=[stop])
    assert torch.equal(out, model.generate(ids, 10, stop_tokens=[stop]))
    assert out.shape[1] <= 5 + 3 and int(out[0, -1]) == stop and stats.new_tokens == out.shape[1] - 5


def test_uncalibrated_draft_budget_and_bad_arguments_raise_clear_errors():
    model, _ = spec_model(budget=0.0)
    ids = torch.randint(0, 256, (1, 4))
    with pytest.raises(ValueError, match="calibrate"):
        speculative_generate(model, ids, 4, draft_budget=0.5)
    with pytest.raises(ValueError, match="num_draft"):
        speculative_generate(model, ids, 4, draft_budget=0.0, num_draft=0)
    with pytest.raises(ValueError, match="cache_mode"):
        speculative_generate(model, ids, 4, draft_budget=0.0, cache_mode="both")
    with pytest.raises(ValueError, match="left padding"):
        speculative_generate(model, ids, 4, attention_mask=torch.tensor([[1, 1, 1, 0]]), draft_budget=0.0)
    plain = CausalLM(preset("tiny-qwen3")).eval()
    with pytest.raises(ValueError, match="attach_gateskip"):
        speculative_generate(plain, ids, 4)


def test_greedy_accept_takes_the_longest_agreeing_prefix():
    logits = torch.zeros(3, 4, 5)
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]])  # argmax at each of K+1 = 4 positions
    logits.scatter_(2, target[..., None], 1.0)
    draft = torch.tensor([[1, 2, 3], [1, 0, 3], [1, 1, 1]])
    n, nxt = greedy_accept(logits, draft)
    assert n.tolist() == [3, 1, 0] and nxt.tolist() == [4, 2, 0]


def test_speculative_accept_emits_tokens_distributed_as_the_target():
    g = torch.Generator().manual_seed(0)
    N, V = 200_000, 3
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]]).expand(N, 3, V)  # (N, K+1, V)
    q = torch.tensor([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]]).expand(N, 2, V)  # a poor draft
    d = torch.stack([torch.multinomial(q[:, j], 1, generator=g).squeeze(1) for j in range(2)], 1)  # (N, 2)
    n, nxt = speculative_accept(p, q, d, generator=g)
    first = torch.where(n >= 1, d[:, 0], nxt)
    freq = torch.bincount(first, minlength=V).double() / N
    assert (freq - p[0, 0]).abs().sum() / 2 < 0.01  # total variation
    has_second = n >= 1  # the second token, given the first was accepted (p_1 does not depend on it here)
    second = torch.where(n >= 2, d[:, 1], nxt)[has_second]
    freq2 = torch.bincount(second, minlength=V).double() / len(second)
    assert (freq2 - p[0, 1]).abs().sum() / 2 < 0.01
    expected_accept = torch.minimum(p[0, 0], q[0, 0]).sum()  # P(accept d1) = sum_x min(p, q)
    assert abs(float(has_second.double().mean()) - float(expected_accept)) < 0.01


def test_sampling_is_deterministic_with_a_generator_and_top_k_1_is_greedy():
    model, _ = spec_model()
    ids, mask = left_padded_pair()
    runs = [speculative_generate(model, ids, 12, attention_mask=mask, temperature=0.8, stop_tokens=[],
                                 generator=torch.Generator().manual_seed(s))[0] for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    greedy = model.generate(ids, 12, attention_mask=mask, stop_tokens=[])
    one_hot, _ = speculative_generate(model, ids, 12, attention_mask=mask, temperature=1.0, top_k=1,
                                      stop_tokens=[], generator=torch.Generator().manual_seed(0))
    assert torch.equal(one_hot, greedy)


def test_benchmark_reports_speedups_and_matching_outputs():
    model, _ = spec_model()
    prompts = [torch.randint(0, 256, (5,)), torch.randint(0, 256, (7,))]
    res = benchmark_speculative(model, prompts, max_new_tokens=8, num_draft=2, repeats=1, warmup=0)
    assert res["outputs_match"] and res["new_tokens"] == 16
    assert res["speedup"] > 0 and res["flops_speedup"] > 0 and res["forward_bound_speedup"] > 0
    assert 0.0 <= res["acceptance_rate"] <= 1.0
