"""Dreamer (models/dreamer.py): the layer against the decoder's, depth causality through the memory, depth
attention against a by-hand reference, batch independence, routing, balancing, cached generation, checkpoints,
training, gradients to every parameter, exact expert / state-change statistics and exit decisions, and the compute
ledger against torch's FLOP counter."""

import collections
import copy
import dataclasses
import json
import math

import families
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dyndepth
from dyndepth import CausalLM, KVCache, ModelConfig
from dyndepth.models import dreamer_layer
from dyndepth.models.dreamer import DreamerConfig, DreamerLM, ExpertBiasHook
from dyndepth.models.dreamer_layer import DepthAttention
from dyndepth.train import build_hooks, build_model, run_training
from dyndepth.train.parallel import DistInfo, apply_activation_checkpointing
from opcount import OpCounter

SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
DA_MODES = ["separate", "merged_softmax", "none"]


def tiny(**kw) -> DreamerConfig:
    fields = {"vocab_size": 256, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "num_recurrences": 3, "num_experts": 8, "num_experts_per_tok": 2,
              "moe_intermediate_size": 32, "max_position_embeddings": 128}
    return DreamerConfig(**{**fields, **kw})


def tiny_decoder(layers: int) -> CausalLM:
    """The Qwen3-shaped decoder of `tiny`'s shapes (a dense MLP of 96), one layer per Dreamer application."""
    return CausalLM(ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                                max_position_embeddings=128, tie_word_embeddings=True)).eval()


def varied(config, seed: int = 0) -> DreamerLM:
    return families.varied(DreamerLM, config, std=0.15, seed=seed)


def left_padded(B=3, T=12, vocab=256):
    return families.left_padded(B, T, vocab, pads=(0, 3, 7))


def test_one_recurrence_without_depth_and_expert_attention_is_a_decoder_layer():
    decoder = families.varied(CausalLM, tiny_decoder(layers=1).config, std=0.15)
    _randomize_norms(decoder)  # each norm its own weights: a norm applied in another's place shows
    dreamer = DreamerLM(tiny(num_recurrences=1, da_mode="none", num_experts=0, intermediate_size=96)).eval()
    dreamer.load_state_dict(decoder.state_dict())  # the same parameter names: a strict load
    ids, mask = left_padded()
    with torch.no_grad():
        torch.testing.assert_close(dreamer(ids).logits, decoder(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(dreamer(ids, attention_mask=mask).logits,
                                   decoder(ids, attention_mask=mask).logits, rtol=0, atol=0)


@pytest.mark.parametrize("da_parallel", [False, True])
def test_one_recurrence_with_depth_attention_is_a_decoder_layer_plus_its_one_entry_between_sa_and_the_ffn(
        da_parallel):
    """Step 0's depth memory is the one state entering the layer, whose softmax weight is 1: depth attention adds
    o(v(norm_da(x))) to the stream after sequence attention's output and before the FFN reads it (SA -> DA -> FFN,
    each residual), sequential or parallel."""
    decoder = families.varied(CausalLM, tiny_decoder(layers=1).config, std=0.15)
    _randomize_norms(decoder)
    dreamer = varied(tiny(num_recurrences=1, num_experts=0, intermediate_size=96, da_parallel=da_parallel))
    _randomize_norms(dreamer)
    dreamer.load_state_dict(decoder.state_dict(), strict=False)  # all but depth attention's weights
    layer, da = dreamer.model.layers[0], dreamer.model.layers[0].depth_attn
    entering = []
    decoder.model.layers[0].register_forward_pre_hook(lambda m, args: entering.append(args[0]))
    # (B, T, D): what the one-entry depth attention adds, joined to the attention's output (before the FFN)
    decoder.model.layers[0].self_attn.register_forward_hook(
        lambda m, args, out: out + da.o_proj(da.v_proj(layer.depth_layernorm(entering[-1]))))
    _assert_same_logits(dreamer, decoder)


def test_merged_softmax_at_one_recurrence_is_sequence_attention():
    """Step 0 has no depth keys: the merged softmax over (sequence keys, depth keys) is SDPA's attention alone,
    scaled by 1 / sqrt(head_dim), causal and padding-masked (merged and none have the same parameters)."""
    fields = {"num_recurrences": 1, "num_experts": 0, "intermediate_size": 96}
    merged = varied(tiny(da_mode="merged_softmax", **fields)).eval()
    plain = DreamerLM(tiny(da_mode="none", **fields)).eval()
    plain.load_state_dict(merged.state_dict())
    _assert_same_logits(merged, plain)


def _assert_same_logits(a, b) -> None:
    """The two models' logits agree on a batch, unpadded and left-padded (real tokens)."""
    ids, mask = left_padded()
    valid = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a(ids, attention_mask=mask).logits[valid],
                                   b(ids, attention_mask=mask).logits[valid], rtol=1e-5, atol=1e-5)


def _depth_run(model, ids, perturb_step=None, restore=None):
    """Residual streams ([embedding, after step 0, ...]) and depth attention's (query input, output) per call, with
    the input of application `perturb_step` perturbed and, given `restore` (B, T, D), that application's output
    replaced by it: the perturbation then reaches later steps only through the depth memory entry it wrote."""
    calls, da_io = [], []

    def pre_hook(module, args):
        calls.append(None)
        if len(calls) - 1 == perturb_step:
            return (args[0] + 0.5 * torch.randn_like(args[0]), *args[1:])

    def hook(module, args, output):
        if len(calls) - 1 == perturb_step and restore is not None:
            return restore

    layer = model.model.layers[0]
    handles = [layer.register_forward_pre_hook(pre_hook), layer.register_forward_hook(hook)]
    if hasattr(layer, "depth_attn"):
        handles.append(layer.depth_attn.register_forward_hook(lambda m, args, out: da_io.append((args[0], out))))
    trace = dyndepth.Trace(keep_streams=True)
    with torch.no_grad():
        model(ids, trace=trace)
    for handle in handles:
        handle.remove()
    return trace.streams, da_io


@pytest.mark.parametrize("da_mode", ["separate", "merged_softmax"])
def test_a_perturbed_step_reaches_later_steps_through_the_depth_memory_and_earlier_steps_not_at_all(da_mode):
    """The state entering step r is perturbed and step r's output restored to the unperturbed one, so step r + 1
    starts from the same residual stream and differs only through the memory entry step r wrote: it must change
    (da_mode="none", or depth attention ignoring its memory, leaves it equal), and steps < r must not."""
    model = varied(tiny(num_recurrences=4, da_mode=da_mode))
    ids = torch.randint(0, 256, (2, 6))
    base, base_da = _depth_run(model, ids)
    for r in (1, 2):
        torch.manual_seed(r)
        moved, moved_da = _depth_run(model, ids, perturb_step=r, restore=base[r + 1])
        for s in range(r + 2):  # the embedding, steps 0..r-1, and step r's (restored) output
            torch.testing.assert_close(moved[s], base[s], rtol=0, atol=0)
        assert (moved[r + 2] - base[r + 2]).abs().max() > 1e-3  # step r + 1, through the memory alone
        if da_mode == "separate":
            for s in range(r):  # depth attention before step r: same query, same output
                torch.testing.assert_close(moved_da[s], base_da[s], rtol=0, atol=0)
            torch.testing.assert_close(moved_da[r + 1][0], base_da[r + 1][0], rtol=0, atol=0)  # same query at r + 1
            assert (moved_da[r + 1][1] - base_da[r + 1][1]).abs().max() > 1e-3  # another output: memory entry r


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _rotated(x, step, theta):
    """x (..., H) rotated by angles step * theta^(-2i/H), HF's rotate_half layout (element i pairs with i + H/2)."""
    half = x.shape[-1] // 2
    angle = step * theta ** (-2 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


def _reference_depth_attention(layer, memory, query, step):
    """Depth attention of one token from the layer's raw weights, float64: `memory` [(D,)] the token's states
    entering steps 0..step (before depth_layernorm), `query` (D,) the state depth attention reads at `step`; with
    da_include_self the query state is one more entry, encoded at `step` as the query."""
    da, norm, theta = layer.depth_attn, layer.depth_layernorm, layer.config.da_rope_theta
    N, H = da.num_heads, da.head_dim
    learned = layer.config.da_step_encoding == "learned"  # the step's embedding added to the normed state, no RoPE

    def heads(linear, state, j):  # (N, H) from the state entering step j
        normed = _rms(state.double(), norm.weight, norm.eps)
        if learned:
            normed = normed + da.step_embed[j].double()
        return (linear.weight.double() @ normed).view(N, H)

    def rotated(linear, state, qk_norm, j):  # q/k: RMSNorm per head, then RoPE at step j
        y = _rms(heads(linear, state, j), qk_norm.weight, qk_norm.eps)
        return y if learned else _rotated(y, j, theta)

    q = rotated(da.q_proj, query, da.q_norm, step)  # (N, H)
    entries = list(enumerate(memory)) + ([(step, query)] if layer.config.da_include_self else [])
    k = torch.stack([rotated(da.k_proj, s, da.k_norm, j) for j, s in entries], 1)  # (N, L, H)
    v = torch.stack([heads(da.v_proj, s, j) for j, s in entries], 1)
    p = torch.softmax((q[:, None] * k).sum(-1) * H**-0.5, -1)  # (N, L)
    return da.o_proj.weight.double() @ (p[..., None] * v).sum(1).reshape(N * H)  # (D,)


def _randomize_norms(model):
    """RMSNorm weights away from their init of ones, so a norm applied with the wrong weight (or none) shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.uniform_(0.5, 1.5)


def _check_depth_attention_against_the_reference(model, ids, tokens):
    """Every depth-attention call of the forward against `_reference_depth_attention` at the given (b, t): the
    memory of layer g at step r is the states entering layer g at steps 0..r (streams[j * G + g])."""
    G = model.config.layers_per_group
    calls = {g: [] for g in range(G)}
    handles = [layer.depth_attn.register_forward_hook(lambda m, args, out, g=g: calls[g].append((args[0], out)))
               for g, layer in enumerate(model.model.layers)]
    trace = dyndepth.Trace(keep_streams=True)
    with torch.no_grad():
        model(ids, trace=trace)
    for handle in handles:
        handle.remove()
    for g, layer in enumerate(model.model.layers):
        assert len(calls[g]) == model.config.num_recurrences
        for r, (query, out) in enumerate(calls[g]):
            for b, t in tokens:
                memory = [trace.streams[j * G + g][b, t] for j in range(r + 1)]
                expected = _reference_depth_attention(layer, memory, query[b, t], r)
                torch.testing.assert_close(out[b, t].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("encoding", ["rope", "learned"])
def test_depth_attention_matches_a_reference_from_the_raw_weights_with_step_rope_and_qk_norm(encoding, include_self):
    """Per token: k/v of the states entering steps 0..r, each key k-normed and rotated by its step, the query
    q-normed and rotated by r, with base da_rope_theta (not rope_theta); fails if step_encoding ignored the step or
    a q/k norm were dropped (and the softmax at steps >= 1 depends on all of that). `learned`: step j's embedding
    added to the normed state every projection reads, no rotation. `include_self`: the query state (after SA) as
    one more entry, normed and encoded at step r as the query is."""
    model = varied(tiny(num_recurrences=4, da_rope_theta=100.0, da_step_encoding=encoding,
                        da_include_self=include_self))
    _randomize_norms(model)
    _check_depth_attention_against_the_reference(model, torch.randint(0, 256, (2, 5)), [(0, 0), (0, 4), (1, 2)])


def test_each_layer_of_a_group_attends_over_its_own_depth_memory():
    """layers_per_group=2: layer g's depth attention at step r reads the states entering layer g (not the other
    layer's) at steps 0..r, projected with layer g's own weights."""
    model = varied(tiny(num_recurrences=3, layers_per_group=2))
    _randomize_norms(model)
    _check_depth_attention_against_the_reference(model, torch.randint(0, 256, (2, 5)), [(0, 1), (1, 4)])


def test_parallel_depth_attention_already_sees_its_query_state_so_including_it_again_is_refused():
    """da_parallel: the query is the step's input, whose k / v (step r's encoding) are memory entry r, so the query
    state is in the memory already (checked from the raw weights). da_include_self then appended that entry a second
    time, identical, doubling its softmax weight (the spec's key set is h_0..h_r plus optionally the query state)."""
    model = varied(tiny(num_recurrences=3, da_parallel=True))
    _randomize_norms(model)
    layer, queries = model.model.layers[0], []
    layer.depth_attn.register_forward_hook(lambda m, args, out: queries.append(args[0]))
    trace = dyndepth.Trace(keep_streams=True)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 5)), trace=trace)
    for r, query in enumerate(queries):
        torch.testing.assert_close(query, trace.streams[r], rtol=0, atol=0)  # the query state is memory entry r
    with pytest.raises(dyndepth.ConfigError, match="da_include_self.*da_parallel.*count twice"):
        tiny(da_parallel=True, da_include_self=True)
    tiny(da_parallel=True, da_include_self=True, da_mode="none")  # no depth attention: neither option acts


@pytest.mark.parametrize("stacked_max", [128, 0])  # a decode-sized call: over the stacked memory | per entry
def test_depth_attention_matches_a_slow_per_token_softmax_over_earlier_steps(stacked_max, monkeypatch):
    monkeypatch.setattr(dreamer_layer, "STACKED_MAX_TOKENS", stacked_max)
    model = varied(tiny(num_recurrences=4))
    da = model.model.layers[0].depth_attn
    B, T, D, step = 2, 3, 64, 2
    states = [torch.randn(B, T, D) for _ in range(step + 1)]  # normed states entering steps 0..step
    kv = [da.project_kv(s, None, da.step_encoding(j, s.dtype, s.device)) for j, s in enumerate(states)]
    h = torch.randn(B, T, D)
    rope = da.step_encoding(step, h.dtype, h.device)
    with torch.no_grad():
        fast = da(h, None, rope, [k for k, _ in kv], [v for _, v in kv])
        q = da._heads(da.q_proj(h), da.q_norm, rope)  # (B, T, N, H)
        slow = torch.zeros(B, T, da.num_heads, da.head_dim)
        for b in range(B):
            for t in range(T):
                for n in range(da.num_heads):
                    scores = torch.stack([q[b, t, n] @ kv[j][0][b, t, n] for j in range(step + 1)]) / da.head_dim**0.5
                    w = scores.softmax(0)
                    slow[b, t, n] = sum(w[j] * kv[j][1][b, t, n] for j in range(step + 1))
        torch.testing.assert_close(fast, da.o_proj(slow.reshape(B, T, -1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("da_mode", DA_MODES)
def test_a_rows_output_does_not_depend_on_the_other_rows(da_mode):
    model = varied(tiny(da_mode=da_mode, layers_per_group=2))
    ids, mask = left_padded()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for b in range(3):
            n = int(mask[b].sum())
            alone = model(ids[b:b + 1, -n:]).logits[0]
            torch.testing.assert_close(batch[b, -n:], alone, rtol=1e-4, atol=1e-4)


def test_top_k_selects_exactly_k_experts_on_the_biased_logits_with_renormalized_gates():
    ea = DreamerLM(tiny(num_experts=8, num_experts_per_tok=3)).model.layers[0].mlp
    ea.expert_bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 0, 0, -5.0]))
    h = torch.randn(50, 64)
    scores, idx, gates = ea.route(h, step=1)
    assert idx.shape == (50, 3) and all(len(set(row)) == 3 for row in idx.tolist())
    assert (idx == 0).any(-1).all() and not (idx == 7).any()  # the bias decides selection
    torch.testing.assert_close(idx.sort(-1).values, torch.topk(scores + ea.expert_bias, 3).indices.sort(-1).values)
    chosen = torch.sigmoid(scores).gather(1, idx)  # gate values: unbiased sigmoid scores, renormalized
    torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    ea.norm_topk_prob = False
    torch.testing.assert_close(ea.route(h, step=1)[2], chosen)


def test_renormalized_gates_stay_finite_where_every_chosen_sigmoid_underflows():
    """Scores below ~-87 give sigmoid 0 in float32; their renormalized gates are the softmax of the chosen scores'
    log-sigmoids (sigma_i / sum sigma_j in the limit), not 0 / 0: one such token made the whole sequence NaN
    (sequence attention multiplies its NaN K/V by probability 0)."""
    model = DreamerLM(tiny(num_experts=8, num_experts_per_tok=2)).eval()
    ea = model.model.layers[0].mlp
    h = torch.randn(3, 64)
    with torch.no_grad():
        ea.expert_keys.copy_(-h[1] / h[1].norm() * torch.linspace(1.0, 2.0, 8)[:, None] * 120 / h[1].norm())
        scores, idx, gates = ea.route(h, step=0)
    assert float(scores[1].max()) < -100 and float(torch.sigmoid(scores[1]).max()) == 0.0  # the underflow case
    torch.testing.assert_close(gates[1], torch.softmax(scores[1].gather(0, idx[1]), -1))  # log sigma(s) ~ s there
    torch.testing.assert_close(gates.sum(-1), torch.ones(3))
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        ea.expert_keys.mul_(1e4)  # every token's chosen scores far below -87 or far above
        assert torch.isfinite(model(ids).logits).all()


def test_router_scores_the_state_plus_the_step_encoding():
    ea = DreamerLM(tiny(num_recurrences=3)).model.layers[0].mlp
    with torch.no_grad():
        ea.step_embed.normal_()
    h = torch.randn(20, 64)
    for step, row in ((0, 0), (2, 2), (5, 2)):  # steps past training reuse the last step's encoding
        torch.testing.assert_close(ea.route(h, step)[0], (h + ea.step_embed[row]) @ ea.expert_keys.T)


def test_the_balancing_hook_moves_load_toward_uniform_on_a_skewed_stream():
    model = DreamerLM(tiny(num_experts=8, num_experts_per_tok=2, ea_bias_update_rate=0.05)).train()
    u = F.normalize(torch.randn(64), dim=0)
    with torch.no_grad():  # states lean along u, and experts 0 and 1 have keys along u: they win most tokens
        model.model.embed_tokens.weight += 0.25 * u
        model.model.layers[0].mlp.expert_keys[:2] += 0.5 * u
    hooks = build_hooks({}, model)  # the model's own hooks reach the trainer through run.py
    assert [type(h) for h in hooks] == [ExpertBiasHook]
    imbalance = []
    for step in range(80):
        ids = torch.randint(0, 256, (4, 16))
        with torch.no_grad():
            stats = model(ids).stats
        imbalance.append(hooks[0].after_step(model, step, stats, DistInfo())["load_imbalance"])
    assert imbalance[0] > 3.0 and sum(imbalance[-10:]) / 10 < 0.5 * imbalance[0], imbalance
    bias = model.model.layers[0].mlp.expert_bias
    assert bias[:2].mean() < bias[2:].mean() - 0.5  # the favoured experts were pushed down


def _prefill_then_decode(model, ids, mask, n_prompt):
    """Logits of a prefill of the first n_prompt columns, then one column at a time, through the KV cache."""
    B, T = ids.shape
    cache = KVCache.for_model(model.config, B, T, num_slots=model.num_slots())
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = [model(ids[:, :n_prompt], attention_mask=mask[:, :n_prompt], positions=pos[:, :n_prompt],
                     cache=cache).logits]
        for t in range(n_prompt, T):
            out.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits)
    return torch.cat(out, 1)


def partial_exit_threshold(model, ids, mask) -> float:
    """A KL threshold at which some tokens exit early and some do not (random weights move logits little)."""
    for kl in (1e-2, 5e-3, 2e-3, 1e-3, 5e-4):
        with model.override(exit_kl=kl), torch.no_grad():
            depth = float(model(ids, attention_mask=mask).stats["dreamer/avg_depth"])
        if model.num_steps - 1 < depth < model.num_steps:
            return kl
    raise AssertionError("no threshold makes only some tokens exit")


@pytest.mark.parametrize("da_mode", DA_MODES)
@pytest.mark.parametrize("knob", [None, "steps", "exit_kl"])
def test_cached_generation_equals_the_full_forward_left_padded(da_mode, knob):
    model = varied(tiny(da_mode=da_mode, layers_per_group=2 if da_mode == "separate" else 1))
    ids, mask = left_padded(T=12)
    mask = torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], 1)  # 4 decoded columns after the prompt
    ids = torch.cat([ids, torch.randint(0, 256, (3, 4))], 1)
    knobs = {"steps": {"steps": 5}, "exit_kl": {"exit_kl": partial_exit_threshold(model, ids, mask)}}.get(knob, {})
    with model.override(**knobs), torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cached = _prefill_then_decode(model, ids, mask, 12)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], rtol=1e-4, atol=1e-4)


def test_generate_with_per_token_exit_after_model_train_decodes_as_in_eval():
    """A cached forward decodes whatever the module mode (models.forward.make_context), so `generate(method_knobs=
    {"exit_kl": ...})` from a model left in train mode decodes as in eval mode (it was refused with "call
    model.eval() first", the one knob of any family that was); an uncached training forward still refuses it."""
    model = varied(tiny())
    ids, mask = left_padded(T=12)
    kl = partial_exit_threshold(model, ids, mask)
    out = model.generate(ids, 5, attention_mask=mask, stop_tokens=[], method_knobs={"exit_kl": kl})
    model.train()
    assert torch.equal(model.generate(ids, 5, attention_mask=mask, stop_tokens=[], method_knobs={"exit_kl": kl}), out)
    with model.override(exit_kl=kl), pytest.raises(ValueError, match="inference knob"):
        model(ids, attention_mask=mask)


@pytest.mark.slow
def test_compiled_decode_equals_eager():
    """generate(compile=True) (one compiled decode step over a static cache; CUDA graphs on a GPU) gives the eager
    tokens: depth attention's stacked path, the per-step RoPE table and the skipped statistics trace."""
    model = varied(tiny())
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, 6, stop_tokens=[], compile=True), model.generate(ids, 6, stop_tokens=[]))


@pytest.mark.slow
def test_a_training_layer_compiles_as_one_graph_with_its_grouped_experts():
    """The float32 grouped expert matmul compiles (an opaque custom op: torch's shape rule for it is bfloat16-only),
    so a compiled layer traces whole (fullgraph) in training, where it fell back to one matmul per expert behind a
    host sync, and gives eager's logits and gradients."""
    model = varied(tiny(num_recurrences=2)).train()  # (2 of tiny's 3: each application compiles its own graph)
    ids = torch.randint(0, 256, (4, 32))  # 128 tokens: past the every-expert path of a few (models/moe.py)
    out = model(ids)
    out.logits.square().mean().backward()
    eager = out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward, fullgraph=True, backend="eager")  # raises on a graph break
    out = model(ids)
    out.logits.square().mean().backward()
    torch.testing.assert_close(out.logits, eager[0], rtol=1e-5, atol=1e-5)
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad is not None
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, eager[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_compiled_layer_recomputes_under_activation_checkpointing_with_rope_depth_attention(monkeypatch):
    """train.compile with train.activation_checkpointing (the checkpoint wraps the compiled layer): the recomputation
    in backward traces what the forward traced. The depth-RoPE table was made by a layer's first call of a forward
    and read back by every later one, so step 0's recomputation, which found it made, saved fewer tensors than its
    forward: torch.utils.checkpoint's CheckpointError at the first backward (aot_eager: the compiled graph's saved
    tensors, without inductor's compile time)."""
    from compiling import compiled_and_checkpointed

    model = varied(tiny(num_recurrences=2, num_experts=0, intermediate_size=64)).train()
    assert model.model.layers[0].depth_attn.encoding == "rope"
    ids = torch.randint(0, 256, (2, 8))
    model(ids).logits.square().mean().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with compiled_and_checkpointed(model, monkeypatch):
        model(ids).logits.square().mean().backward()
    assert eager.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-6)


def test_generate_equals_greedy_without_cache():
    model = varied(tiny())
    ids = torch.randint(0, 256, (2, 5))
    free = ids
    with torch.no_grad():
        for _ in range(6):
            free = torch.cat([free, model(free).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(model.generate(ids, 6, stop_tokens=[]), free)
    assert model.num_slots() == 3 and KVCache.for_model(model.config, 1, 8).k.shape[0] == 3


def test_save_load_round_trip_keeps_logits_and_balancing_biases(tmp_path):
    model = varied(tiny(layers_per_group=2))
    model.model.layers[1].mlp.expert_bias.copy_(torch.linspace(-1, 1, 8))
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "dreamer"
    loaded = dyndepth.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, DreamerLM) and loaded.config == dataclasses.replace(model.config, torch_dtype="float32")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.model.layers[1].mlp.expert_bias, torch.linspace(-1, 1, 8))
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)


class CountingLoader:
    """Rows that count up from a random start (learnable), drawn from (seed, cursor): the state is the cursor."""

    def __init__(self, batch_size: int, seq_len: int, seed: int = 0) -> None:
        self.batch_size, self.seq_len, self.seed, self.cursor = batch_size, seq_len, seed, 0

    def next_batch(self) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.cursor)
        self.cursor += 1
        rows = (torch.randint(0, 256, (self.batch_size, 1), generator=g) + torch.arange(self.seq_len + 1)) % 256
        return {"input_ids": rows[:, :-1].clone(), "labels": rows[:, 1:].clone()}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = state["cursor"]


RECIPE = ('[model]\ntype = "dreamer"\nvocab_size = 256\nhidden_size = 32\nnum_attention_heads = 2\n'
          'num_key_value_heads = 1\nnum_recurrences = 2\nnum_experts = 8\nnum_experts_per_tok = 2\n'
          'moe_intermediate_size = 16\nea_bias_update_rate = 0.01\n'
          '[train]\nbatch_size = 4\nseq_len = 16\nlog_every = 1\nwarmup = 1\nlr = 3e-3\nmin_lr = 3e-4\n'
          'progress = false\nplot = false\ndevice = "cpu"\n[eval]\nenabled = false\n')


@pytest.mark.parametrize("da_mode", ["separate", "none"])
def test_a_checkpoint_with_the_old_sandwich_norm_names_loads(tmp_path, da_mode):
    """Before 2026-12-03 the post-norms were post_sublayer_norms.0 / .1 / .2 (SA, DA, FFN; .1 also without DA)."""
    from safetensors.torch import load_file, save_file
    model = varied(tiny(da_mode=da_mode, sandwich_norm=True))
    model.save_pretrained(tmp_path / "m")
    path = next((tmp_path / "m").glob("*.safetensors"))
    state, D = load_file(path), model.config.hidden_size
    for i, part in enumerate(("sa", "da", "ffn")):
        key = f"model.layers.0.post_sublayer_norms.{part}.weight"
        state[key.replace(part, str(i))] = state.pop(key) if key in state else torch.ones(D)
    save_file(state, path, metadata={"format": "pt"})
    old = {k.replace(".sa.", ".0.").replace(".da.", ".1.").replace(".ffn.", ".2."): v
           for k, v in model.state_dict().items()}
    direct = DreamerLM(model.config)  # a training checkpoint's path: load_state_dict (resume)
    direct.load_state_dict(old)
    loaded = dyndepth.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(direct(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("sampled", [False, True])
def test_training_lowers_the_loss_and_resuming_continues_the_same_run(tmp_path, sampled):
    """sampled: randomised recurrence with truncated backprop over two micro-batches a step (each draws its own
    depth; the resumed run continues the draws from the checkpoint's counter)."""
    extra = 'sample_recurrence = true\nbackprop_depth = 1\n' if sampled else ''
    (tmp_path / "r.toml").write_text(RECIPE.replace("[train]\n", extra + "[train]\n"))
    out = tmp_path / "run"

    def run(resume):
        return run_training(tmp_path / "r.toml", [f"train.out_dir={out}", "train.steps=20", "train.save_every=10",
                                                  f"train.resume={resume}", f"train.grad_accum={2 if sampled else 1}"],
                            loader=CountingLoader(4, 16))

    whole = run("false")
    first = sum(loss for _, loss in whole.losses[:3]) / 3
    assert sum(loss for _, loss in whole.losses[-3:]) / 3 < first - 0.3
    if sampled:  # the logged depth is the mean of the step's two draws
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        depths = [r["dreamer/avg_depth"] for r in records if "dreamer/avg_depth" in r]
        assert len(depths) == 20 and len(set(depths)) > 3 and all(d * 2 == int(d * 2) for d in depths), depths
    trained = dyndepth.from_pretrained(out / "model")
    bias = trained.model.layers[0].mlp.expert_bias
    assert bias.abs().sum() > 0  # the balancing hook ran
    resumed = run(str(out / "step_0000010"))  # the step-20 checkpoint is set aside
    assert [s for s, _ in resumed.losses] == list(range(11, 21))
    assert [loss for _, loss in resumed.losses] == pytest.approx([loss for _, loss in whole.losses[10:]], rel=1e-4)
    again = dyndepth.from_pretrained(out / "model")
    torch.testing.assert_close(again.model.layers[0].mlp.expert_bias, bias)
    torch.testing.assert_close(again.lm_head.weight, trained.lm_head.weight)
    assert isinstance(build_model({"type": "dreamer", "hidden_size": 32, "num_attention_heads": 2,
                                   "num_key_value_heads": 1}), DreamerLM)


def test_activation_checkpointing_gives_the_same_gradients():
    model = varied(tiny(num_recurrences=3)).train()
    ckpt = copy.deepcopy(model)
    apply_activation_checkpointing(ckpt)
    ids = torch.randint(0, 256, (2, 10))
    grads = []
    for m in (model, ckpt):
        loss = F.cross_entropy(m(ids).logits.flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


def test_randomised_recurrence_draws_each_training_forward_and_evaluation_runs_num_recurrences(tmp_path):
    cfg = tiny(num_recurrences=3, sample_recurrence=True)
    a, b = varied(cfg).train(), varied(cfg).train()
    ids = torch.randint(0, 256, (2, 8))
    torch.manual_seed(1)
    depths = [int(a(ids).stats["dreamer/avg_depth"]) for _ in range(12)]
    torch.manual_seed(2)  # another rank's global RNG: the draws do not read it
    assert [int(b(ids).stats["dreamer/avg_depth"]) for _ in range(12)] == depths
    assert len(set(depths)) > 2 and min(depths) >= 1, depths
    out = a(ids)  # a training forward is the model at its drawn depth
    drawn = int(out.stats["dreamer/avg_depth"])
    assert "dreamer/expert_usage" not in out.stats and out.stats["dreamer/expert_load"].shape == (1, 8)
    assert float(out.stats["dreamer/expert_load"].sum()) == 2 * 8 * 2 * drawn  # k selections per token and step
    a.eval()
    with torch.no_grad(), a.override(steps=drawn):
        torch.testing.assert_close(out.logits.detach(), a(ids).logits, rtol=1e-5, atol=1e-5)
    evaluated = a(ids).stats
    assert int(evaluated["dreamer/avg_depth"]) == 3 and evaluated["dreamer/expert_usage"].shape == (3, 8)
    a.train()  # a cached forward (generation) never draws, even in training mode: it runs num_recurrences
    draws = int(a.recurrence_draws)
    with torch.no_grad():
        generated = a.generate(ids[:1, :4], 3)
    a.eval()
    with torch.no_grad():
        assert torch.equal(generated, a.generate(ids[:1, :4], 3))
    assert int(a.recurrence_draws) == draws == 13
    a.save_pretrained(tmp_path / "m")  # the draw counter travels with the weights: a resumed run continues
    loaded = dyndepth.from_pretrained(tmp_path / "m").train()
    assert int(loaded.recurrence_draws) == 13
    assert int(loaded(ids).stats["dreamer/avg_depth"]) == int(a.train()(ids).stats["dreamer/avg_depth"])


def test_weights_load_across_the_sampler_switch():
    """A model trained with sample_recurrence loads into one without it (its draw counter dropped: evaluation never
    draws), and a model without it into one with it (the counter starts at 0), strictly, with the same logits."""
    sampled, fixed = varied(tiny(sample_recurrence=True)), varied(tiny(), seed=1)
    sampled.recurrence_draws.fill_(7)
    ids = torch.randint(0, 256, (2, 6))
    into_fixed, into_sampled = DreamerLM(tiny()).eval(), DreamerLM(tiny(sample_recurrence=True)).eval()
    into_fixed.load_state_dict(sampled.state_dict())
    into_sampled.load_state_dict(fixed.state_dict())
    assert "recurrence_draws" not in into_fixed.state_dict() and int(into_sampled.recurrence_draws) == 0
    with torch.no_grad():
        torch.testing.assert_close(into_fixed(ids).logits, sampled.eval()(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(into_sampled(ids).logits, fixed.eval()(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("sample", [False, True])
def test_truncated_backprop_computes_the_same_function_and_trains_only_the_last_steps(sample):
    """backprop_depth = 2: the learned per-step rows of the no-grad steps get exactly no gradient, the rest do;
    with backprop through every step all rows do. The forward is the evaluation forward at the same depth."""
    fields = {"num_recurrences": 4, "sa_step_encoding": True, "da_step_encoding": "learned",
              "sample_recurrence": sample}
    ids = torch.randint(0, 256, (2, 8))
    rows = {}
    for depth in (2, 0):
        model = varied(tiny(**fields, backprop_depth=depth)).train()
        if sample:  # a drawn count past num_recurrences: 5 steps, the first 3 without gradients (huginn's sampler)
            model.training_steps = lambda: (3, 2) if depth else (0, 5)
        out = model(ids)
        assert int(out.stats["dreamer/avg_depth"]) == (5 if sample else 4)
        F.cross_entropy(out.logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        layer = model.model.layers[0]
        rows[depth] = [t.grad.abs().sum(-1) for t in (layer.sa_step_embed, layer.depth_attn.step_embed)]
        assert layer.mlp.expert_keys.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0
        model.eval()
        with torch.no_grad(), model.override(steps=5 if sample else 4):
            torch.testing.assert_close(out.logits.detach(), model(ids).logits, rtol=1e-5, atol=1e-5)
    no_grad = 3 if sample else 2  # steps past the table's last row reuse it: step 4 trains row 3
    sa, da = rows[2]
    assert (sa[:no_grad] == 0).all() and (sa[no_grad:] > 0).all(), sa
    # DA's row 0 encodes the embedding's depth-memory entry, which keeps its gradient (the embedding's path)
    assert da[0] > 0 and (da[1:no_grad] == 0).all() and (da[no_grad:] > 0).all(), da
    for table in rows[0]:
        assert (table > 0).all(), table


@pytest.mark.parametrize("fields", [{}, {"da_mode": "none", "input_injection": True},
                                    {"da_mode": "merged_softmax", "input_injection": True}])
def test_truncated_backprop_still_trains_the_input_embedding(fields):
    """Untied embeddings: the input embedding reaches the trained steps through the embedding's depth-memory entry
    (kept with its gradient) or through input injection; a configuration with neither path is refused."""
    model = varied(tiny(num_recurrences=4, backprop_depth=1, tie_word_embeddings=False, **fields)).train()
    ids = torch.randint(0, 256, (2, 8))
    F.cross_entropy(model(ids).logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert model.model.embed_tokens.weight.grad[ids.unique()].abs().sum(-1).min() > 0
    with pytest.raises(dyndepth.ConfigError, match="input_injection=True"):
        tiny(backprop_depth=1, da_mode="none")


def test_training_flops_count_the_backward_of_the_steps_that_take_gradients_only():
    from dyndepth.core import flops
    full, truncated = DreamerLM(tiny(num_recurrences=4)), DreamerLM(tiny(num_recurrences=4, backprop_depth=1))
    step = [flops.recurrent_step_flops(full.config, r, 16, 0) for r in range(4)]
    saved = 2 * sum(step[:3]) / 16  # the backward of steps 0..2
    assert full.train_flops_per_token(16) - truncated.train_flops_per_token(16) == pytest.approx(saved, rel=1e-9)
    with full.override(steps=2):  # training at another depth counts the steps its forwards run
        assert full.train_flops_per_token(16) == pytest.approx(
            3 * flops.recurrent_forward_flops(full.config, 16, steps=2) / 16, rel=1e-9)
        full.train()
        assert full.training_steps() is None and full.num_steps == 2
    # SwitchHead's router recomputation: a forward on every step, a backward on the trained ones only
    switch = {"attn_num_experts": 4, "num_recurrences": 4, "backprop_depth": 1}
    on, off = DreamerLM(tiny(**switch)), DreamerLM(tiny(**switch, attn_entropy_coef=0.0))
    router = flops.switchhead_router_flops(on.config)
    assert on.train_flops_per_token(16) - off.train_flops_per_token(16) == pytest.approx(router * (4 + 2 * 1))
    # randomised depth: the expectation over the sampler (training FLOPs are not linear in the draw), checked
    # against other draws than the ones it averages
    from dyndepth.models.huginn import sample_recurrence
    sampled = DreamerLM(tiny(num_recurrences=4, sample_recurrence=True, backprop_depth=2))
    g = torch.Generator().manual_seed(1)
    draws = [sample_recurrence(4, 2, g) for _ in range(30000)]

    def cost(n, k):
        fwd = flops.recurrent_forward_flops(sampled.config, 16, steps=n + k)
        return (3 * fwd - 2 * flops.recurrent_forward_flops(sampled.config, 16, lm_head=False, steps=n)) / 16
    assert sampled.train_flops_per_token(16) == pytest.approx(sum(cost(*d) for d in draws) / len(draws), rel=1e-2)


GRADIENT_OPTIONS = [{"input_injection": True}, {"layers_per_group": 2}, {"attn_num_experts": 4},
                    {"ea_depth_encoding": "learned", "num_recurrences": 4}, {"ea_depth_encoding": "rope"},
                    {"da_include_self": True}, {"da_parallel": True}, {"da_recompute": True, "sandwich_norm": True},
                    {"ea_aux_loss_coef": 0.1, "ea_entropy_coef": 0.01}, {"num_experts": 0, "sandwich_norm": True},
                    {"sa_step_encoding": True, "ea_z_loss_coef": 0.01},
                    {"da_step_encoding": "learned", "da_include_self": True}, {"expert_act": "gelu"},
                    {"sub_block_gate": 0.1}, {"sub_block_gate": 0.1, "da_mode": "merged_softmax"}]


@pytest.mark.parametrize("options", [{"da_mode": m, "sandwich_norm": s} for m in DA_MODES for s in (False, True)]
                         + GRADIENT_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_one_training_loss_gives_every_parameter_a_gradient(options):
    """A parameter no loss reaches is dead weight that DDP rejects (sandwich_norm once built a depth post-norm for
    every da_mode, unused without depth attention). No exclusions: in training all num_recurrences steps run, so
    every step_embed row is used (checked row by row), and every other parameter takes part at every step."""
    model = varied(tiny(**options)).train()
    ids = torch.randint(0, 256, (2, 8))
    out = model(ids)
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    (loss if out.aux_loss is None else loss + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    for layer in model.model.layers:
        if hasattr(layer.mlp, "step_embed"):
            assert (layer.mlp.step_embed.grad.abs().sum(-1) > 0).all()  # (R,): every step's encoding


def _loss_grads_and_saved_bytes(model, ids) -> tuple[dict, int]:
    """One training loss's parameter gradients, and the bytes of the activations autograd saved for it."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(ids).logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, sum(kept.values())


@pytest.mark.parametrize("knobs", [{"da_include_self": True}, {"da_parallel": True, "layers_per_group": 2}])
def test_depth_attention_recompute_gives_the_same_gradients_and_saves_less(knobs):
    ids = torch.randint(0, 256, (2, 24))
    (plain, plain_bytes), (recomputed, recomputed_bytes) = (
        _loss_grads_and_saved_bytes(varied(tiny(num_recurrences=4, da_recompute=on, **knobs)).train(), ids)
        for on in (False, True))
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, rtol=1e-5, atol=1e-6)
    # per step the query's projection, q/k norms' inputs and the products' operands are no longer saved
    assert recomputed_bytes < 0.85 * plain_bytes


def _sdpa_flops(q_shape, k_shape, v_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    B, N, T, H = q_shape
    S = k_shape[2]
    return 4 * B * N * (T * (T + 1) // 2 if is_causal else T * S) * H


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs):
    """2D (M, K) rows against 3D (E, K, N) weights: every row multiplies one expert's matrix."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def counted(model, ids, **kwargs):
    """The forward's output and the FLOPs torch counts for it, plus depth attention's per-entry products (QK and
    PV, 2 per multiply-add), which `FlopCounterMode` does not see (it counts matmuls; a token attends over its own
    <= R memory entries elementwise): counted from each call's actual tokens and memory entries."""
    products = []

    def record(module, args, output):  # args: x (B, T, D), norm, rope, keys [L x (B, T, N, H)], values
        h, _, _, keys, _ = args
        products.append(h.shape[0] * h.shape[1] * len(keys) * 4 * module.num_heads * module.head_dim)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, DepthAttention)]
    mapping = {SDPA_CPU: _sdpa_flops, torch.ops.aten._grouped_mm: _grouped_mm_flops}
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
            out = model(ids, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return out, counter.get_total_flops() + sum(products)


@pytest.mark.parametrize("da_mode", DA_MODES)
@pytest.mark.parametrize("experts", [8, 0])
@pytest.mark.parametrize("options", [{}, {"da_step_encoding": "learned", "expert_act": "gelu"}])
def test_ledger_executed_flops_equal_torchs_counter_and_ideal_equals_the_analytic_count(da_mode, experts, options):
    if da_mode != "separate":  # a learned step encoding is separate depth attention's
        options = {k: v for k, v in options.items() if k != "da_step_encoding"}
    model = varied(tiny(da_mode=da_mode, num_experts=experts, da_include_self=da_mode == "separate", **options))
    ids, mask = left_padded(B=3, T=14)
    out, torch_flops = counted(model, ids)
    assert float(out.stats["flops/executed"]) == torch_flops
    assert float(out.stats["flops/ideal"]) == model.forward_flops(14, B=3) == float(out.stats["flops/dense"])
    out, torch_flops = counted(model, ids, attention_mask=mask)
    assert float(out.stats["flops/executed"]) == torch_flops
    if da_mode != "merged_softmax":  # merged computes the masked pairs too: executed > ideal even unpadded
        lengths = mask.sum(1).tolist()
        assert float(out.stats["flops/ideal"]) == sum(model.forward_flops(n) for n in lengths)
    cache = KVCache.for_model(model.config, 3, 16, num_slots=model.num_slots())
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    counted(model, ids, attention_mask=mask, positions=pos, cache=cache)
    out, torch_flops = counted(model, torch.randint(0, 256, (3, 1)), positions=pos[:, -1:] + 1, cache=cache)
    assert float(out.stats["flops/executed"]) == torch_flops


def test_per_token_exit_saves_ideal_flops_and_more_steps_cost_more():
    model = varied(tiny(num_recurrences=4))
    ids = torch.randint(0, 256, (2, 10))
    kl = partial_exit_threshold(model, ids, None)
    with torch.no_grad():
        plain = model(ids)
        with model.override(exit_kl=kl):
            exited = model(ids)
        with model.override(steps=6):
            deeper = model(ids).stats
            assert float(deeper["flops/executed"]) == model.forward_flops(10, B=2)
    assert float(exited.stats["dreamer/avg_depth"]) < 4.0 == float(plain.stats["dreamer/avg_depth"])
    layers = [sum(out.compute.total(which, part) for part in ("attn", "depth_attn", "experts"))
              for out in (plain, exited) for which in ("executed", "ideal")]
    assert layers[0] == layers[1] == layers[2] > layers[3]  # exit runs every token, counts only the running
    check = exited.compute.total("executed", "exit")
    assert check == 3 * 20 * 2 * 64 * 256 > exited.compute.total("ideal", "exit")  # lm_head after steps 0..2
    assert float(deeper["flops/executed"]) > float(plain.stats["flops/executed"])
    assert deeper["dreamer/expert_usage"].shape == (6, 8) and deeper["dreamer/state_change"].shape == (6,)
    with pytest.raises(ValueError, match="no knob 'depth'"), model.override(depth=3):
        pass
    for steps in (0, 2.5, "3", True):  # a float or string failed inside the schedule with a bare TypeError
        with pytest.raises(ValueError, match="whole number of recurrences"), model.override(steps=steps):
            pass


def test_float64_runs_the_experts_one_matmul_each_and_matches_float32():
    """torch's grouped matmul refuses float64 (it crashed the forward); the per-expert path runs it."""
    torch.manual_seed(0)
    model = DreamerLM(tiny(num_experts=8, num_experts_per_tok=2)).eval()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
        got = model.double()(ids).logits
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("G", [1, 2])
def test_per_token_exit_stops_exactly_the_tokens_whose_distribution_moved_less_than_the_threshold(G):
    """R=3 has one exit check, after step 1: KL(p_1 || p_0) per token, p_r = softmax(lm_head(norm(state after
    step r))), by hand from a full forward's streams, at each threshold between two successive valid tokens' KLs
    (the direction of the KL decides some of them). Tokens below it run 2 steps and keep their step-1 state (the
    2-step logits); the others run 3 (the full logits: at the last step the exited ones' K/V are still those of
    their state entering it). With a group of G layers a step ends after its last layer (streams[(r + 1) G]): the
    check runs there, not after an earlier layer of the group."""
    model = varied(tiny(num_recurrences=3, layers_per_group=G))
    ids, mask = left_padded(T=10)
    valid = mask.bool()
    trace = dyndepth.Trace(keep_streams=True)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, trace=trace).logits
        logp = [F.log_softmax(model.lm_head(model.model.norm(trace.streams[(r + 1) * G])).float(), -1)
                for r in (0, 1)]
        kl = (logp[1].exp() * (logp[1] - logp[0])).sum(-1)  # (B, T)
        with model.override(steps=2):
            two = model(ids, attention_mask=mask).logits
    ranked = kl[valid].sort().values
    gaps = [i for i in range(1, len(ranked)) if ranked[i] - ranked[i - 1] > 1e-4 * ranked[i]]  # rounding can't cross
    assert len(gaps) > len(ranked) // 2
    for i in gaps:
        threshold = float(ranked[i - 1] + ranked[i]) / 2
        trace = dyndepth.Trace()
        with model.override(exit_kl=threshold), torch.no_grad():
            out = model(ids, attention_mask=mask, trace=trace)
        exited = (kl < threshold) & valid  # i of the valid tokens
        depth = (3.0 - exited.float())[valid]
        torch.testing.assert_close(trace.ctx.model_state.depth[valid], depth, rtol=0, atol=0)
        assert float(out.stats["dreamer/avg_depth"]) == pytest.approx(float(depth.mean()))
        torch.testing.assert_close(out.logits[exited], two[exited], rtol=0, atol=0)
        if G == 1:  # (with G = 2, an exited token's K/V at layer 1 of step 2 are from its frozen state, not the full
            # forward's state after layer 0: the running tokens attending to them differ from the full forward)
            torch.testing.assert_close(out.logits[valid & ~exited], full[valid & ~exited], rtol=0, atol=0)


def test_cached_forwards_skip_the_analysis_statistics():
    """Generation's forwards (through a KV cache) record no expert usage, load, diversity or state change (their ~25
    ops per application would be dropped); the full forward over the same tokens has them all, and both count FLOPs."""
    model = varied(tiny())
    ids = torch.randint(0, 256, (2, 8))
    cache = KVCache.for_model(model.config, 2, 9, num_slots=model.num_slots())
    with torch.no_grad():
        full = model(ids).stats
        prefill = model(ids, positions=torch.arange(8).expand(2, 8), cache=cache).stats
        step = model(ids[:, :1], positions=torch.full((2, 1), 8), cache=cache).stats
    analysis = {"dreamer/expert_usage", "dreamer/expert_load", "dreamer/expert_diversity", "dreamer/expert_set_entropy",
                "dreamer/state_change"}
    assert analysis <= set(full)
    for cached in (prefill, step):
        assert not analysis & set(cached) and float(cached["flops/executed"]) > 0 and "dreamer/avg_depth" in cached


def test_a_decode_step_dispatches_under_twice_the_ops_of_a_decoder_with_a_layer_per_application():
    """A decode step is launch-bound on a GPU (and op-bound on a CPU): Dreamer's, at R = 8, stays under 2x the ops
    of a decoder of the same shapes with 8 layers: 1.89x measured; 1.93x with a RoPE call per step for depth
    attention, 2.10x with depth attention per entry in decode steps, 2.15x with cached forwards recording the
    analysis statistics, 2.32x with all three."""
    R = 8
    dreamer = DreamerLM(tiny(num_recurrences=R)).eval()
    decoder = tiny_decoder(layers=R)
    ops = {}
    for name, model in (("dreamer", dreamer), ("decoder", decoder)):
        ids = torch.randint(0, 256, (2, 7))
        cache = KVCache.for_model(model.config, 2, 8, num_slots=model.num_slots())
        with torch.no_grad():
            model(ids[:, :6], positions=torch.arange(6).expand(2, 6), cache=cache)
            with OpCounter() as counter:
                model(ids[:, 6:], positions=torch.full((2, 1), 6), cache=cache)
        ops[name] = counter.n
    assert ops["dreamer"] < 2.0 * ops["decoder"], ops


def test_state_change_is_an_evaluation_statistic():
    model = varied(tiny())
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        change = model(ids).stats["dreamer/state_change"]
    assert change.shape == (3,) and (change > 0).all()  # one per step
    model.train()
    assert "dreamer/state_change" not in model(ids).stats  # training forwards skip its passes


def test_state_change_is_the_mean_relative_change_over_valid_tokens():
    """dreamer/state_change[a] = mean over valid tokens of |x_out - x_in| / |x_in| at application a, by hand from
    the streams (not the max, not over padding)."""
    model = varied(tiny(layers_per_group=2))
    ids, mask = left_padded()
    trace = dyndepth.Trace(keep_streams=True)
    with torch.no_grad():
        change = model(ids, attention_mask=mask, trace=trace).stats["dreamer/state_change"]
    s, valid = trace.streams, mask.bool()
    expected = [((s[a + 1] - s[a]).norm(dim=-1) / s[a].norm(dim=-1))[valid].mean() for a in range(len(s) - 1)]
    torch.testing.assert_close(change, torch.stack(expected), rtol=1e-6, atol=0)


def _recorded_selections(model, ids, mask):
    """The forward's stats and the experts each expert-attention call chose, [application] (B*T, K) sorted."""
    chosen = []
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out: chosen.append(out[1].sort(-1).values))
             for layer in model.model.layers]
    with torch.no_grad():
        stats = model(ids, attention_mask=mask).stats
    for hook in hooks:
        hook.remove()
    return stats, chosen


def _set_entropy(sets) -> float:
    """Entropy (nats) of the distribution of the given top-k sets."""
    counts = collections.Counter(sets)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_expert_statistics_have_exact_values_on_a_designed_routing():
    """Routing made known: every sublayer's output projection is zeroed (the stream stays the embedding), token v's
    embedding is one-hot at dim 4 + v % 4 (normed: 8 there), expert e's key one-hot at dim e, and the step
    encodings add 20 to expert 0 (step 0), 1 (step 1), 4 and 5 (step 2). So a token with e = 4 + v % 4 picks
    {0, e}, {1, e}, {4, 5}: 4 distinct experts for e in {4, 5}, 5 for e = 6. The 12 valid tokens have e = 4 (6),
    5 (3), 6 (3); the 6 PAD tokens e = 7, counted nowhere."""
    model = varied(tiny(num_recurrences=3, num_experts=8, num_experts_per_tok=2))
    layer = model.model.layers[0]
    with torch.no_grad():
        for p in (layer.self_attn.o_proj.weight, layer.depth_attn.o_proj.weight, layer.mlp.experts.down_proj,
                  layer.mlp.step_embed, layer.mlp.expert_keys, model.model.embed_tokens.weight):
            p.zero_()
        model.model.embed_tokens.weight[torch.arange(256), 4 + torch.arange(256) % 4] = 1.0
        layer.mlp.expert_keys[:, :8] = torch.eye(8)
        layer.mlp.step_embed[0, 0] = layer.mlp.step_embed[1, 1] = 20.0
        layer.mlp.step_embed[2, 4] = layer.mlp.step_embed[2, 5] = 20.0
    ids = torch.tensor([[0, 4, 8, 12, 1, 5], [3, 3, 16, 20, 9, 2], [7, 7, 7, 7, 6, 10]])
    mask = torch.tensor([[1] * 6, [0] * 2 + [1] * 4, [0] * 4 + [1] * 2])
    stats, chosen = _recorded_selections(model, ids, mask)
    e = (4 + ids % 4).reshape(-1, 1)
    fixed = torch.tensor([[0], [1]])
    for step, (idx, sets) in enumerate(zip(chosen, [torch.cat([fixed[0].expand_as(e), e], 1),
                                                     torch.cat([fixed[1].expand_as(e), e], 1),
                                                     torch.tensor([[4, 5]]).expand(18, 2)])):
        assert torch.equal(idx, sets), step  # the design holds (the values below follow from it)
    # definition a: (6 * 4 + 3 * 4 + 3 * 5) / 12 distinct experts per token, of min(k R, E) = min(6, 8)
    assert float(stats["dreamer/expert_diversity"]) == pytest.approx(51 / 12 / 6, rel=1e-6)
    # definition b: steps 0 and 1 split tokens 6 / 3 / 3 over three sets (1.5 ln 2 nats), step 2 one set (0)
    assert float(stats["dreamer/expert_set_entropy"]) == pytest.approx((1.5 + 1.5 + 0) * math.log(2) / 3, rel=1e-6)
    valid = mask.bool().reshape(-1).tolist()
    counted = [_set_entropy(tuple(row) for row, v in zip(idx.tolist(), valid) if v) for idx in chosen]
    assert float(stats["dreamer/expert_set_entropy"]) == pytest.approx(sum(counted) / 3, rel=1e-6)
    usage = torch.zeros(3, 8)
    usage[0, [0, 4, 5, 6]] = torch.tensor([12.0, 6, 3, 3])
    usage[1, [1, 4, 5, 6]] = torch.tensor([12.0, 6, 3, 3])
    usage[2, [4, 5]] = 12.0
    torch.testing.assert_close(stats["dreamer/expert_usage"], usage, rtol=0, atol=0)
    torch.testing.assert_close(stats["dreamer/state_change"], torch.zeros(3), rtol=0, atol=0)


@pytest.mark.parametrize("da_mode", ["separate", "none"])
def test_sub_block_gates_scale_each_sub_blocks_output(da_mode):
    """Gates at 1 are the ungated model; gates at 0 make every step the identity (logits of the embedding alone);
    a gate on one sub-block only scales that sub-block (here: DA off by its gate equals da_mode none)."""
    base = varied(tiny(da_mode=da_mode, sandwich_norm=True))
    ids, mask = left_padded()
    gated = DreamerLM(tiny(da_mode=da_mode, sandwich_norm=True, sub_block_gate=1.0))
    gated.load_state_dict(base.state_dict(), strict=False)
    parts = ["da", "ffn", "sa"] if da_mode == "separate" else ["ffn", "sa"]
    assert sorted(gated.model.layers[0].sub_block_gates) == parts
    with torch.no_grad():
        torch.testing.assert_close(gated(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)
        for gate in gated.model.layers[0].sub_block_gates.values():
            gate.zero_()
        embed_only = gated.lm_head(gated.model.norm(gated.model.embed_tokens(ids)))
        torch.testing.assert_close(gated(ids, attention_mask=mask).logits, embed_only, rtol=1e-6, atol=1e-6)
        if da_mode == "separate":
            gated.model.layers[0].sub_block_gates["sa"].fill_(1.0)
            gated.model.layers[0].sub_block_gates["ffn"].fill_(1.0)
            without = DreamerLM(tiny(da_mode="none", sandwich_norm=True))
            without.load_state_dict(base.state_dict(), strict=False)
            torch.testing.assert_close(gated(ids, attention_mask=mask).logits,
                                       without(ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_a_sub_block_gate_scales_the_output_after_its_sandwich_norm():
    """One step, SA and DA gated off: the state after the step is embedding + g * ffn_norm(ffn(...)), linear in g
    (a gate before the sandwich norm would be undone by it)."""
    from dyndepth.models.forward import Trace
    model = varied(tiny(num_recurrences=1, sandwich_norm=True, sub_block_gate=1.0))
    ids = torch.randint(0, 256, (2, 8))
    gates = model.model.layers[0].sub_block_gates
    change = {}
    with torch.no_grad():
        gates["sa"].zero_()
        gates["da"].zero_()
        for g in (1.0, 0.5):
            gates["ffn"].fill_(g)
            trace = Trace(keep_streams=True)
            model(ids, trace=trace)
            change[g] = trace.streams[1] - trace.streams[0]
    assert change[1.0].abs().max() > 1e-2
    torch.testing.assert_close(change[0.5], 0.5 * change[1.0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("E", [8, 4])  # k R = 6 below E, and above it
def test_expert_statistics_equal_counts_over_the_recorded_selections(E):
    """On a free routing with two layers per group and left padding: usage, diversity (distinct experts per valid
    token and layer over its steps, mean over layers, / min(k R, E)) and set entropy (per application over valid
    tokens, a Counter of sets; mean over applications) from the experts each call recorded."""
    model = varied(tiny(num_recurrences=3, layers_per_group=2, num_experts=E, num_experts_per_tok=2))
    ids, mask = left_padded()
    stats, chosen = _recorded_selections(model, ids, mask)
    valid = mask.bool().reshape(-1).tolist()
    rows = [[row for row, v in zip(idx.tolist(), valid) if v] for idx in chosen]  # [application] valid tokens' sets
    usage = torch.stack([torch.bincount(torch.tensor(r).reshape(-1), minlength=E).float() for r in rows])
    torch.testing.assert_close(stats["dreamer/expert_usage"], usage, rtol=0, atol=0)
    load = torch.stack([usage[g::2].sum(0) for g in range(2)])  # each layer's load over its own applications
    torch.testing.assert_close(stats["dreamer/expert_load"], load, rtol=0, atol=0)
    distinct = [len(set().union(*(rows[a][n] for a in range(g, 6, 2)))) for g in range(2) for n in range(len(rows[0]))]
    assert float(stats["dreamer/expert_diversity"]) == pytest.approx(sum(distinct) / len(distinct) / min(6, E), rel=1e-6)
    entropy = sum(_set_entropy(map(tuple, r)) for r in rows) / 6
    assert float(stats["dreamer/expert_set_entropy"]) == pytest.approx(entropy, rel=1e-6)
    assert 0 < entropy and sum(distinct) / len(distinct) > 2  # neither a single set nor one expert pair per token


@pytest.mark.parametrize("options", [{"input_injection": True}, {"sandwich_norm": True}, {"da_parallel": True},
                                     {"ea_depth_encoding": "rope"}, {"ea_depth_encoding": "none"},
                                     {"norm_topk_prob": False}, {"da_head_dim": 8, "da_num_heads": 2},
                                     {"sa_step_encoding": True}, {"da_step_encoding": "learned"},
                                     {"expert_act": "gelu"}, {"sub_block_gate": 0.5, "sandwich_norm": True}])
def test_every_option_decodes_exactly_and_changes_the_output(options):
    base = varied(tiny())
    model = varied(tiny(**options))
    ids, mask = left_padded(T=10)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cached = _prefill_then_decode(model, ids, mask, 7)
        if "da_head_dim" not in options and "expert_act" not in options:  # same shapes: the option changes it
            model.load_state_dict(base.state_dict(), strict=False)
            assert (model(ids).logits - base(ids).logits).abs().max() > 1e-4
    torch.testing.assert_close(cached[mask.bool()], full[mask.bool()], rtol=1e-4, atol=1e-4)


def test_the_optional_balancing_loss_trains_the_expert_keys():
    model = varied(tiny(ea_aux_loss_coef=0.1)).train()
    out = model(torch.randint(0, 256, (2, 8)))
    assert float(out.aux_loss.detach()) > 0 and "dreamer/balance_loss" in out.stats
    out.aux_loss.backward()
    assert model.model.layers[0].mlp.expert_keys.grad.abs().sum() > 0
    assert float(varied(tiny()).train()(torch.randint(0, 256, (2, 8))).aux_loss.detach()) == 0.0  # off by default


def test_the_router_z_loss_is_the_mean_squared_logsumexp_of_the_scores_over_running_tokens():
    model = varied(tiny(ea_z_loss_coef=0.01, layers_per_group=2)).train()
    ids, mask = left_padded(T=8)
    scores = []  # [application] (B*T, E) router scores
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out: scores.append(out[2].detach()))
             for layer in model.model.layers]
    out = model(ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    valid = mask.bool().reshape(-1)
    z = torch.stack([torch.logsumexp(s[valid].double(), -1).square().mean() for s in scores]).mean()
    assert float(out.stats["dreamer/z_loss"]) == pytest.approx(float(z), rel=1e-5)
    torch.testing.assert_close(out.aux_loss.double(), 0.01 * z, rtol=1e-5, atol=0)  # the only auxiliary loss on
    out.aux_loss.backward()
    assert model.model.layers[0].mlp.expert_keys.grad.abs().sum() > 0


class TwoRanks:
    """A stand-in for DistInfo whose all-reduce returns the mean of this rank's and another rank's tensor."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t.add_(self.other).div_(2)


def test_the_balancing_hook_moves_each_layer_of_a_group_by_its_own_load():
    model = varied(tiny(layers_per_group=2, num_experts=4))
    load = torch.tensor([[9.0, 1, 1, 1], [1.0, 1, 1, 9]])  # layer 0: expert 0 overloaded; layer 1: expert 3
    ExpertBiasHook().after_step(model, 1, {"dreamer/expert_load": load}, DistInfo())
    for g, overloaded in ((0, 0), (1, 3)):
        expected = torch.full((4,), 1e-3)
        expected[overloaded] = -1e-3
        torch.testing.assert_close(model.model.layers[g].mlp.expert_bias, expected)


def test_the_balancing_hook_applies_the_rank_mean_so_ranks_stay_equal():
    a, b = varied(tiny(num_recurrences=2, num_experts=4)), varied(tiny(num_recurrences=2, num_experts=4))
    load_a = torch.tensor([[16.0, 0, 0, 0]])  # (G, E) over both steps; rank a: expert 0 overloaded
    load_b = torch.tensor([[0.0, 0, 0, 24]])  # rank b: expert 3 overloaded
    ExpertBiasHook().after_step(a, 1, {"dreamer/expert_load": load_a}, TwoRanks(load_b))
    ExpertBiasHook().after_step(b, 1, {"dreamer/expert_load": load_b}, TwoRanks(load_a))
    bias = a.model.layers[0].mlp.expert_bias
    torch.testing.assert_close(bias, b.model.layers[0].mlp.expert_bias)
    torch.testing.assert_close(bias, torch.tensor([-1e-3, 1e-3, 1e-3, -1e-3]))  # mean load 5: 0 and 3 above


@pytest.mark.parametrize("fields, message", [({"da_step_encoding": "learned", "da_mode": "none"}, "da_mode='separate'"),
                                             ({"expert_act": "relu"}, "expert_act"),
                                             ({"da_step_encoding": "sinusoid"}, "da_step_encoding"),
                                             ({"backprop_depth": -1}, "backprop_depth must be >= 0"),
                                             ({"sub_block_gate": float("nan")},
                                              "sub_block_gate=nan must be a finite number")])
def test_option_errors_name_the_field_and_the_fix(fields, message):
    with pytest.raises(dyndepth.ConfigError, match=message):
        tiny(**fields)


def test_recipe_overrides_reach_the_config_by_name():
    """`--set model.da_mode=none` parses to None: a string field reads it as the word; an unknown field is named."""
    config = dyndepth.preset("dreamer-tiny", da_mode=None, ea_depth_encoding=None, rope_scaling=None)
    assert (config.da_mode, config.ea_depth_encoding) == ("none", "none")
    assert config.rope_scaling is None  # an optional field keeps None
    with pytest.raises(dyndepth.ConfigError, match="DreamerConfig has no field 'da_heads'.*'da_num_heads'"):
        dyndepth.preset("dreamer-tiny", da_heads=2)


def test_the_compiled_grouped_matmul_equals_torchs_with_its_gradients():
    """`models.moe.grouped_mm` under torch.compile (its opaque custom op) against torch's own grouped matmul in
    eager, forward and both gradients, with an empty expert, a transposed weight view and an expanded (stride-0)
    output gradient; `group_sizes` counts as bincount does, int32 indices too."""
    from dyndepth.models.moe import group_sizes, grouped_mm

    a = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(4, 8, 16, requires_grad=True)  # (E, N, K): used transposed, as the experts do
    offsets = torch.tensor([3, 3, 7, 12], dtype=torch.int32)  # expert 1 owns no row
    torch.nn.functional.grouped_mm(a, w.transpose(-2, -1), offs=offsets).backward(torch.ones(12, 8))  # (torch's
    # own backward takes no expanded gradient)
    eager = a.grad.clone(), w.grad.clone()
    a.grad = w.grad = None
    torch._dynamo.reset()
    out = torch.compile(lambda a, w: grouped_mm(a, w.transpose(-2, -1), offsets), backend="eager", fullgraph=True)(a, w)
    out.sum().backward()  # the gradient reaching the op is expanded: stride 0
    torch.testing.assert_close(a.grad, eager[0])
    torch.testing.assert_close(w.grad, eager[1])
    assert w.grad[1].abs().sum() == 0  # the empty expert
    idx = torch.tensor([3, 0, 3, 3, 1], dtype=torch.int32)
    assert torch.equal(group_sizes(idx, 5), torch.bincount(idx, minlength=5))


def test_expert_widths_the_grouped_matmul_cannot_take_run_one_matmul_per_expert():
    """F = 30 (120-byte rows in float32) is not a multiple of 16 bytes: the grouped matmul refuses it (it raised
    deep inside torch), so the experts run one matmul per expert, with the grouped path's values and gradients."""
    model = varied(tiny(moe_intermediate_size=30))
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(12, 64, requires_grad=True)
    scores, idx, gates = model.model.layers[0].mlp.route(x, 1)
    y = experts(x, idx, gates)
    y.square().sum().backward()
    ref = torch.zeros_like(y)  # per (token, expert) pair
    for n in range(12):
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            gate, up = F.linear(x[n], experts.gate_up_proj[e]).chunk(2)
            ref[n] += gates[n, k] * F.linear(F.silu(gate) * up, experts.down_proj[e])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert x.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0


@pytest.mark.parametrize("fields, message", [
    ({"num_experts_per_tok": 1}, "router gets no gradient.*norm_topk_prob = false"),  # the one gate renormalized to 1
    ({"num_experts": 0, "intermediate_size": 0}, "intermediate_size must be >= 1"),  # was silently 3 * hidden_size
    ({"initializer_range": -0.02}, "initializer_range must be >= 0"),  # failed inside torch's init
    ({"hidden_size": 36, "head_dim": None}, r"\{'head_dim': 9, 'da_head_dim': 9\} must be even"),  # named no value
    ({"rope_scaling": {"rope_type": "bogus"}}, "rope_scaling type 'bogus' is not supported"),  # ran as plain RoPE
    ({"rope_scaling": {"rope_type": "linear"}}, r"needs \['factor'\]"),  # a bare KeyError at build
    ({"rope_scaling": {"rope_type": "linear", "factor": -2}}, "finite numbers > 0"),  # accepted
])
def test_config_values_that_trained_wrong_or_failed_late_are_refused(fields, message):
    with pytest.raises(dyndepth.ConfigError, match=message):
        tiny(**fields)
    tiny(num_experts_per_tok=1, norm_topk_prob=False)  # one expert with its sigmoid gate learns
    tiny(da_mode="none", da_head_dim=7)  # depth attention's width matters only when it runs


@pytest.mark.parametrize("name", ["huginn-tiny", "mor-tiny"])
def test_the_other_recurrent_configs_check_rope_scaling_as_the_decoder_does(name):
    with pytest.raises(dyndepth.ConfigError, match="rope_scaling type 'bogus' is not supported"):
        dyndepth.preset(name, rope_scaling={"rope_type": "bogus"})
    with pytest.raises(dyndepth.ConfigError, match="initializer_range must be >= 0"):
        dyndepth.preset(name, initializer_range=-1.0)


@pytest.mark.parametrize("encoding", ["learned", "rope", "none"])
def test_expert_routing_scores_in_float32_whatever_the_model_dtype(encoding):
    """bfloat16 scores flipped ~1.6% of top-k sets at dreamer-bench's shapes: the router's (N, E) scores are computed
    in float32 from the bf16 weights and state, and under autocast from the fp32 ones."""
    ea = varied(tiny(ea_depth_encoding=encoding)).model.layers[0].mlp
    if encoding == "learned":
        torch.nn.init.normal_(ea.step_embed, std=0.5)
    h = torch.randn(64, 64)

    def reference(module, x):
        q = x.float()
        if encoding == "rope":
            cos, sin = module.rotary_emb(torch.full((1,), 2), torch.float32)
            q = dyndepth.core.layers.apply_rope(q[:, None], cos, sin)[:, 0]
        bias = module.expert_keys.float() @ module.step_embed[2].float() if encoding == "learned" else None
        return F.linear(q, module.expert_keys.float(), bias)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = ea.route(h, 2)[0]
    torch.testing.assert_close(scores, reference(ea, h), rtol=1e-6, atol=1e-6)
    low = copy.deepcopy(ea).to(torch.bfloat16)
    scores, idx, gates = low.route(h.bfloat16(), 2)
    assert scores.dtype == torch.float32 and gates.dtype == torch.bfloat16
    torch.testing.assert_close(scores, reference(low, h.bfloat16()), rtol=1e-6, atol=1e-6)


def test_the_exit_check_runs_in_blocks_with_the_same_decisions(monkeypatch):
    """The exit check's log-softmax runs over EXIT_BLOCK tokens at a time (a 3,000-token prompt with V = 32k held
    ~5 (B*T, V) float32 tensors at once): blocks of 3 tokens decide exactly as one block of all."""
    model = varied(tiny(num_recurrences=4))
    ids, mask = left_padded(T=10)
    kl = partial_exit_threshold(model, ids, mask)
    with model.override(exit_kl=kl), torch.no_grad():
        whole = model(ids, attention_mask=mask)
        monkeypatch.setattr(dreamer_layer, "EXIT_BLOCK", 3)
        trace = dyndepth.Trace()
        blocks = model(ids, attention_mask=mask, trace=trace)
    assert trace.ctx.model_state.prev_logp.shape == (3 * 10, 256)
    torch.testing.assert_close(blocks.logits, whole.logits, rtol=0, atol=0)
    assert float(blocks.stats["dreamer/avg_depth"]) == float(whole.stats["dreamer/avg_depth"]) < 4


def test_the_set_entropy_and_diversity_count_only_the_steps_tokens_ran():
    """With a threshold every token passes at the first check (after step 1), steps 2 and 3 run no token: the
    expert-set entropy is that of steps 0 and 1, as a 2-step forward's (it counted the exited tokens' choices), and
    so is the diversity, distinct experts over min(k * 2, E) (it divided by min(k * 4, E): an exiting model read as
    less diverse than it was)."""
    model = varied(tiny(num_recurrences=4))
    ids = torch.randint(0, 256, (3, 10))
    with torch.no_grad():
        with model.override(exit_kl=1e9):
            exited = model(ids).stats
        with model.override(steps=2):
            two = model(ids).stats
    assert float(exited["dreamer/avg_depth"]) == 2.0
    assert float(exited["dreamer/expert_set_entropy"]) == pytest.approx(float(two["dreamer/expert_set_entropy"]))
    assert float(exited["dreamer/expert_diversity"]) == pytest.approx(float(two["dreamer/expert_diversity"]))
    one_token = model(ids[:, :1]).stats  # a full forward of one-token rows has it too (eval/dreamer.py reads it)
    assert float(one_token["dreamer/expert_set_entropy"]) >= 0


def test_a_cache_without_a_slot_per_application_or_of_another_batch_is_a_clear_error():
    model = varied(tiny(num_recurrences=3))
    ids, pos = torch.randint(0, 256, (3, 5)), torch.arange(5).expand(3, 5)
    cache = KVCache.for_model(model.config, 2, 16)  # 3 slots: one per trained step
    with model.override(steps=5), pytest.raises(ValueError, match=r"3 slots but this forward writes 5.*num_slots="):
        model(ids[:2], positions=pos[:2], cache=cache)  # an IndexError inside the cache
    with pytest.raises(ValueError, match="the KV cache holds 2 rows but input_ids has 3"):
        model(ids, positions=pos, cache=cache)
    model(ids[:2], positions=pos[:2], cache=cache)  # the cache as made


@pytest.mark.parametrize("recipe", ["dreamer_tiny_cpu", "dreamer_gutenberg_cpu", "dreamer_small"])
def test_each_dreamer_recipe_states_its_models_parameter_count(recipe):
    """The header's "X.XXM parameters" equals the recipe's model to the digits it gives (the gutenberg recipe said
    ~1.1M for its 1.23M: a 4096-token vocabulary's tied embedding is 0.52M, not 0.36M)."""
    import re
    from pathlib import Path

    from dyndepth.runconfig import load_run_config
    path = Path(__file__).parents[2] / "recipes" / f"{recipe}.toml"
    stated = re.search(r"~?(\d+\.\d+)M parameters", path.read_text().replace("\n#", "")).group(1)
    with torch.device("meta"):
        model = build_model(load_run_config(path).model)
    decimals = len(stated.split(".")[1])
    assert f"{sum(p.numel() for p in model.parameters()) / 1e6:.{decimals}f}" == stated
