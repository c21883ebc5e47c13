"""GateSkip: neutrality, budgets, physical skipping == masked dense reference, cache consistency."""

import pytest
import torch
from gated import gated_model

import dyndepth
from dyndepth import CausalLM, KVCache, preset
from dyndepth.core.routing import SelectRule, select
from dyndepth.methods import GateSkipConfig, attach_gateskip, calibrate


def masked_dense_reference(model, ids, mask=None):
    """The official code path: every branch runs densely; skipped tokens' outputs are zeroed."""
    method = model.method
    ctx = model.make_context(ids, mask, None, None)
    method.begin(ids, ctx)
    x = model.model.embed_tokens(ids)
    for slot, layer in enumerate(model.model.layers):
        for branch, norm in (("attn", layer.input_layernorm), ("mlp", layer.post_attention_layernorm)):
            h = norm(x)
            gate = getattr(layer.gateskip, f"{branch}_gate")(h)
            y = layer.self_attn(h, ctx, slot) if branch == "attn" else layer.mlp_branch(h, ctx)
            pool = ctx.method["pool"]
            s = gate.mean(-1)
            keep = select(s, pool, SelectRule(kind="quantile", scope=method.cfg.scope, q=method.cfg.budget,
                                              pad_policy="keep"))
            x = x + gate * y * keep[..., None]
    return model.lm_head(model.model.norm(x))


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_open_gates_and_zero_budget_give_the_base_model(name):
    torch.manual_seed(0)
    model = CausalLM(preset(name)).eval()
    ids = torch.randint(0, 256, (2, 9))
    ref = model(ids).logits
    attach_gateskip(model, GateSkipConfig(budget=0.0))
    with torch.no_grad():
        for layer in model.model.layers:
            for gate in (layer.gateskip.attn_gate, layer.gateskip.mlp_gate):
                gate.proj.weight.zero_()
                gate.proj.bias.fill_(100.0)  # sigmoid(100) == 1.0 in fp32
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("q", [0.15, 0.3, 0.5])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_skipped_fraction_equals_the_budget(q, scope):
    model, method = gated_model(budget=q, scope=scope)
    ids = torch.randint(0, 256, (4, 40))
    stats = model(ids).stats
    for branch in ("attn", "mlp"):
        assert abs(float(stats[f"gateskip/{branch}_skipped"]) - q) <= 1 / 40 + 1e-6


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe", "tiny-llama"])
@pytest.mark.parametrize("q", [0.0, 0.3, 0.6])
def test_physical_skipping_equals_the_masked_dense_reference(name, q):
    model, _ = gated_model(name, budget=q)
    ids = torch.randint(0, 256, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        ref = masked_dense_reference(model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=0)


def test_pad_and_eos_are_never_skipped_and_not_counted():
    model, method = gated_model(eos=5, budget=0.5)
    ids = torch.randint(6, 256, (2, 10))
    ids[0, 4] = 5
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
    ctx = model.make_context(ids, mask, None, None)
    method.begin(ids, ctx)
    assert not ctx.method["pool"][0, 4] and not ctx.method["pool"][1, :2].any()


def test_sequence_scope_outputs_do_not_depend_on_the_batch():
    model, _ = gated_model(budget=0.4, scope="sequence")
    row = torch.randint(0, 256, (1, 16))
    others = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        alone = model(row).logits
        batched = model(torch.cat([row, others])).logits[:1]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_calibrated_threshold_decoding_equals_full_forward_with_same_decisions():
    model, method = gated_model(budget=0.0)
    calib = [torch.randint(0, 256, (4, 24)) for _ in range(3)]
    table = calibrate(model, calib, budget=0.3)
    assert table.shape == (2, 2) and (table > 0).all()
    ids = torch.randint(0, 256, (2, 14))
    P = 6
    with method.decoding(0.3), torch.no_grad():
        full = model(ids)
        skipped = float(full.stats["gateskip/mlp_skipped"])
        cache = KVCache.for_model(model.config, 2, 16)
        pos = torch.arange(14).expand(2, 14)
        steps = [model(ids[:, :P], positions=pos[:, :P], cache=cache).logits]
        for t in range(P, 14):
            steps.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, atol=1e-5, rtol=0)
    assert 0.05 < skipped < 0.7  # thresholds from other batches skip roughly the budget


def test_generate_with_skip_budget_needs_calibration_then_matches_uncached():
    model, method = gated_model(budget=0.0)
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="calibrate"):
        model.generate(ids, 4, stop_tokens=[], skip_budget=0.3)
    calibrate(model, [torch.randint(0, 256, (4, 24))], budget=0.3)
    out = model.generate(ids, 6, stop_tokens=[], skip_budget=0.3)
    with method.decoding(0.3), torch.no_grad():
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_training_penalty_gradients_and_budget_ramp():
    from dyndepth.methods import GateSkipHook

    model, method = gated_model()
    model.train()
    hook = GateSkipHook(method, total_steps=10)
    out = model(torch.randint(0, 256, (2, 8)))
    assert out.aux_loss > 0  # lambda * mean(g^2)
    out.aux_loss.backward()
    gate = model.model.layers[0].gateskip.attn_gate.proj.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None  # detached gate input
    hook.after_step(model, 5, {}, None)
    assert method.cfg.budget == pytest.approx(0.1)
    assert hook.state_dict() == {"budget": pytest.approx(0.1)}


def test_gated_model_saves_and_loads(tmp_path):
    model, method = gated_model(budget=0.25, gate="lowrank", rank=4)
    calibrate(model, [torch.randint(0, 256, (2, 16))], budget=0.25)
    model.save_pretrained(tmp_path)
    loaded = dyndepth.from_pretrained(tmp_path).eval()
    assert loaded.method.cfg.gate == "lowrank" and loaded.method.cfg.calibrated_budget == 0.25
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert torch.equal(loaded.model.layers[1].gateskip.tau, model.model.layers[1].gateskip.tau)


def test_scalar_and_shared_gates():
    model, _ = gated_model(gate="scalar", shared=True, budget=0.3)
    assert model.model.layers[0].gateskip.attn_gate.proj.weight.shape == (1, 64)
    assert not hasattr(model.model.layers[1], "gateskip")
    assert model(torch.randint(0, 256, (2, 10))).logits.shape == (2, 10, 256)


def test_long_subsets_use_chunked_attention_and_stay_exact():
    model, _ = gated_model(budget=0.3)
    ids = torch.randint(0, 256, (2, 1100))  # > 2 * 256 kept queries per row: several chunks
    mask = torch.ones_like(ids)
    mask[1, :50] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        ref = masked_dense_reference(model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-4, rtol=0)


def test_a_branch_every_token_skips_still_writes_kv():
    model, method = gated_model(budget=0.0)
    calibrate(model, [torch.randint(0, 256, (2, 16))], budget=0.3)
    for layer in model.model.layers:
        layer.gateskip.tau.fill_(2.0)  # importance <= 1 < 2: everything skips
    ids = torch.randint(0, 256, (1, 6))
    cache = KVCache.for_model(model.config, 1, 8)
    with method.decoding(0.3), torch.no_grad():
        out = model(ids, positions=torch.arange(6)[None], cache=cache)
    assert cache.valid[:, 0, :6].all()  # every slot has K/V for every token
    torch.testing.assert_close(out.logits, model.lm_head(model.model.norm(model.model.embed_tokens(ids))))


def test_copy_prev_kv_policy_reuses_the_layer_below_and_stays_cache_consistent():
    model, method = gated_model(budget=0.0, kv_policy="copy_prev")
    calibrate(model, [torch.randint(0, 256, (4, 24))], budget=0.4)
    ids = torch.randint(0, 256, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    with method.decoding(0.4), torch.no_grad():
        cache = KVCache.for_model(model.config, 2, 12)
        full = model(ids, positions=pos, cache=cache)
        skipped = ~full_keep(model, ids, slot=1)
        assert skipped.any()
        k0, k1 = (cache.k[s, :, :, :12].transpose(1, 2) for s in (0, 1))  # (B, S, G, H)
        torch.testing.assert_close(k1[skipped], k0[skipped])  # skipped tokens carry layer 0's keys
        assert not torch.allclose(k1[~skipped], k0[~skipped])
        step_cache = KVCache.for_model(model.config, 2, 12)
        steps = [model(ids[:, :5], positions=pos[:, :5], cache=step_cache).logits]
        for t in range(5, 12):
            steps.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=step_cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, atol=1e-5, rtol=0)


def full_keep(model, ids, slot):
    ctx = model.make_context(ids, None, None, None)
    model.method.begin(ids, ctx)
    x = model.model.embed_tokens(ids)
    for i, layer in enumerate(model.model.layers):
        x = model.method.apply(layer, x, ctx, i)
    return ctx.method["masks"][(slot, "attn")]


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_flop_counter_matches_dense_count_plus_gates_and_a_slow_count(name):
    from dyndepth.core import flops

    model, method = gated_model(name, budget=0.0)
    cfg = model.config
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        dense = float(model(ids).stats["gateskip/flops"])
    L, gate = cfg.num_hidden_layers, flops.gate_flops(cfg, "vector")
    assert dense == pytest.approx(2 * flops.forward_flops(cfg, 10, lm_head=False) + 2 * L * 20 * gate)
    with method.override(budget=0.4), torch.no_grad():
        ctx = model.make_context(ids, None, None, None)
        method.begin(ids, ctx)
        x = model.model.embed_tokens(ids)
        for i, layer in enumerate(model.model.layers):
            x = method.apply(layer, x, ctx, i)
        method.end(ctx, cfg)
    slow = 0.0
    for (slot, branch), keep in ctx.method["masks"].items():
        for b in range(2):
            for t in range(10):
                slow += gate
                if branch == "attn":
                    slow += flops.kv_flops(cfg)
                    if keep[b, t]:
                        slow += flops.q_o_flops(cfg) + flops.attn_score_flops(cfg, t + 1)
                elif keep[b, t]:
                    slow += flops.mlp_flops(cfg, slot)
    assert float(ctx.stats["gateskip/flops"]) == pytest.approx(slow)
    assert float(ctx.stats["gateskip/flops"]) < dense
