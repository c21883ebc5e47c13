"""Invariants under property tests (hypothesis), for the decoder and every method, on random shapes, lengths,
left padding and budgets: the method at its neutral setting equals the base model; prefill + token-by-token
cached decoding equals the full forward; left padding does not change a row's output; a row's output does not
depend on the other rows of its batch; a fixed seed is deterministic. Kept small for the CPU."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dyndepth import CausalLM, KVCache, ModelConfig, build_model, preset
from dyndepth.methods import attach_method, calibrate
from dyndepth.models.dreamer import DreamerConfig

PROPS = settings(max_examples=6, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
V = 256


def _spread(model) -> None:
    """Random methods' parameters spread so their decisions differ by token (fresh ones are near-uniform)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("gateskip.", ".mod.", ".dnd.router")):
                p.normal_(0, 0.5)


def _factory(kind: str):
    torch.manual_seed(0)
    if kind == "dreamer":
        return build_model(preset("dreamer-tiny", vocab_size=V, num_recurrences=3)).eval()
    name = {"qwen3": "tiny-qwen3", "qwen3_moe": "tiny-qwen3-moe", "qwen2": "tiny-qwen2", "llama": "tiny-llama"}.get(
        kind, "tiny-qwen3")
    extra = {"model_type": "mistral", "tie_word_embeddings": False, "rope_theta": 1e6} if kind == "mistral" else {}
    model = CausalLM(preset("tiny-llama" if kind == "mistral" else name, num_hidden_layers=3, **extra)).eval()
    if kind == "gateskip":  # threshold mode: each token decides alone (causal, batch-independent)
        attach_method(model, "gateskip", {"scope": "sequence"})
        _spread(model)
        calibrate(model, [torch.randint(0, V, (4, 16))], budget=0.4)
        model.method.mode, model.method.budget = "threshold", 0.4
    elif kind == "mod":  # the causal predictor routes
        attach_method(model, "mod", {"capacity": 0.5, "every": 1, "mode": "predictor"})
        _spread(model)
    elif kind == "dnd":
        attach_method(model, "dnd", {"layers": (1, 2), "ratio": 0.3, "tau_init": 0.5})
        _spread(model)
        with torch.no_grad():
            for i in (1, 2):
                model.model.layers[i].dnd.beta.fill_(0.5)
    return model


KINDS = ["qwen3", "qwen3_moe", "qwen2", "llama", "mistral", "gateskip", "mod", "dnd", "dreamer"]


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return _factory(request.param)


lengths = st.integers(min_value=2, max_value=10)


@PROPS
@given(data=st.data())
def test_cached_decoding_equals_the_full_forward(model, data):
    B = data.draw(st.integers(1, 3))
    T = data.draw(st.integers(3, 10))
    pads = [data.draw(st.integers(0, T - 2)) for _ in range(B)]
    P = data.draw(st.integers(1, T - 1 - max(pads)) if T - 1 - max(pads) >= 1 else st.just(1))
    P = max(P, max(pads) + 1)  # every row has a real token in the prefill
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = KVCache.for_model(model.config, B, T, num_slots=model.num_slots())
        steps = [model(ids[:, :P], attention_mask=mask[:, :P], positions=pos[:, :P], cache=cache).logits]
        for t in range(P, T):
            steps.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache).logits)
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[valid], full[valid], atol=2e-5, rtol=0)


@PROPS
@given(T=lengths, pad=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_left_padding_does_not_change_a_row(model, T, pad, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (1, T), generator=g)
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, T, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(ids).logits
        shifted = model(padded, attention_mask=mask).logits[:, pad:]
    torch.testing.assert_close(shifted, alone, atol=2e-5, rtol=0)


@PROPS
@given(T=lengths, others=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_a_rows_output_does_not_depend_on_the_other_rows(model, T, others, seed):
    g = torch.Generator().manual_seed(seed)
    row = torch.randint(0, V, (1, T), generator=g)
    rest = torch.randint(0, V, (others, T), generator=g)
    with torch.no_grad():
        alone = model(row).logits
        batched = model(torch.cat([rest, row])).logits[-1:]
    torch.testing.assert_close(batched, alone, atol=2e-5, rtol=0)


@settings(PROPS, max_examples=3)
@given(T=lengths, seed=st.integers(0, 10**6), temperature=st.sampled_from([0.0, 0.8]))
def test_a_fixed_seed_is_deterministic(model, T, seed, temperature):
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))
    runs = [model.generate(ids, 3, stop_tokens=[], temperature=temperature,
                           generator=torch.Generator().manual_seed(seed)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("kind", ["gateskip", "mod", "dnd", "dreamer"])
@settings(max_examples=5, deadline=None, derandomize=True)
@given(T=lengths, seed=st.integers(0, 10**6))
def test_the_neutral_setting_equals_the_base_model(kind, T, seed):
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(0)
    if kind == "dreamer":  # one recurrence, depth and expert attention off: a plain decoder layer
        base = CausalLM(ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                                    max_position_embeddings=128, tie_word_embeddings=True)).eval()
        ours = build_model(DreamerConfig(vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_recurrences=1, da_mode="none", num_experts=0,
                                         intermediate_size=96, max_position_embeddings=128)).eval()
        ours.load_state_dict(base.state_dict())  # the same parameter names
    else:
        base = CausalLM(preset("tiny-qwen3", num_hidden_layers=3)).eval()
        ours = CausalLM(preset("tiny-qwen3", num_hidden_layers=3)).eval()
        ours.load_state_dict(base.state_dict())
        options = {"gateskip": {"budget": 0.0, "init_bias": 100.0, "init_std": 0.0},  # gates fully open, q = 0
                   "mod": {"capacity": 1.0, "every": 1, "scale_by_router": False},  # every token, w = 1
                   # beta = 0: the nested output weighs 0 (a spread router selects tokens, so nesting runs)
                   "dnd": {"layers": (0, 2), "beta_init": 0.0, "router_init_std": 1.0}}[kind]
        attach_method(ours, kind, options)
    with torch.no_grad():
        out = ours(ids)
        torch.testing.assert_close(out.logits, base(ids).logits, atol=2e-5, rtol=0)
    if kind == "dnd":
        assert float(out.stats["dnd/selected"]) > 0
