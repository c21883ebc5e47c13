"""Weight-only quantization (int8 / int4), alone and with GateSkip skipping."""

import pytest
import torch
import torch.nn.functional as F
from gated import gated_model
from torch import nn

import dyndepth
from dyndepth.methods.gateskip_analysis import trace_forward
from dyndepth.methods.quantize import QuantLinear, quantize_weights, weight_bytes


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


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
    err_T = (out - ref).abs().amax(-1) / ref.abs().max()  # (B, T) per position
    # MoE: a quantized router may flip one token's top-k experts (a discontinuous change); dense: none may move
    allowed = 0.1 if "moe" in name else 0.0
    assert float((err_T > bound).float().mean()) <= allowed, err_T
    assert float((out - ref).norm() / ref.norm()) < (4 * bound if "moe" in name else bound)
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


@pytest.mark.parametrize("bits,group", [(8, 16), (4, 16), (8, 64)])
def test_scales_stay_float32_when_the_model_changes_dtype(bits, group):
    """`model.to(torch.bfloat16)` cast the float32 scales too: the weights were rounded twice (a bfloat16 scale, then
    the product), and `.float()` afterwards did not give the quantized model back. Now the scales stay float32 and a
    bfloat16 forward uses q * scale rounded once to bfloat16."""
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 24, bias=False), bits=bits, group_size=group)
    x = torch.randn(3, 5, 64)
    w, ref = q.dequantize(), q(x)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.float16)):
        cast(q)
        assert q.scale.dtype == torch.float32 and q.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
        q.float()
        assert torch.equal(q.dequantize(), w) and torch.equal(q(x), ref)
    q.to(torch.bfloat16)
    x16 = x.bfloat16()
    want = F.linear(x16, w.bfloat16())  # the bfloat16 reference: the float32 weights rounded once
    if q.uses_int8_kernel(x16):  # (8 bits per channel: torch's kernel, its own order and bfloat16 scale: an ulp)
        torch.testing.assert_close(q(x16), want, atol=float(want.abs().max()) / 128, rtol=0)
    else:
        assert torch.equal(q(x16), want)
    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3")).eval()
    quantize_weights(model, bits=bits, group_size=group)
    ids = torch.randint(0, 256, (2, 16))
    full = logits(model, ids)
    model.to(torch.bfloat16)
    assert {m.scale.dtype for m in model.modules() if isinstance(m, QuantLinear)} == {torch.float32}
    out = logits(model, ids).float()
    assert float((out - full).norm() / full.norm()) < 0.02  # bfloat16 activations and float weights only


def test_int8_uses_the_cpu_kernel_when_torch_has_it():
    q = QuantLinear.from_linear(nn.Linear(32, 8, bias=False), bits=8)
    x = torch.randn(4, 32)
    assert q.uses_int8_kernel(x) == hasattr(torch, "_weight_int8pack_mm")
    assert not QuantLinear.from_linear(nn.Linear(32, 8), bits=8, group_size=16).uses_int8_kernel(x)


def test_float16_int8_kernel_keeps_rows_of_small_weights():
    """The CPU int8 kernel took its scales in x's dtype: in float16 a row whose largest |w| is 2e-6 (scale 1.6e-8)
    got a scale of 0 and gave zeros, and a row of 1e-4 weights was off by ~2%, where dequantizing was exact."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 3, bias=False)
    with torch.no_grad():
        for row, top in zip(linear.weight, (1.0, 1e-4, 2e-6)):
            row.mul_(top / row.abs().max())
    q = QuantLinear.from_linear(linear, bits=8).half()
    x = torch.randn(4, 64).half()
    if not q.uses_int8_kernel(x):
        pytest.skip("this torch has no CPU int8 kernel")
    want = (x.double() @ q.dequantize().double().T)  # (4, 3)
    err_N = ((q(x).double() - want).abs().amax(0) / want.abs().amax(0))  # (3,) relative error per output row
    assert float(err_N.max()) < 2e-3, err_N

@pytest.mark.parametrize("attach", ["attach_gateskip", "attach_dnd", "attach_mod"])
def test_a_method_attaches_to_a_model_whose_lm_head_is_quantized(attach):
    """The attach functions read lm_head.weight for the new modules' device and dtype: after quantize_weights(skip=())
    they stopped with "'QuantLinear' object has no attribute 'weight'"."""
    import dyndepth.methods

    torch.manual_seed(0)
    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3", num_hidden_layers=4)).eval()
    assert "lm_head" in quantize_weights(model, bits=8, skip=())
    getattr(dyndepth.methods, attach)(model, {"layers": (1, 2)} if attach == "attach_dnd" else None)
    ids = torch.randint(0, 256, (2, 8))
    assert model(ids).logits.shape == (2, 8, 256) and model.generate(ids, 3).shape == (2, 11)

def test_gradients_flow_through_int8_weights_to_float_gates():
    """Training float gates on an int8 base (quantize_gates=False) ran the CPU int8 kernel in backward too: "derivative
    for aten::_weight_int8pack_mm is not implemented"."""
    q = QuantLinear.from_linear(nn.Linear(32, 8), bits=8)
    x = torch.randn(4, 32, requires_grad=True)
    q(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_()
    (ref @ q.dequantize().T + q.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)
    model, _ = gated_model(budget=0.3)
    quantize_weights(model, bits=8, quantize_gates=False)
    model(torch.randint(0, 256, (2, 8))).logits.square().mean().backward()
    assert model.model.layers[0].gateskip.attn_gate.proj.weight.grad.abs().sum() > 0


def test_gates_can_stay_in_float_and_bad_settings_are_refused():
    model, _ = gated_model()
    names = quantize_weights(model, bits=8, quantize_gates=False)
    assert len(names) == 14 and not any("gateskip" in n for n in names)
    assert type(model.model.layers[0].gateskip.mlp_gate.proj) is nn.Linear
    with pytest.raises(ValueError, match="bits"):
        quantize_weights(gated_model()[0], bits=3)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weights(gated_model()[0], bits=4, group_size=48)
    mixed = nn.Sequential(nn.Linear(64, 8), nn.Linear(96, 8))  # 64 divides the first layer's inputs, not the second's
    with pytest.raises(ValueError, match="1: group_size=64 does not divide in_features=96"):
        quantize_weights(mixed, bits=8, group_size=64)
    assert all(type(m) is nn.Linear for m in mixed), "a refused call must leave every layer as it was"
    odd = nn.Sequential(nn.Linear(64, 8), nn.Linear(33, 8))  # 4 bits: an odd row (a GateSkip gate of rank 15) packs
    with pytest.raises(ValueError, match="1: 4 bits pack two values per byte.* group_size=33 is odd"):  # no pairs
        quantize_weights(odd, bits=4)
    assert all(type(m) is nn.Linear for m in odd), "the first layer was left quantized"


def test_skip_takes_one_name_as_a_string():
    """skip="lm_head" was iterated letter by letter: every module name holds an "l", so nothing was quantized and
    the call returned [] with no word."""
    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
    names = quantize_weights(model, skip="lm_head")
    assert "model.layers.0.self_attn.q_proj" in names and "lm_head" not in names
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    for bad in (("",), (3,)):
        with pytest.raises(ValueError, match="must be module-name substrings"):
            quantize_weights(dyndepth.CausalLM(dyndepth.preset("tiny-qwen3")), skip=bad)


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
        assert float(stats[f"gateskip/{branch}_skipped"]) == pytest.approx(0.3)  # floor(0.3 * 80) / 80
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


def test_a_quantized_model_refuses_to_save_a_folder_it_could_not_load(tmp_path):
    """save_pretrained wrote qweight / scale tensors that from_pretrained then refused as missing weights."""
    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
    quantize_weights(model, 8)
    with pytest.raises(ValueError, match="quantized in memory .* save the model before quantize_weights"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("encoding", ["rope", "learned"])
def test_a_dreamer_with_depth_attention_quantizes_and_runs(encoding):
    """Depth attention's projections read the weights directly (one normed pass, the learned step row as W e):
    quantized, the forward raised AttributeError 'QuantLinear' object has no attribute 'weight'."""
    torch.manual_seed(0)
    model = dyndepth.build_model(dyndepth.preset("dreamer-tiny", da_step_encoding=encoding)).eval()
    if encoding == "learned":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.depth_attn.step_embed.normal_(0, 0.5)
    ids = torch.randint(0, 256, (2, 12))
    ref = logits(model, ids)
    names = quantize_weights(model, bits=8)
    assert any(".depth_attn.k_proj" in n for n in names)
    out = logits(model, ids)
    assert not torch.equal(out, ref) and float((out - ref).norm() / ref.norm()) < 0.05
