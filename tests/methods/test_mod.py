"""Mixture-of-Depths: neutrality, capacity, PAD, fast path == per-sequence reference loop, cached decoding,
training (router/predictor gradients, predictor BCE), FLOPs, annealing, threshold calibration, save/load."""

import math

import pytest
import torch

import dyndepth
from dyndepth import CausalLM, KVCache, preset
from dyndepth.core import flops
from dyndepth.methods import MoDConfig, MoDHook, attach_method, attach_mod, calibrate


def mod_model(name="tiny-qwen3", **cfg):
    torch.manual_seed(0)
    model = CausalLM(preset(name)).eval()
    method = attach_mod(model, MoDConfig(**cfg))
    with torch.no_grad():  # spread router scores and predictor logits so routing differs clearly by token
        for i in method.routed:
            mod = model.model.layers[i].mod
            mod.router.weight.normal_(0, 1.0)
            mod.predictor.fc1.weight.normal_(0, 1.0)
            mod.predictor.fc2.weight.normal_(0, 1.0)
            mod.predictor.fc2.bias.zero_()
    return model, method


def reference_forward(model, ids, mask=None):
    """Slow MoD: per layer, per sequence, run the plain layer on the top-k tokens of that sequence only."""
    method, cfg = model.method, model.method.config
    full = model.make_context(ids, mask, None, None)
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    x = model.model.embed_tokens(ids)
    B = ids.shape[0]
    for i, layer in enumerate(model.model.layers):
        if i not in method.routed:
            x = layer.block(x, full, i)
            continue
        r = layer.mod.router(x).squeeze(-1)  # (B, T)
        rows = []
        for b in range(B):
            scores = r[b].masked_fill(~valid[b], float("-inf"))
            k = math.ceil(cfg.capacity * int(valid[b].sum()) - 1e-6)  # c of the row's real tokens
            sel = torch.argsort(scores, descending=True, stable=True)[:k]
            sel = sel.sort().values
            xs, pos = x[b:b + 1, sel], full.positions[b:b + 1, sel]
            ctx = model.make_context(ids[b:b + 1, sel], None, pos, None)
            delta = layer.block(xs, ctx, i) - xs
            w = r[b, sel][None, :, None] if cfg.scale_by_router else 1.0
            rows.append(x[b].index_add(0, sel, (w * delta)[0]))
        x = torch.stack(rows)
    return model.lm_head(model.model.norm(x))


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_capacity_one_without_router_scale_gives_the_base_model(name):
    torch.manual_seed(0)
    model = CausalLM(preset(name)).eval()
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        ref, ref_pad = model(ids).logits, model(ids, attention_mask=mask).logits
        attach_mod(model, MoDConfig(capacity=1.0, every=1, scale_by_router=False))
        out, out_pad = model(ids), model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_pad[mask.bool()], ref_pad[mask.bool()], atol=1e-5, rtol=0)
    assert float(out.stats["mod/routed_fraction"]) == 1.0


@pytest.mark.parametrize("c", [0.125, 0.3, 0.5])
def test_routed_fraction_is_ceil_c_T_over_T(c):
    model, _ = mod_model(capacity=c, every=1)
    ids = torch.randint(0, 256, (3, 21))
    with torch.no_grad():
        stats = model(ids).stats
    assert float(stats["mod/routed_fraction"]) == pytest.approx(math.ceil(c * 21) / 21)


def test_pad_is_never_routed_and_unrouted_tokens_pass_unchanged():
    model, method = mod_model(capacity=0.9, every=1)
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # row 1: 4 real tokens < k = 9
    ctx = model.make_context(ids, mask, None, None)
    ctx.state = method.begin(ids, ctx)
    layer = model.model.layers[0]
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        y = layer(x, ctx, 0)  # the layer call hands over to the method
    keep = ctx.state.routed[0]
    assert not keep[1, :6].any() and keep[1, 6:].all() and keep[0].sum() == 9
    assert torch.equal(y[~keep], x[~keep])  # PAD and unrouted tokens: identity
    assert not torch.equal(y[keep], x[keep])


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe", "tiny-qwen2", "tiny-llama"])
@pytest.mark.parametrize("c,scale", [(0.25, True), (0.5, False), (0.125, True)])
def test_fast_path_equals_per_sequence_reference_loop(name, c, scale):
    model, _ = mod_model(name, capacity=c, every=1, scale_by_router=scale)
    ids = torch.randint(0, 256, (3, 16))
    mask = torch.ones_like(ids)
    mask[2, :5] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        ref = reference_forward(model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=0)


def test_default_routes_every_other_layer_from_layer_one():
    model, method = mod_model("demo-tiny")  # 4 layers
    assert sorted(method.routed) == [1, 3]
    assert not hasattr(model.model.layers[0], "mod") and hasattr(model.model.layers[3], "mod")
    with pytest.raises(ValueError, match="routes none"):
        attach_mod(CausalLM(preset("tiny-qwen3")), MoDConfig(every=4, offset=3))


def test_topk_routes_c_of_each_rows_real_tokens_so_left_padding_changes_nothing():
    """k was c x the padded width: a row of 6 real tokens in a width-12 batch routed all 6 at c = 0.5 (logits 0.09
    off the row alone), so a row's output depended on its batch-mates (the eval harness left-pads)."""
    model, _ = mod_model(capacity=0.5, every=1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    trace = dyndepth.Trace()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, trace=trace).logits
        alone = model(ids[1:, 6:]).logits
    assert all(int(keep[1].sum()) == 3 for keep in trace.ctx.state.routed.values())
    torch.testing.assert_close(batch[1, 6:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["predictor", "router_threshold"])
def test_causal_modes_never_route_pad_so_left_padding_changes_nothing(mode):
    model, method = mod_model(capacity=0.5, every=1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    if mode == "router_threshold":
        calibrate(model, [ids], capacity=0.5)
    trace = dyndepth.Trace()
    with method.override(mode=mode), torch.no_grad():
        batch = model(ids, attention_mask=mask, trace=trace).logits
        alone = model(ids[1:, 6:]).logits
    assert not any(keep[1, :6].any() for keep in trace.ctx.state.routed.values())
    torch.testing.assert_close(batch[1, 6:], alone[0], atol=1e-5, rtol=0)


def test_the_predictor_loss_is_a_mean_over_real_tokens():
    """Per routed layer the BCE and the accuracy are means over real tokens: a copy of the row or left padding
    leaves them."""
    model, _ = mod_model(capacity=0.5, every=1)
    model.train()
    row = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([torch.randint(0, 256, (1, 4)), row], 1)
    mask = torch.ones_like(padded)
    mask[0, :4] = 0
    with torch.no_grad():
        batches = ((row, None), (row.repeat(2, 1), None), (padded, mask))
        stats = [model(ids, attention_mask=m).stats for ids, m in batches]
    for name in ("mod/predictor_loss", "mod/predictor_acc"):  # (the accuracy counted PAD the predictor left out)
        values = [float(st[name]) for st in stats]
        assert values == pytest.approx([values[0]] * 3, rel=1e-5)


@pytest.mark.parametrize("mode", ["predictor", "router_threshold", "topk"])
def test_cached_decoding_equals_full_forward(mode):
    """topk: forwards with a cache route with decode_mode (the predictor); top-k of one token would always route it."""
    model, method = mod_model(capacity=0.5, every=1)
    if mode == "router_threshold":
        calibrate(model, [torch.randint(0, 256, (4, 24))])
    ids = torch.randint(0, 256, (2, 14))
    P = 6
    with method.override(mode=mode), torch.no_grad():
        with method.override(mode="predictor" if mode == "topk" else mode):
            full = model(ids)
        cache = KVCache.for_model(model.config, 2, 16)
        pos = torch.arange(14).expand(2, 14)
        steps = [model(ids[:, :P], positions=pos[:, :P], cache=cache).logits]
        for t in range(P, 14):
            steps.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, atol=1e-5, rtol=0)
    assert 0.1 < float(full.stats["mod/routed_fraction"]) < 0.9  # routing really skipped some tokens
    assert not cache.valid[0, :, :14].all()  # unrouted tokens left invalid K/V at the routed slot


def test_feeding_positions_again_without_invalidate_rewrites_the_routed_slots():
    """A routed slot holds the routed tokens only: a position sent again whose new token is not routed kept the old
    token's entry (0.02 off the full forward)."""
    model, method = mod_model(capacity=0.5, every=1)
    pos = torch.arange(14).expand(2, 14)
    for seed in range(4):  # (seed 3 draws a sent-again position whose first token was routed and whose second is not)
        torch.manual_seed(seed)
        ids = torch.randint(0, 256, (2, 14))
        with method.override(mode="predictor"), torch.no_grad():
            full = model(ids).logits
            cache = KVCache.for_model(model.config, 2, 16)
            model(ids[:, :8], positions=pos[:, :8], cache=cache)
            for t in range(8, 11):  # one true token, then two others that are sent again below with the truth
                model(ids[:, t:t + 1] if t == 8 else torch.randint(0, 256, (2, 1)), positions=pos[:, t:t + 1],
                      cache=cache)
            got = model(ids[:, 9:], positions=pos[:, 9:], cache=cache).logits
        torch.testing.assert_close(got, full[:, 9:], atol=1e-5, rtol=0)


def test_generate_in_topk_mode_decodes_with_the_predictor():
    model, method = mod_model(capacity=0.5, every=1)
    ids = torch.randint(0, 256, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = model.generate(ids, 6, attention_mask=mask, stop_tokens=[])
    with method.override(mode="predictor"), torch.no_grad():
        seq, m = ids, mask
        for _ in range(6):
            nxt = model(seq, attention_mask=m).logits[:, -1:].argmax(-1)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


def test_router_threshold_needs_calibration_and_then_routes_exactly_c_on_the_calibration_batch():
    model, method = mod_model(capacity=0.25, every=1)
    ids = torch.randint(0, 256, (4, 32))
    with pytest.raises(ValueError, match="calibrate"), method.override(mode="router_threshold"):  # on entry
        model(ids)
    table = calibrate(model, [ids])
    assert set(table) == {0, 1}
    assert {int(layer.mod.threshold_capacity_ppm) for layer in model.model.layers} == {250_000}
    with method.override(mode="router_threshold"), torch.no_grad():
        frac = float(model(ids).stats["mod/routed_fraction"])
    assert frac == 0.25  # the batch's 32 best router scores of 128 sit above each layer's threshold
    with pytest.raises(ValueError, match="0.5"), method.override(capacity=0.5, mode="router_threshold"):
        model(ids)  # calibrated at 0.25, not 0.5
    whole = calibrate(model, [ids], capacity=1.0)  # nothing to skip: -inf thresholds, every token routed
    assert all(t == float("-inf") for t in whole.values())
    with method.override(capacity=1.0, mode="router_threshold"), torch.no_grad():
        assert float(model(ids).stats["mod/routed_fraction"]) == 1.0


def test_training_gradients_reach_router_and_predictor_only_through_their_paths():
    model, _ = mod_model(capacity=0.25)
    model.train()
    out = model(torch.randint(0, 256, (2, 16)))
    assert "mod/predictor_loss" in out.stats and out.aux_loss > 0
    (out.logits.pow(2).mean() + out.aux_loss).backward()
    mod = model.model.layers[1].mod
    assert mod.router.weight.grad.abs().sum() > 0
    assert mod.predictor.fc1.weight.grad.abs().sum() > 0
    model.zero_grad()
    model(torch.randint(0, 256, (2, 16))).aux_loss.backward()  # BCE alone: inputs are detached
    assert model.model.layers[0].mlp.up_proj.weight.grad is None and mod.router.weight.grad is None


def test_predictor_loss_decreases_on_a_toy_batch():
    model, method = mod_model(capacity=0.25, every=1)
    model.train()
    ids = torch.randint(0, 256, (4, 16))
    params = [p for i in method.routed for p in model.model.layers[i].mod.predictor.parameters()]
    opt = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(30):
        out = model(ids)
        losses.append(float(out.stats["mod/predictor_loss"]))
        opt.zero_grad()
        out.aux_loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses


def test_ideal_flops_count_what_the_routing_allows():
    cfg = preset("tiny-qwen3")
    model, method = mod_model(capacity=1.0, every=1, scale_by_router=False)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        dense = float(model(ids).stats["flops/ideal"])
        with method.override(capacity=0.25):
            routed = model(ids).stats
    router = 2 * 12 * 2 * flops.gate_flops(cfg, "scalar")  # 2 layers, B * T tokens
    assert dense == flops.forward_flops(cfg, 12, B=2) + router
    k = 3  # ceil(0.25 * 12): k tokens per row run both branches; attention among them only
    attn = flops.branch_flops(cfg, 0, "attn", k, k, k * (k + 1) // 2)
    per_layer = attn + flops.branch_flops(cfg, 0, "mlp", k)
    head = 2 * 12 * flops.lm_head_flops(cfg)
    assert float(routed["flops/ideal"]) == 2 * 2 * per_layer + router + head
    # static k: no padded rows, and the routed tokens in position order, so SDPA's causal kernel runs the pairs the
    # causal mask keeps (a boolean mask would make it compute all k * k): nothing executed beyond the ideal
    assert float(routed["flops/executed"]) == float(routed["flops/ideal"])
    assert float(routed["flops/dense"]) == flops.forward_flops(cfg, 12, B=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # ideal: the router and the predictor score the 19 real tokens, PAD not
    with torch.no_grad(), method.override(mode="predictor"):
        padded = model(ids, attention_mask=mask)
    per_token = flops.gate_flops(cfg, "scalar") + model.model.layers[0].mod.predictor.flops_per_token()
    assert float(padded.compute.total("ideal", part="router")) == 2 * 19 * per_token


def test_capacity_anneal_hook_and_registry():
    model, method = mod_model(capacity=0.2, anneal_period=1500)
    (hook,) = method.trainer_hooks(100)
    assert isinstance(hook, MoDHook) and method.capacity == 1.0
    assert hook.after_step(model, 1500, {}, None) == {"capacity": 1.0}  # logged: what the step trained at
    assert method.capacity == pytest.approx(0.2 + 0.8 / 2)  # the next step's
    assert hook.state_dict() == {"capacity": pytest.approx(0.6)}
    MoDHook(*(method, 100)).load_state_dict({"capacity": 0.3})
    assert method.capacity == 0.3 and method.config.capacity == 0.2  # the hook moves the knob, not the config
    other = attach_method(CausalLM(preset("tiny-qwen3")), "mod", {"capacity": 0.5})
    assert other.name == "mod" and other.capacity == 0.5


@pytest.mark.parametrize("mode", ["predictor", "router_threshold"])
def test_training_in_an_inference_mode_is_refused(mode):
    """A predictor- or threshold-routed step can route no token of a layer: its router got no gradient and DDP
    stopped at the next step ('parameters that were not used'); the trainer's hook refuses such a run up front."""
    _, method = mod_model(capacity=0.5, mode=mode)
    with pytest.raises(ValueError, match=f"mod mode='{mode}' is an inference mode .* train with mode='topk'"):
        method.trainer_hooks(10)
    with method.override(mode="topk"):
        assert isinstance(method.trainer_hooks(10)[0], MoDHook)


def test_retrofit_and_save_load(tmp_path):
    torch.manual_seed(0)
    base = CausalLM(preset("tiny-qwen3")).eval()
    base.save_pretrained(tmp_path / "base")
    model = dyndepth.from_pretrained(tmp_path / "base").eval()
    method = attach_mod(model, {"capacity": 0.5, "router_act": "sigmoid", "predictor_hidden": 8})
    with torch.no_grad():
        model.model.layers[1].mod.threshold.fill_(0.123)
    model.save_pretrained(tmp_path / "mod")
    loaded = dyndepth.from_pretrained(tmp_path / "mod").eval()
    assert loaded.method.to_dict() == method.to_dict()
    assert loaded.model.layers[1].mod.predictor.fc1.weight.shape == (8, 64)
    assert float(loaded.model.layers[1].mod.threshold) == pytest.approx(0.123)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_topk_routing_picks_each_rows_best_router_scores_never_pad():
    model, method = mod_model(capacity=0.3, every=1)
    ids = torch.randint(0, 256, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, :8] = 0  # 2 real tokens: k = ceil(0.3 * 2) = 1
    trace = dyndepth.Trace()
    with torch.no_grad():
        model(ids, attention_mask=mask, trace=trace)
        x = model.model.embed_tokens(ids)  # layer 0's input
        r = model.model.layers[0].mod.router(x).squeeze(-1)
    keep = trace.ctx.state.routed[0]
    for b in range(3):  # slow reference: the k = ceil(0.3 * real tokens) best valid scores of the row
        valid = [t for t in range(10) if mask[b, t]]
        best = sorted(valid, key=lambda t: (-float(r[b, t]), t))[:math.ceil(0.3 * len(valid) - 1e-6)]
        assert keep[b].nonzero().flatten().tolist() == sorted(best)


def test_the_depth_heatmap_shows_the_predictors_routing(tmp_path, monkeypatch):
    from dyndepth import plots
    from dyndepth.tokenizer import load_tokenizer

    model, method = mod_model()
    tok = load_tokenizer("byte")
    text = "tokens take the routed layers or not"
    ids = torch.tensor([tok.encode(text, add_bos=False)])
    drawn = []
    monkeypatch.setattr(plots, "_save_token_grid", lambda fig, bar, share, *a: drawn.append(share) or tmp_path)
    with method.override(mode="predictor"), torch.no_grad():
        plots.mod_heatmap(model, tok, text, tmp_path / "mod.png")
        x = model.model.embed_tokens(ids)
        ctx = model.make_context(ids, None, None, None)
        ctx.state = method.begin(ids, ctx)
        expected = torch.ones(len(model.model.layers), ids.shape[1])
        for i, layer in enumerate(model.model.layers):  # the predictor's decision on each routed layer's input
            if i in method.routed:
                expected[i] = (layer.mod.predictor(x).squeeze(-1)[0] > 0).float()
            x = layer(x, ctx, i)
    torch.testing.assert_close(drawn[0], expected.mean(0))
    assert 0 < float(drawn[0].min()) < 1  # some token skipped a routed layer
    path = plots.mod_heatmap(model, tok, text, tmp_path / "topk.png")  # top-k mode, drawn for real
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="Mixture-of-Depths"):
        plots.mod_heatmap(CausalLM(preset("tiny-qwen3")), tok, text, tmp_path / "none.png")


def test_a_top_k_training_forward_traces_as_one_graph():
    # static k and an ordered parent: packing, the subset and its causal attention need no host sync
    import torch._dynamo as dynamo

    model, _ = mod_model(capacity=0.5, every=1)
    model.train()
    explained = dynamo.explain(lambda ids: model(ids).logits)(torch.randint(0, 256, (2, 16)))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_an_eval_with_uncalibrated_router_thresholds_fails_when_its_knobs_are_read(tmp_path):
    """`dyndepth eval CKPT --model-args mode=router_threshold` raised only at its first scoring forward, after lm-eval
    had built its requests; GateSkip's mode=threshold failed at once."""
    from dyndepth.eval.model_args import split_knobs

    model, method = mod_model(capacity=0.25, every=1)
    with pytest.raises(ValueError, match=r"mode 'router_threshold' at capacity 0.25 needs MoD's thresholds"):
        split_knobs(method, {"mode": "router_threshold"})
    calibrate(model, [torch.randint(0, 256, (4, 32))])
    assert split_knobs(method, {"mode": "router_threshold"}).fields == {"mode": "router_threshold"}


def test_a_capacity_for_decoding_in_predictor_mode_is_refused_with_the_mode_that_takes_it():
    """The predictor routes whatever it predicts: generate ran at capacity 0.05 exactly as at 1.0, silently."""
    model, _ = mod_model(capacity=0.5, every=1)
    ids = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="capacity=0.25 does not reach decoding in predictor mode.*router_threshold"):
        model.generate(ids, 2, method_knobs={"capacity": 0.25})
    calibrate(model, [torch.randint(0, 256, (4, 16))], capacity=0.25)
    assert model.generate(ids, 2, method_knobs={"capacity": 0.25, "mode": "router_threshold"}).shape == (2, 10)
    assert model.generate(ids, 2).shape == (2, 10)  # its own settings: the predictor


def test_a_zero_capacity_and_an_uncalibrated_decode_mode_are_refused_on_entry():
    _, method = mod_model(decode_mode="router_threshold")
    with pytest.raises(ValueError, match=r"capacity=0.0 must lie in \(0, 1\]"), method.override(capacity=0.0):
        pass
    entered = False
    with pytest.raises(ValueError, match="router_threshold"), method.decoding():  # checks decode_mode's thresholds
        entered = True
    assert not entered


def test_the_predictor_loss_weight_scales_the_loss_and_zero_trains_no_predictor():
    ids = torch.randint(0, 256, (2, 8))
    model, _ = mod_model(capacity=0.5, every=1, predictor_loss_weight=0.5)
    out = model.train()(ids)
    assert float(out.aux_loss.detach()) == pytest.approx(0.5 * float(out.stats["mod/predictor_loss"]))
    model, _ = mod_model(capacity=0.5, every=1, predictor_loss_weight=0.0)
    out = model.train()(ids)  # no BCE to train with: the predictor does not run (nor counts FLOPs)
    assert "mod/predictor_loss" not in out.stats and float(out.aux_loss.detach()) == 0.0


@pytest.mark.parametrize("how", ["bf16 weights", "autocast"])
def test_a_bfloat16_model_ranks_tokens_by_float32_router_scores(how):
    # the router ran in the model's dtype: bfloat16 scores of 8 mantissa bits tied runs of tokens, and top-k broke the
    # ties by position (GateSkip's gates and DND's router were already float32)
    model, _ = mod_model(capacity=0.5, every=1)
    with torch.no_grad():  # every embedding shares a large last coordinate that the router reads: scores ~ 10 +- 0.02,
        # where bfloat16's spacing is 0.0625
        model.model.embed_tokens.weight[:, -1] = 10.0
        router = model.model.layers[0].mod.router.weight
        router.normal_(0, 1e-2)[0, -1] = 1.0
    if how == "bf16 weights":
        model.to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 32))
    trace = dyndepth.Trace()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=how == "autocast"):
        model(ids, trace=trace)
        x = model.model.embed_tokens(ids).float()  # layer 0's input
    r = (x @ model.model.layers[0].mod.router.weight.float().T).squeeze(-1)  # (B, T) float32 scores
    best = r.topk(16, dim=-1).indices.sort(-1).values  # k = 0.5 * 32
    assert torch.equal(trace.ctx.state.routed[0].nonzero()[:, 1].view(2, 16), best)
