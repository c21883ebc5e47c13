"""GateSkip: neutrality, exact budgets in every precision, physical skipping == an independent masked dense
reference, per-layer thresholds (shared gates too), cached decoding, both execution paths, save / load."""

import math

import pytest
import torch
from gated import gated_model, masked_dense_reference

import dyndepth
from dyndepth import CausalLM, KVCache, preset
from dyndepth.core.accounting import accounting
from dyndepth.methods import GateSkipConfig, GateSkipHook, attach_gateskip, calibrate
from dyndepth.methods.common import budget_ppm
from opcount import OpCounter


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_open_gates_and_zero_budget_give_the_base_model(name):
    torch.manual_seed(0)
    model = CausalLM(preset(name)).eval()
    with torch.no_grad():  # norms that differ: each branch must read its own (fresh ones are all ones)
        for key, param in model.named_parameters():
            if key.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    ids = torch.randint(0, 256, (2, 9))
    ref = model(ids).logits
    attach_gateskip(model, GateSkipConfig(budget=0.0))
    with torch.no_grad():
        for layer in model.model.layers:
            for gate in (layer.gateskip.attn_gate, layer.gateskip.mlp_gate):
                gate.proj.weight.zero_()
                gate.proj.bias.fill_(100.0)  # sigmoid(100) == 1.0 in fp32
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "autocast"])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_fresh_gates_skip_exactly_the_budget_in_every_precision(precision, scope):
    # Fresh gates (bias 5, std 0.01) give ~0.993 to every token: in bf16 every importance used to tie and a
    # "s <= quantile" rule skipped all tokens. Now exactly floor(q * n) per pool skip, in every precision.
    model, method = gated_model(spread=False, scope=scope)
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, 256, (4, 40))
    for q in (0.2, 0.35):
        with method.override(budget=q), torch.no_grad(), torch.autocast("cpu", torch.bfloat16,
                                                                          enabled=precision == "autocast"):
            stats = model(ids).stats
        per_pool = 160 if scope == "batch" else 40
        expected = math.floor(q * per_pool) / per_pool
        for branch in ("attn", "mlp"):
            assert float(stats[f"gateskip/{branch}_skipped"]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("precision", ["bfloat16", "autocast"])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_fresh_gates_in_16_bits_skip_the_budget_in_every_layer_and_branch_of_a_padded_batch(precision, scope):
    # the forward's statistics average over layers: here each (layer, branch) of a left-padded batch with an EOS skips
    # exactly floor(q * n) of its pool (each row's for scope "sequence"), PAD never runs and EOS always does
    model, method = gated_model(spread=False, scope=scope, eos=3, layers=3)
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    ids = torch.randint(4, 256, (3, 21))
    ids[0, 5] = 3
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :11] = 0
    trace = dyndepth.Trace()
    with method.override(budget=0.25), torch.no_grad(), torch.autocast("cpu", torch.bfloat16,
                                                                         enabled=precision == "autocast"):
        model(ids, attention_mask=mask, trace=trace)
    st = trace.ctx.state
    pools = [st.pool.flatten()] if scope == "batch" else list(st.pool)  # 47 tokens, or rows of 20, 17 and 10
    assert len(st.keep) == 6
    for key, keep in st.keep.items():
        assert st.scores[key].dtype == torch.float32
        assert keep[0, 5] and not (keep & ~mask.bool()).any(), key
        keeps = [keep.flatten()] if scope == "batch" else list(keep)
        assert [int((p & ~k).sum()) for p, k in zip(pools, keeps)] == \
            [math.floor(0.25 * int(p.sum())) for p in pools], key


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe", "tiny-qwen2", "tiny-llama"])
@pytest.mark.parametrize("q", [0.0, 0.3, 0.6])
@pytest.mark.parametrize("path", ["packed", "dense"])
def test_physical_skipping_equals_the_masked_dense_reference(name, q, path):
    model, method = gated_model(name, budget=q, path=path, eos=7)
    ids = torch.randint(8, 256, (3, 12))
    ids[0, 5] = 7  # an EOS: always runs, never ranked
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    trace = dyndepth.Trace()
    with torch.no_grad():
        got = model(ids, attention_mask=mask, trace=trace).logits
        ref, keeps, _ = masked_dense_reference(model, ids, mask, eos=(7,))
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=0)
    for key, keep in trace.ctx.state.keep.items():
        if keep is not None:
            assert torch.equal(keep & valid, keeps[key] & valid), key
    assert (q == 0) == all(keep is None for keep in trace.ctx.state.keep.values())


def test_long_subsets_use_chunked_attention_and_stay_exact():
    model, _ = gated_model(budget=0.3, max_positions=2048)
    ids = torch.randint(0, 256, (2, 1100))  # > 2 * 256 kept queries per row: several chunks
    mask = torch.ones_like(ids)
    mask[1, :50] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        ref, _, _ = masked_dense_reference(model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-4, rtol=0)


def test_pad_and_eos_are_never_skipped_and_not_counted():
    model, method = gated_model(eos=5, budget=0.5)
    ids = torch.randint(6, 256, (2, 10))
    ids[0, 4] = 5
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    trace = dyndepth.Trace()
    with torch.no_grad():
        stats = model(ids, attention_mask=mask, trace=trace).stats
    st = trace.ctx.state
    assert not st.pool[0, 4] and not st.pool[1, :2].any() and st.pool.sum() == 17
    for keep in st.keep.values():
        assert keep[0, 4] and not keep[1, :2].any()  # EOS runs every branch; PAD runs none
        assert (~keep & st.pool).sum() == 8  # floor(0.5 * 17) of the pool skip
    assert float(stats["gateskip/attn_skipped"]) == pytest.approx(8 / 17)


def test_an_eos_named_by_generation_config_alone_is_never_skipped(tmp_path):
    """A model trained from scratch names its tokenizer's EOS in generation_config.json only (config.json's is null):
    GateSkip read config.json alone, so it ranked and skipped the EOS between packed documents, while attached to the
    run's model and after from_pretrained (which attaches the method before reading generation_config.json)."""
    model, _ = gated_model(budget=0.5)
    model.generation_config = {"eos_token_id": 5, "pad_token_id": 6}
    model.save_pretrained(tmp_path)
    ids = torch.randint(7, 256, (2, 10))
    ids[:, 4] = 5
    for m in (model, dyndepth.from_pretrained(tmp_path)):
        assert m.config.eos_token_id is None
        trace = dyndepth.Trace()
        with torch.no_grad():
            m(ids, trace=trace)
        assert not trace.ctx.state.pool[:, 4].any()
        for keep in trace.ctx.state.keep.values():
            assert keep[:, 4].all()  # the EOS runs every branch


def test_sequence_scope_outputs_do_not_depend_on_the_batch():
    model, _ = gated_model(budget=0.4, scope="sequence")
    row = torch.randint(0, 256, (1, 16))
    others = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        alone = model(row).logits
        batched = model(torch.cat([row, others])).logits[:1]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shared", [False, True])
def test_calibrated_thresholds_reproduce_each_layers_own_budget_decisions(shared):
    # Thresholds live per (layer, branch) whatever the gate sharing: calibrated on a batch, threshold mode
    # on that batch makes exactly the quantile rule's decisions in every layer (distinct scores).
    model, method = gated_model(budget=0.0, shared=shared)
    ids = torch.randint(0, 256, (4, 24))
    table = calibrate(model, [ids], budget=0.3)
    assert set(table) == {(s, b) for s in range(2) for b in ("attn", "mlp")}
    taus = torch.stack([g.tau for g in method.layer_gates])  # (L, 2)
    assert not torch.allclose(taus[0], taus[1])  # layers differ (the old shared path copied layer 0's)
    quantile, threshold = dyndepth.Trace(), dyndepth.Trace()
    with torch.no_grad():
        with method.override(budget=0.3):
            model(ids, trace=quantile)
        with method.decoding(budget=0.3):
            model(ids, trace=threshold)
    for key, keep in quantile.ctx.state.keep.items():
        assert torch.equal(threshold.ctx.state.keep[key], keep), key
        assert int((~keep).sum()) == math.floor(0.3 * 96)


def test_calibrated_decoding_equals_the_full_forward_with_the_same_decisions():
    model, method = gated_model(budget=0.0)
    calibrate(model, [torch.randint(0, 256, (4, 24)) for _ in range(3)], budget=0.3)
    ids = torch.randint(0, 256, (2, 14))
    P = 6
    with method.decoding(budget=0.3), torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model.config, 2, 16)
        pos = torch.arange(14).expand(2, 14)
        steps = [model(ids[:, :P], positions=pos[:, :P], cache=cache).logits]
        for t in range(P, 14):
            steps.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, atol=1e-5, rtol=0)


def test_generate_with_skip_budget_needs_calibration_then_matches_uncached():
    model, method = gated_model(budget=0.0)
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="calibrate"):
        model.generate(ids, 4, stop_tokens=[], skip_budget=0.3)
    calibrate(model, [torch.randint(0, 256, (4, 24))], budget=0.3)
    out = model.generate(ids, 6, stop_tokens=[], skip_budget=0.3)
    with method.decoding(budget=0.3), torch.no_grad():
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("B", [1, 2, 7, 10])
def test_decode_paths_agree_and_the_cost_rule_picks_each_calls_path(B, monkeypatch):
    # no share condition: the count alone decides (test_the_cost_rule_packs_a_prefill_... checks the share)
    model, method = gated_model(budget=0.0, pack_min_skipped=4, pack_min_fraction=0.0)
    calibrate(model, [torch.randint(0, 256, (4, 24))], budget=0.5)
    ids = torch.randint(0, 256, (B, 6))
    calls = []
    run_path = method._run_path

    def spy(keep, st, branch):  # each branch call's kept count and the path the method ran
        path = run_path(keep, st, branch)
        calls.append((int(keep.sum()), keep.numel(), path))
        return path

    monkeypatch.setattr(method, "_run_path", spy)

    def decode_step(budget: float, path: str):  # -> the step's output and the host syncs it made
        with method.decoding(budget=budget, path=path), torch.no_grad():
            cache = KVCache.for_model(model.config, B, 7)
            pos = torch.arange(7).expand(B, 7)
            model(ids, positions=pos[:, :6], cache=cache)
            calls.clear()
            with OpCounter("_local_scalar_dense") as syncs:
                return model(ids[:, -1:], positions=pos[:, 6:], cache=cache), syncs.n

    outs = {path: decode_step(0.5, path)[0] for path in ("packed", "dense", "auto")}
    torch.testing.assert_close(outs["packed"].logits, outs["dense"].logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["auto"].logits, outs["dense"].logits, atol=1e-5, rtol=0)

    def rule(n_keep, n):  # the documented cost rule: pack when >= 4 tokens of the call skip; a call whose expected
        if 0.5 * n < 4 and 0.5 ** n < 0.01:  # skips cannot pack and that rarely skips whole: dense, uncounted
            return "dense"
        if n_keep in (0, n):
            return "none" if n_keep == 0 else "all"
        return "packed" if n - n_keep >= 4 else "dense"

    assert [path for *_, path in calls] == [rule(n_keep, n) for n_keep, n, _ in calls]
    ran = [path for *_, path in calls if path in ("packed", "dense")]  # the calls that were not run or skipped whole
    if not ran:
        assert "gateskip/packed" not in outs["auto"].stats
    else:
        assert float(outs["auto"].stats["gateskip/packed"]) == pytest.approx(ran.count("packed") / len(ran))
    if B <= 2:  # a whole skip is likely (q^n >= 1%): each call reads its count and some skip outright
        assert "none" in [path for *_, path in calls] and (B == 2 or not ran)
    if B == 1:  # forcing the dense path forces it on partially kept calls only: a branch no token keeps is skipped
        assert float(outs["dense"].stats["flops/executed"]) == float(outs["auto"].stats["flops/executed"])
    if B == 7:  # 3.5 expected skips and a 1-in-128 chance of a whole skip per call: every call masked without
        monkeypatch.undo()  # reading its count, so the step makes the budget-0 step's host syncs and no more
        assert set(ran) == {"dense"} and len(ran) == len(calls)
        syncs = {q: decode_step(q, "auto")[1] for q in (0.0, 0.5)}
        assert syncs[0.5] == syncs[0.0], syncs
    if B == 10:  # this seed's decode step has both kinds of partially kept call
        assert {"packed", "dense"} <= set(ran)
    # ideal FLOPs do not depend on the path; executed ones do (dense runs every token's q/o and MLP)
    assert float(outs["packed"].stats["flops/ideal"]) == pytest.approx(float(outs["dense"].stats["flops/ideal"]))
    assert float(outs["dense"].stats["flops/executed"]) > float(outs["packed"].stats["flops/executed"]) or B == 1


def test_training_penalty_gradients_and_budget_ramp():
    model, method = gated_model()
    model.train()
    hook = GateSkipHook(method, total_steps=11)  # the first step at 0, the 11th at 0.2
    ids, trace = torch.randint(0, 256, (2, 8)), dyndepth.Trace(keep_streams=True)
    out = model(ids, trace=trace)
    with torch.no_grad():  # lambda * mean over branches of mean(g^2), each gate recomputed from its branch's input
        squares, ctx = [], model.make_context(ids, None, None, None)
        for i, layer in enumerate(model.model.layers):
            attn_gate, mlp_gate = layer.gateskip.attn_gate.proj, layer.gateskip.mlp_gate.proj
            h = layer.input_layernorm(trace.streams[i])
            g = torch.sigmoid(attn_gate(h))
            x = trace.streams[i] + g * layer.self_attn(h, ctx, i)  # budget 0 at the ramp's first step: nothing skips
            squares += [g.square().mean(), torch.sigmoid(mlp_gate(layer.post_attention_layernorm(x))).square().mean()]
    torch.testing.assert_close(out.aux_loss, method.config.penalty * torch.stack(squares).mean())
    assert out.aux_loss > 0
    out.aux_loss.backward()
    gate = model.model.layers[0].gateskip.attn_gate.proj.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None  # detached gate input
    assert hook.after_step(model, 5, {}, None) == {"budget": 0.0}  # what step 5 trained at (set by hand: none ran)
    assert method.budget == pytest.approx(0.1) and method.config.budget == 0.0  # step 6's; the config is not touched
    assert hook.state_dict() == {"budget": pytest.approx(0.1), "step": 5, "span": 10}


def test_training_forwards_skip_the_ramps_budget_and_the_gates_of_kept_tokens_learn():
    # the hook's budget reaches the training forwards: each (layer, branch) skips floor(q * n) of the batch, q on the
    # ramp 0, .05, ..., .2, and the gates get gradient while tokens skip (hard mask: through g * f(h) of kept tokens)
    model, method = gated_model(spread=False)
    model.train()
    hook = GateSkipHook(method, total_steps=5)
    for step in range(1, 6):
        trace = dyndepth.Trace()
        out = model(torch.randint(0, 256, (2, 20)), trace=trace)
        skipped = {key: int((~keep).sum()) for key, keep in trace.ctx.state.keep.items()} if method.budget else {}
        assert set(skipped.values()) <= {math.floor(method.budget * 40 + 1e-9)}
        assert len(skipped) == (4 if step > 1 else 0)
        (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
        for layer in model.model.layers:
            for gate in (layer.gateskip.attn_gate, layer.gateskip.mlp_gate):
                assert gate.proj.weight.grad.abs().sum() > 0 and torch.isfinite(gate.proj.weight.grad).all()
        model.zero_grad()
        assert hook.after_step(model, step, {}, None)["budget"] == pytest.approx(0.05 * (step - 1))


def test_the_ramp_resumes_on_its_line_and_never_goes_back_when_a_run_is_extended():
    # a 3-step run resumed to 7 steps logged 0, .1, .2, .2, .133, ...: the restored budget, then the new run's line
    model, method = gated_model()

    def run(total: int, steps, state=None):
        hook = GateSkipHook(method, total)
        if state is not None:
            hook.load_state_dict(state)
        return [hook.after_step(model, s, {}, None)["budget"] for s in steps], hook.state_dict()

    whole, _ = run(7, range(1, 8))
    first, state = run(7, range(1, 4))
    assert first + run(7, range(4, 8), state)[0] == whole  # an unchanged run resumes exactly
    first, state = run(3, range(1, 4))
    extended = first + run(7, range(4, 8), state)[0]
    assert extended == pytest.approx([0.0, 0.1, 0.2, 0.2, 0.2, 0.2, 0.2])
    first, state = run(3, range(1, 4))  # a state saved before the step and span were: continues from its budget
    assert first + run(7, range(4, 8), {"budget": state["budget"]})[0] == pytest.approx(extended)
    first, state = run(5, range(1, 4))  # stopped mid-ramp (step 4 was to train at .15), extended to 9 steps: step 4
    # trains at .15, then the line from there to .2 at step 9 (not the new run's line from step 1, which restarted it)
    assert first + run(9, range(4, 10), state)[0] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.16, 0.17, 0.18, 0.19, 0.2])


def test_knobs_of_the_wrong_type_and_a_budget_given_twice_are_clear_errors():
    model, method = gated_model(budget=0.0)
    calibrate(model, [torch.randint(0, 256, (4, 24))], budget=0.3)
    ids = torch.randint(0, 256, (1, 5))
    with pytest.raises(ValueError, match=r"gateskip knob budget='abc' must be a number"):
        model.generate(ids, 2, method_knobs={"budget": "abc"})
    with pytest.raises(ValueError, match=r"gateskip knob mode=1 must be a word"):
        model.generate(ids, 2, method_knobs={"mode": 1})
    with pytest.raises(ValueError, match="the budget is given twice"):
        model.generate(ids, 2, skip_budget=0.3, method_knobs={"budget": 0.5})
    # a mode next to the budget used to raise "got multiple values for keyword argument 'mode'"
    assert torch.equal(model.generate(ids, 3, skip_budget=0.3, method_knobs={"mode": "threshold"}),
                       model.generate(ids, 3, skip_budget=0.3))


def test_calibrating_a_threshold_mode_model_and_quantile_decoding_without_counts():
    # calibrate entered the budget's override before its recording mode, so a model configured in threshold mode
    # asked to be calibrated first; quantile mode read every small call's count though floor(q n) < n never skips
    # a whole branch
    model, method = gated_model(budget=0.0, mode="threshold")
    calibrate(model, [torch.randint(0, 256, (4, 24))], budget=0.3)
    assert method.mode == "threshold"
    ids = torch.randint(0, 256, (2, 5))
    with method.override(budget=0.3, mode="quantile"), torch.no_grad():
        cache = KVCache.for_model(model.config, 2, 6)
        model(ids, positions=torch.arange(5).expand(2, 5), cache=cache)
        with OpCounter("_local_scalar_dense") as syncs:
            model(ids[:, -1:], positions=torch.full((2, 1), 5), cache=cache)
    with method.override(budget=0.0), torch.no_grad():
        cache = KVCache.for_model(model.config, 2, 6)
        model(ids, positions=torch.arange(5).expand(2, 5), cache=cache)
        with OpCounter("_local_scalar_dense") as base:
            model(ids[:, -1:], positions=torch.full((2, 1), 5), cache=cache)
    assert syncs.n == base.n
    with pytest.raises(ValueError, match="no runtime knob 'name'"):  # a non-knob attribute: the name error
        method.override(name=1).__enter__()


def test_gated_model_saves_and_loads(tmp_path):
    model, method = gated_model(budget=0.25, gate="lowrank", rank=4)
    calibrate(model, [torch.randint(0, 256, (2, 16))], budget=0.25)
    model.save_pretrained(tmp_path)
    loaded = dyndepth.from_pretrained(tmp_path).eval()
    assert loaded.method.config.gate == "lowrank" and int(loaded.method.layer_gates[1].tau_budget_ppm) == 250_000
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert torch.equal(loaded.model.layers[1].gateskip.tau, model.model.layers[1].gateskip.tau)
    with loaded.method.decoding(budget=0.25):  # the calibration travels with the weights
        pass


def test_scalar_shared_gates_are_one_module_every_layer_uses():
    model, method = gated_model(gate="scalar", shared=True, budget=0.3)
    shared = model.model.gateskip
    assert shared.attn_gate.proj.weight.shape == (1, 64)
    assert all(not hasattr(layer.gateskip, "attn_gate") for layer in model.model.layers)
    names = [n for n, _ in model.named_parameters() if "gateskip" in n]
    assert sorted(names) == ["model.gateskip.attn_gate.proj.bias", "model.gateskip.attn_gate.proj.weight",
                             "model.gateskip.mlp_gate.proj.bias", "model.gateskip.mlp_gate.proj.weight"]
    model.train()
    model(torch.randint(0, 256, (2, 10))).aux_loss.backward()
    assert shared.attn_gate.proj.weight.grad.abs().sum() > 0
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():  # closing the shared gate closes every layer's branch
        before = model(ids).logits
        shared.attn_gate.proj.bias.fill_(-100.0)
        shared.mlp_gate.proj.bias.fill_(-100.0)
        closed = model(ids).logits
    assert not torch.allclose(before, closed)
    embed_only = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
    torch.testing.assert_close(closed, embed_only, atol=1e-5, rtol=0)


def test_lowrank_gate_starts_open_and_learns_from_the_first_step():
    model, method = gated_model(gate="lowrank", rank=4, spread=False)
    model.train()
    g = model.model.layers[0].gateskip.attn_gate
    ids = torch.randint(0, 256, (2, 10))
    h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    assert (g(h) > 0.99).all()  # open: the fine-tune starts from the base model
    model(ids).aux_loss.backward()
    # `down` starts at unit output scale, so proj's first gradient is ~0.2 of the bias's (mean |grad|);
    # with both factors at std 0.01 (the old init) it was ~0.015
    assert g.proj.weight.grad.abs().mean() > 0.06 * g.proj.bias.grad.abs().mean()
    assert g.down.weight.grad is not None and g.down.weight.grad.abs().sum() > 0  # both factors learn


def test_single_branch_ablations_double_the_budget_and_layer_skipping_ties_branches():
    ids = torch.randint(0, 256, (2, 20))
    model, method = gated_model(budget=0.2, skip_branches="mlp")
    stats = model(ids).stats
    assert float(stats["gateskip/attn_skipped"]) == 0 and float(stats["gateskip/mlp_skipped"]) == pytest.approx(0.4)
    model, method = gated_model(budget=0.2, skip_unit="layer")
    trace = dyndepth.Trace()
    with torch.no_grad():
        model(ids, trace=trace)
    keep = trace.ctx.state.keep
    for slot in range(2):
        assert torch.equal(keep[(slot, "mlp")], keep[(slot, "attn")])
        assert int((~keep[(slot, "attn")]).sum()) == 8
    with pytest.raises(ValueError, match="skip_branches"):
        GateSkipConfig(skip_unit="layer", skip_branches="mlp")


def test_a_branch_every_token_skips_still_writes_kv():
    model, method = gated_model(budget=0.0)
    calibrate(model, [torch.randint(0, 256, (2, 16))], budget=0.3)
    for gates in method.layer_gates:
        gates.tau.fill_(2.0)  # importance <= 1 < 2: everything skips
    ids = torch.randint(0, 256, (1, 6))
    cache = KVCache.for_model(model.config, 1, 8)
    with method.decoding(budget=0.3), torch.no_grad():
        out = model(ids, positions=torch.arange(6)[None], cache=cache)
    assert cache.valid[:, 0, :6].all()  # every slot has K/V for every token
    torch.testing.assert_close(out.logits, model.lm_head(model.model.norm(model.model.embed_tokens(ids))))


def test_copy_prev_kv_policy_reuses_the_layer_below_and_stays_cache_consistent():
    model, method = gated_model(budget=0.0, kv_policy="copy_prev")
    calibrate(model, [torch.randint(0, 256, (4, 24))], budget=0.4)
    ids = torch.randint(0, 256, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    with method.decoding(budget=0.4), torch.no_grad():
        cache = KVCache.for_model(model.config, 2, 12)
        trace = dyndepth.Trace()
        full = model(ids, positions=pos, cache=cache, trace=trace)
        skipped = ~trace.ctx.state.keep[(1, "attn")]
        assert skipped.any()
        k0, k1 = (cache.k[s, :, :, :12].transpose(1, 2) for s in (0, 1))  # (B, S, G, H)
        torch.testing.assert_close(k1[skipped], k0[skipped])  # skipped tokens carry layer 0's keys
        assert not torch.allclose(k1[~skipped], k0[~skipped])
        step_cache = KVCache.for_model(model.config, 2, 12)
        steps = [model(ids[:, :5], positions=pos[:, :5], cache=step_cache).logits]
        for t in range(5, 12):
            steps.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=step_cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, atol=1e-5, rtol=0)


def test_copy_prev_under_activation_checkpointing_gives_the_gradients_of_the_plain_forward():
    """The recomputation runs the layers last to first; with one "previous K/V" layer 0's recomputation copied the
    last layer's, and torch.utils.checkpoint refused the backward (different metadata)."""
    import copy

    from dyndepth.train.parallel import apply_activation_checkpointing

    model, _ = gated_model(budget=0.3, kv_policy="copy_prev", layers=3)
    model.train()
    checkpointed = copy.deepcopy(model)
    checkpointed.method.bind(checkpointed)
    apply_activation_checkpointing(checkpointed)
    ids = torch.randint(0, 256, (2, 16))
    grads = []
    for m in (model, checkpointed):
        out = m(ids)
        (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("k_proj" in n for n in grads[0])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_copy_prev_trains_the_layer_below_through_the_copied_kv():
    # layer 0's attention adds nothing (its gate is shut: sigmoid(-200) == 0), so its K/V projections reach the loss
    # only through the K/V that layer 1's skipped tokens copy: a copy cut from the graph left them no gradient
    model, _ = gated_model(budget=0.3, kv_policy="copy_prev")
    model.train()
    with torch.no_grad():
        model.model.layers[0].gateskip.attn_gate.proj.weight.zero_()
        model.model.layers[0].gateskip.attn_gate.proj.bias.fill_(-200.0)
    trace = dyndepth.Trace()
    model(torch.randint(0, 256, (2, 16)), trace=trace).logits.logsumexp(-1).mean().backward()
    assert (~trace.ctx.state.keep[(1, "attn")]).any()
    attn0 = model.model.layers[0].self_attn
    assert attn0.q_proj.weight.grad is None or attn0.q_proj.weight.grad.abs().sum() == 0  # (its queries: unused)
    for proj in (attn0.k_proj, attn0.v_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 1e-6


def test_knobs_and_options_are_checked():
    model, method = gated_model()
    with pytest.raises(ValueError, match="no runtime knob 'budgets'"):
        with method.override(budgets=0.3):
            pass
    with pytest.raises(ValueError, match="must lie in"):
        with method.override(budget=1.5):
            pass
    with pytest.raises(ValueError, match="no field 'penalti'"):
        attach_gateskip(CausalLM(preset("tiny-qwen3")), {"penalti": 1.0})
    with pytest.raises(ValueError, match="already carries method 'gateskip'"):
        attach_gateskip(model)


def test_budgets_at_the_edge_are_refused_and_budget_zero_has_nothing_to_calibrate():
    """A knob budget of 1 (every pool token would skip), 0.5 when one branch type skips (at 2q = 1) and a calibration
    at budget 0 (no threshold to fit: it stored -inf thresholds) are errors, not silent runs."""
    model, method = gated_model()
    with pytest.raises(ValueError, match=r"budget=1.0 must lie in \[0, 1\)"), method.override(budget=1.0):
        pass
    _, attn_only = gated_model(skip_branches="attn")
    with pytest.raises(ValueError, match="every token would skip it"), attn_only.override(budget=0.5):
        pass
    with pytest.raises(ValueError, match="no calibration scores were recorded"):
        calibrate(model, [torch.randint(0, 256, (2, 12))], budget=0.0)


def test_the_cost_rule_packs_a_prefill_only_when_enough_of_it_skips():
    model, method = gated_model(budget=0.0, pack_min_skipped=4, pack_min_fraction=0.2)
    ids = torch.randint(0, 256, (2, 40))
    packed = {}
    for q in (0.1, 0.3):
        with method.override(budget=q), torch.no_grad():
            packed[q] = float(model(ids).stats["gateskip/packed"])
    assert packed[0.1] == 0.0  # 8 of 80 tokens skip: >= 4, but under 20% of the call: dense with a mask
    assert packed[0.3] == 1.0  # 24 of 80: packed



def test_a_padded_prefill_counts_its_padding_as_skipped_when_choosing_to_pack():
    # half of each row is left padding: at q = 0.15 the call skips 128 PAD + 19 pool tokens of 256, which packs.
    # The uncounted shortcut's first version estimated q * n = 38 skips and ran it densely (+57% executed FLOPs)
    model, method = gated_model(budget=0.0)
    ids = torch.randint(3, 256, (4, 64))
    mask = torch.ones_like(ids)
    mask[:, :32] = 0
    with method.override(budget=0.15), torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert float(out.stats["gateskip/packed"]) == 1.0
    assert float(out.stats["gateskip/attn_skipped"]) == pytest.approx(19 / 128)


def test_a_masked_decode_step_adds_few_ops_to_the_dense_one():
    # A batched decode step is launch-bound: the masked dense path (a branch some rows skip) must cost little
    # more than running every branch. Per routed branch call: the threshold, the mask and the ideal FLOPs of the kept
    # tokens, no kept count (an 8-row step at 0.5 can neither pack nor likely skip whole): 6.5 ops per call (9 before
    # 2026-12-04 and 13 before 2026-12-03; the rest spare for torch versions), and 8 per forward for the skip
    # statistics (no host sync). As `generate` decodes, without a ledger: the threshold and the mask alone (3 ops a
    # call, 7.5 before 2026-12-05: generate counted FLOPs nobody read) and no statistics.
    model, method = gated_model(budget=0.0, layers=4)
    B, P = 8, 6
    ids = torch.randint(0, 256, (B, P + 1))
    counts, logits = {}, {}
    for gates in method.layer_gates:  # hand-set thresholds, declared as budget 0.5's (threshold mode checks it)
        gates.tau.fill_(0.5)  # spread gates: some rows keep each branch, some skip it
        gates.tau_budget_ppm.fill_(budget_ppm(0.5))
    for counted in (True, False):
        for q in (0.0, 0.5):
            with method.override(budget=q, mode="threshold"), torch.no_grad(), accounting(counted):
                cache = KVCache.for_model(model.config, B, P + 1)  # (auto: 8 rows at 0.5 run masked)
                pos = torch.arange(P + 1).expand(B, P + 1)
                model(ids[:, :P], positions=pos[:, :P], cache=cache)
                with OpCounter() as ops:
                    out = model(ids[:, P:], positions=pos[:, P:], cache=cache)
            counts[counted, q], logits[counted, q] = ops.n, out.logits
            if counted and q:
                assert 0 < float(out.stats["gateskip/attn_skipped"]) < 1 and out.stats["gateskip/packed"] == 0
    calls = 2 * len(model.model.layers)
    assert counts[True, 0.5] - counts[True, 0.0] <= 7 * calls + 8, counts
    assert counts[False, 0.5] - counts[False, 0.0] <= 3 * calls, counts
    assert "gateskip/attn_skipped" not in out.stats
    assert torch.equal(logits[True, 0.5], logits[False, 0.5]) and not torch.equal(logits[True, 0.5], logits[True, 0.0])


def test_threshold_mode_refuses_a_budget_its_thresholds_were_not_calibrated_for():
    """`override(budget=0.5, mode="threshold")` after calibrating at 0.3 skipped 30% while reporting 0.5 (an
    lm-eval run with skip_budget=0.5,mode=threshold did); now it is the same error `decoding` gives."""
    model, method = gated_model(budget=0.0, layers=2)
    ids = torch.randint(0, 256, (4, 16))
    with pytest.raises(ValueError, match=r"needs GateSkip's thresholds calibrated for it, and they are not calibrated"):
        method.override(budget=0.3, mode="threshold").__enter__()
    calibrate(model, [ids], budget=0.3)
    with method.override(budget=0.3, mode="threshold"), torch.no_grad():
        assert float(model(ids).stats["gateskip/attn_skipped"]) > 0
    with pytest.raises(ValueError, match=r"they are calibrated for budget\(s\) \[0.3\]; run .*budget=0.5"):
        method.override(budget=0.5, mode="threshold").__enter__()
    with method.override(budget=0.5):  # quantile mode needs no calibration
        pass


def test_threshold_mode_from_the_config_is_checked_by_the_first_forward_the_trainer_and_the_cli(tmp_path,
                                                                                                 monkeypatch):
    """Attached (or saved) with mode="threshold" and a budget, never calibrated, a model ran every token (thresholds
    0) while the budget said otherwise, in Python, in `dyndepth generate` and in training; only `override` checked."""
    from typer.testing import CliRunner

    from dyndepth.cli import app

    model, method = gated_model(budget=0.3, mode="threshold", layers=2)
    ids = torch.randint(0, 256, (4, 16))
    with pytest.raises(ValueError, match="needs GateSkip's thresholds calibrated for it, and they are not calibrated"):
        model(ids)
    with pytest.raises(ValueError, match="mode='threshold' decodes with thresholds calibrated at one budget"):
        GateSkipHook(method, total_steps=4)
    model.save_pretrained(tmp_path / "uncalibrated")
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "uncalibrated"), "-p", "hi", "-n", "2",
                                      "--tokenizer", "byte"])
    assert result.exit_code == 2 and result.output.startswith("error:") and "not calibrated" in result.output
    calibrate(model, [ids], budget=0.3)
    checks = []
    monkeypatch.setattr(method, "_check_calibrated", lambda budget: checks.append(budget))
    with torch.no_grad():
        assert float(model(ids).stats["gateskip/attn_skipped"]) > 0
        model(ids)
    assert checks == [0.3]  # once, not every forward (a decode step would read L buffers on the host)
    calibrate(model, [ids], budget=0.3)  # new thresholds: checked again
    with torch.no_grad():
        model(ids)
    assert checks == [0.3, 0.3]
    monkeypatch.undo()
    method.budget = 0.5  # around `override`
    with pytest.raises(ValueError, match=r"calibrated for budget\(s\) \[0.3\]"):
        model(ids)


def test_threshold_mode_runs_eos_never_pad_and_counts_neither():
    """Every threshold above any gate value: every pool token skips every branch, EOS still runs (outside the pool)
    and PAD never runs; the skipped share of the pool is exactly 1 (EOS skipped made it 17/16)."""
    model, method = gated_model(eos=5, budget=0.0)
    for gates in method.layer_gates:
        gates.tau.fill_(2.0)
        gates.tau_budget_ppm.fill_(budget_ppm(0.5))
    ids = torch.randint(6, 256, (2, 10))
    ids[0, 4] = 5
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    trace = dyndepth.Trace()
    with method.override(budget=0.5, mode="threshold"), torch.no_grad():
        stats = model(ids, attention_mask=mask, trace=trace).stats
    for keep in trace.ctx.state.keep.values():
        assert keep[0, 4] and int(keep.sum()) == 1  # EOS only: no PAD, no pool token
    assert float(stats["gateskip/attn_skipped"]) == float(stats["gateskip/mlp_skipped"]) == 1.0


def test_calibration_averages_the_batches_that_can_skip_and_names_the_fix_when_none_can():
    """Thresholds are the mean of each batch's; a short last batch whose floor(q n) is 0 has none (its -inf made
    the mean -inf: nothing skipped, silently), and a calibration where no batch can skip is an error."""
    model, method = gated_model(budget=0.0, layers=2)
    a, b = torch.randint(0, 256, (4, 24)), torch.randint(0, 256, (4, 24))
    one = {name: calibrate(model, [ids], budget=0.05) for name, ids in (("a", a), ("b", b))}
    both = calibrate(model, [a, b, torch.randint(0, 256, (1, 10))], budget=0.05)  # 10 tokens: floor(0.5) = 0
    for key, tau in both.items():
        assert torch.isfinite(tau)
        torch.testing.assert_close(tau, (one["a"][key] + one["b"][key]) / 2)
    torch.testing.assert_close(method.layer_gates[1].tau, torch.stack([both[(1, "attn")], both[(1, "mlp")]]))
    with pytest.raises(ValueError, match="needs at least 20 real tokens.*--batch-size.*--seq-len"):
        calibrate(model, [torch.randint(0, 256, (1, 10))], budget=0.05)


def test_the_gate_penalty_averages_over_real_tokens_only():
    # a training batch the loader pads (data.packing="documents": attention_mask 0 after the row's documents) took
    # the padding's gates into mean(g^2): the penalty moved with the padding's length and trained gates on it
    model, method = gated_model(eos=3)
    model.train()
    ids = torch.randint(4, 256, (2, 8))
    ids[0, 2] = ids[1, 1] = 3  # an EOS is a real token: never ranked, but its gates run and are trained
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # row 1: 5 real tokens, then padding
    padded = model(ids, attention_mask=mask).aux_loss
    alone = [model(ids[:1]).stats["gateskip/gate_sq"], model(ids[1:, :5]).stats["gateskip/gate_sq"]]  # each row
    assert method.budget == 0 and padded > 0  # (nothing skips: a row's gates do not depend on the other row)
    # per branch a mean over the 13 real tokens, so a token-weighted mean of the rows' own penalties
    torch.testing.assert_close(padded, method.config.penalty * (8 * alone[0] + 5 * alone[1]) / 13)


def test_the_penalty_weight_scales_the_loss_and_zero_turns_it_off():
    # lambda multiplies mean over branches of mean(g^2); every other test trains at the default lambda = 1.0, where
    # a dropped factor reads the same
    ids = torch.randint(0, 256, (2, 8))
    for penalty in (0.25, 0.0):
        model, _ = gated_model(penalty=penalty)
        model.train()
        out = model(ids)
        assert float(out.stats["gateskip/gate_sq"]) > 0.1  # logged whatever the weight
        torch.testing.assert_close(out.aux_loss, penalty * out.stats["gateskip/gate_sq"])


def test_a_vector_gate_costs_2_d_squared_flops_per_token_per_branch():
    # the spec's overhead (section 5): d^2 MACs per token per branch, charged for every real token, skipped or not
    model, _ = gated_model(budget=0.5)
    D, L = model.config.hidden_size, model.config.num_hidden_layers
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # 17 real tokens
    with torch.no_grad():
        ledger = model(ids, attention_mask=mask).compute
    assert ledger.total("ideal", part="gate") == L * 2 * 17 * 2 * D * D
    assert ledger.total("executed", part="gate") == L * 2 * 20 * 2 * D * D  # the padding's gates ran too


def test_a_bfloat16_models_gates_compute_their_logits_in_float32():
    # importances of a bf16 model are ranked in float32 (docs/methods.md): the gate's matmul upcasts h and its
    # weights, so rounding the logits to bf16 (spacing 1/32 at 5, where fresh gates start) cannot tie or reorder them
    model, _ = gated_model()
    model = model.to(torch.bfloat16)
    ids, trace = torch.randint(0, 256, (2, 12)), dyndepth.Trace(keep_streams=True)
    with torch.no_grad():
        model(ids, trace=trace)
        proj = model.model.layers[0].gateskip.attn_gate.proj
        h = model.model.layers[0].input_layernorm(trace.streams[0])  # (B, T, D) bf16, as the gate read it
        ref = torch.sigmoid(h.float() @ proj.weight.float().T + proj.bias.float()).mean(-1)
    torch.testing.assert_close(trace.ctx.state.scores[(0, "attn")], ref, atol=1e-6, rtol=0)
