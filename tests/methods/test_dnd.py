"""Dynamic Nested Depth: neutral settings, the fast path against a slow per-row reference written without the
method, batch and document independence, cached decoding (dense and MoE, left padding, invalidation), the
router controlling loss, the threshold controller, FLOPs against torch's counter, training, save / load."""

import contextlib
import json
import shutil

import pytest
import torch
from test_compute import counted, padded_batch
from typer.testing import CliRunner

import dyndepth
from dyndepth import CausalLM, KVCache, preset
from dyndepth.cli import app
from dyndepth.core.accounting import accounting
from dyndepth.core.method import Method
from dyndepth.methods import DNDConfig, DNDHook, attach_dnd, attach_method, calibrate
from dyndepth.methods.dnd import compact_positions, router_losses, topk_per_document
from dyndepth.methods.dnd_analysis import without_method
from dyndepth.methods.registry import reconfigure_method
from opcount import OpCounter


def dnd_model(name="tiny-qwen3", beta=0.5, std=1.0, **cfg):
    """A tiny model with DND on both layers, routers spread (p far from tau for most tokens) and a large beta,
    so nesting changes the logits clearly."""
    torch.manual_seed(0)
    model = CausalLM(preset(name)).eval()
    method = attach_dnd(model, DNDConfig(**{"layers": (0, 1), **cfg}))
    with torch.no_grad():
        for d in method.layer_dnd:
            d.router.weight.normal_(0, std)
            d.beta.fill_(beta)
    return model, method


# How the nested pass attends: `positions` alone, or the TaH-style ablation (nested queries also see the vanilla K/V)
NESTED = {"compact": {"positions": "compact"}, "original": {"positions": "original"},
          "tah": {"positions": "original", "nested_attends_vanilla": True}}


def left_padded(B=3, T=12):
    ids = torch.randint(0, 256, (B, T))
    mask = torch.ones_like(ids)
    mask[1, :T // 3] = 0
    mask[2, :T // 2 + 1] = 0
    return ids, mask


def reference_logits(model, ids, mask=None) -> list[torch.Tensor]:
    """Slow DND, written without the method: per row (its real tokens only), per layer, the plain layer; then
    the tokens with p > tau alone, at positions 0..n-1 (compact) or their own, through the same layer again,
    mixed as (beta p) x^d + (1 - beta p) x^v. Returns each row's logits (n_b, V)."""
    method = model.method
    cfg = method.config
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    rows = []
    for b in range(ids.shape[0]):
        row = ids[b:b + 1, valid[b]]  # (1, n)
        x = model.model.embed_tokens(row)
        ctx = model.make_context(row, None, None, None)
        for i, layer in enumerate(model.model.layers):
            x = layer.block(x, ctx, i)
            if i not in method.layers:
                continue
            p = torch.sigmoid(layer.dnd.router(x.float()))[0, :, 0]  # (n,)
            sel = (p > layer.dnd.tau).nonzero().flatten() if cfg.ratio < 1 else torch.arange(row.shape[1])
            if len(sel) == 0:
                continue
            pos = torch.arange(len(sel)) if cfg.positions == "compact" else sel
            xs = x[:, sel]
            xd = layer.block(xs, model.make_context(row[:, sel], None, pos[None], None), i)
            w = (layer.dnd.beta * p[sel])[None, :, None]
            x = x.clone()
            x[:, sel] = w * xd + (1 - w) * xs
        rows.append(model.lm_head(model.model.norm(x))[0])
    return rows


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_beta_zero_or_no_selection_gives_exactly_the_base_model(name):
    torch.manual_seed(0)
    base = CausalLM(preset(name)).eval()
    ids, mask = left_padded()
    with torch.no_grad():
        ref = base(ids, attention_mask=mask).logits
    model, method = dnd_model(name, beta=0.0)
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        assert torch.equal(out.logits, ref)
        assert 0.2 < float(out.stats["dnd/selected"]) < 0.8  # tokens were nested, with weight 0
        for d in method.layer_dnd:
            d.beta.fill_(0.5)
            d.tau.fill_(1.0)  # p < 1: the router selects nothing
        none = model(ids, attention_mask=mask)
        assert torch.equal(none.logits, ref) and float(none.stats["dnd/selected"]) == 0.0
        assert 0 < float(none.stats["dnd/flops_overhead"]) < 0.01  # the routers only


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe", "tiny-qwen2", "tiny-llama"])
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_fast_path_equals_the_slow_per_row_reference(name, positions):
    model, _ = dnd_model(name, positions=positions)
    ids, mask = left_padded()
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        ref = reference_logits(model, ids, mask)
    for b, ref_b in enumerate(ref):
        torch.testing.assert_close(got.logits[b, mask[b].bool()], ref_b, atol=2e-5, rtol=0)
    assert 0.2 < float(got.stats["dnd/selected"]) < 0.8


def test_a_rows_logits_do_not_change_when_other_rows_join_its_batch():
    model, _ = dnd_model()
    ids = torch.randint(0, 256, (4, 16))
    with torch.no_grad():
        batch = model(ids).logits
        alone = [model(ids[b:b + 1]).logits[0] for b in range(4)]
    for b in range(4):
        torch.testing.assert_close(batch[b], alone[b], atol=1e-5, rtol=0)


@pytest.mark.parametrize("nested", list(NESTED))
def test_nested_attention_never_crosses_documents_and_compact_positions_restart_per_document(nested):
    model, _ = dnd_model(**NESTED[nested])  # (the TaH-style variant's concatenated keys carry documents too)
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 9))
    packed = torch.cat([a, b], 1)
    doc_ids = torch.cat([torch.zeros(1, 7), torch.ones(1, 9)], 1).long()
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    trace = dyndepth.Trace()
    with torch.no_grad():
        got = model(packed, positions=positions, doc_ids=doc_ids, trace=trace).logits
        alone = torch.cat([model(a).logits, model(b).logits], 1)
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
    keep = trace.ctx.state.keep[1]
    assert keep[0, :7].any() and keep[0, 7:].any()  # both documents nest some tokens
    pos = compact_positions(keep, doc_ids)
    assert pos[0, 7] == 0 and pos[0, -1] == keep[0, 7:-1].sum()


def _prefill_then_decode(model, ids, mask, P):
    B, T = ids.shape
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = KVCache.for_model(model.config, B, T, num_slots=model.num_slots())
    steps = [model(ids[:, :P], attention_mask=mask[:, :P], positions=pos[:, :P], cache=cache).logits]
    for t in range(P, T):
        steps.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits)
    return torch.cat(steps, 1), cache


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
@pytest.mark.parametrize("nested", list(NESTED))
def test_prefill_plus_decode_equals_the_full_forward_with_left_padding(name, nested):
    model, method = dnd_model(name, **NESTED[nested])
    ids, mask = left_padded(T=14)
    trace = dyndepth.Trace()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, trace=trace).logits
        got, cache = _prefill_then_decode(model, ids, mask, P=9)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], full[valid], atol=1e-5, rtol=0)
    assert model.num_slots() == 4 and method.nested_slot == {0: 2, 1: 3}
    for layer, nslot in method.nested_slot.items():  # the nested slot holds the selected tokens only
        selected = trace.ctx.state.keep[layer]
        assert torch.equal(cache.valid[nslot, :, :14].sum(1), selected.sum(1))
        assert cache.valid[layer, :, :14].sum() == valid.sum()
    assert len({int(n) for n in trace.ctx.state.keep[1].sum(1)}) > 1  # rows selected differently


def test_greedy_generate_equals_argmax_of_the_full_forward():
    model, _ = dnd_model()
    ids, mask = left_padded(T=6)
    out = model.generate(ids, 6, attention_mask=mask, stop_tokens=[])
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq, attention_mask=m).logits[:, -1:].argmax(-1)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("control", ["threshold", "topk"])
def test_generate_in_train_mode_decodes_as_in_eval_and_feeds_nothing_to_the_controller(control):
    """A cached forward is a decoding forward whatever the module mode (as MoR's, Huginn's and Dreamer's are): a
    `generate` from a model left in train mode (a sample taken mid-training) ranked each one-token step by top-k
    (control="topk": other tokens than the full forward) and pushed every step's scores into the buffer the
    threshold controller moves tau by."""
    model, method = dnd_model(control=control)
    ids, mask = left_padded(T=8)
    out = model.generate(ids, 6, attention_mask=mask, stop_tokens=[])
    model.train()
    assert torch.equal(model.generate(ids, 6, attention_mask=mask, stop_tokens=[]), out)
    assert all(len(buffer) == 0 for buffer in method.scores_buffer.values())
    model(ids, attention_mask=mask)  # a training forward still records
    assert all(len(buffer) == 1 for buffer in method.scores_buffer.values())


def _prefilled(nested: str, prefill: int = 8):
    """DND (`NESTED[nested]`) on a left-padded 3 x 14 batch: (model, method, ids, mask, positions, a cache holding the
    first `prefill` tokens, the full forward's logits)."""
    model, method = dnd_model(**NESTED[nested])
    ids, mask = left_padded(T=14)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = KVCache.for_model(model.config, 3, 14, num_slots=model.num_slots())
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        model(ids[:, :prefill], attention_mask=mask[:, :prefill], positions=pos[:, :prefill], cache=cache)
    return model, method, ids, mask, pos, cache, full


@pytest.mark.parametrize("nested", ["compact", "tah"])
@pytest.mark.parametrize("draft", ["block", "steps"])
def test_invalidate_drops_stale_nested_entries_so_a_rewritten_suffix_matches_the_full_forward(nested, draft):
    """A rejected draft written as one block or one decode step at a time (the decode-step path, whose nested entries
    carry their real positions: a stale compact entry survived when the step did not pass them)."""
    model, method, ids, mask, pos, cache, full = _prefilled(nested)
    with torch.no_grad():
        slots = range(model.num_slots())  # the layers' slots, then the nested ones
        prefix = [cache.count(s).clone() for s in slots]
        wrong = torch.randint(0, 256, (3, 4))  # a rejected draft: its nested entries must not survive
        for t in ([slice(0, 4)] if draft == "block" else [slice(t, t + 1) for t in range(4)]):
            model(wrong[:, t], positions=pos[:, 8:12][:, t], cache=cache)
        drafted = [cache.count(s) for s in slots]
        assert all((drafted[s] > prefix[s]).any() for s in method.nested_slot.values())  # the draft nested tokens
        cache.invalidate(pos[:, 8])
        for s in slots:  # every entry of the rejected tokens is gone, in the sparse nested slots too
            assert torch.equal(cache.count(s), prefix[s]), s
        if draft == "block":  # a verification block
            got = model(ids[:, 8:], positions=pos[:, 8:], cache=cache).logits
        else:  # the true continuation decoded step by step
            got = torch.cat([model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits
                             for t in range(8, 14)], 1)
    valid = mask[:, 8:].bool()
    torch.testing.assert_close(got[valid], full[:, 8:][valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("nested", list(NESTED))
@pytest.mark.parametrize("draft", ["block", "steps"])
def test_feeding_positions_again_without_invalidate_rewrites_them_as_plain_slots_are(nested, draft):
    """A cached forward at positions already written replaces what was there, in the nested slots too: a compact slot
    used to append (duplicate keys, every later column shifted by one; 0.02 off the full forward) and an original
    one kept a stale entry where the new token does not nest."""
    model, method, ids, mask, pos, cache, full = _prefilled(nested)
    with torch.no_grad():
        for t in range(8, 11):  # decode three tokens, then send positions 9.. again, the second time with the truth
            model(ids[:, t:t + 1] if t == 8 else torch.randint(0, 256, (3, 1)), positions=pos[:, t:t + 1], cache=cache)
        if draft == "block":
            got = model(ids[:, 9:], positions=pos[:, 9:], cache=cache).logits
        else:
            got = torch.cat([model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits
                             for t in range(9, 14)], 1)
        again = KVCache.for_model(model.config, 3, 14, num_slots=model.num_slots())
        model(ids, attention_mask=mask, positions=pos, cache=again)  # what the nested slots hold without the detour
    for s in method.nested_slot.values():
        assert torch.equal(cache.count(s), again.count(s)), s
    valid = mask[:, 9:].bool()
    torch.testing.assert_close(got[valid], full[:, 9:][valid], atol=1e-5, rtol=0)


def test_a_cached_forward_through_a_row_view_rewrites_its_rows_only():
    """Rows 0 and 2 decode a step through `cache.rows`, then row 1 sends its position 6 again: each matches the full
    forward, and no row loses another's nested entries (invalidate ignored the view: a shape error, or every row)."""
    model, method = dnd_model(positions="compact", std=3.0)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12).expand(3, -1)
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.for_model(model.config, 3, 16, num_slots=model.num_slots())
        model(ids[:, :10], positions=pos[:, :10], cache=cache)
        counts = [cache.count(s).clone() for s in method.nested_slot.values()]
        rows = torch.tensor([0, 2])
        step = model(ids[rows, 10:11], positions=pos[rows, 10:11], cache=cache.rows(rows)).logits
        torch.testing.assert_close(step[:, 0], full[rows, 10], atol=1e-5, rtol=0)
        for s, before in zip(method.nested_slot.values(), counts):
            assert cache.count(s)[1] == before[1]  # row 1 untouched
        again = model(ids[1:2, 6:7], positions=pos[1:2, 6:7], cache=cache.rows(torch.tensor([1]))).logits
        torch.testing.assert_close(again[0, 0], full[1, 6], atol=1e-5, rtol=0)
        fresh = KVCache.for_model(model.config, 1, 16, num_slots=model.num_slots())
        model(ids[1:2, :7], positions=pos[1:2, :7], cache=fresh)
        after = [cache.count(s) for s in method.nested_slot.values()]
        for s, now, before in zip(method.nested_slot.values(), after, counts):
            assert now[1] == fresh.count(s)[0]  # row 1 holds what a prefill of its first 7 tokens leaves
            assert now[0] >= before[0] and now[2] >= before[2]  # the others keep theirs


def test_router_losses_per_sequence_without_pad_and_the_sign_flag():
    torch.manual_seed(0)
    p = torch.rand(2, 6, requires_grad=True)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False
    sd, dp = router_losses(p, valid, None)
    ref_sd, ref_dp = [], []
    for b in range(2):
        s = p[b, valid[b]]
        q = s / s.sum()
        ref_sd.append((q * q.log()).sum() / torch.log(torch.tensor(float(len(s)))))
        ref_dp.append(((s - 0.5) ** 2).mean())
    torch.testing.assert_close(sd, torch.stack(ref_sd).mean())
    torch.testing.assert_close(dp, torch.stack(ref_dp).mean())
    flipped, _ = router_losses(p, valid, None, "minimize_entropy")
    torch.testing.assert_close(flipped, -sd)
    sd.backward()  # minimising -H(q) spreads the mass: the largest score is pushed down
    assert p.grad[0, p[0].argmax()] > 0
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)  # documents are sequences of their own
    sd_docs, dp_docs = router_losses(p.detach(), torch.ones_like(valid), docs)
    halves = router_losses(p.detach().reshape(4, 3), torch.ones(4, 3, dtype=torch.bool), None)
    torch.testing.assert_close((sd_docs, dp_docs), halves)  # both means are over the 4 documents, not the 2 rows
    single = torch.tensor([[0, 0, 0, 0, 0, 1]] * 2)  # a one-token document has no entropy to spread: left out
    sd_single, _ = router_losses(p.detach(), torch.ones_like(valid), single)
    fives = router_losses(p.detach()[:, :5], torch.ones(2, 5, dtype=torch.bool), None)[0]
    torch.testing.assert_close(sd_single, fives)  # (log 1 = 0 made it 0 / 0 = nan)


def test_controller_drives_a_synthetic_score_stream_to_the_target_within_five_percent():
    model, method = dnd_model(ratio=0.2)
    (hook,) = method.trainer_hooks(400)
    g = torch.Generator().manual_seed(0)
    tail = []
    for step in range(1, 401):
        shift = 0.0 if step <= 200 else 1.0  # the score distribution moves halfway through
        stats = {}
        for i, d in zip(method.layers, method.layer_dnd):
            p = torch.sigmoid(torch.randn(2048, generator=g) * (1 + i) + shift)
            stats[f"dnd/selected/L{i}"] = (p > d.tau).float().mean()
            method.record_scores(i, p)
            if step > 330:
                tail.append(float(stats[f"dnd/selected/L{i}"]))
        logged = hook.after_step(model, step, stats, None)
    assert max(abs(a - 0.2) for a in tail) < 0.05
    assert set(logged) == {"ratio_error", "tau/L0", "tau/L1", "selected/L0", "selected/L1", "selected"}
    # the EMA targets: the quantile selects exactly the target share of the buffer; the top-k mean lies above
    quantile = hook.targets()
    buffered = torch.cat(list(method.scores_buffer[0]))
    assert int((buffered > quantile[0]).sum()) == round(0.2 * buffered.numel())
    method.configure(DNDConfig(layers=(0, 1), ema_target="topk_mean"))
    assert (hook.targets() > quantile).all()


@pytest.mark.parametrize("ema_target", ["quantile", "topk_mean"])
def test_the_ema_sync_lerps_tau_by_gamma_toward_the_buffers_target_every_sync_every_steps(ema_target):
    # every step tau += alpha (actual - target); then, at steps divisible by sync_every, tau += gamma (the buffer's
    # target threshold - tau). alpha and gamma far from their defaults, so ignoring either shows.
    model, method = dnd_model(ratio=0.25, alpha=0.1, gamma=0.3, sync_every=3, ema_target=ema_target)
    (hook,) = method.trainer_hooks(10)
    g = torch.Generator().manual_seed(0)
    scores = {i: torch.rand(2, 10, generator=g) for i in method.layers}  # two forwards of 10 scores per layer
    for i in method.layers:
        for forward in scores[i]:
            method.record_scores(i, forward)

    def target(s):  # 20 distinct buffered scores, ratio 0.25: k = 5
        top = s.flatten().sort(descending=True).values
        return float((top[4] + top[5]) / 2 if ema_target == "quantile" else top[:5].mean())

    actual = {0: 0.4, 1: 0.1}
    stats = {f"dnd/selected/L{i}": torch.tensor(actual[i]) for i in method.layers}
    for step in range(1, 7):
        before = [float(d.tau) for d in method.layer_dnd]
        logged = hook.after_step(model, step, stats, None)
        for i, d, tau in zip(method.layers, method.layer_dnd, before):
            expected = tau + 0.1 * (actual[i] - 0.25)  # the proportional step first
            if step % 3 == 0:
                expected += 0.3 * (target(scores[i]) - expected)  # then the lerp toward the buffer's target
            assert float(d.tau) == pytest.approx(expected, abs=1e-6), (step, i)
            assert logged[f"tau/L{i}"] == float(d.tau)
    assert abs(float(method.layer_dnd[0].tau) - 0.5) > 0.1  # tau moved well within (0, 1): nothing clamped


def test_training_gradients_losses_and_moe_balancing_of_nested_tokens():
    model, method = dnd_model("tiny-qwen3-moe", std=0.1)
    model.train()
    ids = torch.randint(0, 256, (2, 16))
    trace = dyndepth.Trace()
    out = model(ids, trace=trace)
    assert {"dnd/sd_loss", "dnd/dp_loss", "dnd/beta", "moe/balance_loss"} <= set(out.stats)
    assert len(trace.ctx.aux) == 4  # two vanilla and two nested MoE calls feed the balancing loss
    (out.logits.pow(2).mean() + out.aux_loss).backward()
    d = model.model.layers[1].dnd
    assert d.router.weight.grad.abs().sum() > 0 and d.beta.grad.abs().sum() > 0
    assert not d.tau.requires_grad and len(method.scores_buffer[1]) == 1
    model.zero_grad()
    with torch.no_grad():
        for dd in method.layer_dnd:
            dd.tau.fill_(1.0)
    out = model(ids)  # nothing nested: beta and router still take part (DDP needs every parameter)
    (out.logits.sum() + out.aux_loss).backward()
    assert d.beta.grad is not None and d.router.weight.grad is not None


def test_topk_control_selects_the_ratio_per_sequence_in_training_and_tau_at_inference():
    model, _ = dnd_model(control="topk", ratio=0.25)
    ids, mask = left_padded(T=12)
    trace = dyndepth.Trace()
    model.train()
    model(ids, attention_mask=mask, trace=trace)
    keep = trace.ctx.state.keep[0]
    assert keep.sum(1).tolist() == [3, 2, 2]  # ceil(0.25 * n) of each row's real tokens
    model.eval()
    with torch.no_grad():
        p = trace.ctx.state.scores[0]
        trace = dyndepth.Trace()
        model(ids, attention_mask=mask, trace=trace)
    assert torch.equal(trace.ctx.state.keep[0], (p > 0.5) & mask.bool())


def test_topk_control_in_a_packed_row_selects_per_document_what_each_document_selects_alone():
    model, _ = dnd_model(control="topk", ratio=0.25)
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 9))
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], 1)  # two documents, then 3 PAD
    mask = torch.ones_like(packed)
    mask[0, 16:] = 0
    doc_ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 3])
    positions = torch.cat([torch.arange(7), torch.arange(9), torch.arange(3)])[None]
    traces = [dyndepth.Trace() for _ in range(3)]
    model.train()
    with torch.no_grad():
        model(packed, attention_mask=mask, positions=positions, doc_ids=doc_ids, trace=traces[0])
        model(a, trace=traces[1])
        model(b, trace=traces[2])
    for layer in (0, 1):
        alone = torch.cat([traces[1].ctx.state.keep[layer], traces[2].ctx.state.keep[layer],
                           torch.zeros(1, 3, dtype=torch.bool)], 1)
        assert torch.equal(traces[0].ctx.state.keep[layer], alone), layer
        assert alone[0, :7].sum() == 2 and alone[0, 7:].sum() == 3  # ceil(0.25 * 7), ceil(0.25 * 9); the row: 4


def test_topk_control_tau_tracks_the_top_k_threshold_so_inference_selects_what_training_did():
    # no proportional step under control="topk"; the EMA sync (gamma 1 here) sets tau to the buffer's top-k
    # threshold, so the causal p > tau at inference selects the top-k of the training forward
    model, method = dnd_model(control="topk", ratio=0.25, gamma=1.0, sync_every=2)
    (hook,) = method.trainer_hooks(10)
    ids = torch.randint(0, 256, (1, 14))
    trace = dyndepth.Trace()
    model.train()
    with torch.no_grad():
        out = model(ids, trace=trace)
    trained = dict(trace.ctx.state.keep)
    hook.after_step(model, 1, out.stats, None)
    assert [float(d.tau) for d in method.layer_dnd] == [0.5, 0.5]  # not a sync step: tau stays
    hook.after_step(model, 2, out.stats, None)
    model.eval()
    trace = dyndepth.Trace()
    with torch.no_grad():
        model(ids, trace=trace)
    for layer in method.layers:
        assert trained[layer].sum() == 4  # ceil(0.25 * 14)
        assert torch.equal(trace.ctx.state.keep[layer], trained[layer]), layer
    # under topk a run shorter than sync_every ends synced at the buffer's target (it saved tau_init: inference
    # nested 2-3x the ratio); threshold control's tau moves every step and syncs on its schedule alone
    taus = {}
    for control, total in (("topk", 3), ("topk", 10), ("threshold", 3), ("threshold", 10)):
        model, method = dnd_model(control=control, ratio=0.25, gamma=0.5, sync_every=50)
        (hook,) = method.trainer_hooks(total)
        model.train()
        for step in (1, 2, 3):
            with torch.no_grad():
                out = model(torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(step)))
            hook.after_step(model, step, out.stats, None)
        taus[control, total] = torch.stack([d.tau.reshape(()) for d in method.layer_dnd])
        if (control, total) == ("topk", 3):
            torch.testing.assert_close(taus[control, total], hook.targets())
    assert torch.equal(taus["topk", 10], torch.full((2,), 0.5))  # step 3 of 10: no sync yet
    assert not torch.allclose(taus["topk", 3], taus["topk", 10])
    assert torch.equal(taus["threshold", 3], taus["threshold", 10])


def test_ratio_one_nests_every_token_and_the_fixed_control_never_moves_tau():
    model, _ = dnd_model(ratio=1.0)
    ids, mask = left_padded()
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        ref = reference_logits(model, ids, mask)
    assert float(out.stats["dnd/selected"]) == 1.0
    torch.testing.assert_close(out.logits[0], ref[0], atol=2e-5, rtol=0)
    _, fixed = dnd_model(control="fixed")
    (hook,) = fixed.trainer_hooks(10)
    for i in fixed.layers:  # a buffer to sync toward, and a ratio far off the target in both layers
        fixed.record_scores(i, torch.rand(100, generator=torch.Generator().manual_seed(i)))
    stats = {"dnd/selected/L0": torch.tensor(1.0), "dnd/selected/L1": torch.tensor(0.0)}
    assert hook.after_step(None, 50, stats, None) == {"tau/L0": 0.5, "tau/L1": 0.5, "selected/L0": 1.0,
                                                      "selected/L1": 0.0, "selected": 0.5}


def test_a_positive_tau_offset_raises_every_threshold_and_nests_fewer_tokens():
    """override(tau_offset=d) selects p > tau + d in every DND layer (a positive offset nests fewer tokens)."""
    model, method = dnd_model()
    ids = torch.randint(0, 256, (2, 16))
    for offset in (0.2, -0.2):
        trace = dyndepth.Trace()
        with method.override(tau_offset=offset), torch.no_grad():
            model(ids, trace=trace)
        st = trace.ctx.state
        for slot, keep in st.keep.items():
            assert torch.equal(keep, st.scores[slot] > model.model.layers[slot].dnd.tau + offset)


def test_the_score_buffer_keeps_at_most_buffer_tokens_per_forward():
    _, method = dnd_model(buffer_tokens=20)
    for n, kept in ((20, 20), (21, 11), (45, 15)):  # stride ceil(n / 20)
        method.record_scores(0, torch.rand(n))
        assert method.scores_buffer[0][-1].numel() == kept


def test_the_threshold_controller_keeps_tau_within_the_sigmoid_range():
    _, method = dnd_model(alpha=1.0)
    (hook,) = method.trainer_hooks(10)
    full = {"dnd/selected/L0": torch.tensor(1.0), "dnd/selected/L1": torch.tensor(0.0)}
    assert hook.after_step(None, 1, full, None) == pytest.approx({"ratio_error": 0.5, "tau/L0": 1.0, "tau/L1": 0.3,
                                                                  "selected/L0": 1.0, "selected/L1": 0.0,
                                                                  "selected": 0.5})
    assert hook.after_step(None, 2, full, None)["tau/L1"] == pytest.approx(0.1)
    assert hook.after_step(None, 3, full, None)["tau/L1"] == 0.0  # 0.1 - 0.2: clamped at 0


def test_topk_per_document_ranks_real_tokens_only():
    """PAD never takes a place among a document's top k, however high its score."""
    p = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.3, 0.4]])
    valid = torch.tensor([[False, False, True, True, True, True]])
    keep = topk_per_document(p, valid, torch.zeros(1, 6, dtype=torch.long), 0.5)
    assert keep.tolist() == [[False, False, False, False, True, True]]  # k = ceil(0.5 * 4) of the real tokens


def test_reconfiguring_resizes_the_score_buffer_and_beta_is_logged_as_the_layers_mean():
    model, method = dnd_model()
    method.configure(DNDConfig(layers=(0, 1), buffer_batches=2))
    for _ in range(3):
        method.record_scores(0, torch.rand(8))
    assert len(method.scores_buffer[0]) == 2  # (it kept the old maxlen of 50)
    with torch.no_grad():
        method.layer_dnd[1].beta.fill_(0.1)  # layer 0 keeps 0.5
    stats = model.train()(torch.randint(0, 256, (2, 8))).stats
    assert float(stats["dnd/beta"]) == pytest.approx(0.3)


def test_nested_attends_vanilla_sees_earlier_vanilla_keys_and_generates_from_the_cache():
    with pytest.raises(ValueError, match="original"):
        DNDConfig(nested_attends_vanilla=True)
    model, method = dnd_model(**NESTED["tah"])
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        out = model(ids).logits
        alone, prefix = model(ids[:1]).logits, model(ids[:, :6]).logits
        method.configure(DNDConfig(layers=(0, 1), positions="original"))
        selected_only = model(ids).logits  # the same selections, nested keys from selected tokens only
        method.configure(DNDConfig(layers=(0, 1), **NESTED["tah"]))
        generated = model.generate(ids, 4, stop_tokens=[])
        seq = ids
        for _ in range(4):  # greedy by full forwards, which recompute the vanilla K/V instead of reading the cache
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=0)  # row-independent
    torch.testing.assert_close(out[:, :6], prefix, atol=1e-5, rtol=0)  # causal
    assert (out - selected_only).abs().amax() > 1e-3
    assert torch.equal(generated, seq)


@pytest.mark.parametrize("nested", ["compact", "tah"])
def test_executed_flops_equal_torch_in_prefill_and_decode_and_overhead_is_reported(nested):
    model, method = dnd_model(**NESTED[nested])
    ids, mask = padded_batch()
    out, torch_flops = counted(model, ids, attention_mask=mask)
    assert float(out.stats["flops/executed"]) == torch_flops
    assert float(out.stats["flops/ideal"]) > float(out.stats["flops/dense"])
    D = model.config.hidden_size  # ideal: each DND layer's router scores the real tokens only, PAD not
    assert float(out.compute.total("ideal", part="router")) == len(method.layers) * int(mask.sum()) * 2 * D
    extra = sum(float(out.compute.total("executed", slot=s)) for s in method.nested_slot.values())
    extra += float(out.compute.total("executed", part="router"))
    overhead = extra / (float(out.stats["flops/executed"]) - extra)
    assert float(out.stats["dnd/flops"]) == extra
    assert float(out.stats["dnd/flops_overhead"]) == pytest.approx(overhead, rel=1e-6)
    ideal = sum(float(out.compute.total("ideal", slot=s)) for s in method.nested_slot.values())
    ideal += float(out.compute.total("ideal", part="router"))
    ideal_overhead = ideal / (float(out.stats["flops/ideal"]) - ideal)
    assert float(out.stats["dnd/flops_overhead_ideal"]) == pytest.approx(ideal_overhead, rel=1e-6)
    assert isinstance(method, Method)  # the full typed contract
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = KVCache.for_model(model.config, 3, 20, num_slots=model.num_slots())
    counted(model, ids, attention_mask=mask, positions=pos, cache=cache)
    partial = 0
    for t in range(4):
        out, torch_flops = counted(model, torch.randint(0, 256, (3, 1)), positions=pos[:, -1:] + 1 + t, cache=cache)
        assert float(out.stats["flops/executed"]) == torch_flops
        for s in method.nested_slot.values():  # only the rows that selected the new token ran the nested pass
            ran = out.compute.tokens.get((s, "mlp"), 0)
            assert out.compute.total("executed", "mlp", s) == out.compute.total("ideal", "mlp", s)
            partial += 0 < ran < 3
    assert partial > 0


def test_a_checkpoints_band_may_be_written_another_way_but_not_changed():
    """`reconfigure_method` (a post-training recipe on a DND checkpoint) compares the layers a band selects: (0, -1)
    is (0, 1) on a 2-layer model; another band or router_bias would not fit the saved parameters."""
    model = CausalLM(preset("tiny-qwen3"))
    attach_dnd(model, DNDConfig(layers=(0, 1)))
    assert reconfigure_method(model, "dnd", {"layers": [0, -1], "sd_weight": 0.5}).config.sd_weight == 0.5
    with pytest.raises(ValueError, match="dnd.layers cannot change once attached.*layers 0-1.*selects 1-1"):
        reconfigure_method(model, "dnd", {"layers": [1, 1]})
    with pytest.raises(ValueError, match="router_bias cannot change"):
        reconfigure_method(model, "dnd", {"router_bias": False})


def test_config_errors_and_no_calibration():
    model = CausalLM(preset("tiny-qwen3"))
    with pytest.raises(ValueError, match="no band"):
        attach_dnd(model, DNDConfig())  # (4, -5) of a 2-layer model
    with pytest.raises(ValueError, match="positions"):
        DNDConfig(positions="rope")
    method = attach_method(model, "dnd", {"layers": [1, 1], "ratio": 0.3})
    assert method.layers == [1] and method.config.layers == (1, 1) and not hasattr(model.model.layers[0], "dnd")
    with pytest.raises(ValueError, match="no calibration"):
        calibrate(model, [torch.randint(0, 256, (1, 4))])
    with pytest.raises(ValueError, match="knob"):
        method.override(budget=0.3).__enter__()


@pytest.mark.parametrize("options, message", [
    ({"layers": 2}, r"layers=2 must be an inclusive band .* a single layer i is \(i, i\)"),
    ({"layers": [1.5, 2]}, "must be an inclusive band"),
    ({"ratio": "abc"}, "DNDConfig.ratio='abc' must be a float, like its default 0.2"),
    ({"sync_every": 2.5}, "sync_every=2.5 must be an int"),
    ({"gamma": 2.0}, r"gamma=2.0 must lie in \[0, 1\]"),
    ({"alpha": -1.0}, "alpha=-1.0 must be >= 0"),
    ({"tau_init": 1.5}, r"tau_init=1.5 must lie in \[0, 1\]"),
    ({"ratio": 20}, r"ratio=20.0 must lie in \(0, 1\]: .* \(0.2 for 20%\).*method.name = \"none\""),
    ({"control": None}, r"dnd.control=None is not one of \('threshold', 'topk', 'fixed'\)")])
def test_recipe_options_of_the_wrong_type_or_range_are_named(options, message):
    """What `--set method.layers=2` and its kind pass: one ValueError naming the option (were TypeErrors from
    inside the method, or a controller that ran backwards)."""
    with pytest.raises(ValueError, match=message):
        attach_method(CausalLM(preset("tiny-qwen3")), "dnd", {"layers": [0, 1], **options})


def test_save_load_and_cli_posttraining_export_round_trip(tmp_path):
    model, method = dnd_model(positions="original", ratio=0.3)
    with torch.no_grad():
        model.model.layers[1].dnd.tau.fill_(0.625)
    model.save_pretrained(tmp_path / "dnd")
    loaded = dyndepth.from_pretrained(tmp_path / "dnd").eval()
    assert loaded.method.to_dict() == method.to_dict()
    assert float(loaded.model.layers[1].dnd.tau) == 0.625 and loaded.model.layers[1].dnd.tau.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert "model.layers.0.dnd.router.bias" in loaded.state_dict()

    base = CausalLM(preset("tiny-qwen3", vocab_size=264))
    base.save_pretrained(tmp_path / "base")
    recipe = tmp_path / "post.toml"
    recipe.write_text(
        f'[model]\npretrained = "{tmp_path / "base"}"\n'
        '[method]\nlayers = [0, 1]\nratio = 0.3\nrouter_init_std = 0.02\n'
        f'[train]\nsteps = 3\nbatch_size = 2\nseq_len = 32\nwarmup = 1\nlr = 1e-3\nmin_lr = 1e-4\nlog_every = 1\n'
        f'progress = false\nplot = false\ndevice = "cpu"\neval_batches = 1\nout_dir = "{tmp_path / "run"}"\n'
        '[data]\nsource = "embedded"\nsynthetic_examples = 100\nstdlib_bytes = 10000\n')
    result = CliRunner().invoke(app, ["train", str(recipe), "--method", "dnd"])
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    taus = [r["dnd/tau/L1"] for r in records if "dnd/tau/L1" in r]
    assert len(taus) == 3 and taus[-1] != 0.5 and any("dnd/sd_loss" in r for r in records)
    tuned = dyndepth.from_pretrained(tmp_path / "run" / "model")
    assert tuned.method.name == "dnd" and float(tuned.model.layers[1].dnd.tau) == pytest.approx(taus[-1])
    assert isinstance(tuned.method.trainer_hooks(1)[0], DNDHook)


@pytest.mark.parametrize("recipe", ["dnd_posttrain.toml", "tiny_dnd.toml"])
def test_recipes_are_valid_and_the_sft_baseline_differs_in_one_key(recipe):
    from pathlib import Path

    from dyndepth.methods.common import make_config
    from dyndepth.runconfig import load_run_config
    from dyndepth.train.run import build_hooks

    path = Path(__file__).parents[2] / "recipes" / recipe
    dnd, sft = load_run_config(path), load_run_config(path, ["method.name=none"])
    plain = CausalLM(preset("tiny-qwen3"))
    assert dnd.method["name"] == "dnd" and build_hooks(sft.method, plain) == [] and plain.method is None
    assert {**dnd.to_dict(), "method": None} == {**sft.to_dict(), "method": None}
    assert {k: v for k, v in dnd.method.items() if k != "name"} == {k: v for k, v in sft.method.items() if k != "name"}
    cfg = make_config(DNDConfig, dnd.method)  # every option is a DNDConfig field
    if recipe == "dnd_posttrain.toml":
        assert cfg.band(28) == list(range(4, 24)) and cfg.ratio == 0.2
        assert cfg.buffer_batches == 50 * dnd.train.grad_accum  # forwards: the spec's last 50 optimizer steps
    assert cfg.buffer_batches * cfg.buffer_tokens <= 1_000_000  # the spec's N_b: <= 1M scores per layer


@pytest.mark.parametrize("nested", ["compact", "tah"])
@pytest.mark.parametrize("taus", [(-1.0, 0.5), (2.0, 0.5), (-1.0, -1.0)])
def test_decode_steps_where_every_some_or_no_row_nests_equal_the_full_forward(taus, nested):
    # A decode step (one token per row) runs the selected rows' nested pass as a decode step of those rows;
    # tau -1: every row nests, 2: none, 0.5: some (rows differ), each layer on its own.
    model, method = dnd_model(**NESTED[nested])
    for d, tau in zip(method.layer_dnd, taus):
        d.tau.fill_(tau)
    ids, mask = left_padded(T=12)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        got, _ = _prefill_then_decode(model, ids, mask, P=8)  # the prompt covers every row's padding
    torch.testing.assert_close(got[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)


def test_a_decode_step_adds_one_plain_layer_and_a_few_routing_ops_per_nesting_layer():
    # A decode step is launch-bound on a GPU: a DND layer whose rows nest adds its block once more (at the nested
    # slot), the router, the compact position's rotary table and the fusion: 150 ops against a plain layer's 101
    # (the general packing path: 217).
    model, method = dnd_model(layers=(0, 1))
    for d in method.layer_dnd:
        d.tau.fill_(-1.0)  # every row nests at both layers
    ids, mask = left_padded(B=4, T=8)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    ops = {}
    for on in (False, True):
        with torch.no_grad(), (contextlib.nullcontext() if on else without_method(model)):
            cache = KVCache.for_model(model.config, 4, 9, num_slots=model.num_slots())
            model(ids, attention_mask=mask, positions=pos, cache=cache)
            with OpCounter() as counter:
                model(ids[:, -1:], positions=pos[:, -1:] + 1, cache=cache)
            ops[on] = counter.n
    layer = model.model.layers[0]  # one plain layer's decode step
    x = torch.randn(4, 1, model.config.hidden_size)
    ctx = model.make_context(ids[:, -1:], None, pos[:, -1:] + 1, cache)
    with torch.no_grad(), OpCounter() as counter:
        layer.block(x, ctx, 0)
    per_layer = counter.n
    assert ops[True] - ops[False] <= 2 * (per_layer + 60), (ops, per_layer)


def test_a_decode_step_where_no_row_nests_adds_only_the_routers_and_keeps_the_selected_ratio():
    # Routing only: per DND layer the router (5 ops), sigmoid, threshold, the host sync deciding the nested
    # pass (any, nonzero, squeeze) and dropping the nested slot's entries from this step's position on (2); per
    # forward the selected ratios (5) and the rows' first positions (1). The code before 2026-12-04 took 15 per
    # layer and 21 per forward (detaches, a valid-token count per layer, FLOP-overhead statistics every step).
    model, method = dnd_model(layers=(0, 1))
    for d in method.layer_dnd:
        d.tau.fill_(1.0)  # p <= 1: no token nests
    ids = torch.randint(0, 256, (4, 8))
    pos = torch.arange(8).expand(4, 8)
    ops, outs = {}, {}
    for on in (False, True):
        with torch.no_grad(), (contextlib.nullcontext() if on else without_method(model)):
            cache = KVCache.for_model(model.config, 4, 9, num_slots=model.num_slots())
            model(ids, positions=pos, cache=cache)
            with OpCounter() as counter:
                outs[on] = model(ids[:, -1:], positions=pos[:, -1:] + 1, cache=cache)
            full = model(ids)
            ops[on] = counter.n
    assert ops[True] - ops[False] <= 2 * 12 + 6, ops
    assert float(outs[True].stats["dnd/selected"]) == 0.0 and "dnd/selected/L1" in outs[True].stats
    assert "dnd/flops_overhead" not in outs[True].stats  # cached forwards: out.compute has the FLOPs
    assert "dnd/flops_overhead" in full.stats and float(full.stats["dnd/flops_overhead"]) > 0  # full forwards


def test_a_resumed_run_syncs_tau_as_the_uninterrupted_one_does(tmp_path):
    """The controller's score buffer is checkpoint state: resuming the same run from its step-4 checkpoint and
    syncing at step 6 (sync_every 3) gives the uninterrupted run's tau and losses exactly (the old code resumed
    with an empty buffer, so its step-6 target came from one batch)."""
    base = CausalLM(preset("tiny-qwen3", vocab_size=264))
    base.save_pretrained(tmp_path / "base")
    recipe = tmp_path / "run.toml"

    def train(out: str, resume: bool = False) -> list[dict]:
        recipe.write_text(
            f'[model]\npretrained = "{tmp_path / "base"}"\n'
            '[method]\nname = "dnd"\nlayers = [0, 1]\nratio = 0.3\nrouter_init_std = 0.5\nsync_every = 3\n'
            'gamma = 0.5\n'
            '[train]\nsteps = 7\nbatch_size = 2\nseq_len = 32\nwarmup = 1\nlr = 1e-3\nmin_lr = 1e-4\n'
            'log_every = 1\nsave_every = 4\nprogress = false\nplot = false\ndevice = "cpu"\neval_every = 0\n'
            f'out_dir = "{tmp_path / out}"\n'
            '[data]\nsource = "embedded"\nsynthetic_examples = 100\nstdlib_bytes = 10000\n')
        result = CliRunner().invoke(app, ["train", str(recipe)] + (["--resume"] if resume else []))
        assert result.exit_code == 0, result.output
        return [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    whole = train("whole")
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "whole" / "step_0000004", tmp_path / "cut" / "step_0000004")
    resumed = train("cut", resume=True)

    def curve(records, key):
        return {r["step"]: r[key] for r in records if key in r and r["step"] > 4}

    for key in ("loss", "dnd/tau/L0", "dnd/tau/L1"):
        assert curve(resumed, key) == curve(whole, key) and len(curve(whole, key)) == 3, key
    synced = curve(whole, "dnd/tau/L0")
    assert synced[6] != synced[5]  # the step-6 sync moved tau (so the buffer mattered)


def test_resumed_at_another_world_size_the_ranks_pool_the_saved_score_buffer_once(tmp_path, monkeypatch):
    """The score buffer is rank-local and targets() pools every rank's: resumed at another world size, every rank
    loaded rank 0's buffer, so from 1 rank to 2 the pooled buffer held each saved score twice (and from 2 to 1 lost
    rank 1's). Now rank 0 takes every saved rank's buffer and the others none."""
    from dyndepth.runconfig import TrainConfig
    from dyndepth.train import train
    from dyndepth.train.parallel import DistInfo
    from dyndepth.train.trainer import _resume, setup_model

    class Loader:
        cursor = 0

        def next_batch(self):
            self.cursor += 1
            ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(self.cursor))
            return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

        def state_dict(self):
            return {"cursor": self.cursor}

        def load_state_dict(self, state):
            self.cursor = state["cursor"]

    cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup=0, save_every=2, progress=False, plot=False,
                      device="cpu", out_dir=str(tmp_path))
    model, method = dnd_model(ratio=0.3, sync_every=5)
    train(model, Loader(), cfg, hooks=[DNDHook(method, 2)])
    saved = {layer: torch.cat(list(method.scores_buffer[layer])).sort().values for layer in method.layers}
    pooled = {layer: [] for layer in method.layers}
    monkeypatch.setattr(DistInfo, "barrier", lambda self: None)  # (no process group: each rank resumes in turn)
    for rank in (0, 1):  # resumed on 2 ranks
        fresh, fresh_method = dnd_model(ratio=0.3, sync_every=5)
        hook = DNDHook(fresh_method, 4)
        _, wrapped, optimizer, scheduler = setup_model(fresh, cfg, DistInfo())
        _resume(tmp_path / "step_0000002", wrapped, optimizer, scheduler, Loader(), [hook], cfg,
                DistInfo(rank=rank, world_size=2))
        for layer in method.layers:
            pooled[layer] += list(fresh_method.scores_buffer[layer])
    for layer in method.layers:
        assert torch.equal(torch.cat(pooled[layer]).sort().values, saved[layer]), layer
    # from 2 ranks to 1: rank 0 holds both, the k-th newest forwards of each saved rank as one entry
    a, b = [torch.tensor([1.0]), torch.tensor([2.0])], [torch.tensor([3.0])]
    merged = hook.merge_rank_states([{"scores": {0: a, 1: a}}, {"scores": {0: b, 1: []}}])["scores"]
    assert [t.tolist() for t in merged[0]] == [[1.0], [2.0, 3.0]] and [t.tolist() for t in merged[1]] == [[1.0], [2.0]]
    assert hook.merge_rank_states([]) == {"scores": {0: [], 1: []}}  # a rank that takes none


def test_a_dnd_checkpoint_trains_on_with_its_controller_and_refuses_method_none(tmp_path):
    """A recipe without [method] from a DND checkpoint keeps training DND, tau controller included (it trained the
    router with tau frozen); `method.name=none` cannot remove the carried method and says so."""
    from dyndepth.train.run import build_hooks

    model, method = dnd_model()
    model.save_pretrained(tmp_path / "dnd")
    loaded = dyndepth.from_pretrained(tmp_path / "dnd")
    hooks = build_hooks({}, loaded, 10)
    assert [type(h) for h in hooks] == [DNDHook] and hooks[0].method is loaded.method
    with pytest.raises(ValueError, match="carries a dnd method, which a recipe cannot remove"):
        build_hooks({"name": None}, dyndepth.from_pretrained(tmp_path / "dnd"), 10)
    assert build_hooks({}, CausalLM(preset("tiny-qwen3")), 10) == []  # no method carried, none attached
    reconfigured = dyndepth.from_pretrained(tmp_path / "dnd")
    build_hooks({"ratio": 0.3}, reconfigured, 10)  # options without a name: the carried method's
    assert reconfigured.method.config.ratio == 0.3


def test_recipe_scalars_are_read_as_the_train_section_reads_them():
    """1e3 for an int, 0 / 1 for a bool, numpy numbers, gamma 0 (no sync pull): accepted and converted."""
    import numpy as np

    from dyndepth.methods import GateSkipConfig, MoDConfig
    from dyndepth.methods.common import make_config

    gs = make_config(GateSkipConfig, {"ramp_steps": 1e3, "shared": 1})
    assert (gs.ramp_steps, gs.shared) == (1000, True) and type(gs.ramp_steps) is int
    assert make_config(MoDConfig, {"every": np.int64(2)}).every == 2
    dnd = make_config(DNDConfig, {"ratio": np.float32(0.25), "layers": [np.int64(0), 1], "gamma": 0})
    assert (dnd.ratio, dnd.layers, dnd.gamma) == (0.25, (0, 1), 0.0) and type(dnd.layers[0]) is int
    with pytest.raises(ValueError, match="shared=2 must be a bool"):
        make_config(GateSkipConfig, {"shared": 2})


def test_the_paper_init_selects_nothing_and_the_losses_and_scores_are_what_the_config_says():
    """Zero router (p = 0.5 everywhere) and tau_init 0.5: `p > tau` is strict, so nothing nests at step 0 (>= would
    nest every token); tau starts at tau_init; aux_loss = sd_weight L_sd + dp_weight L_dp; the controller's buffer
    holds the valid tokens' scores only; an all-PAD training batch has finite losses."""
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3"))
    cfg = DNDConfig(layers=(0, 1), tau_init=0.5, router_init_std=0.0, sd_weight=0.3, dp_weight=2.0)
    method = attach_dnd(model, cfg)
    assert all(float(d.tau) == 0.5 for d in method.layer_dnd)
    other = attach_dnd(CausalLM(preset("tiny-qwen3")), DNDConfig(layers=(0, 1), tau_init=0.7))
    assert all(float(d.tau) == pytest.approx(0.7) for d in other.layer_dnd)
    ids, mask = left_padded()
    with torch.no_grad():
        assert float(model.eval()(ids, attention_mask=mask).stats["dnd/selected"]) == 0.0
        for d in method.layer_dnd:
            d.router.weight.normal_(0, 1.0)
    out = model.train()(ids, attention_mask=mask)
    sd, dp = out.stats["dnd/sd_loss"], out.stats["dnd/dp_loss"]
    torch.testing.assert_close(out.aux_loss.detach(), 0.3 * sd + 2.0 * dp)
    assert all(len(method.scores_buffer[i][-1]) == int(mask.sum()) for i in method.layers)  # PAD's not recorded
    empty = model(ids, attention_mask=torch.zeros_like(mask))
    assert torch.isfinite(empty.aux_loss) and float(empty.stats["dnd/dp_loss"]) == 0.0


def test_nested_false_runs_the_base_model_and_reports_nothing_selected():
    torch.manual_seed(0)
    base = CausalLM(preset("tiny-qwen3")).eval()
    model, method = dnd_model()
    model.load_state_dict(base.state_dict(), strict=False)
    ids, mask = left_padded()
    with torch.no_grad(), method.override(nested=False):
        out = model(ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, base(ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert float(out.stats["dnd/selected"]) == 0.0  # it read the router's would-be selection (0.44)


def test_a_skipped_non_finite_step_leaves_no_nan_in_the_score_buffer_or_tau(tmp_path):
    """train.nonfinite="skip" after a forward whose activations turned NaN (one step, e.g. an overflow): that step's
    NaN scores stayed in the controller's buffer, ranked above every real score, so the next sync's target, then tau,
    became NaN for good and no token nested again (tau nan, dnd/selected 0.0 for every later step)."""
    from dyndepth.runconfig import TrainConfig
    from dyndepth.train import train

    model, method = dnd_model(beta=0.1, std=0.5, ratio=0.2, sync_every=2)
    model.train()
    calls = []

    def nan_once(module, args, out):  # the third training forward's embeddings turn NaN
        calls.append(1)
        return out * float("nan") if len(calls) == 3 else None

    model.model.embed_tokens.register_forward_hook(nan_once)

    class Loader:
        def next_batch(self):
            ids = torch.randint(0, 256, (2, 17))
            return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    cfg = TrainConfig(steps=6, batch_size=2, seq_len=16, lr=1e-3, min_lr=1e-4, warmup=1, log_every=1, device="cpu",
                      out_dir=str(tmp_path), progress=False, plot=False, nonfinite="skip")
    result = train(model, Loader(), cfg, hooks=method.trainer_hooks(6))
    assert result.nonfinite_steps == 1
    assert all(bool(torch.isfinite(t).all()) for buf in method.scores_buffer.values() for t in buf)
    assert all(torch.isfinite(d.tau) for d in method.layer_dnd), [float(d.tau) for d in method.layer_dnd]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("dnd/selected", 0) > 0][-1] == 6  # still nesting at the end


@pytest.mark.parametrize("ledger", [True, False])
def test_the_controller_steps_by_the_ratio_of_the_steps_tokens_not_the_mean_of_micro_batch_ratios(ledger):
    """k_actual = selected / valid tokens over the whole optimizer step (spec Eq. 8-9), PAD excluded. Two
    micro-batches of 16 and 4 real tokens: the mean of their two ratios weighs 4 tokens as much as 16 (with
    packing="documents" micro-batches differ in fill, and the controller steered that mean to the target)."""
    from dyndepth.runconfig import TrainConfig
    from dyndepth.train.parallel import DistInfo
    from dyndepth.train.trainer import forward_backward

    model, method = dnd_model(ratio=0.25, alpha=1.0, sync_every=1000)
    model.train()
    ids = torch.randint(0, 256, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :12] = 0  # the second micro-batch: 4 real tokens (left padded)
    batches = [{"input_ids": ids[b:b + 1], "labels": ids[b:b + 1].masked_fill(mask[b:b + 1] == 0, -100),
                "attention_mask": mask[b:b + 1]} for b in range(2)]
    selected = {i: 0 for i in method.layers}
    for batch in batches:  # the same forwards by hand: count the selected real tokens
        trace = dyndepth.Trace()
        with torch.no_grad():
            model(batch["input_ids"], attention_mask=batch["attention_mask"], trace=trace)
        for i in method.layers:
            selected[i] += int(trace.ctx.state.keep[i].sum())
    cfg = TrainConfig(out_dir="unused", device="cpu", grad_accum=2, batch_size=1, seq_len=16)
    with accounting(ledger):  # the controller's statistics do not depend on the FLOP ledger
        stats = forward_backward(model, model, batches, [], cfg, DistInfo())
    (hook,) = method.trainer_hooks(10)
    logged = hook.after_step(model, 1, stats, DistInfo())
    for i, d in zip(method.layers, method.layer_dnd):
        assert float(d.tau) == pytest.approx(min(1.0, max(0.0, 0.5 + (selected[i] / 20 - 0.25))), abs=1e-6), i
        assert logged[f"selected/L{i}"] == pytest.approx(selected[i] / 20)  # logged: the ratio it steered by
    assert any(selected[i] / 20 != float(stats[f"dnd/selected/L{i}"]) for i in method.layers)  # the two differ
    assert logged["selected"] == pytest.approx(sum(selected.values()) / 20 / len(selected))


def test_the_score_buffer_subsamples_every_forward_of_a_shape_at_one_stride_so_tokens_weigh_alike():
    """The EMA target is the threshold selecting the ratio of the recent tokens: a forward with fewer real tokens
    (more PAD) must not keep a larger share of them (the stride came from its valid count: 12 real of 32 kept 6,
    the 32 of a full forward 8, so the half-padded forward's tokens counted 2x in the quantile)."""
    model, method = dnd_model(buffer_tokens=8, router_init_std=0.0)
    model.train()
    ids = torch.randint(0, 256, (2, 32))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # 12 real tokens
    with torch.no_grad():
        for b in range(2):
            model(ids[b:b + 1], attention_mask=mask[b:b + 1])
    assert [t.numel() for t in method.scores_buffer[0]] == [8, 3]  # stride 32 / 8 = 4 for both: 32 / 4, 12 / 4


def test_pooled_targets_keep_the_kept_score_when_the_two_around_the_quantile_are_adjacent_floats():
    # The ranks' pooled target took (lo + hi) / 2, which rounds up to hi for adjacent float32 scores, so `p > tau`
    # dropped a token that one process's target (rank_threshold) keeps: the two must give the same threshold.
    from types import SimpleNamespace

    from dyndepth.core.routing import rank_threshold
    from dyndepth.methods.dnd import _pooled_targets

    lo = torch.tensor(0.5).nextafter(torch.tensor(1.0))
    hi = lo.nextafter(torch.tensor(1.0))
    assert (lo + hi) / 2 == hi  # the case: the midpoint rounds to the kept score
    scores = torch.stack([hi, lo, torch.tensor(0.25), torch.tensor(0.75)])
    method = SimpleNamespace(config=DNDConfig(ratio=0.5, ema_target="quantile"), layers=[0],
                             layer_dnd=[SimpleNamespace(tau=torch.zeros(1))], scores_buffer={0: [scores]})
    one_rank = SimpleNamespace(all_reduce_sum=lambda t: t)
    pooled = _pooled_targets(method, one_rank)
    single = rank_threshold(scores[None], None, 0.5, scope="batch").reshape(1)
    assert torch.equal(pooled, single)
    assert (scores > pooled).tolist() == [True, False, False, True]


def test_the_defaults_are_the_papers_and_attach_initialises_from_the_config():
    """The spec's [C] settings (4 untouched layers at each end: 4..23 of 28, 4..43 of 48; ratio 20%; beta 0.1; tau 0.5;
    zero router; T_sync 50) and its [I] recommendations (alpha 1e-2, gamma 0.5, lambda_sd = lambda_dp = 1e-2, the
    paper's L_sd sign, compact positions, the quantile target) are DNDConfig's defaults; attach takes beta_init."""
    cfg = DNDConfig()
    assert cfg.band(28) == list(range(4, 24)) and cfg.band(48) == list(range(4, 44))
    assert (cfg.ratio, cfg.beta_init, cfg.tau_init, cfg.router_init_std, cfg.sync_every) == (0.2, 0.1, 0.5, 0.0, 50)
    assert (cfg.alpha, cfg.gamma, cfg.sd_weight, cfg.dp_weight) == (0.01, 0.5, 0.01, 0.01)
    assert (cfg.sd_sign, cfg.positions, cfg.ema_target, cfg.control) == ("maximize_entropy", "compact", "quantile",
                                                                         "threshold")
    method = attach_dnd(CausalLM(preset("tiny-qwen3")), DNDConfig(layers=(0, 1), beta_init=0.3))
    for d in method.layer_dnd:
        assert float(d.beta.detach()) == pytest.approx(0.3) and not d.router.weight.any() and not d.router.bias.any()


def test_the_lm_loss_alone_trains_the_router_through_the_fusion_weight():
    """Spec 2.5 [C]: p multiplies x^d in the fusion, so the LM loss reaches the router through beta p (the hard
    selection has no gradient): without the router controlling loss the router still learns."""
    model, method = dnd_model(sd_weight=0.0, dp_weight=0.0)
    out = model.train()(torch.randint(0, 256, (2, 16)))
    assert float(out.aux_loss) == 0.0 and all(0 < float(out.stats[f"dnd/selected/L{i}"]) < 1 for i in method.layers)
    out.logits.pow(2).mean().backward()
    for d in method.layer_dnd:
        assert d.router.weight.grad is not None and d.router.weight.grad.abs().sum() > 0


def test_a_forwards_router_losses_are_per_document_and_averaged_over_the_band():
    """dnd/sd_loss and dnd/dp_loss (weighted into aux_loss) are the mean over the DND layers of each layer's
    `router_losses` on its scores, per document of a packed row, PAD left out (the spec's [C] text sums over the
    layers; docs/methods.md: we average, so the weights do not scale with the band)."""
    model, method = dnd_model(sd_weight=0.3, dp_weight=2.0)
    packed = torch.randint(0, 256, (1, 19))
    mask = torch.ones_like(packed)
    mask[0, 16:] = 0  # documents of 7 and 9 tokens, then 3 PAD
    doc_ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 3])
    positions = torch.cat([torch.arange(7), torch.arange(9), torch.arange(3)])[None]
    trace = dyndepth.Trace()
    out = model.train()(packed, attention_mask=mask, positions=positions, doc_ids=doc_ids, trace=trace)
    scores = trace.ctx.state.scores
    per_layer = torch.tensor([router_losses(scores[i], mask.bool(), doc_ids) for i in method.layers])  # (L, 2)
    sd, dp = per_layer.mean(0)
    torch.testing.assert_close(out.stats["dnd/sd_loss"], sd)
    torch.testing.assert_close(out.stats["dnd/dp_loss"], dp)
    torch.testing.assert_close(out.aux_loss.detach(), 0.3 * sd + 2.0 * dp)
    rows = torch.tensor([router_losses(scores[i], mask.bool(), None)[0] for i in method.layers]).mean()
    assert abs(float(rows - sd)) > 1e-4  # (the row as one sequence gives another L_sd)


def test_loading_the_controllers_state_replaces_the_score_buffer():
    """A hook loading a checkpoint's state holds that buffer, not the scores it had recorded before it."""
    _, method = dnd_model()
    (hook,) = method.trainer_hooks(10)
    for i in method.layers:
        method.record_scores(i, torch.rand(5))
    saved = hook.state_dict()
    for i in method.layers:
        method.record_scores(i, torch.rand(7))  # a later forward's, not in the checkpoint
    hook.load_state_dict(saved)
    assert all([t.numel() for t in method.scores_buffer[i]] == [5] for i in method.layers)


@pytest.mark.parametrize("control", ["threshold", "topk"])
def test_a_skipped_non_finite_step_still_runs_the_threshold_sync_due_at_it(control, tmp_path):
    """train.nonfinite="skip" runs no after_step on a dropped step, and the sync due at it was lost: under topk a
    skipped last step left tau at tau_init (inference nested 0.43 of the tokens for a 0.2 target); under threshold
    control a skipped sync step waited sync_every more steps. The sync now runs on the buffer's finite scores."""
    from dyndepth.runconfig import TrainConfig
    from dyndepth.train import train

    model, method = dnd_model(control=control, ratio=0.2, beta=0.1, std=0.5, gamma=1.0,
                              sync_every=3 if control == "threshold" else 50)
    calls = []

    def nan_at_the_last_step(module, args, out):
        calls.append(1)
        return out * float("nan") if len(calls) == 3 else None

    model.model.embed_tokens.register_forward_hook(nan_at_the_last_step)

    class Loader:
        def next_batch(self):
            ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(len(calls)))
            return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, lr=1e-3, warmup=0, device="cpu", out_dir=str(tmp_path),
                      progress=False, plot=False, nonfinite="skip", save_every=0)
    (hook,) = method.trainer_hooks(3)
    assert train(model, Loader(), cfg, hooks=[hook]).nonfinite_steps == 1
    target = hook.targets()  # steps 1 and 2's scores: the third forward's were all NaN
    assert sum(len(b) for b in method.scores_buffer.values()) == 4
    torch.testing.assert_close(torch.stack([d.tau.reshape(()) for d in method.layer_dnd]), target)
    assert (target - 0.5).abs().min() > 1e-3


def test_a_band_outside_the_model_names_the_fix_in_python_and_in_recipe_syntax():
    # a recipe user read "give (first, last) ... e.g. (1, 1)", a Python tuple, where the key is written as a list
    with pytest.raises(ValueError, match=r"e\.g\. \(1, 1\) \(in a recipe: --set 'method\.layers=\[first,last\]'\)"):
        DNDConfig(layers=(1, 2)).band(2)
