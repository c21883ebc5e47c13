"""A compiled decode step traces as one graph (`fullgraph=True`: no host sync, CUDA graphs on a GPU) for every model
family and method, and decodes what eager decoding does: left-padded batches, routers that send some decode tokens
one way and some the other."""

import pytest
import torch

from dyndepth import build_model, preset
from dyndepth.core.cache import KVCache
from dyndepth.methods import DNDConfig, GateSkipConfig, attach_dnd, attach_gateskip, calibrate
from dyndepth.methods.mod import MoDConfig, attach_mod

TRACE_ONLY = {"backend": "eager", "fullgraph": True}  # dynamo traces the step in one graph, or raises
PROMPT, NEW = 9, 8


def varied(name: str):
    """A tiny model with weights large enough that greedy tokens and routing decisions vary."""
    torch.manual_seed(0)
    model = build_model(preset(name)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in pname:
                p.normal_(0, 0.1)
    return model


def live_dnd(model, **cfg):
    attach_dnd(model, DNDConfig(layers=(0, 1), ratio=0.3, **cfg))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.dnd.router.weight.normal_(0, 1.0)  # scores spread around tau: some decode tokens nest
    return model


def left_padded_batch():
    ids = torch.randint(0, 200, (4, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids, mask


def decode_both_ways(model, knobs: dict | None = None):
    """(eager tokens, compiled tokens, the compiled run's cache)."""
    ids, mask = left_padded_batch()
    eager = model.generate(ids, NEW, attention_mask=mask, stop_tokens=[], method_knobs=knobs)
    torch._dynamo.reset()
    cache = KVCache.for_model(model.config, 4, PROMPT + NEW, num_slots=model.num_slots())
    compiled = model.generate(ids, NEW, attention_mask=mask, stop_tokens=[], method_knobs=knobs, compile=TRACE_ONLY,
                              cache=cache)
    return eager, compiled, cache


def decode_writes(cache: KVCache, slot: int) -> torch.Tensor:
    """(B, NEW - 1) which decode steps' tokens wrote K/V at `slot` (a sparse slot: routed or nested tokens only)."""
    valid, source = cache.valids[slot][:, :cache.max_seq_len], cache.sources[slot][:, :cache.max_seq_len]
    written = torch.zeros(cache.batch_size, PROMPT + NEW, dtype=torch.bool)
    for b in range(cache.batch_size):
        written[b, source[b][valid[b]]] = True
    return written[:, PROMPT:PROMPT + NEW - 1]  # the positions decode steps wrote (after the prompt's)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe", "tiny-qwen2", "tiny-llama", "dreamer-tiny", "huginn-tiny", "mor-tiny",
                                  "moeut-tiny", "moeut-switchhead-tiny"])
def test_every_model_family_decodes_in_one_graph(name):
    eager, compiled, _ = decode_both_ways(varied(name))
    assert torch.equal(compiled, eager)


@pytest.mark.slow
@pytest.mark.parametrize("dnd", [{}, {"positions": "original"},
                                 {"positions": "original", "nested_attends_vanilla": True}],
                         ids=["compact", "original", "attends_vanilla"])
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_dnd_decodes_in_one_graph_with_rows_that_nest_and_rows_that_do_not(name, dnd):
    """Every row runs the nested block in the traced step; the rows that selected nothing write their nested K/V to
    the scratch column and keep x^v, so the nested slot holds exactly what eager decoding writes there."""
    model = live_dnd(varied(name), **dnd)
    eager, compiled, cache = decode_both_ways(model)
    assert torch.equal(compiled, eager)
    nested = decode_writes(cache, model.method.nested_slot[1])
    assert nested.any() and not nested.all()  # some decode tokens nested, others did not
    ids, mask = left_padded_batch()
    reference = KVCache.for_model(model.config, 4, PROMPT + NEW, num_slots=model.num_slots())
    model.generate(ids, NEW, attention_mask=mask, stop_tokens=[], cache=reference)  # eager, into a cache we keep
    assert torch.equal(decode_writes(reference, model.method.nested_slot[1]), nested)


@pytest.mark.slow
def test_gateskip_decodes_in_one_graph_skipping_some_tokens():
    """A traced step reads no kept count: every partially kept branch runs densely with a masked output (a whole
    skip adds nothing), the same tokens as eager decoding's packed / whole-skip paths."""
    model = varied("tiny-qwen3")
    attach_gateskip(model, GateSkipConfig(budget=0.3))
    calibrate(model, [torch.randint(0, 200, (4, 32))], budget=0.3)
    eager, compiled, _ = decode_both_ways(model, {"budget": 0.3})
    assert torch.equal(compiled, eager)
    with model.method.decoding(budget=0.3):  # threshold decisions are per token: the full forward's are decode's
        stats = model(compiled).stats
    assert 0.0 < float(stats["gateskip/attn_skipped"]) < 1.0


@pytest.mark.slow
def test_gateskip_with_the_dense_path_also_decodes_in_one_graph_and_compiled_prefill_still_packs():
    """path="dense" needs no count either; only decode steps trace without counts: a compiled prefill (a forward of
    many tokens per row) packs as eager prefill does."""
    model = varied("tiny-qwen3")
    attach_gateskip(model, GateSkipConfig(budget=0.3, path="dense"))
    calibrate(model, [torch.randint(0, 200, (4, 32))], budget=0.3)
    eager, compiled, _ = decode_both_ways(model, {"budget": 0.3})
    assert torch.equal(compiled, eager)
    ids = torch.randint(0, 200, (4, 64))
    with model.method.override(budget=0.5, path="auto"):
        torch._dynamo.reset()
        stats = torch.compile(model, backend="eager")(ids).stats  # (the packing's count breaks this graph)
    assert float(stats["gateskip/packed"]) == 1.0


@pytest.mark.slow
def test_mod_decodes_in_one_graph_routing_some_tokens():
    model = varied("tiny-qwen3")
    attach_mod(model, MoDConfig(capacity=0.5))
    eager, compiled, cache = decode_both_ways(model)
    assert torch.equal(compiled, eager)
    routed = decode_writes(cache, min(model.method.routed))
    assert routed.any() and not routed.all()


@pytest.mark.slow
def test_mod_router_threshold_decodes_in_one_graph_as_generate_compiles_it():
    """generate(compile=...) traces with fullgraph=False: each step of mode router_threshold read the stored
    calibration back from the buffers (int(tensor)), a graph break per step (4 graphs), though a fullgraph=True trace,
    which specializes the buffers, passed."""
    from torch._dynamo.utils import counters

    model = varied("tiny-qwen3")
    attach_mod(model, MoDConfig(capacity=0.5))
    calibrate(model, [torch.randint(0, 200, (4, 32))], capacity=0.5)
    ids, mask = left_padded_batch()
    knobs = {"mode": "router_threshold"}
    eager = model.generate(ids, 4, attention_mask=mask, stop_tokens=[], method_knobs=knobs)
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(ids, 4, attention_mask=mask, stop_tokens=[], method_knobs=knobs,
                              compile={"backend": "eager"})
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.slow
@pytest.mark.parametrize("name, every", [("tiny-qwen3-moe", True), ("dreamer-tiny", False)])
def test_a_traced_step_counts_the_experts_it_runs(name, every):
    """Qwen3-MoE's experts (one matmul per expert eagerly) run every expert in a traced step of a few tokens: the
    ledger's executed FLOPs say so, E - K more experts per token and MoE layer than eager's. Dreamer's experts run
    grouped, compiled too (`models.moe.grouped_mm`): the same count as eager. Ideal is unchanged."""
    from dyndepth.core.flops import expert_flops

    model = varied(name)
    c = model.config
    n = -(-c.num_experts // c.num_experts_per_tok)  # n tokens x K picks >= E: not the few-token gathered path
    ids = torch.randint(0, 200, (n, 1))

    def step(m):  # a decode step: one token per row, with a cache (`ForwardContext.traced_decode`)
        cache = KVCache.for_model(c, n, 4, num_slots=model.num_slots())
        return m(ids, positions=torch.zeros_like(ids), cache=cache).stats

    eager = step(model)
    torch._dynamo.reset()
    traced = step(torch.compile(model, **TRACE_ONLY))
    moe_calls = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers)) if hasattr(c, "is_moe_layer") \
        else c.num_hidden_layers  # Dreamer: every application's FFN slot
    extra = n * moe_calls * (c.num_experts - c.num_experts_per_tok) * expert_flops(c) if every else 0
    assert float(traced["flops/executed"]) == pytest.approx(float(eager["flops/executed"]) + extra)
    assert float(traced["flops/ideal"]) == pytest.approx(float(eager["flops/ideal"]))
