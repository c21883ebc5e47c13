"""Under load: many generations with random batch shapes and lengths keep memory flat (no tensors or method
state piling up), and random configs and inputs fed to the public API give results or clear errors only."""

import gc
import random
import traceback
import warnings
import weakref

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dyndepth import CausalLM, ConfigError, ModelConfig, preset
from dyndepth.methods import attach_method, calibrate


def _live_tensors() -> dict[int, weakref.ref]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op object warns
        warnings.simplefilter("ignore", FutureWarning)
        return {id(obj): weakref.ref(obj) for obj in gc.get_objects() if isinstance(obj, torch.Tensor)}


def _born_since(before: dict[int, weakref.ref]) -> list[torch.Tensor]:
    """Tensors alive now that were not alive at `before` (earlier tests' tensors may die meanwhile: not ours)."""
    now = _live_tensors()
    return [ref() for key, ref in now.items() if key not in before or before[key]() is not ref()]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_long_generation_run_with_random_shapes_keeps_memory_flat():
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3", num_hidden_layers=3)).eval()
    attach_method(model, "gateskip", {"scope": "sequence"})
    calibrate(model, [torch.randint(0, 256, (4, 16))], budget=0.3)
    rng = random.Random(0)

    def one_round():
        B, T, n = rng.randint(1, 6), rng.randint(1, 24), rng.randint(1, 12)
        ids = torch.randint(0, 256, (B, T))
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, : rng.randint(0, T - 1)] = 0
        out = model.generate(ids, n, attention_mask=mask, stop_tokens=[], skip_budget=rng.choice([0.0, 0.3]))
        assert out.shape == (B, T + n)

    for _ in range(10):  # warm-up: the allocator and caches reach their working size
        one_round()
    tensors, rss = _live_tensors(), _rss_bytes()
    for _ in range(60):
        one_round()
    born = _born_since(tensors)
    assert not born, [tuple(t.shape) for t in born]  # nothing accumulates: caches, method state and ledgers die
    assert _rss_bytes() - rss < 32 * 2**20  # and the process does not grow (32 MiB of allocator slack)


CLEAR = (ValueError, ConfigError)  # the library's errors name the problem and the fix


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(hidden=st.sampled_from([0, 8, 30, 32]), heads=st.integers(0, 5), kv=st.integers(0, 5),
       head_dim=st.sampled_from([None, 3, 4, 8]), vocab=st.integers(1, 64), B=st.integers(0, 3), T=st.integers(0, 6),
       dtype=st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool]), offset=st.integers(-3, 70),
       method=st.sampled_from([None, ("gateskip", {"budget": 0.5}), ("gateskip", {"budget": 1.2}),
                               ("mod", {"capacity": 0.5, "every": 1}), ("mod", {"capacity": 0.0}),
                               ("dnd", {"layers": (0, 0), "ratio": 0.5}), ("dnd", {"layers": (3, 9)}),
                               ("gateskip", {"nonsense": 1})]))
def test_random_configs_and_inputs_give_results_or_clear_errors(hidden, heads, kv, head_dim, vocab, B, T, dtype,
                                                                offset, method):
    try:
        config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                             max_position_embeddings=32)
        model = CausalLM(config).eval()
        if method is not None:
            attach_method(model, *method)
        ids = (torch.arange(B * T).reshape(B, T) % max(vocab, 1) + offset).to(dtype)
        with torch.no_grad():
            out = model(ids)
        assert out.logits.shape == (B, T, vocab) and torch.isfinite(out.logits).all()
    except CLEAR as e:
        message = str(e)
        assert len(message) > 20 and "\n" not in message.strip(), message  # one line that says something
        raised_in = traceback.extract_tb(e.__traceback__)[-1].filename
        assert "/dyndepth/" in raised_in and "/torch/" not in raised_in, raised_in  # at our boundary, not in torch
