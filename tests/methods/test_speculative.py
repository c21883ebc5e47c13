"""Self-speculative GateSkip decoding: greedy output == full-compute generate, stats, the sampling rule."""

import math
from pathlib import Path

import pytest
import torch

from dyndepth import CausalLM, preset
from dyndepth.bench.speculative import benchmark_speculative
from dyndepth.core.accounting import accounting
from dyndepth.methods import GateSkipConfig, attach_gateskip, calibrate, speculative
from dyndepth.methods.speculative import (
    SpecStats,
    filtered_probs,
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
    if num_draft == 1:  # the cache dtype by name too, as `generate` and the CLI's --dtype take it
        named, _ = speculative_generate(model, ids, 20, draft_budget=0.5, num_draft=1, stop_tokens=[],
                                        cache_mode=cache_mode, cache_dtype="float32")
        assert torch.equal(named, ref)


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
def test_padding_columns_past_the_longest_prompt_decode_as_without_them(cache_mode):
    """Every row left-padded to a width beyond its prompt (a batch padded to a fixed width): the prefill read the
    cache through a window of the input's width, not of the longest prompt, and failed with "window length 12 is
    outside 1..11" once the padding outgrew max_new_tokens + num_draft. generate decodes such a batch; so does this."""
    model, _ = spec_model()
    ids, mask = left_padded_pair()
    wide = torch.cat([torch.zeros(2, 5, dtype=torch.long), ids], 1)  # (2, 12): 5 more PAD columns in every row
    wide_mask = torch.cat([torch.zeros(2, 5, dtype=torch.long), mask], 1)
    ref = model.generate(ids, 3, attention_mask=mask, stop_tokens=[])
    out, _ = speculative_generate(model, wide, 3, attention_mask=wide_mask, num_draft=1, stop_tokens=[],
                                  cache_mode=cache_mode)
    assert torch.equal(out[:, 5:], ref)


@pytest.mark.parametrize("cache_mode", ["shared", "separate"])
def test_a_num_draft_past_max_new_tokens_sizes_the_caches_by_the_tokens_it_can_draft(cache_mode, monkeypatch):
    """A step never drafts more than the tokens still to come, but the caches were sized prompt + max_new_tokens +
    num_draft: num_draft=10**6 for 12 new tokens made caches of a million positions (gigabytes on a real model)."""
    from dyndepth import KVCache

    model, _ = spec_model()
    ids, mask = left_padded_pair()
    ref = model.generate(ids, 12, attention_mask=mask, stop_tokens=[])
    made, for_model = [], KVCache.for_model.__func__

    def sized(cls, config, batch_size, max_seq_len, *args, **kwargs):
        made.append(max_seq_len)
        assert max_seq_len <= 7 + 2 * 12, max_seq_len  # (refused before allocating: no gigabytes in a test)
        return for_model(cls, config, batch_size, max_seq_len, *args, **kwargs)

    monkeypatch.setattr(KVCache, "for_model", classmethod(sized))
    out, _ = speculative_generate(model, ids, 12, attention_mask=mask, num_draft=10**6, stop_tokens=[],
                                  cache_mode=cache_mode)
    assert torch.equal(out, ref) and len(made) == (1 if cache_mode == "shared" else 2)


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


def record_steps(monkeypatch) -> list:
    """Spy on greedy_accept: every verification's drafts (B, K) and accepted counts (B,), in order."""
    steps = []

    def spy(logits_BKV, draft_BK):
        n_B, nxt_B = greedy_accept(logits_BKV, draft_BK)
        steps.append((draft_BK.clone(), n_B.clone()))
        return n_B, nxt_B

    monkeypatch.setattr(speculative, "greedy_accept", spy)
    return steps


def replay(steps, ref_new, n, num_draft):
    """Re-derive each step from the drafts and the full-compute greedy continuation `ref_new` (B, >= n + K):
    the draft width K the loop must use, the accepted count (longest prefix of drafts equal to the
    reference), and each row's progress (accepted + 1 tokens, cut at n). Returns accepted, drafted, widths: the
    stats count only drafts at positions the row's output reaches (up to its n-th token)."""
    B = ref_new.shape[0]
    count = [1] * B  # the prefill emits one token per row
    accepted = drafted = 0
    widths = []
    for draft_BK, n_B in steps:
        live = [r for r in range(B) if count[r] < n]
        assert live, "a verification ran after every row had finished"
        k = min(num_draft, max(n - count[r] for r in live) - 1)
        assert draft_BK.shape == (B, k)
        widths.append(k)
        for r in live:
            agree = 0
            while agree < k and draft_BK[r, agree] == ref_new[r, count[r] + agree]:
                agree += 1
            assert int(n_B[r]) == agree, (r, count[r])
            left = n - count[r]
            accepted, drafted = accepted + min(agree, left), drafted + min(k, left)
            count[r] += min(agree + 1, n - count[r])
    assert count == [n] * B, "the loop stopped before every row had n tokens"
    return accepted, drafted, widths


@pytest.mark.parametrize("cache_mode", ["shared", "separate"])
@pytest.mark.parametrize("batch", ["one", "left_padded"])
def test_stats_count_what_the_steps_did(monkeypatch, batch, cache_mode):
    model, _ = spec_model()
    ids, mask = (torch.randint(0, 256, (1, 6)), None) if batch == "one" else left_padded_pair()
    n, k = 15, 3
    steps = record_steps(monkeypatch)
    out, stats = speculative_generate(model, ids, n, attention_mask=mask, num_draft=k, stop_tokens=[],
                                      cache_mode=cache_mode)
    B, T = ids.shape
    ref = model.generate(ids, n + k, attention_mask=mask, stop_tokens=[])  # k more: verifiers may look past n
    assert torch.equal(out, ref[:, :T + n])
    accepted, drafted, widths = replay(steps, ref[:, T:], n, k)
    assert 0 < accepted < drafted  # the skipping draft is right sometimes, not always
    assert (stats.accepted, stats.drafted, stats.verify_forwards) == (accepted, drafted, len(steps))
    assert stats.new_tokens == B * n
    if B == 1:  # the prefill emits one token, every verification accepted + 1
        assert stats.new_tokens == 1 + stats.accepted + stats.verify_forwards
    assert stats.draft_forwards == sum(widths)
    assert stats.verify_tokens == B * sum(w + 1 for w in widths)
    catch_up = 1 if cache_mode == "separate" else 0  # the draft's first forward re-feeds the token at pos - 1
    assert stats.draft_tokens == B * sum(w + catch_up for w in widths if w > 0)
    # the draft skips branches, the verifier runs them all: fewer FLOPs per token fed
    assert stats.draft_flops / stats.draft_tokens < stats.verify_flops / stats.verify_tokens
    assert set(stats.to_dict()) >= {"accepted", "drafted", "acceptance_rate", "draft_forwards", "verify_forwards"}
    assert stats.to_dict()["acceptance_rate"] == accepted / drafted
    assert SpecStats().acceptance_rate == 1.0
    with accounting(True), torch.no_grad():  # the prefill: full compute, plus the draft's own in "separate"
        prefill = float(model(ids, attention_mask=mask, num_logits=1).stats["flops/executed"])
    assert stats.prefill_flops == pytest.approx(prefill * (1 if cache_mode == "shared" else 2), rel=0.05)


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


def test_stats_count_no_draft_past_a_stop_token():
    # a stop inside an accepted block ended the row, yet the drafts after it counted as accepted: 4 tokens out (the
    # prefill's, then 3 accepted drafts, the stop among them) read accepted=6, drafted=6 (acceptance over drafts
    # that were never part of the output)
    model, _ = spec_model()
    ids = torch.randint(0, 256, (1, 6))
    free = model.generate(ids, 8, stop_tokens=[])[0, 6:].tolist()
    j = next(i for i in range(2, 8) if free[i] not in free[:i])  # the first token not seen before it
    out, stats = speculative_generate(model, ids, 8, draft_budget=0.0, num_draft=8, stop_tokens=[free[j]])
    assert out[0, 6:].tolist() == free[:j + 1] and stats.verify_forwards == 1  # the draft is the verifier
    assert stats.accepted == stats.drafted == j  # d1..dj, the stop last


def test_default_stops_are_generates_the_generation_configs_too():
    # generate took generation_config.json's eos ids (as transformers does) and speculative decoding kept
    # config.json's: at temperature 0 the two no longer agreed on a Qwen3-style checkpoint
    model, _ = spec_model()
    ids, mask = left_padded_pair()
    free = model.generate(ids, 12, attention_mask=mask, stop_tokens=[])
    model.generation_config = {"eos_token_id": [int(free[0, 7 + 2])], "pad_token_id": 255}
    ref = model.generate(ids, 12, attention_mask=mask)
    out, _ = speculative_generate(model, ids, 12, attention_mask=mask, num_draft=3)
    assert torch.equal(out, ref) and (ref[0, 7 + 3:] == 255).all()
    with pytest.raises(ValueError, match="temperature must be"):  # generate's argument checks, the same ones
        speculative_generate(model, ids, 4, temperature=-1.0)


def test_all_rows_stopping_early_shortens_the_output():
    model, _ = spec_model()
    ids = torch.randint(0, 256, (1, 5))
    free = model.generate(ids, 10, stop_tokens=[])
    stop = int(free[0, 5 + 2])
    out, stats = speculative_generate(model, ids, 10, num_draft=4, stop_tokens=[stop])
    assert torch.equal(out, model.generate(ids, 10, stop_tokens=[stop]))
    assert out.shape[1] <= 5 + 3 and int(out[0, -1]) == stop and stats.new_tokens == out.shape[1] - 5



def test_in_bfloat16_a_near_tie_can_go_the_other_way_and_the_docs_say_so():
    # the docs promised "exact greedy", output identical to plain greedy decoding, whatever the dtype: in bfloat16 the
    # verifier's block forward rounded a logit one unit off generate's one-token step, and a tie between two tokens
    # went the other way (2 of 20 two-row prompts of 30 tokens on this model)
    model, _ = spec_model()
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(17))
    ref = model.generate(ids, 30, stop_tokens=[])
    out, _ = speculative_generate(model, ids, 30, num_draft=4, stop_tokens=[])
    row, col = (out != ref).nonzero()[0].tolist()
    with torch.no_grad():  # both picks are the top of the full forward, to within a bfloat16 rounding
        logits = model(ref[row:row + 1, :col]).logits[0, -1].float()
    top = logits.max()
    assert top - logits[ref[row, col]] <= 2 ** -7 * top.abs() and top - logits[out[row, col]] <= 2 ** -7 * top.abs()
    assert "bfloat16" in speculative_generate.__doc__
    root = Path(__file__).resolve().parents[2]
    for doc in ("README.md", "docs/methods.md"):
        text = (root / doc).read_text()
        assert "exact greedy" not in text and "identical to plain greedy decoding)" not in text, doc

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
    import dyndepth
    from dyndepth.methods import attach_method

    for name in ("mod", "dnd"):  # the error said to attach GateSkip, which refuses a model carrying a method
        other = CausalLM(preset("tiny-qwen3")).eval()
        attach_method(other, name, {"layers": (1, 1)} if name == "dnd" else None)
        with pytest.raises(ValueError, match=f"the attached {name} method has none"):
            speculative_generate(other, ids, 4)
    for name in ("dreamer-tiny", "huginn-tiny", "mor-tiny"):  # GateSkip cannot attach there: no draft to make
        with pytest.raises(ValueError, match=r"decoder family \(CausalLM\); a \w+LM cannot carry it"):
            speculative_generate(dyndepth.build_model(dyndepth.preset(name)).eval(), ids, 4)


def test_float16_activations_that_overflow_are_an_error_not_a_row_of_token_0():
    model, _ = spec_model()
    with torch.no_grad():  # activations past float16's 65504, as many checkpoints' outliers are
        model.model.layers[0].mlp.down_proj.weight.mul_(3e5)
        model.model.layers[0].mlp.up_proj.weight.mul_(30)
    with pytest.raises(FloatingPointError, match="not finite.*float16 model.*bfloat16 or float32"):
        speculative_generate(model.half(), torch.randint(0, 256, (2, 12)), 4)  # greedy emitted token 0


def test_logits_that_turn_non_finite_while_decoding_are_an_error_not_a_tail_of_token_0():
    """Only the prompt's logits were checked: a NaN in a verify forward (an overflow later in the text) was emitted as
    token 0, silently."""
    model, _ = spec_model()

    def poison(module, args, out):  # the full model's verify forwards (K + 1 positions), not the prompt or drafts
        return out.clone().fill_(float("nan")) if out.shape[1] > 1 else out

    handle = model.lm_head.register_forward_hook(poison)
    try:
        with pytest.raises(FloatingPointError, match=r"the full model's logits of a decode step \(the prompt's were "
                                                     r"finite\) are not finite"):
            speculative_generate(model, torch.randint(0, 256, (2, 12)), 6, num_draft=2)
    finally:
        handle.remove()


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
    bonus = nxt[n == 2]  # both drafts accepted: the extra token comes from p_2 itself (no draft to subtract)
    freq3 = torch.bincount(bonus, minlength=V).double() / len(bonus)
    assert (freq3 - p[0, 2]).abs().sum() / 2 < 0.01


def test_top_p_keeps_the_smallest_set_of_likely_tokens_that_reaches_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    torch.testing.assert_close(filtered_probs(logits, 1.0, top_p=0.8), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(filtered_probs(logits, 1.0, top_k=3), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_emit_remembers_the_token_before_the_next_cur_for_the_separate_draft_cache():
    """After n of K drafts are accepted the next cur sits at pos + n + 1 and the token before it is d_n (cur when
    n = 0): the separate draft cache catches up on that token, not on dK (a rejected draft when n < K)."""
    run = speculative._Run.__new__(speculative._Run)
    run.opt = speculative._Options(max_new_tokens=20, draft_budget=0.5, num_draft=3, cache_mode="separate",
                                   stops=torch.tensor([], dtype=torch.long), sample=None)
    run.count, run.unfinished = torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.bool)
    run.pos, run.prev, run.stats = torch.tensor([5, 7]), torch.tensor([0, 0]), SpecStats()
    block = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])  # [cur, d1, d2, d3] at pos..pos+3
    cur = run.emit(block, torch.tensor([1, 0]), torch.tensor([99, 98]), torch.zeros(2, 20, dtype=torch.long))
    assert cur.tolist() == [99, 98] and run.pos.tolist() == [7, 8]
    assert run.prev.tolist() == [11, 20]  # the tokens at positions 6 and 7
    run.opt.stops = torch.tensor([12])  # a stop token among the rejected drafts (after nxt) ends nothing
    run.emit(block, torch.tensor([0, 0]), torch.tensor([97, 96]), torch.zeros(2, 20, dtype=torch.long))
    assert run.unfinished.tolist() == [True, True] and run.count.tolist() == [4, 3]


def test_a_first_token_that_is_a_stop_token_ends_the_row():
    model, _ = spec_model()
    ids = torch.randint(0, 256, (1, 6))
    first = int(model.generate(ids, 1, stop_tokens=[])[0, -1])
    out, stats = speculative_generate(model, ids, 8, stop_tokens=[first])
    assert out.shape == (1, 7) and int(out[0, -1]) == first
    assert stats.new_tokens == 1 and stats.verify_forwards == 0


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


def test_benchmark_aggregates_the_per_prompt_runs():
    model, _ = spec_model()
    prompts = [torch.randint(0, 256, (5,)), torch.randint(0, 256, (7,))]
    n, k = 8, 2
    res = benchmark_speculative(model, prompts, max_new_tokens=n, num_draft=k, repeats=1, warmup=0)
    assert res["outputs_match"] and res["new_tokens"] == 2 * n and res["prompts"] == 2
    runs = [speculative_generate(model, p[None], n, num_draft=k, stop_tokens=[])[1] for p in prompts]
    for key in ("accepted", "drafted", "draft_forwards", "verify_forwards", "draft_tokens", "verify_tokens",
                "draft_flops", "verify_flops", "prefill_flops"):  # the totals of every count (FLOPs read 0)
        assert res[key] == pytest.approx(sum(getattr(st, key) for st in runs)) and res[key] > 0, key
    # plain decoding's FLOPs are what generate's forwards executed: its cached prefill (a T x T masked attention),
    # then one token per step; speculation's verified prefill is the same forward
    assert res["flops_speedup"] == pytest.approx(
        sum(_generate_flops(model, p[None], n) for p in prompts) / (res["prefill_flops"] + res["draft_flops"]
                                                                  + res["verify_flops"]))
    assert 0 < res["accepted"] < res["drafted"] and res["acceptance_rate"] == res["accepted"] / res["drafted"]
    # B = 1 and no stop tokens: each verification emits accepted + 1 tokens
    assert res["tokens_per_verify"] == pytest.approx(1 + res["accepted"] / res["verify_forwards"])
    assert res["speedup"] == pytest.approx(res["generate_s"] / res["speculative_s"])
    # every emitted token after the first is verified at full compute (rejected drafts too), and drafting
    # costs extra: speculation never saves FLOPs
    assert res["flops_speedup"] < 1
    ratios = [(st.draft_flops / st.draft_tokens) / (st.verify_flops / st.verify_tokens) for st in runs]
    assert all(0 < f < 1 for f in ratios)  # a drafted token costs less than a verified one
    cost = sum(st.verify_forwards + st.draft_forwards * f for st, f in zip(runs, ratios))
    assert res["forward_bound_speedup"] == pytest.approx(2 * (n - 1) / cost)



def test_benchmark_refuses_fewer_than_two_new_tokens_before_timing():
    # max_new_tokens=1 ran both decoders (the prefill emits the one token, nothing is verified), then divided
    # by the verifications' 0 FLOPs: ZeroDivisionError('float division by zero') instead of a result or an error
    model, _ = spec_model()
    with pytest.raises(ValueError, match="max_new_tokens must be >= 2"):
        benchmark_speculative(model, [torch.randint(0, 256, (5,))], max_new_tokens=1, repeats=1, warmup=0)

@pytest.mark.parametrize("prompts, message", [([], "at least one prompt"), ([torch.zeros(2, 5, dtype=torch.long)],
                                                "prompt 0 has shape \\(2, 5\\)"),
                                               ([torch.zeros(0, dtype=torch.long)], "prompt 0 has shape \\(0,\\)")])
def test_benchmark_refuses_prompts_that_are_not_one_sequence_each(prompts, message):
    # no prompt divided 0 by 0 (ZeroDivisionError), and a (2, 5) batch was timed as one 10-token prompt
    model, _ = spec_model()
    with pytest.raises(ValueError, match=message):
        benchmark_speculative(model, prompts, max_new_tokens=4, repeats=1, warmup=0)


def _generate_flops(model, ids, n):
    """FLOPs of plain greedy decoding, from a hand-run cached loop: prefill, then n - 1 one-token steps."""
    from dyndepth import KVCache

    with model.method.decoding(budget=0.0), torch.no_grad():
        cache = KVCache.for_model(model.config, 1, ids.shape[1] + n, num_slots=model.num_slots())
        out = model(ids, positions=torch.arange(ids.shape[1])[None], cache=cache.window(ids.shape[1]), num_logits=1)
        total, seq = out.compute.total("executed"), ids
        for i in range(n - 1):
            seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], 1)
            pos = torch.tensor([[seq.shape[1] - 1]])
            out = model(seq[:, -1:], positions=pos, cache=cache.window(seq.shape[1]))
            total += out.compute.total("executed")
    return total

