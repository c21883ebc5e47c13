"""The compute ledger of every model and method against torch's own FLOP counter (executed) and against a
slow per-token count (ideal): padding, per-row subsets, dense fallbacks, chunked attention, decoding."""

import contextlib

import pytest
import torch
from gated import gated_model
from torch.utils.flop_counter import FlopCounterMode

import dyndepth
from dyndepth import CausalLM, KVCache, preset
from dyndepth.core import flops
from dyndepth.methods import attach_mod, calibrate

SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _sdpa_flops(q_shape, k_shape, v_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    """Torch's counter does not know the CPU SDPA kernel: count it from the shapes it was given, every
    (query, key) pair, or the lower triangle when the kernel runs causally (it skips the upper blocks)."""
    B, N, T, H = q_shape
    S = k_shape[2]
    pairs = T * (T + 1) // 2 if is_causal else T * S
    return 4 * B * N * pairs * H


def counted(model, *args, **kwargs):
    """(model output, FLOPs torch counted for the forward)."""
    with FlopCounterMode(display=False, custom_mapping={SDPA_CPU: _sdpa_flops}) as counter, torch.no_grad():
        out = model(*args, **kwargs)
    return out, counter.get_total_flops()


def padded_batch(B=3, T=14, vocab=256):
    ids = torch.randint(0, vocab, (B, T))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
@pytest.mark.parametrize("padded", [False, True])
def test_plain_model_executed_equals_torch_and_ideal_equals_the_analytic_count(name, padded):
    model = CausalLM(preset(name)).eval()
    ids, mask = padded_batch()
    out, torch_flops = counted(model, ids, attention_mask=mask if padded else None)
    assert float(out.stats["flops/executed"]) == torch_flops
    if not padded:  # no PAD: ideal = executed = the analytic count of core/flops.py
        assert float(out.stats["flops/ideal"]) == flops.forward_flops(model.config, 14, B=3) == torch_flops
    else:  # ideal counts real tokens only: each row as a sequence of its own length
        lengths = mask.sum(1).tolist()
        assert float(out.stats["flops/ideal"]) == sum(flops.forward_flops(model.config, n) for n in lengths)
    assert float(out.stats["flops/dense"]) == float(out.stats["flops/ideal"])


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("path", ["packed", "dense"])
def test_gateskip_prefill_executed_equals_torch_with_padding_and_uneven_rows(name, scope, path):
    model, method = gated_model(name, budget=0.4, scope=scope, path=path, eos=3)
    ids, mask = padded_batch()
    ids[0, 6] = 3
    out, torch_flops = counted(model, ids, attention_mask=mask)
    assert float(out.stats["flops/executed"]) == torch_flops


@pytest.mark.parametrize("gate", ["scalar", "lowrank"])
def test_gateskip_prefill_executed_equals_torch_for_every_gate_kind(gate):
    model, _ = gated_model(budget=0.4, gate=gate, spread=False)  # (a low-rank gate runs two matmuls: down, proj)
    ids, mask = padded_batch()
    out, torch_flops = counted(model, ids, attention_mask=mask)
    assert float(out.stats["flops/executed"]) == torch_flops


def test_gateskip_ideal_is_the_slow_per_token_count_and_executed_adds_the_padding():
    model, method = gated_model(budget=0.4, scope="batch", path="packed")
    cfg = model.config
    ids, mask = padded_batch()
    trace = dyndepth.Trace()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, trace=trace)
    st, valid, pos = trace.ctx.state, mask.bool(), trace.ctx.positions
    gate = flops.gate_flops(cfg, "vector")
    slow = 0
    for (slot, branch), keep in st.keep.items():
        for b in range(3):
            for t in range(14):
                if not valid[b, t]:
                    continue
                slow += gate
                if branch == "attn":
                    slow += flops.kv_flops(cfg)
                    if keep[b, t]:
                        slow += flops.q_o_flops(cfg) + flops.attn_score_flops(cfg, int(pos[b, t]) + 1)
                elif keep[b, t]:
                    slow += flops.mlp_flops(cfg, slot)
    slow += int(valid.sum()) * flops.lm_head_flops(cfg)
    assert float(out.stats["flops/ideal"]) == pytest.approx(slow)
    # rows keep different counts in batch scope: padding rows to the longest costs attention pairs
    assert float(out.stats["flops/executed"]) > float(out.stats["flops/ideal"])


def test_gateskip_chunked_attention_counts_the_pairs_it_computed():
    model, _ = gated_model(budget=0.3, path="packed", max_positions=2048)
    ids = torch.randint(0, 256, (1, 1100))
    out, torch_flops = counted(model, ids)
    assert float(out.stats["flops/executed"]) == torch_flops
    dense = float(out.stats["flops/dense"])
    assert float(out.stats["flops/ideal"]) < float(out.stats["flops/executed"]) < dense


@pytest.mark.parametrize("path", ["packed", "dense", "auto"])
@pytest.mark.parametrize("B", [1, 4])
def test_gateskip_decode_executed_equals_torch(path, B):
    model, method = gated_model(budget=0.0)
    calibrate(model, [torch.randint(0, 256, (4, 24))], budget=0.5)
    ids = torch.randint(0, 256, (B, 8))
    cache = KVCache.for_model(model.config, B, 12)
    pos = torch.arange(12).expand(B, 12)
    with method.decoding(budget=0.5, path=path):
        counted(model, ids, positions=pos[:, :8], cache=cache)
        for t in range(8, 11):
            out, torch_flops = counted(model, torch.randint(0, 256, (B, 1)), positions=pos[:, t:t + 1],
                                       cache=cache)
            assert float(out.stats["flops/executed"]) == torch_flops
            assert float(out.stats["flops/ideal"]) <= float(out.stats["flops/executed"])


@pytest.mark.parametrize("mode", ["topk", "predictor"])
def test_mod_executed_equals_torch_with_padding_and_decoding(mode):
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3", num_hidden_layers=4)).eval()
    attach_mod(model, {"capacity": 0.5, "mode": mode})
    ids, mask = padded_batch()
    out, torch_flops = counted(model, ids, attention_mask=mask)
    assert float(out.stats["flops/executed"]) == torch_flops
    assert float(out.stats["flops/ideal"]) < float(out.stats["flops/dense"])
    cache = KVCache.for_model(model.config, 3, 16)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    counted(model, ids, attention_mask=mask, positions=pos, cache=cache)
    out, torch_flops = counted(model, torch.randint(0, 256, (3, 1)), positions=pos[:, -1:] + 1, cache=cache)
    assert float(out.stats["flops/executed"]) == torch_flops


def _counting_backend(totals: list):
    """A torch.compile backend that runs dynamo's graph under torch's FLOP counter, appending each run's total."""
    def backend(gm, example_inputs):
        def run(*args):
            with FlopCounterMode(display=False, custom_mapping={SDPA_CPU: _sdpa_flops}) as counter:
                result = gm(*args)
            totals.append(counter.get_total_flops())
            return result
        return run
    return backend


def _live_dnd(name: str):
    from dyndepth.methods import DNDConfig, attach_dnd

    torch.manual_seed(0)
    model = CausalLM(preset(name)).eval()
    attach_dnd(model, DNDConfig(layers=(0, 1), ratio=0.3))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.dnd.router.weight.normal_(0, 1.0)  # some rows nest, some do not
    return model, contextlib.nullcontext()


def _gated(name: str):
    model, method = gated_model(name, budget=0.0)
    calibrate(model, [torch.randint(0, 256, (4, 24))], budget=0.5)
    return model, method.decoding(budget=0.5)


@pytest.mark.parametrize("make", [_gated, _live_dnd], ids=["gateskip", "dnd"])
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_a_compiled_decode_steps_executed_equals_torch(make, name):
    """A compiled decode step is one static graph: GateSkip runs partially kept branches dense-masked, DND runs the
    nested block on every row, a MoE layer of a few tokens every expert. The ledger's executed FLOPs are what torch
    counts inside the compiled graph as it runs; ideal stays below them."""
    model, knobs = make(name)
    B, totals = 4, []
    cache = KVCache.for_model(model.config, B, 12, num_slots=model.num_slots())
    pos = torch.arange(12).expand(B, 12)
    step = torch.compile(model, backend=_counting_backend(totals), fullgraph=True)
    torch._dynamo.reset()
    with knobs, torch.no_grad():
        model(torch.randint(0, 256, (B, 8)), positions=pos[:, :8], cache=cache)  # prefill, eager
        for t in range(8, 11):
            out = step(torch.randint(0, 256, (B, 1)), positions=pos[:, t:t + 1], cache=cache)
            assert float(out.stats["flops/executed"]) == totals[-1]
            assert float(out.stats["flops/ideal"]) < float(out.stats["flops/executed"])
    assert len(totals) == 3
