"""Analytic FLOP counts against hand-computed numbers and consistency identities."""

import pytest
import torch

from dyndepth import preset
from dyndepth.core.flops import (
    attn_score_flops,
    branch_flops,
    causal_attended_keys,
    decode_flops,
    forward_flops,
    gate_flops,
    ideal_speedup,
    kv_flops,
    layer_flops,
    lm_head_flops,
    mlp_flops,
    q_o_flops,
)


def test_tiny_dense_by_hand(tiny_config):
    # D=64, N=4, G=2, H=16, F=128, V=256, 2 layers.
    assert q_o_flops(tiny_config) == 2 * 64 * 64 + 2 * 64 * 64 == 16384
    assert kv_flops(tiny_config) == 2 * (2 * 64 * 32) == 8192
    assert mlp_flops(tiny_config, 0) == 3 * 2 * 64 * 128 == 49152
    assert attn_score_flops(tiny_config, 1) == 2 * 2 * 4 * 16 == 256
    assert lm_head_flops(tiny_config) == 2 * 64 * 256 == 32768
    # T=4: 10 causal (query, key) pairs; per layer 4 * (16384 + 8192 + 49152) + 10 * 256 = 297472.
    assert forward_flops(tiny_config, T=4) == 2 * 297472 + 4 * 32768 == 726016
    assert forward_flops(tiny_config, T=4, B=3) == 3 * 726016
    assert forward_flops(tiny_config, T=4, lm_head=False) == 2 * 297472
    assert forward_flops(tiny_config, T=0) == 0


def test_tiny_moe_by_hand(tiny_moe_config):
    # E=4 experts, K=2 per token, F_moe=32: router 2*64*4 = 512, experts 2 * 3 * 2*64*32 = 24576.
    assert mlp_flops(tiny_moe_config, 0) == 512 + 24576 == 25088
    per_layer = 4 * (16384 + 8192 + 25088) + 10 * 256
    assert forward_flops(tiny_moe_config, T=4) == 2 * per_layer + 4 * 32768 == 533504
    mixed = preset("tiny-qwen3-moe", mlp_only_layers=[0])  # layer 0 keeps a dense MLP (F=128)
    assert mlp_flops(mixed, 0) == 49152 and mlp_flops(mixed, 1) == 25088


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe", "tiny-qwen2", "tiny-llama"])
def test_decode_is_the_difference_of_prefills(name):
    config = preset(name)
    for c in range(6):
        assert decode_flops(config, c) == forward_flops(config, c + 1) - forward_flops(config, c)
        assert decode_flops(config, c, B=4) == 4 * decode_flops(config, c)
    # A chunked prefill costs the same as one prefill.
    assert forward_flops(config, 5, context=7) + forward_flops(config, 7) == forward_flops(config, 12)


def test_dense_forward_is_two_flops_per_matmul_parameter(tiny_config):
    """2 * T * (matmul weights incl. lm_head) + attention scores: ties the count to num_params()."""
    c, T = tiny_config, 9
    norms = c.num_hidden_layers * (2 * c.hidden_size + 2 * c.head_dim) + c.hidden_size
    matmul_params = c.num_params(include_embedding=False) - norms + c.vocab_size * c.hidden_size
    attention = c.num_hidden_layers * attn_score_flops(c, causal_attended_keys(T))
    assert forward_flops(c, T) == 2 * T * matmul_params + attention


def test_six_n_rule_of_thumb():
    """Training FLOPs ~ 6 * params * tokens holds within 3% for Qwen3-0.6B at T=128 (attention is small)."""
    c, T = preset("qwen3-0.6b"), 128
    n = c.num_params(include_embedding=False) + c.vocab_size * c.hidden_size  # lm_head runs per token
    ratio = 3 * forward_flops(c, T) / (6 * n * T)
    assert 1.0 < ratio < 1.03


def test_branch_flops_compose_a_layer_and_gateskip(tiny_config):
    c, T = tiny_config, 6
    full = branch_flops(c, 0, "attn", T, T, causal_attended_keys(T)) + branch_flops(c, 0, "mlp", T)
    assert full == layer_flops(c, 0, T)
    # GateSkip: kept tokens at positions {0, 3, 5} query; every token runs k/v; gates score everyone.
    kept = [0, 3, 5]
    attn = branch_flops(c, 0, "attn", len(kept), T, sum(p + 1 for p in kept))
    assert attn == 3 * 16384 + 6 * 8192 + (1 + 4 + 6) * 256
    assert branch_flops(c, 0, "mlp", 3) == 3 * 49152
    assert gate_flops(c, "vector") == 2 * 64 * 64 and gate_flops(c, "scalar") == 2 * 64
    # Counts may be tensors (accumulated without a host sync).
    n = torch.tensor(3)
    assert int(branch_flops(c, 0, "mlp", n)) == 3 * 49152


def test_errors_and_speedup(tiny_config):
    with pytest.raises(ValueError, match="branch"):
        branch_flops(tiny_config, 0, "ffn", 1)
    with pytest.raises(ValueError, match="attended_keys"):
        branch_flops(tiny_config, 0, "attn", 1)
    with pytest.raises(ValueError, match="no keys"):
        branch_flops(tiny_config, 0, "mlp", 1, attended_keys=3)
    with pytest.raises(ValueError, match="gate kind"):
        gate_flops(tiny_config, "matrix")
    with pytest.raises(ValueError, match="non-negative"):
        forward_flops(tiny_config, -1)
    assert ideal_speedup(200, 100) == 2.0
    with pytest.raises(ValueError, match="positive"):
        ideal_speedup(1, 0)
