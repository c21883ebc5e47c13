import pytest

from dyndepth import CausalLM, preset
from dyndepth.train.metrics import flops_per_token
from dyndepth.train.optim import apply_freeze


def test_frozen_parameters_cost_4n_and_trainable_ones_6n():
    model = CausalLM(preset("tiny-qwen3"))
    cfg, T = model.config, 16
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T
    n = sum(p.numel() for p in model.parameters())  # tied embeddings: counted once, as lm_head
    assert flops_per_token(model, T) == pytest.approx(6 * n + attn)
    frozen = apply_freeze(model, ["model.layers.0.*"])
    n0 = sum(p.numel() for name, p in model.named_parameters() if name in frozen)
    assert n0 > 0
    assert flops_per_token(model, T) == pytest.approx(6 * (n - n0) + 4 * n0 + attn)


def test_moe_experts_count_with_their_top_k_fraction():
    model = CausalLM(preset("tiny-qwen3-moe"))
    cfg, T = model.config, 16
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    n = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()  # untied: a lookup
    assert not cfg.tie_word_embeddings and 0 < experts < n and cfg.num_experts_per_tok < cfg.num_experts
    routed = experts * cfg.num_experts_per_tok / cfg.num_experts
    assert flops_per_token(model, T) == pytest.approx(6 * (n - experts + routed) + attn)
