import torch

from dyndepth import KVCache
from dyndepth.core.context import ForwardContext


def _context() -> ForwardContext:
    B, T, H = 2, 3, 4
    positions = torch.arange(T).expand(B, T)
    cos, sin = torch.randn(B, T, H), torch.randn(B, T, H)
    cache = KVCache(num_slots=2, batch_size=B, max_seq_len=8, num_kv_heads=1, head_dim=H)
    ctx = ForwardContext(positions, torch.ones(B, T, dtype=torch.bool), cos, sin, cache=cache, training=True,
                         rope=lambda p: (cos, sin), state=object(), model_state=object(),
                         kv_hook=lambda slot, k, v: (k, v), cache_source=positions)
    ctx.ordered, ctx.entries = True, (torch.tensor([0]), torch.tensor([1]))
    return ctx


def test_copy_is_shallow_and_keeps_every_attribute():
    ctx = _context()
    for name in list(vars(ctx)):  # a distinct object in every attribute: one the copy missed would read its default
        setattr(ctx, name, object())
    twin = ctx.copy()
    assert twin is not ctx
    assert vars(twin).keys() == vars(ctx).keys()  # an attribute added to the class must be copied too
    for name, value in vars(ctx).items():
        assert getattr(twin, name) is value, name  # the same objects: cache, ledger and state are shared
    twin.valid = None  # and the copy's own attributes are its own
    assert ctx.valid is not None


def test_also_reading_copies_and_marks_the_slot():
    ctx = _context()
    other = ctx.also_reading(1)
    assert other.also_read == 1 and ctx.also_read is None
    assert other.cache is ctx.cache and other.ledger is ctx.ledger
