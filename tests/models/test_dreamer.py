"""Dreamer (models/dreamer.py): the layer against the decoder's, depth causality, batch independence, routing,
balancing, cached generation, checkpoints, training, and the compute ledger against torch's FLOP counter."""

import copy
import dataclasses
import json

import families
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dyndepth
from dyndepth import CausalLM, KVCache, ModelConfig
from dyndepth.models.dreamer import DreamerConfig, DreamerLM, ExpertBiasHook
from dyndepth.models.dreamer_layer import DepthAttention
from dyndepth.train import build_hooks, build_model, run_training
from dyndepth.train.parallel import DistInfo, apply_activation_checkpointing

SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
DA_MODES = ["separate", "merged_softmax", "none"]


def tiny(**kw) -> DreamerConfig:
    fields = {"vocab_size": 256, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "num_recurrences": 3, "num_experts": 8, "num_experts_per_tok": 2,
              "moe_intermediate_size": 32, "max_position_embeddings": 128}
    return DreamerConfig(**{**fields, **kw})


def varied(config, seed: int = 0) -> DreamerLM:
    return families.varied(DreamerLM, config, std=0.15, seed=seed)


def left_padded(B=3, T=12, vocab=256):
    return families.left_padded(B, T, vocab, pads=(0, 3, 7))


def test_one_recurrence_without_depth_and_expert_attention_is_a_decoder_layer():
    decoder = CausalLM(ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                                   max_position_embeddings=128, tie_word_embeddings=True)).eval()
    dreamer = DreamerLM(tiny(num_recurrences=1, da_mode="none", num_experts=0, intermediate_size=96)).eval()
    dreamer.load_state_dict(decoder.state_dict())  # the same parameter names: a strict load
    ids, mask = left_padded()
    with torch.no_grad():
        torch.testing.assert_close(dreamer(ids).logits, decoder(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(dreamer(ids, attention_mask=mask).logits,
                                   decoder(ids, attention_mask=mask).logits, rtol=0, atol=0)


def _streams(model, ids, perturb_step=None):
    """Residual streams after each application, with the input of application `perturb_step` perturbed."""
    calls = []

    def pre_hook(module, args):
        calls.append(None)
        if len(calls) - 1 == perturb_step:
            return (args[0] + 0.5 * torch.randn_like(args[0]), *args[1:])

    handle = model.model.layers[0].register_forward_pre_hook(pre_hook)
    trace = dyndepth.Trace(keep_streams=True)
    with torch.no_grad():
        model(ids, trace=trace)
    handle.remove()
    return trace.streams  # [embedding, after step 0, after step 1, ...]


@pytest.mark.parametrize("da_mode", ["separate", "merged_softmax"])
def test_depth_attention_is_causal_over_depth(da_mode):
    model = varied(tiny(num_recurrences=4, da_mode=da_mode))
    ids = torch.randint(0, 256, (2, 6))
    base = _streams(model, ids)
    for r in (1, 2):
        torch.manual_seed(r)
        moved = _streams(model, ids, perturb_step=r)
        for s in range(r + 1):  # the embedding and steps 0..r-1
            torch.testing.assert_close(moved[s], base[s], rtol=0, atol=0)
        for s in range(r + 1, 5):
            assert (moved[s] - base[s]).abs().max() > 1e-3


def test_depth_attention_matches_a_slow_per_token_softmax_over_earlier_steps():
    model = varied(tiny(num_recurrences=4))
    da = model.model.layers[0].depth_attn
    B, T, D, step = 2, 3, 64, 2
    states = [torch.randn(B, T, D) for _ in range(step + 1)]  # normed states entering steps 0..step
    kv = [da.project_kv(s, None, da.step_rope(j, s.dtype, s.device)) for j, s in enumerate(states)]
    h = torch.randn(B, T, D)
    rope = da.step_rope(step, h.dtype, h.device)
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


def test_training_lowers_the_loss_and_resuming_continues_the_same_run(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    out = tmp_path / "run"

    def run(resume):
        return run_training(tmp_path / "r.toml", [f"train.out_dir={out}", "train.steps=20", "train.save_every=10",
                                                  f"train.resume={resume}"], loader=CountingLoader(4, 16))

    whole = run("false")
    first = sum(loss for _, loss in whole.losses[:3]) / 3
    assert sum(loss for _, loss in whole.losses[-3:]) / 3 < first - 0.3
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
def test_ledger_executed_flops_equal_torchs_counter_and_ideal_equals_the_analytic_count(da_mode, experts):
    model = varied(tiny(da_mode=da_mode, num_experts=experts, da_include_self=da_mode == "separate"))
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


def test_state_change_is_an_evaluation_statistic():
    model = varied(tiny())
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        change = model(ids).stats["dreamer/state_change"]
    assert change.shape == (3,) and (change > 0).all()  # one per step
    model.train()
    assert "dreamer/state_change" not in model(ids).stats  # training forwards skip its passes


def test_expert_statistics_count_every_selection_and_bound_diversity():
    model = varied(tiny(num_recurrences=3, num_experts=8, num_experts_per_tok=2))
    ids, mask = left_padded()
    with torch.no_grad():
        stats = model(ids, attention_mask=mask).stats
    usage = stats["dreamer/expert_usage"]  # (steps, E): k selections per valid token per step
    torch.testing.assert_close(usage.sum(-1), torch.full((3,), 2.0 * int(mask.sum())))
    assert 2 / 6 <= float(stats["dreamer/expert_diversity"]) <= 1.0  # at least k distinct of min(k R, E)
    assert 0 < float(stats["dreamer/expert_set_entropy"]) <= torch.log(mask.sum().float())


@pytest.mark.parametrize("options", [{"input_injection": True}, {"sandwich_norm": True}, {"da_parallel": True},
                                     {"ea_depth_encoding": "rope"}, {"ea_depth_encoding": "none"},
                                     {"norm_topk_prob": False}, {"da_head_dim": 8, "da_num_heads": 2}])
def test_every_option_decodes_exactly_and_changes_the_output(options):
    base = varied(tiny())
    model = varied(tiny(**options))
    ids, mask = left_padded(T=10)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cached = _prefill_then_decode(model, ids, mask, 7)
        if "da_head_dim" not in options:  # same parameter shapes: the option itself changes the function
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


class TwoRanks:
    """A stand-in for DistInfo whose all-reduce returns the mean of this rank's and another rank's tensor."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t.add_(self.other).div_(2)


def test_the_balancing_hook_applies_the_rank_mean_so_ranks_stay_equal():
    a, b = varied(tiny(num_recurrences=2, num_experts=4)), varied(tiny(num_recurrences=2, num_experts=4))
    load_a = torch.tensor([[8.0, 0, 0, 0], [8, 0, 0, 0]])  # rank a: expert 0 overloaded
    load_b = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 24]])  # rank b: expert 3 overloaded
    ExpertBiasHook().after_step(a, 1, {"dreamer/expert_usage": load_a}, TwoRanks(load_b))
    ExpertBiasHook().after_step(b, 1, {"dreamer/expert_usage": load_b}, TwoRanks(load_a))
    bias = a.model.layers[0].mlp.expert_bias
    torch.testing.assert_close(bias, b.model.layers[0].mlp.expert_bias)
    torch.testing.assert_close(bias, torch.tensor([-1e-3, 1e-3, 1e-3, -1e-3]))  # mean load 5: 0 and 3 above
