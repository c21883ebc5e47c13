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


def test_causal_mask_takes_int_and_float_validity_as_bool():
    # An HF-style attention mask is int64 0 / 1: `~` on it gave -1 / -2, and SDPA reads a non-bool mask as additive
    # scores, so the "mask" silently shifted scores instead of hiding keys.
    from dyndepth.core.context import causal_mask, subset_mask

    pos = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]])
    valid = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    docs = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    expected = causal_mask(pos, pos, valid.bool(), valid.bool(), docs)
    sub = subset_mask(pos[:, 1:], pos, valid.bool(), valid[:, 1:].bool(), docs[:, 1:], docs)
    for v in (valid, valid.float()):
        mask = causal_mask(pos, pos, v, v, docs)
        assert mask.dtype == torch.bool and torch.equal(mask, expected)
        mask = subset_mask(pos[:, 1:], pos, v, v[:, 1:], docs[:, 1:], docs)
        assert mask.dtype == torch.bool and torch.equal(mask, sub)
