import contextlib

import pytest
import torch

from dyndepth import CausalLM, preset
from dyndepth.generation import sample_next


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CausalLM(preset("tiny-qwen3")).eval()


def greedy_without_cache(model, ids, n):
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_cached_greedy_equals_uncached_greedy(model):
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, 12, stop_tokens=[]), greedy_without_cache(model, ids, 12))


@pytest.fixture
def varied_model():
    """Larger random weights than the default init, so greedy output changes token to token (the default
    init mostly repeats the last prompt token, which makes every stop test stop at the first token)."""
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0, 0.1)
    return model


def expected_with_stops(free, T, stops, pad, length):
    """Each row of `free` (greedy, no stops) cut after its first stop token, padded to `length` columns."""
    rows = []
    for row in free[:, T:].tolist():
        first = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
        rows.append(row[:first + 1] + [pad] * (length - first - 1))
    return torch.cat([free[:, :T], torch.tensor(rows)], dim=1)


def test_stop_tokens_pad_finished_rows_and_end_early(varied_model):
    ids = torch.randint(0, 256, (2, 4))
    free = varied_model.generate(ids, 10, stop_tokens=[])
    new = free[:, 4:].tolist()
    stops = [new[0][2], new[1][4]]  # row 0 stops by its 3rd new token, row 1 by its 5th
    ends = [next(i for i, t in enumerate(row) if t in stops) + 1 for row in new]
    assert ends[0] < ends[1] <= 5, (new, stops)  # row 0 finishes first (then pads), row 1 ends the loop early
    out = varied_model.generate(ids, 10, stop_tokens=stops, pad_token_id=7)
    assert out.shape == (2, 4 + ends[1])
    assert torch.equal(out, expected_with_stops(free, 4, stops, 7, ends[1]))
    # no pad_token_id given: the config's, else the first stop id
    assert varied_model.config.pad_token_id is None and stops[0] != 0
    out = varied_model.generate(ids, 10, stop_tokens=stops)
    assert torch.equal(out, expected_with_stops(free, 4, stops, stops[0], ends[1]))
    varied_model.config.pad_token_id = 9
    try:
        out = varied_model.generate(ids, 10, stop_tokens=stops)
    finally:
        varied_model.config.pad_token_id = None
    assert torch.equal(out, expected_with_stops(free, 4, stops, 9, ends[1]))


def test_a_row_that_never_stops_runs_to_the_end(varied_model):
    ids = torch.randint(0, 256, (2, 4))
    free = varied_model.generate(ids, 10, stop_tokens=[])
    new = free[:, 4:].tolist()
    stop = next(t for t in new[0] if t not in new[1])  # row 0 emits it, row 1 never does
    out = varied_model.generate(ids, 10, stop_tokens=[stop], pad_token_id=7)
    assert out.shape == (2, 14) and torch.equal(out[1], free[1])
    assert torch.equal(out, expected_with_stops(free, 4, [stop], 7, 10))



def test_a_checkpoints_pad_id_outside_the_vocabulary_falls_back_to_the_stop_id(varied_model):
    # some Llama conversions' config.json says pad_token_id -1: once a row of a batch stopped, the loop fed it -1
    # and failed mid-generation blaming the input ("token ids must lie in [0, 256) ... got ids from -1")
    ids = torch.randint(0, 256, (2, 4))
    free = varied_model.generate(ids, 10, stop_tokens=[])
    stop = next(t for t in free[0, 4:].tolist() if t not in free[1, 4:].tolist())  # row 0 stops, row 1 goes on
    varied_model.config.pad_token_id = -1
    out = varied_model.generate(ids, 10, stop_tokens=[stop])
    assert torch.equal(out, expected_with_stops(free, 4, [stop], stop, 10))  # padded with the stop id, as with none


def test_callback_streams_every_new_column(model):
    ids = torch.randint(0, 256, (2, 4))
    seen, forwards = [], []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    out = model.generate(ids, 6, stop_tokens=[], callback=lambda i, tok: seen.append(tok.clone()))
    handle.remove()
    assert torch.equal(torch.stack(seen, dim=1), out[:, 4:])
    assert len(forwards) == 6  # the prompt's, then one per new token but the last


def test_sampling_is_reproducible_with_a_generator(model):
    ids = torch.randint(0, 256, (2, 4))
    a = model.generate(ids, 8, temperature=0.9, top_k=20, top_p=0.9, stop_tokens=[],
                       generator=torch.Generator().manual_seed(3))
    b = model.generate(ids, 8, temperature=0.9, top_k=20, top_p=0.9, stop_tokens=[],
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(500, 5)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, ...: top_p=0.8 keeps {0, 1}
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert 0.62 < probs[0] < 0.62 + probs[1]  # top_p=0.62: token 0 alone is the nucleus
    assert sample_next(logits, 1.0, top_p=0.62, generator=g).eq(0).all()
    assert sample_next(logits, 1.0, top_p=1e-9, generator=g).eq(0).all()  # the top token is always kept
    assert sample_next(logits, 0.0).eq(0).all()
    cold = sample_next(logits, 0.25, generator=g).eq(0).float().mean()  # p(0) = 0.98 at temperature 0.25
    assert cold > 0.9 > probs[0] + 0.1


def test_generation_rejects_bad_input(model):
    ids = torch.randint(0, 256, (2, 4))
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, 3, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(ids, 10_000)
    with pytest.raises(ValueError, match="batch, time"):
        model.generate(ids[0], 3)


def test_float16_activations_that_overflow_are_an_error_not_a_row_of_token_0(model):
    with torch.no_grad():  # activations past float16's 65504, as many checkpoints' outliers are
        model.model.layers[0].mlp.down_proj.weight.mul_(3e5)
        model.model.layers[0].mlp.up_proj.weight.mul_(30)
    ids = torch.randint(0, 256, (2, 12))
    assert model.generate(ids, 3).shape == (2, 15)  # float32 holds them
    with pytest.raises(FloatingPointError, match="not finite.*float16 model.*bfloat16 or float32"):
        model.half().generate(ids, 3)  # NaN logits: greedy emitted token 0 at every step


@pytest.mark.slow
def test_compiled_decode_matches_eager(model):
    ids = torch.randint(0, 256, (2, 5))
    assert torch.equal(model.generate(ids, 6, stop_tokens=[], compile=True), model.generate(ids, 6, stop_tokens=[]))


def test_a_given_cache_serves_repeated_compiled_generations_and_nested_ones_stay_apart(varied_model):
    """`generate(cache=...)`: the caller's cache, emptied first, so repeated compiled generates can replay CUDA graphs
    on one set of addresses; a second prompt (left-padded, through a DND model's compact nested slots) decodes as
    if it came first. Without one each call builds its own: a generate nested in another's callback (it shared the
    model's kept cache and wiped the outer one's) leaves the outer one exact."""
    from dyndepth import KVCache
    from dyndepth.methods import DNDConfig, attach_dnd

    attach_dnd(varied_model, DNDConfig(layers=(0, 1), ratio=0.5))
    with torch.no_grad():
        for layer in varied_model.model.layers:
            layer.dnd.router.weight.normal_(0, 1.0)  # a live router: tokens nest
    eager = {"backend": "eager"}  # dynamo traces the step; no inductor (the code path under test)
    a, b = torch.randint(0, 256, (2, 7)), torch.randint(0, 256, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = KVCache.for_model(varied_model.config, 2, 13, num_slots=varied_model.num_slots())
    out_a = varied_model.generate(a, 6, stop_tokens=[], compile=eager, cache=cache)
    assert cache.sourced  # the nested slots were written compactly
    out_b = varied_model.generate(b, 6, attention_mask=mask, stop_tokens=[], compile=eager, cache=cache)
    assert torch.equal(out_a, varied_model.generate(a, 6, stop_tokens=[]))
    assert torch.equal(out_b, varied_model.generate(b, 6, attention_mask=mask, stop_tokens=[]))
    with pytest.raises(ValueError, match="does not fit this generation"):
        varied_model.generate(a, 7, stop_tokens=[], cache=cache)  # 14 positions needed
    other = KVCache(varied_model.num_slots(), 2, 13, num_kv_heads=1, head_dim=8)  # another model's heads
    with pytest.raises(ValueError, match="1 x 8 kv heads"):
        varied_model.generate(a, 6, stop_tokens=[], cache=other)
    half = KVCache.for_model(varied_model.config, 2, 13, num_slots=varied_model.num_slots(), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="torch.bfloat16 on cpu"):  # failed inside attention
        varied_model.generate(a, 6, stop_tokens=[], cache=half)

    def nested(step, tokens):
        if step == 2:
            varied_model.generate(b, 2, stop_tokens=[], compile=eager)

    assert torch.equal(varied_model.generate(a, 6, stop_tokens=[], compile=eager, callback=nested), out_a)


def test_decode_compile_options_default_and_override(model):
    from dyndepth.generation import decode_compile_options

    assert decode_compile_options(model) == {"backend": "inductor", "mode": "default", "fullgraph": False,
                                             "dynamic": False}  # CPU: no CUDA graphs
    assert decode_compile_options(model, {"backend": "eager"})["backend"] == "eager"
    assert "mode" not in decode_compile_options(model, {"options": {"max_autotune": False}})  # torch takes one


def test_compile_as_an_empty_dict_compiles_with_the_defaults(model, monkeypatch):
    from dyndepth import generation

    seen = []
    monkeypatch.setattr(generation.torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    model.generate(torch.randint(0, 256, (1, 3)), 3, stop_tokens=[], compile={})  # ran eager before
    assert seen == [generation.decode_compile_options(model)]


def test_a_compiled_decode_step_at_dynamos_recompile_limit_is_named_by_a_warning(model, monkeypatch, caplog):
    """Each batch size (cache length, model) compiles another variant of the one decode step; past dynamo's
    recompile_limit the step ran eager for any new shape with only a compiler log line, once."""
    import logging

    import torch._dynamo

    from dyndepth import generation

    torch._dynamo.reset()  # (other tests' compiled steps share the code object)
    monkeypatch.setattr(generation, "_warned_recompile_limits", set(), raising=False)
    eager = {"backend": "eager"}
    # (dynamo's own patch: monkeypatch's undo left torch._dynamo.config without recompile_limit for later tests)
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level(logging.WARNING, logger="dyndepth.generation"):
        for batch in (1, 2):
            model.generate(torch.randint(0, 256, (batch, 3)), 3, stop_tokens=[], compile=eager)
        assert not [r for r in caplog.records if r.name == "dyndepth.generation"]  # reached, not passed
        for batch in (3, 4):  # the first past it warns; once
            model.generate(torch.randint(0, 256, (batch, 3)), 3, stop_tokens=[], compile=eager)
    warned = [r.getMessage() for r in caplog.records if r.name == "dyndepth.generation"]
    assert len(warned) == 1 and "holds 2 variants" in warned[0]
    assert "torch._dynamo.config.recompile_limit=2" in warned[0]  # the cause and the knob
    torch._dynamo.reset()


def test_left_padding_past_the_models_window_is_fine_when_every_row_fits():
    """Positions count each row's real tokens: 10 real tokens in 20 columns fit a 16-position model (the length check
    counted the PAD columns and refused), and decode as the same rows without the extra padding."""
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3", max_position_embeddings=16)).eval()
    ids = torch.randint(0, 256, (2, 20))
    mask = torch.ones_like(ids)
    mask[:, :10] = 0
    mask[1, 10:12] = 0  # row 1: 8 real tokens
    valid = mask[:, 10:].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[:, 10:][valid],
                                   model(ids[:, 10:], attention_mask=mask[:, 10:]).logits[valid], atol=1e-5, rtol=0)
    out = model.generate(ids, 4, attention_mask=mask, stop_tokens=[])
    assert torch.equal(out[:, 10:], model.generate(ids[:, 10:], 4, attention_mask=mask[:, 10:], stop_tokens=[]))
    mask[0, :10] = 1  # 20 real tokens: refused
    with pytest.raises(ValueError, match="the input has 20 tokens, more than max_position_embeddings"):
        model(ids, attention_mask=mask)


LOW_PRECISION_ROWS = {  # preset, method and its options, decoding knobs
    "qwen3": ("tiny-qwen3", None, None), "qwen3-moe": ("tiny-qwen3-moe", None, None),
    "gateskip": ("tiny-qwen3", ("gateskip", {"budget": 0.3, "scope": "sequence"}), {"budget": 0.3}),
    "mod-predictor": ("tiny-qwen3", ("mod", {"capacity": 0.5, "every": 1}), {"mode": "predictor"}),
    "mod-threshold": ("tiny-qwen3", ("mod", {"capacity": 0.5, "every": 1}), {"mode": "router_threshold"}),
    "dnd": ("tiny-qwen3-moe", ("dnd", {"layers": (0, 1), "ratio": 0.3, "beta_init": 0.5}), None),
    "dreamer": ("dreamer-tiny", None, None), "huginn": ("huginn-tiny", None, None), "mor": ("mor-tiny", None, None),
    "moeut": ("moeut-tiny", None, None), "moeut-switchhead": ("moeut-switchhead-tiny", None, None)}


def low_precision_model(row: str):
    """A tiny model of every family / method, weights and routers spread so routing and greedy tokens vary; routers
    calibrated where the decoding knobs need it."""
    from dyndepth import build_model
    from dyndepth.methods import attach_method, calibrate

    name, method, knobs = LOW_PRECISION_ROWS[row]
    torch.manual_seed(0)
    model = build_model(preset(name)).eval()
    if method is not None:
        attach_method(model, *method)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in pname:
                p.normal_(0, 0.1 if method is None or method[0] not in pname else 0.5)
            if "gateskip" in pname and pname.endswith("bias"):
                p.zero_()  # gates around 0.5: importances differ token to token
    if method is not None and method[0] == "gateskip":
        calibrate(model, [torch.randint(0, 200, (4, 32))], budget=0.3)
    elif knobs == {"mode": "router_threshold"}:
        calibrate(model, [torch.randint(0, 200, (4, 32))])
    return model, knobs


@pytest.mark.parametrize("precision", ["bfloat16", "autocast"])
@pytest.mark.parametrize("row", list(LOW_PRECISION_ROWS))
def test_every_family_and_method_decodes_its_full_forward_in_bfloat16_and_under_autocast(row, precision):
    """What users run: bf16 weights, or fp32 weights under bf16 autocast (cache in the weights' dtype). A left-padded
    batch's rows equal each row alone, prefill + one-token steps equal the full forward (to bf16 rounding: the paths
    multiply in other shapes), and greedy `generate` equals the argmax of the uncached forward token for token."""
    import contextlib

    from dyndepth import KVCache

    model, knobs = low_precision_model(row)
    if precision == "bfloat16":
        model.to(torch.bfloat16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast")
    decoding = (lambda: model.method.decoding(**(knobs or {}))) if model.method else contextlib.nullcontext
    ids = torch.randint(0, 200, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2], mask[2, :5] = 0, 0
    real, pos = mask.bool(), (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), autocast, decoding():
        full = model(ids, attention_mask=mask).logits  # (B, T, V)
        assert full.dtype == torch.bfloat16
        tol = 0.02 * float(full[real].abs().max())
        for b in range(3):
            alone = model(ids[b:b + 1, real[b]]).logits[0]
            torch.testing.assert_close(alone.float(), full[b, real[b]].float(), atol=tol, rtol=0)
        cache = KVCache.for_model(model.config, 3, 10, num_slots=model.num_slots(), dtype=next(model.parameters()).dtype)
        steps = [model(ids[:, :4], mask[:, :4], pos[:, :4], cache).logits]
        steps += [model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits for t in range(4, 10)]
        torch.testing.assert_close(torch.cat(steps, 1)[real].float(), full[real].float(), atol=tol, rtol=0)
    with autocast:
        out = model.generate(ids, 5, attention_mask=mask, stop_tokens=[], method_knobs=knobs)
    with torch.no_grad(), autocast, decoding():  # teacher-forced: each generated token is the uncached forward's
        # argmax up to bf16 rounding (top logits can tie exactly in bf16, so exact argmax equality would be luck)
        m = torch.cat([mask, torch.ones_like(out[:, 10:])], 1)
        logits = model(out, attention_mask=m).logits[:, 9:-1].float()  # (B, 5, V) predicting tokens 10..14
    chosen = logits.gather(-1, out[:, 10:, None]).squeeze(-1)  # (B, 5)
    assert out.shape == (3, 15) and torch.equal(out[:, :10], ids)
    assert (logits.amax(-1) - chosen).max() <= tol, (logits.amax(-1) - chosen).max()


@pytest.mark.parametrize("row", list(LOW_PRECISION_ROWS))
def test_every_family_and_method_decodes_the_edge_shapes_of_a_batch(row):
    """fp32, every family and method with its decoding knobs: a batch left-padded past its longest prompt, with a row
    of one real token, generates each row as that row alone (token-choice routing: rows are independent), greedy
    tokens are the argmax of the uncached forward over the output, one new token is the first of six, and a prompt of
    max_position_embeddings - 1 tokens still gets its last token, the full forward's argmax."""
    model, knobs = low_precision_model(row)
    decoding = (lambda: model.method.decoding(**(knobs or {}))) if model.method else contextlib.nullcontext
    ids = torch.randint(0, 200, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros_like(ids)
    mask[0, 2:], mask[1, 4:], mask[2, 8:] = 1, 1, 1  # 7, 5 and 1 real tokens; two PAD columns in every row
    out = model.generate(ids, 6, attention_mask=mask, stop_tokens=[], method_knobs=knobs)
    for b in range(3):
        alone = model.generate(ids[b:b + 1, mask[b].bool()], 6, stop_tokens=[], method_knobs=knobs)
        assert torch.equal(alone[0, -6:], out[b, -6:]), b
    one = model.generate(ids, 1, attention_mask=mask, stop_tokens=[], method_knobs=knobs)
    assert torch.equal(one, out[:, :10])
    long = torch.randint(0, 200, (1, model.config.max_position_embeddings - 1))
    last = model.generate(long, 1, stop_tokens=[], method_knobs=knobs)
    with torch.no_grad(), decoding():
        logits = model(out, attention_mask=torch.cat([mask, torch.ones_like(out[:, 9:])], 1)).logits[:, 8:-1]
        assert torch.equal(logits.argmax(-1), out[:, 9:])
        assert int(last[0, -1]) == int(model(long).logits[0, -1].argmax())


def test_generation_generate_called_directly_records_no_autograd_graph(model):
    """`dyndepth.generation.generate` (the function `model.generate` wraps in no_grad) ran its forwards with autograd
    on when called directly: every step's activations stayed alive through the KV cache's in-place writes (the cache
    buffers took a grad_fn chaining all steps), twice the memory of `model.generate` for 600 tokens of demo-tiny."""
    from dyndepth import KVCache
    from dyndepth.generation import generate

    ids = torch.randint(0, 256, (2, 5))
    cache = KVCache.for_model(model.config, 2, 11, num_slots=model.num_slots())
    graphs = []
    handle = model.register_forward_hook(lambda _m, _args, out: graphs.append(out.logits.requires_grad))
    out = generate(model, ids, 6, stop_tokens=[], cache=cache)
    handle.remove()
    assert torch.equal(out, model.generate(ids, 6, stop_tokens=[]))
    assert graphs == [False] * 6 and not any(t.requires_grad for t in cache.buffers())


def test_a_cache_made_under_inference_mode_is_refused_outside_it_with_the_fix(model):
    """A cache made (or first filled) under torch.inference_mode holds inference tensors: reused by a later generate
    or cached forward outside it, the first in-place write failed inside torch ("Inplace update to inference tensor
    outside InferenceMode"); now the boundary names the cache and the fix. Inside inference_mode it serves again."""
    from dyndepth import KVCache

    ids = torch.randint(0, 256, (2, 5))
    with torch.inference_mode():
        cache = KVCache.for_model(model.config, 2, 11)
        first = model.generate(ids, 6, stop_tokens=[], cache=cache)
    with pytest.raises(ValueError, match="made under torch.inference_mode"):
        model.generate(ids, 6, stop_tokens=[], cache=cache)
    with pytest.raises(ValueError, match="made under torch.inference_mode"), torch.no_grad():
        model(ids, positions=torch.arange(5).expand(2, 5), cache=cache)
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, 6, stop_tokens=[], cache=cache), first)
    outside = KVCache.for_model(model.config, 2, 11)  # a cache made outside serves both ways
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, 6, stop_tokens=[], cache=outside), first)
    assert torch.equal(model.generate(ids, 6, stop_tokens=[], cache=outside), first)


def test_logits_that_turn_non_finite_while_decoding_are_an_error_not_a_tail_of_token_0(model):
    """Only the prompt's logits were checked: an overflow that appeared during decode (a long generation's activations
    in float16) made greedy emit token 0 from there on, silently. Steps are checked on the device and read once."""
    calls = []

    def poison(module, args, out):  # from the third decode step on, row 1's logits are NaN
        calls.append(None)
        if len(calls) > 3:
            out = out.clone()
            out[1] = float("nan")
        return out

    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    handle = model.lm_head.register_forward_hook(poison)
    try:
        with pytest.raises(FloatingPointError, match=r"the next-token logits after 3 generated tokens \(the prompt's "
                                                     r"were finite\) are not finite.*bfloat16 or float32"):
            model.generate(ids, 6)
        calls.clear()
        first = model.generate(ids, 3)  # (the poisoned step is never read: stopped at max_new_tokens)
        calls.clear()
        stopped = model.generate(ids, 6, stop_tokens=[int(first[1, 6])])  # row 1 stops before its logits turn NaN
        assert stopped.shape[1] > 9 and (stopped[1, 7:] == stopped[1, 7]).all()
    finally:
        handle.remove()
