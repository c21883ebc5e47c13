"""GateSkip combinations: weight-only quantization (int8 / int4) and layer pruning by gate importance."""

import pytest
import torch
from gated import gated_model
from torch import nn

import dyndepth
from dyndepth import CausalLM, preset
from dyndepth.methods.gateskip_analysis import trace_forward
from dyndepth.methods.gateskip_combos import (
    QuantLinear,
    block_influence,
    layer_importance,
    prune_layers,
    quantize_weights,
    weight_bytes,
)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
@pytest.mark.parametrize("bits,bound", [(8, 0.02), (4, 0.25)])
def test_quantized_logits_stay_close_to_float(name, bits, bound):
    model, _ = gated_model(name)
    ids = torch.randint(0, 256, (2, 16))
    ref = logits(model, ids)
    names = quantize_weights(model, bits=bits)
    assert "lm_head" not in names and isinstance(model.lm_head, nn.Linear)
    mlp = "model.layers.1.mlp.gate" if "moe" in name else "model.layers.1.mlp.down_proj"  # MoE: the router
    assert "model.layers.0.gateskip.attn_gate.proj" in names and mlp in names
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n != "lm_head")
    out = logits(model, ids)
    assert float((out - ref).abs().max() / ref.abs().max()) < bound
    assert float((out - ref).norm() / ref.norm()) < bound
    assert not torch.equal(out, ref)


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_matches_its_integer_weights(bits):
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    q = QuantLinear.from_linear(linear, bits=bits, group_size=64 if bits == 8 else 16)
    w = linear.weight.detach()
    scale = w.reshape(24, -1, q.group_size).abs().amax(-1) / (127 if bits == 8 else 7)  # (N, G)
    expected = torch.round(w.reshape(24, -1, q.group_size) / scale[..., None]).reshape(24, 64)
    assert torch.equal(q.int_weight().float(), expected)
    assert (q.dequantize() - w).abs().max() <= scale.max() / 2 + 1e-7
    assert q.qweight.numel() == (24 * 64 if bits == 8 else 24 * 32)  # int4: two values per byte
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(q(x), x @ q.dequantize().T + linear.bias, atol=1e-5, rtol=1e-5)
    assert q(x[:0]).shape == (0, 5, 24)


def test_int8_uses_the_cpu_kernel_when_torch_has_it():
    q = QuantLinear.from_linear(nn.Linear(32, 8, bias=False), bits=8)
    x = torch.randn(4, 32)
    assert q.uses_int8_kernel(x) == hasattr(torch, "_weight_int8pack_mm")
    assert not QuantLinear.from_linear(nn.Linear(32, 8), bits=8, group_size=16).uses_int8_kernel(x)


def test_gates_can_stay_in_float_and_bad_settings_are_refused():
    model, _ = gated_model()
    names = quantize_weights(model, bits=8, quantize_gates=False)
    assert len(names) == 14 and not any("gateskip" in n for n in names)
    assert type(model.model.layers[0].gateskip.mlp_gate.proj) is nn.Linear
    with pytest.raises(ValueError, match="bits"):
        quantize_weights(gated_model()[0], bits=3)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weights(gated_model()[0], bits=4, group_size=48)


def test_skipping_still_works_on_a_quantized_model():
    model, _ = gated_model(budget=0.3)
    ids = torch.randint(0, 256, (4, 20))
    with torch.no_grad():
        before = trace_forward(model, ids).keep
    quantize_weights(model, bits=8)
    with torch.no_grad():
        stats = model(ids).stats
        after = trace_forward(model, ids).keep
    for branch in ("attn", "mlp"):
        assert abs(float(stats[f"gateskip/{branch}_skipped"]) - 0.3) <= 1 / 80 + 1e-6
    agree = torch.stack([(before[k] == after[k]).float().mean() for k in before]).mean()
    assert agree > 0.9  # int8 gates rank tokens (almost) as the float gates do


def test_weight_memory_shrinks():
    float_bytes = weight_bytes(gated_model()[0])
    linear_bytes = sum(m.weight.numel() * 4 for n, m in gated_model()[0].named_modules()
                       if isinstance(m, nn.Linear) and n != "lm_head")
    sizes = {}
    for bits in (8, 4):
        model, _ = gated_model()
        quantize_weights(model, bits=bits)
        sizes[bits] = weight_bytes(model)
    assert float_bytes - sizes[8] >= 0.7 * linear_bytes  # int8: a quarter of the fp32 weights, plus scales
    assert float_bytes - sizes[4] >= 0.8 * linear_bytes  # int4: an eighth, plus one scale per 32 weights
    assert sizes[4] < sizes[8] < float_bytes


# ----------------------------------------------------------------------------------------- pruning

def close_layer(model, i):
    """sigmoid(-12) ~ 6e-6: the layer's branches barely touch the residual stream."""
    with torch.no_grad():
        for gate in (model.model.layers[i].gateskip.attn_gate, model.model.layers[i].gateskip.mlp_gate):
            gate.proj.weight.zero_()
            gate.proj.bias.fill_(-12.0)


def test_prune_removes_the_layer_with_closed_gates(tmp_path):
    model, method = gated_model(layers=4, budget=0.25)
    close_layer(model, 2)
    batches = [torch.randint(0, 256, (2, 16))]
    for by in ("gate", "influence"):
        scores = layer_importance(model, batches, by=by)
        assert len(scores) == 4 and min(range(4), key=scores.__getitem__) == 2
    ids = torch.randint(0, 256, (2, 12))
    with method.override(budget=0.0):
        ref = logits(model, ids)
    kept = [model.model.layers[i] for i in (0, 1, 3)]
    assert prune_layers(model, 1, batches, by="gate") == [2]
    assert list(model.model.layers) == kept and model.config.num_hidden_layers == 3
    with method.override(budget=0.0):
        torch.testing.assert_close(logits(model, ids), ref, atol=1e-3, rtol=0)  # the layer did ~nothing
    out = model(ids)
    assert out.logits.shape == (2, 12, 256) and float(out.stats["gateskip/attn_skipped"]) > 0.2
    model.save_pretrained(tmp_path)
    assert not any(".layers.3." in k for k in model.state_dict())
    loaded = dyndepth.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(loaded, ids), out.logits, atol=0, rtol=0)


@pytest.mark.parametrize("step,only,drop,expected_dense", [(1, [1, 3], 1, [2]), (2, [], 0, [1])])
def test_prune_moe_keeps_every_layer_kind(tmp_path, step, only, drop, expected_dense):
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3-moe", num_hidden_layers=4, decoder_sparse_step=step,
                            mlp_only_layers=only)).eval()
    scores = [1.0] * 4
    scores[drop] = 0.0
    assert prune_layers(model, 1, scores=scores) == [drop]
    config = model.config
    assert config.mlp_only_layers == expected_dense and config.decoder_sparse_step == 1
    kinds = [hasattr(layer.mlp, "experts") for layer in model.model.layers]
    assert kinds == [config.is_moe_layer(i) for i in range(3)]
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(logits(dyndepth.from_pretrained(tmp_path).eval(), ids), logits(model, ids))


def test_block_influence_on_a_plain_model():
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3", num_hidden_layers=3)).eval()
    with torch.no_grad():  # layer 1 adds nothing to the residual stream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    scores = block_influence(model, [torch.randint(0, 256, (2, 10))])
    assert abs(scores[1]) < 1e-6 and min(scores[0], scores[2]) > 1e-4
    with pytest.raises(ValueError, match="attach_gateskip"):
        layer_importance(model, [torch.randint(0, 256, (1, 4))], by="gate")
    assert prune_layers(model, 1, [torch.randint(0, 256, (2, 10))], by="influence") == [1]


def test_pruning_layer_zero_moves_shared_gates(tmp_path):
    model, method = gated_model(layers=3, gate="scalar", shared=True, budget=0.3)
    shared = method.shared_gates
    assert prune_layers(model, 1, scores=[0.0, 1.0, 2.0]) == [0]
    assert model.model.layers[0].gateskip is shared and method.shared_gates is shared
    ids = torch.randint(0, 256, (2, 10))
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(dyndepth.from_pretrained(tmp_path).eval(), ids), logits(model, ids))


def test_prune_refuses_bad_requests():
    model, _ = gated_model(layers=2)
    with pytest.raises(ValueError, match="prune between"):
        prune_layers(model, 2, scores=[0.0, 1.0])
    with pytest.raises(ValueError, match="batches"):
        prune_layers(model, 1)
    with pytest.raises(ValueError, match="scores"):
        prune_layers(model, 1, scores=[0.0])
    assert prune_layers(model, 0, scores=[0.0, 1.0]) == [] and len(model.model.layers) == 2
