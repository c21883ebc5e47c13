"""Mixture-of-Recursions (models/mor.py): routing (expert-choice top-k with hierarchical filtering, its causal
threshold path, token-choice depths), recursion-wise KV caching, cached generation, checkpoints, the trainer, and
the FLOP count against torch's counter."""

import copy
import dataclasses

import families
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dyndepth
from dyndepth import KVCache, Trace
from dyndepth.core.routing import capacity
from dyndepth.models.mor import MoRConfig, MoRLM
from dyndepth.train import run_training
from dyndepth.train.parallel import apply_activation_checkpointing

SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
ROUTERS = ["expert", "token"]


def tiny(**kw) -> MoRConfig:
    fields = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_recursions": 3, "max_position_embeddings": 64}
    return MoRConfig(**{**fields, **kw})


def varied(config, seed: int = 0) -> MoRLM:
    return families.varied(MoRLM, config, std=0.3, seed=seed)


def left_padded(B=3, T=12, vocab=256):
    return families.left_padded(B, T, vocab, pads=(0, 3, 6))


def _state(model, *args, **kwargs):
    trace = Trace()
    with torch.no_grad():
        out = model(*args, trace=trace, **kwargs)
    return out, trace.ctx.state


def test_expert_choice_keeps_the_top_capacity_of_the_previous_recursions_tokens_in_training():
    model = varied(tiny()).train()
    ids = torch.randint(0, 256, (2, 12))
    out, st = _state(model, ids)
    for r, c in enumerate(model.config.capacity):
        assert (st.keep[r].sum(1) == capacity(c, 12)).all()
        if r:
            assert not (st.keep[r] & ~st.keep[r - 1]).any()  # hierarchical filtering
            score = model.routers[r](st.start[r]).squeeze(-1)
            lowest_kept = score.masked_fill(~st.keep[r], float("inf")).min(1).values
            dropped = score.masked_fill(~(st.keep[r - 1] & ~st.keep[r]), float("-inf")).max(1).values
            assert (lowest_kept >= dropped).all()
    assert float(out.aux_loss) > 0 and "mor/router_acc_r1" in out.stats  # the BCE of the causal path


def test_expert_choice_training_keeps_the_capacity_of_each_rows_real_tokens_so_left_padding_changes_nothing():
    """k was capacity[r] x the padded width: a row with 6 real tokens of 12 ran recursions 1 and 2 on 6 and 4 tokens
    (alone: 4 and 2), and its training logits moved by 0.13 with its batch-mates."""
    model = varied(tiny()).train()
    ids, mask = families.left_padded(2, 12, pads=(0, 6))
    out, st = _state(model, ids, attention_mask=mask)
    alone, st_alone = _state(model, ids[1:, 6:])
    for r, c in enumerate(model.config.capacity):
        assert st.keep[r].sum(1).tolist() == [capacity(c, 12), capacity(c, 6)]
        assert torch.equal(st.keep[r][1:, 6:], st_alone.keep[r])
    torch.testing.assert_close(out.logits[1, 6:], alone.logits[0], atol=1e-5, rtol=0)


def test_evaluation_routes_causally_by_threshold_and_token_choice_by_depth():
    model = varied(tiny())
    ids = torch.randint(0, 256, (2, 12))
    _, st = _state(model, ids)
    for r in range(3):
        score = model.routers[r](st.start[r]).squeeze(-1)
        pool = torch.ones_like(st.keep[0]) if r == 0 else st.keep[r - 1]
        assert torch.equal(st.keep[r], (score > 0) & pool)
    model = varied(tiny(router_type="token"))
    _, st = _state(model, ids)
    probs = model.routers[0](st.start[0]).softmax(-1)
    assert torch.equal(st.depth, probs.argmax(-1))
    for r in range(3):
        assert torch.equal(st.keep[r], st.depth >= r)


@pytest.mark.parametrize("router", ROUTERS)
def test_cached_generation_equals_the_full_forward_and_only_routed_tokens_write_kv(router):
    model = varied(tiny(router_type=router))
    ids, mask = left_padded()
    B, T = ids.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    full, st = _state(model, ids, attention_mask=mask)
    cache = KVCache.for_model(model.config, B, T, num_slots=model.num_slots())
    with torch.no_grad():
        out = [model(ids[:, :8], attention_mask=mask[:, :8], positions=pos[:, :8], cache=cache).logits]
        for t in range(8, T):
            out.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(out, 1)[real], full.logits[real], rtol=1e-4, atol=1e-4)
    partial = [0 < int((st.keep[r] & real).sum()) < int(real.sum()) for r in range(3)]
    assert any(partial), [int(st.keep[r].sum()) for r in range(3)]  # some recursion runs a strict subset
    for r in range(3):  # recursion-wise KV: slots 1 + 2r and 2 + 2r hold exactly the tokens that ran recursion r
        kept = st.keep[r] & real
        for slot in (1 + 2 * r, 2 + 2 * r):
            written = torch.zeros(B, T, dtype=torch.bool)
            for b in range(B):
                cols = cache.valid[slot, b, :T].nonzero().squeeze(-1)
                written[b, T - int(mask[b].sum()) + cols] = True  # left padding: column = position
            assert torch.equal(written, kept)
    prompt = torch.randint(0, 256, (2, 5))
    free = prompt
    with torch.no_grad():
        for _ in range(4):
            free = torch.cat([free, model(free).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(model.generate(prompt, 4, stop_tokens=[]), free)


@pytest.mark.parametrize("router", ROUTERS)
def test_feeding_positions_again_without_invalidate_rewrites_the_recursion_slots(router):
    """A recursion slot holds the tokens that ran it only: a position sent again (a rejected draft, a re-prefill)
    whose new token stops earlier kept the old token's entry there, read by every later token (0.04 to 0.1 off the
    full forward), as MoD's routed slots once did."""
    model = varied(tiny(router_type=router))
    pos = torch.arange(12).expand(2, 12)
    for seed in range(6):  # (a sent-again position whose first token ran a recursion and whose second does not)
        torch.manual_seed(seed)
        ids = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            full = model(ids).logits
            cache = KVCache.for_model(model.config, 2, 12, num_slots=model.num_slots())
            model(ids[:, :6], positions=pos[:, :6], cache=cache)
            for t in range(6, 9):  # one true token, then two others that are sent again below with the truth
                model(ids[:, t:t + 1] if t == 6 else torch.randint(0, 256, (2, 1)), positions=pos[:, t:t + 1],
                      cache=cache)
            got = model(ids[:, 7:], positions=pos[:, 7:], cache=cache).logits
        torch.testing.assert_close(got, full[:, 7:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("router", ROUTERS)
def test_save_load_round_trip(router, tmp_path):
    model = varied(tiny(router_type=router, n_layers_in_recursion=1))
    model.save_pretrained(tmp_path / "m")
    loaded = dyndepth.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, MoRLM) and loaded.config == dataclasses.replace(model.config, torch_dtype="float32")
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def _sdpa_flops(q_shape, k_shape, v_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    B, N, T, H = q_shape
    return 4 * B * N * (T * (T + 1) // 2 if is_causal else T * k_shape[2]) * H


@pytest.mark.parametrize("router", ROUTERS)
def test_flops_equal_torchs_counter_and_the_analytic_count(router):
    model = varied(tiny(router_type=router)).train()
    ids = torch.randint(0, 256, (2, 12))
    with FlopCounterMode(display=False, custom_mapping={SDPA_CPU: _sdpa_flops}) as counter:
        out, st = _state(model, ids)
    assert float(out.stats["flops/executed"]) == counter.get_total_flops()
    ideal = sum(model.flops_at(12, [int(st.keep[r][b].sum()) for r in range(3)]) for b in range(2))
    assert float(out.stats["flops/ideal"]) == ideal
    if router == "expert":  # training top-k runs exactly the nominal capacity
        assert ideal == model.forward_flops(12, B=2)
    assert tiny(router_type=router).num_params() == model.num_params()
    assert tiny(router_type=router, attention_bias=True, mlp_bias=True, tie_word_embeddings=False).num_params() == \
        MoRLM(tiny(router_type=router, attention_bias=True, mlp_bias=True, tie_word_embeddings=False)).num_params()


RECIPE = ('[model]\ntype = "mor"\nvocab_size = 264\nhidden_size = 32\nintermediate_size = 64\n'
          'num_attention_heads = 2\nnum_key_value_heads = 1\nnum_recursions = 2\nrouter_type = "{router}"\n'
          '[train]\nbatch_size = 4\nseq_len = 16\nlog_every = 1\nwarmup = 1\nlr = 3e-3\nsteps = 10\n'
          'progress = false\nplot = false\ndevice = "cpu"\n[eval]\nenabled = false\n')


@pytest.mark.parametrize("router", ROUTERS)
def test_the_trainer_trains_it(router, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE.format(router=router))
    result = run_training(tmp_path / "r.toml", [f"train.out_dir={tmp_path / 'run'}"])
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3])
    assert isinstance(dyndepth.from_pretrained(tmp_path / "run" / "model"), MoRLM)


def test_bad_configs_fail_with_one_clear_error():
    with pytest.raises(ValueError, match="router_type"):
        tiny(router_type="random")
    with pytest.raises(ValueError, match="non-increasing"):
        tiny(capacity=[0.5, 1.0, 0.25])
    with pytest.raises(ValueError, match="depend on the routing"):
        MoRLM(tiny()).forward_flops(4, context=3)
    for odd in ({"head_dim": 15}, {"hidden_size": 60, "head_dim": None}):  # (60 / 4 heads: 15) the first forward
        with pytest.raises(ValueError, match="head_dim must be even .*got 15"):  # failed on a rotary size mismatch
            tiny(**odd)


def test_expert_choice_without_the_causal_predictors_loss_is_refused():
    """Evaluation and decoding keep a token iff sigmoid(score) > 0.5 (or the auxiliary router's logit > 0), a rule
    only the BCE (router_aux_loss_coef) trains; with it at 0 the config was accepted and generation routed
    arbitrarily. Token-choice, causal already, has only its balancing loss to switch off."""
    for path in ("aux_loss", "aux_router"):
        with pytest.raises(ValueError, match="router_aux_loss_coef=0 with expert-choice.*router_aux_loss_coef > 0"):
            tiny(router_aux_loss_coef=0.0, causal_path=path)
    assert tiny(router_type="token", router_aux_loss_coef=0.0).router_aux_loss_coef == 0.0


def test_a_token_choice_capacity_is_refused_not_counted_in_the_nominal_flops():
    """Token-choice routing ignores `capacity` (each token's depth is its router's argmax), but the nominal FLOPs
    (`forward_flops`, what `dyndepth match` matches) read it: capacity [1, 1, 1] reported 31% more FLOPs than the
    default for the same model. Only the default (the balanced depths the count assumes) is accepted."""
    with pytest.raises(ValueError, match="capacity is expert-choice's"):
        tiny(router_type="token", capacity=[1.0, 1.0, 1.0])
    config = tiny(router_type="token")
    assert config.capacity == [1.0, 2 / 3, 1 / 3]
    assert MoRConfig.from_dict(config.to_dict()) == config  # a saved token-choice config still loads


@pytest.mark.parametrize("router", ROUTERS)
def test_activation_checkpointing_gives_the_same_gradients(router):
    model = varied(tiny(router_type=router)).train()
    ckpt = copy.deepcopy(model)
    apply_activation_checkpointing(ckpt)
    ids = torch.randint(0, 256, (2, 10))
    grads = []
    for m in (model, ckpt):
        out = m(ids)
        (F.cross_entropy(out.logits.flatten(0, 1), ids.roll(-1, 1).flatten()) + out.aux_loss).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


def test_the_auxiliary_router_variant_decides_causally_and_learns_from_the_top_k_alone():
    model = varied(tiny(causal_path="aux_router"))
    assert tiny(causal_path="aux_router").num_params() == model.num_params()
    ids, mask = left_padded()
    B, T = ids.shape
    full, st = _state(model, ids, attention_mask=mask)
    for r in range(3):  # evaluation: the auxiliary router decides, not the router
        pool = mask.bool() if r == 0 else st.keep[r - 1]
        with torch.no_grad():
            logit = model.aux_routers[r](st.start[r]).squeeze(-1)
        assert torch.equal(st.keep[r], (logit > 0) & pool)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache.for_model(model.config, B, T, num_slots=model.num_slots())
    with torch.no_grad():
        out = [model(ids[:, :8], attention_mask=mask[:, :8], positions=pos[:, :8], cache=cache).logits]
        for t in range(8, T):
            out.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(out, 1)[mask.bool()], full.logits[mask.bool()], rtol=1e-4, atol=1e-4)
    model.train()  # the BCE trains the auxiliary routers only: the stream is detached, the router gets no BCE
    out = model(ids[:, :12])
    out.aux_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aux_routers.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in [*model.routers.parameters(),
                                                                    *model.model.parameters()])
    with FlopCounterMode(display=False, custom_mapping={SDPA_CPU: _sdpa_flops}) as counter:
        out, st = _state(model, ids)
    assert float(out.stats["flops/executed"]) == counter.get_total_flops()
    assert float(out.stats["flops/ideal"]) == model.forward_flops(T, B=B)  # training top-k: nominal capacity
    with pytest.raises(ValueError, match="expert-choice"):
        tiny(router_type="token", causal_path="aux_router")


def test_expert_choice_adds_the_gated_block_output_to_the_stream_entering_the_recursion():
    """x_kept + alpha * sigmoid(score) * block(x_kept) [MoR code]: at alpha = 0 every recursion leaves the stream
    entering it unchanged (streams: the embedding, then one per application; recursion r's last is 3 + 2r)."""
    model = varied(tiny(router_alpha=0.0))
    trace = Trace(keep_streams=True)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 12)), trace=trace)
    st = trace.ctx.state
    for r in range(3):
        assert st.keep[r].any()
        torch.testing.assert_close(trace.streams[3 + 2 * r], st.start[r])
    model = varied(tiny())
    _, st = _state(model, torch.randint(0, 256, (2, 12)))
    for r in range(3):
        score = model.routers[r](st.start[r]).squeeze(-1)
        torch.testing.assert_close(st.weight[r], 0.1 * torch.sigmoid(score))


def test_the_causal_predictors_bce_is_a_mean_over_each_recursions_candidates():
    model = varied(tiny()).train()
    ids = torch.randint(0, 256, (2, 12))
    out, st = _state(model, ids)
    expected = 0.0
    for r in range(3):
        pool = torch.ones_like(st.keep[0]) if r == 0 else st.keep[r - 1]
        logit = model.routers[r](st.start[r]).squeeze(-1)
        expected += 0.1 * F.binary_cross_entropy_with_logits(logit[pool], st.keep[r][pool].float())
    torch.testing.assert_close(out.aux_loss, expected)


def test_calibrate_says_mor_has_no_thresholds():
    """`calibrate` (and `dyndepth calibrate`) on a MoR model raised AttributeError: 'RecursionRouting' object has no
    attribute 'recording' (a stack trace from the shell)."""
    from dyndepth.methods import calibrate

    with pytest.raises(ValueError, match="MoR has no thresholds to calibrate"):
        calibrate(MoRLM(tiny()), [torch.randint(0, 256, (2, 8))], budget=0.3)


def test_attaching_a_method_says_mor_takes_none():
    """GateSkip or DND on a MoR model (`--method dnd` with a MoR preset) said "the model already carries method 'mor';
    load the base model to attach 'dnd' instead": a MoR model has no base model to load, its routing is the method."""
    from dyndepth.methods import attach_method

    for name in ("gateskip", "dnd", "mod"):
        with pytest.raises(ValueError, match=rf"MoRLM routes its recursions through its own method 'mor'.*'{name}'"):
            attach_method(MoRLM(tiny()), name, None)
