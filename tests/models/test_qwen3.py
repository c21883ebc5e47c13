import pytest
import torch

import dyndepth
from dyndepth import CausalLM, KVCache, build_model, preset


@pytest.fixture(params=["tiny-qwen3", "tiny-qwen3-moe", "tiny-qwen2", "tiny-llama"])
def model(request):
    torch.manual_seed(0)
    return CausalLM(preset(request.param)).eval()


def test_forward_shapes_and_zero_aux_in_eval(model):
    out = model(torch.randint(0, 256, (2, 7)))
    assert out.logits.shape == (2, 7, 256)
    assert out.aux_loss.item() == 0.0


def test_left_padded_row_equals_unpadded_row(model):
    ids = torch.randint(0, 256, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(ids).logits
        both = model(torch.cat([padded, torch.randint(0, 256, (1, 9))]), attention_mask=torch.cat(
            [mask, torch.ones(1, 9, dtype=torch.long)])).logits
    torch.testing.assert_close(both[0, 3:], alone[0], atol=1e-5, rtol=0)


def test_prefill_then_decode_equals_full_forward(model):
    B, T, P = 3, 12, 5
    ids = torch.randint(0, 256, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = KVCache.for_model(model.config, B, max_seq_len=16)
        got = [model(ids[:, :P], mask[:, :P], positions[:, :P], cache).logits]
        for t in range(P, T):
            got.append(model(ids[:, t:t + 1], positions=positions[:, t:t + 1], cache=cache).logits)
    got = torch.cat(got, dim=1)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], full[valid], atol=1e-5, rtol=0)


def test_num_logits_keeps_last_positions(model):
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, num_logits=3).logits, model(ids).logits[:, -3:])


def test_moe_training_aux_loss_is_weighted_and_differentiable(tiny_moe_config):
    model = CausalLM(tiny_moe_config).train()
    out = model(torch.randint(0, 256, (2, 8)))
    assert out.aux_loss.requires_grad
    # a uniform router gives a balance loss of exactly K (E * sum_e (K/E) * (1/E)); ours is near it
    assert out.stats["moe/balance_loss"].item() == pytest.approx(tiny_moe_config.num_experts_per_tok, rel=0.3)
    torch.testing.assert_close(out.aux_loss, tiny_moe_config.router_aux_loss_coef * out.stats["moe/balance_loss"])
    out.aux_loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_moe_balance_loss_of_an_all_padding_batch_is_zero_not_nan(tiny_moe_config):
    model = CausalLM(tiny_moe_config).train()
    ids = torch.randint(0, 256, (2, 8))
    out = model(ids, attention_mask=torch.zeros_like(ids))  # no valid token: 0 / 0 made the objective NaN
    assert out.aux_loss.item() == 0.0 and out.stats["moe/balance_loss"].item() == 0.0
    out.aux_loss.backward()
    assert torch.isfinite(model.model.layers[0].mlp.gate.weight.grad).all()


def test_moe_gathered_and_grouped_expert_paths_agree(tiny_moe_config):
    moe = CausalLM(tiny_moe_config).model.layers[0].mlp
    x = torch.randn(1, 64)
    probs, idx, w = moe.route(x)
    torch.testing.assert_close(moe.experts._gathered(x, idx, w), moe.experts(x.expand(4, 64), idx.expand(4, 2),
                                                                            w.expand(4, 2))[:1])


def test_the_every_expert_path_of_a_compiled_step_rounds_as_the_eager_loop_in_bf16():
    """A compiled step of a few tokens runs every expert on every token (`_every_expert`); it scaled the F-wide
    activation by the gates where eager scales each expert's output (as HF), so in bfloat16 its outputs left the
    eager loop's by an ulp (0.5 at a scale of 88 here) and a compiled bf16 Qwen3-MoE computed other logits."""
    from dyndepth.models.moe import Experts

    torch.manual_seed(0)
    experts = Experts(8, 64, 32).to(torch.bfloat16)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(20, 64, dtype=torch.bfloat16)
    w, idx = torch.softmax(torch.randn(20, 8), -1).topk(2, -1)  # (N, K)
    w = w.to(torch.bfloat16)
    assert experts._path(x, 2) == "loop"  # eager
    with torch.no_grad():
        assert torch.equal(experts._every_expert(x, idx, w), experts(x, idx, w))
        experts, x = experts.float(), x.float()  # float32 weights under bf16 autocast: summed in float32 as the loop
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(experts._every_expert(x, idx, w), experts(x, idx, w))


def test_a_compiled_training_forward_of_a_few_tokens_runs_only_the_chosen_experts():
    """A compiled forward of <= EVERY_EXPERT_MAX_TOKENS tokens ran every expert on every token, a path meant for
    compiled decode steps (one graph, no host sync); a compiled training forward of a small micro-batch (or of the
    tokens GateSkip / MoD / DND route) paid E / K times the expert FLOPs, and the ledger reported them as executed."""
    torch.manual_seed(0)
    model = build_model(preset("tiny-qwen3-moe")).train()
    ids = torch.randint(0, 200, (2, 8))  # 16 tokens x K picks >= E: not the few-token gathered path
    eager = model(ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")(ids)
    assert float(compiled.stats["flops/executed"]) == float(eager.stats["flops/executed"])
    torch.testing.assert_close(compiled.logits, eager.logits)


def test_bf16_forward_is_close_to_fp32(tiny_config):
    model = CausalLM(tiny_config).eval()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        got = model.to(torch.bfloat16)(ids).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.05


@pytest.mark.slow
def test_forward_under_torch_compile(tiny_config):
    model = CausalLM(tiny_config).eval()
    ids = torch.randint(0, 256, (2, 8))
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def test_config_errors_name_the_field():
    with pytest.raises(dyndepth.ConfigError, match="num_key_value_heads"):
        dyndepth.ModelConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(dyndepth.ConfigError, match="gpt2"):
        dyndepth.ModelConfig(model_type="gpt2")
    with pytest.raises(dyndepth.ConfigError, match="unknown preset"):
        preset("tiny-qwen")
    with pytest.raises(dyndepth.ConfigError, match="'dynamic' is not supported"):
        dyndepth.ModelConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    for field in ({"attention_bias": True}, {"num_experts": 4}):  # transformers' Qwen2 and Mistral have neither
        with pytest.raises(dyndepth.ConfigError, match="use model_type qwen3 / qwen3_moe"):
            preset("tiny-qwen2", **field)
        with pytest.raises(dyndepth.ConfigError, match="a mistral model has a dense MLP and no o_proj bias"):
            preset("tiny-llama", model_type="mistral", **field)


def test_num_params_formula_matches_module(tiny_config, tiny_moe_config):
    for cfg in (tiny_config, tiny_moe_config, preset("tiny-qwen2"), preset("tiny-llama")):
        assert cfg.num_params() == CausalLM(cfg).num_params()


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe", "tiny-llama"])
@pytest.mark.parametrize("fields", [{"attention_bias": True}, {"mlp_bias": True}, {"qkv_bias": True},
                                    {"attention_bias": True, "mlp_bias": True, "qk_norm": False}])
def test_num_params_formula_counts_attention_and_mlp_biases(name, fields):
    """The formula left out q / k / v / o biases (attention_bias) and the dense MLP's biases (mlp_bias), so `dyndepth
    match` under-counted a reference or baseline with them."""
    cfg = preset(name, **fields)
    assert cfg.num_params() == CausalLM(cfg).num_params()


def test_intra_document_mask_makes_packed_documents_independent(tiny_config):
    model = CausalLM(tiny_config).eval()
    a, b = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 4))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 4])
    positions = torch.tensor([list(range(5)) + list(range(4))])
    with torch.no_grad():
        got = model(packed, positions=positions, doc_ids=doc_ids).logits
        torch.testing.assert_close(got[:, :5], model(a).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[:, 5:], model(b).logits, atol=1e-5, rtol=0)


def test_training_flops_count_matmul_weights_not_norms_or_biases():
    """6 FLOPs per trainable matmul weight and token, 4 per frozen one, plus attention; RMSNorm weights and biases
    are elementwise (they were counted as matmul weights: +0.4% at tiny-qwen3)."""
    model = CausalLM(preset("tiny-qwen3", attention_bias=True))
    cfg, T = model.config, 16
    matmul = [p for n, p in model.named_parameters() if p.dim() == 2 and n != "model.embed_tokens.weight"
              or n == "model.embed_tokens.weight" and cfg.tie_word_embeddings]
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T
    assert model.train_flops_per_token(T) == 6 * sum(p.numel() for p in matmul) + attention
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    assert model.train_flops_per_token(T) == (6 * sum(p.numel() for p in matmul) + attention
                                              - 2 * model.model.layers[0].self_attn.q_proj.weight.numel())


def test_a_shared_gate_pair_counts_in_the_training_flops_once_per_layer_call():
    """GateSkip's `shared=True` runs one gate pair at every layer, the same matmuls as a pair per layer: the
    training FLOPs (MFU) counted the shared pair once (bench-small: 265.1M instead of 287.2M per token, 7.7% low)."""
    from dyndepth.methods import GateSkipConfig, attach_gateskip

    counts = []
    for shared in (False, True):
        model = CausalLM(preset("tiny-qwen3", num_hidden_layers=3))
        attach_gateskip(model, GateSkipConfig(shared=shared))
        counts.append(model.train_flops_per_token(16))
    assert counts[1] == counts[0]


def test_explicit_positions_mask_by_position_with_or_without_an_attention_mask(model):
    """Causality is by position (core.context.causal_mask): positions that restart in the row take the same mask
    whether or not an all-ones attention_mask is passed (SDPA's causal fast path only fits 0..T-1)."""
    ids = torch.randint(0, 256, (2, 6))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        bare = model(ids, positions=positions).logits
        masked = model(ids, attention_mask=torch.ones_like(ids), positions=positions).logits
    torch.testing.assert_close(bare, masked)


def test_grouped_experts_forward_and_gradients_equal_the_per_expert_loop():
    """The grouped-matmul experts (Dreamer's) and one matmul per expert (Qwen3-MoE's), both with custom backwards
    (GatherGroupedMM, AddRows), against each token's K experts' weights gathered (plain autograd): output and the
    gradients of the input, the gates and both weights."""
    from dyndepth.models.moe import Experts

    torch.manual_seed(0)
    grouped, loop, gathered = Experts(8, 64, 32, grouped=True), Experts(8, 64, 32), Experts(8, 64, 32)
    loop.load_state_dict(grouped.state_dict())
    gathered.load_state_dict(grouped.state_dict())
    x, w, g = torch.randn(40, 64), torch.rand(40, 2), torch.randn(40, 64)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(40)])  # (N, K)
    assert grouped._path(x, 2) == "grouped" and loop._path(x, 2) == "loop"
    results = []
    for experts, run in ((gathered, gathered._gathered), (grouped, grouped), (loop, loop)):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = run(xx, idx, ww)
        (y * g).sum().backward()
        results.append([y, xx.grad, ww.grad, experts.gate_up_proj.grad, experts.down_proj.grad])
    for got in results[1:]:
        for name, a, b in zip(["y", "x", "gates", "gate_up_proj", "down_proj"], got, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
