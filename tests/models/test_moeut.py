"""The MoEUT-style baseline (models/moeut.py), a Dreamer configuration: sigma-MoE routing, the entropy regulariser,
layer groups, cached generation, checkpoints, the trainer and the FLOP count against torch's counter."""

import dataclasses
import math

import families
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dyndepth
from dyndepth import KVCache
from dyndepth.models import moe
from dyndepth.models.dreamer import DreamerConfig, DreamerLM, entropy_regularizer
from dyndepth.models.moeut import is_moeut, moeut_config
from dyndepth.train import run_training

SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def tiny(**kw):
    fields = {"vocab_size": 256, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_recurrences": 2, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
              "max_position_embeddings": 64}
    return moeut_config(**{**fields, **kw})


def varied(config, seed: int = 0) -> DreamerLM:
    return families.varied(DreamerLM, config, std=0.2, seed=seed)


def test_it_is_a_looped_group_of_two_layers_with_unnormalized_sigmoid_gates_and_no_balancing_hook():
    model = varied(tiny())
    assert is_moeut(model.config) and len(model.model.layers) == 2
    assert [(a.layer, a.slot) for a in model.schedule] == [(0, 0), (1, 1), (0, 2), (1, 3)]
    assert not hasattr(model.model.layers[0], "depth_attn") and model.trainer_hooks(10) == []
    scores, idx, gates = model.model.layers[0].mlp.route(torch.randn(20, 32), step=1)
    torch.testing.assert_close(gates, torch.sigmoid(scores).gather(1, idx))  # no renormalisation
    torch.testing.assert_close(idx.sort(-1).values, scores.topk(2).indices.sort(-1).values)
    with pytest.raises(ValueError, match="define MoEUT"):
        moeut_config(da_mode="separate")


def test_the_entropy_regularizer_matches_a_slow_per_sequence_reference_and_trains_the_router():
    A, B, T, E = 3, 2, 5, 4
    logits = torch.randn(A, B, T, E)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :2] = False
    slow = []
    for b in range(B):
        p = torch.stack([F.softmax(logits[a, b, t], -1) for a in range(A) for t in range(T) if valid[b, t]]).mean(0)
        slow.append((p * p.log()).sum())
    torch.testing.assert_close(entropy_regularizer(logits, valid), torch.stack(slow).mean())
    assert float(entropy_regularizer(torch.zeros(A, B, T, E), valid)) == pytest.approx(-math.log(E))
    empty = torch.zeros(B, T, dtype=torch.bool)  # a row without a valid token counts in no mean
    regs = [entropy_regularizer(torch.cat([logits, logits], 1), torch.cat([valid, v])) for v in (valid, empty)]
    torch.testing.assert_close(regs[1], entropy_regularizer(logits, valid))
    torch.testing.assert_close(regs[0], regs[1])
    model = varied(tiny()).train()
    out = model(torch.randint(0, 256, (2, 8)))
    reg = out.stats["dreamer/entropy_reg"]
    torch.testing.assert_close(out.aux_loss.detach(), 0.01 * reg)
    out.aux_loss.backward()
    assert model.model.layers[1].mlp.expert_keys.grad.abs().sum() > 0


def test_the_ffn_regularizer_is_each_layers_own_over_its_applications_summed_over_the_group():
    """As MoEUT's sigma-MoE: layer g's selection distribution pools its own applications (steps) only, never the
    other layer's experts, which are other parameters; the group's regularizer is the sum over its layers."""
    model = varied(tiny(num_recurrences=3)).train()
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    scores = {0: [], 1: []}  # layer -> [(B*T, E) router scores at each of its applications]
    for g, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda m, args, out, g=g: scores[g].append(out[2].detach()))
    out = model(ids, attention_mask=mask)
    valid = mask.bool()
    per_layer = [entropy_regularizer(torch.stack(scores[g]).view(3, 2, 8, -1), valid) for g in (0, 1)]
    torch.testing.assert_close(out.stats["dreamer/entropy_reg"], per_layer[0] + per_layer[1])


SWITCHHEAD = {"attn_num_experts": 4, "attn_experts_per_tok": 2}


@pytest.mark.parametrize("attn", [{}, SWITCHHEAD], ids=["attention", "switchhead"])
def test_cached_generation_equals_the_full_forward_left_padded(attn):
    model = varied(tiny(**attn))
    ids = torch.randint(0, 256, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = KVCache.for_model(model.config, 3, 11, num_slots=model.num_slots())
        out = [model(ids[:, :7], attention_mask=mask[:, :7], positions=pos[:, :7], cache=cache).logits]
        for t in range(7, 11):
            out.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(out, 1)[mask.bool()], full[mask.bool()], rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_keeps_the_config(tmp_path):
    model = varied(tiny())
    model.save_pretrained(tmp_path / "m")
    loaded = dyndepth.from_pretrained(tmp_path / "m").eval()
    assert is_moeut(loaded.config) and loaded.config.ea_entropy_coef == 0.01
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def _sdpa_flops(q_shape, k_shape, v_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    B, N, T, H = q_shape
    return 4 * B * N * (T * (T + 1) // 2 if is_causal else T * k_shape[2]) * H


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


@pytest.mark.parametrize("attn", [{}, SWITCHHEAD], ids=["attention", "switchhead"])
def test_analytic_flops_equal_torchs_counter(attn):
    model = varied(tiny(**attn))
    mapping = {SDPA_CPU: _sdpa_flops, torch.ops.aten._grouped_mm: _grouped_mm_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        out = model(torch.randint(0, 256, (2, 9)))
    assert counter.get_total_flops() == model.forward_flops(9, B=2) == float(out.stats["flops/executed"])


def test_the_trainer_trains_the_preset(tmp_path):
    (tmp_path / "r.toml").write_text(
        '[model]\npreset = "moeut-tiny"\nhidden_size = 32\nnum_attention_heads = 2\nnum_key_value_heads = 1\n'
        'head_dim = 16\nmoe_intermediate_size = 16\n[train]\nbatch_size = 4\nseq_len = 16\nlog_every = 1\n'
        'warmup = 1\nlr = 3e-3\nsteps = 10\nprogress = false\nplot = false\ndevice = "cpu"\n[eval]\nenabled = false\n')
    result = run_training(tmp_path / "r.toml", [f"train.out_dir={tmp_path / 'run'}"])
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3])
    assert is_moeut(dyndepth.from_pretrained(tmp_path / "run" / "model").config)


@pytest.mark.parametrize("fields", [{}, {"da_mode": "separate", "ea_depth_encoding": "learned", "sandwich_norm": True},
                                    {"num_experts": 0, "intermediate_size": 48, "tie_word_embeddings": False},
                                    {"attention_bias": True, "qk_norm": False, "layers_per_group": 3},
                                    {**SWITCHHEAD, "qk_norm": False}, {**SWITCHHEAD, "num_key_value_heads": 4},
                                    {"da_mode": "separate", "sub_block_gate": 0.1}, {"sub_block_gate": 0.1}])
def test_the_analytic_parameter_count_equals_the_models(fields):
    config = DreamerConfig(**{**dataclasses.asdict(tiny()), **fields})
    assert config.num_params() == DreamerLM(config).num_params()


# ------------------------------------------------------------------------------ SwitchHead attention experts
def _slow_switchhead(attn, h_TD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One sequence, token by token and head by head: each head's top-k value experts (routed on the key's token)
    and output experts (routed on the query's token), sigmoid gates, causal softmax attention."""
    T, _ = h_TD.shape
    E, K, N, G, H = attn.v_proj.num_experts, attn.v_proj.top_k, attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.project_q(h_TD, cos, sin)  # (T, N, H)
    k = attn.project_k(h_TD[None], cos[None], sin[None])[0]  # (T, G, H)
    v = torch.zeros(T, G, H)
    for t in range(T):
        for g in range(G):
            s = torch.sigmoid(h_TD[t] @ attn.v_proj.gate.weight[g * E:(g + 1) * E].T)
            for e in s.topk(K).indices:
                v[t, g] += s[e] * (h_TD[t] @ attn.v_proj.experts[g * E + e])
    out = torch.zeros(T, h_TD.shape[1])
    for t in range(T):
        for n in range(N):
            g = n // (N // G)
            p = torch.softmax(k[:t + 1, g] @ q[t, n] / H**0.5, 0)
            a = p @ v[:t + 1, g]  # (H,)
            s = torch.sigmoid(h_TD[t] @ attn.o_proj.gate.weight[n * E:(n + 1) * E].T)
            for e in s.topk(K).indices:
                out[t] += s[e] * (a @ attn.o_proj.experts[n * E + e])
    return out


def test_switchhead_equals_a_slow_per_token_per_head_reference():
    model = varied(tiny(**SWITCHHEAD))
    attn = model.model.layers[0].self_attn
    h = torch.randn(1, 7, 32)
    with torch.no_grad():
        ctx = model.make_context(torch.zeros(1, 7, dtype=torch.long), None, None, None, None)
        fast = attn(h, ctx, 0)[0]
        torch.testing.assert_close(fast, _slow_switchhead(attn, h[0], ctx.cos[0], ctx.sin[0]), rtol=1e-4, atol=1e-5)


def test_expert_linear_paths_agree(monkeypatch):
    x = torch.randn(5, 8)
    for P, w in ((4, torch.randn(6, 8, 4)), (40, torch.randn(6, 8, 4)), (40, torch.randn(6, 8, 3))):
        # grouped on CPU, then without grouped_mm (compiled fp32, old GPUs): fewer pairs than experts gather their
        # weights, more run a matmul per expert; rows of 3 floats are too narrow for grouped_mm (a loop always)
        row, expert = torch.randint(0, 5, (P,)), torch.randint(0, 6, (P,))
        ref = torch.stack([x[r] @ w[e] for r, e in zip(row, expert)])
        torch.testing.assert_close(moe.expert_linear(x, row, expert, w), ref)
        monkeypatch.setattr(moe, "_grouped_mm_supported", lambda x: False)  # compiled fp32 / old GPUs
        torch.testing.assert_close(moe.expert_linear(x, row, expert, w), ref)
        monkeypatch.undo()


def _slow_attn_regularizer(model, inputs: dict, valid: torch.Tensor) -> torch.Tensor:
    """MoEUT's attention regularizer by loops: per layer, router side, sequence and head, the negative entropy of
    the mean softmax of the scores over that layer's applications and the sequence's valid tokens; mean over
    (sequence, head), summed over sides and layers. `inputs[g]`: the inputs (B, T, D) of layer g's attention."""
    total = 0.0
    for g, layer in enumerate(model.model.layers):
        for part in (layer.self_attn.v_proj, layer.self_attn.o_proj):
            E, heads = part.num_experts, part.heads
            per_seq = []
            for b in range(valid.shape[0]):
                for n in range(heads):
                    probs = [F.softmax(h[b, t] @ part.gate.weight[n * E:(n + 1) * E].T, -1)
                             for h in inputs[g] for t in range(valid.shape[1]) if valid[b, t]]
                    p = torch.stack(probs).mean(0)
                    per_seq.append((p * p.log()).sum())
            total = total + torch.stack(per_seq).mean()
    return total


def test_switchhead_regularizer_matches_a_slow_per_layer_per_head_reference_and_trains_both_routers():
    model = varied(tiny(**SWITCHHEAD)).train()
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    inputs = {0: [], 1: []}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, args, g=g: inputs[g].append(args[0].detach()))
             for g, layer in enumerate(model.model.layers)]
    out = model(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    reg = out.stats["dreamer/attn_entropy_reg"]
    with torch.no_grad():
        torch.testing.assert_close(reg, _slow_attn_regularizer(model, inputs, mask.bool()), rtol=1e-5, atol=1e-5)
    assert -4 * math.log(4) < float(reg) < -0.5  # 2 layers x 2 routers, each above -ln E, the varied model not uniform
    torch.testing.assert_close(out.aux_loss.detach(), 0.01 * out.stats["dreamer/entropy_reg"] + 0.001 * reg)
    F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()).add(out.aux_loss).backward()
    attn = model.model.layers[1].self_attn
    for p in (attn.v_proj.gate.weight, attn.o_proj.gate.weight, attn.v_proj.experts, attn.o_proj.experts):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_training_forwards_charge_the_regularizers_router_recomputation():
    model = varied(tiny(**SWITCHHEAD)).train()
    mapping = {SDPA_CPU: _sdpa_flops, torch.ops.aten._grouped_mm: _grouped_mm_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        out = model(torch.randint(0, 256, (2, 9)))
    cfg = model.config
    recompute = 2 * 9 * cfg.num_hidden_layers * 2 * cfg.hidden_size * (cfg.num_key_value_heads + 4) * 4
    assert counter.get_total_flops() == float(out.stats["flops/executed"]) == model.forward_flops(9, B=2) + recompute
    assert model.train_flops_per_token(9) * 9 == 3 * (model.forward_flops(9) + recompute / 2)


def test_switchhead_with_narrow_heads_runs_under_bfloat16_autocast():
    model = varied(tiny(**SWITCHHEAD, head_dim=12))  # rows of 12: 48 fp32 bytes are 16-aligned, 24 bf16 ones not
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(torch.randint(0, 256, (2, 6))).logits).all()


def test_switchhead_attention_in_bfloat16_and_under_autocast_tracks_fp32():
    model = varied(tiny(**SWITCHHEAD))
    attn = model.model.layers[0].self_attn
    h, ids = torch.randn(2, 9, 32), torch.zeros(2, 9, dtype=torch.long)
    with torch.no_grad():
        full = attn(h, model.make_context(ids, None, None, None, None), 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = attn(h, model.make_context(ids, None, None, None, None), 0)
        model.to(torch.bfloat16)
        bf16 = attn(h.bfloat16(), model.make_context(ids, None, None, None, None), 0)
    for low in (auto, bf16):  # per token: rounding alone, except where a near-tie flips a router's top-k
        assert low.dtype == torch.bfloat16
        err = (low.float() - full).norm(dim=-1) / full.norm(dim=-1)  # (B, T)
        assert float(err.median()) < 0.02 and float(err.max()) < 1
