"""The memory-lean autograd functions of core/layers.py (RMSNorm, the normed projections, SwiGLU, RoPE; the
experts' gather and row sum, models/moe.py): the same forward and gradients as autograd on the plain
expressions, with less saved for backward or fewer kernels."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dyndepth import preset
from dyndepth.core.layers import RMSNorm, apply_rope, normed_linear, rope_inv_freq, rotate_half, swiglu
from dyndepth.models.moe import AddRows, Experts, GatherGroupedMM


def _saved_bytes(fn, exclude: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, int]:
    """fn()'s output and the bytes of the distinct storages autograd saved while it ran, but `exclude`'s."""
    saved, skip = {}, {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max().clamp(min=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_autograd_and_saves_only_its_input(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(64).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = (1e-3 * torch.randn(4, 32, 64)).to(dtype).requires_grad_()  # small rows: eps matters
    grad = torch.randn(4, 32, 64).to(dtype)

    def plain():
        return norm.weight * F.rms_norm(x.float(), (64,), eps=norm.eps).to(dtype)

    ours, ours_bytes = _saved_bytes(lambda: norm(x))
    ref, ref_bytes = _saved_bytes(plain)
    assert torch.equal(ours, ref)  # the forward is the same arithmetic
    inputs = (x, norm.weight)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        _close(a, b, dtype)
    assert ours_bytes == x.untyped_storage().nbytes() + norm.weight.untyped_storage().nbytes()
    assert ref_bytes >= ours_bytes + x.numel() * x.element_size()  # autograd also keeps the normalized rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
def test_swiglu_matches_autograd_and_saves_only_its_inputs(dtype, scaled):
    torch.manual_seed(0)
    h = torch.randn(48, 2, 16).to(dtype).requires_grad_()
    gate, up = h[:, 0], h[:, 1]  # views of one tensor, as the experts' [gate | up] rows
    scale = torch.rand(48, 1).to(dtype).requires_grad_() if scaled else None
    inputs = (h,) if scale is None else (h, scale)
    grad = torch.randn(48, 16).to(dtype)

    def plain():
        return F.silu(gate) * (up if scale is None else up * scale)

    ours, ours_bytes = _saved_bytes(lambda: swiglu(gate, up, scale))
    ref, ref_bytes = _saved_bytes(plain)
    assert torch.equal(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        _close(a, b, dtype)
    assert ref_bytes - ours_bytes >= ours.numel() * ours.element_size()  # silu(gate) is not kept


class _Kernels(TorchDispatchMode):
    """The ATen ops dispatched inside that are not views: the kernels a block of code launches."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))


def _rope_formula(x, cos, sin):  # HF's apply_rotary_pos_emb, heads on dim -2
    return x * cos.unsqueeze(-2) + rotate_half(x) * sin.unsqueeze(-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_matches_the_formula_with_fewer_kernels(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 16, dtype=dtype, requires_grad=True)
    cos, sin = torch.randn(2, 7, 16, dtype=dtype), torch.randn(2, 7, 16, dtype=dtype)  # halves differ: any rotation
    grad = torch.randn(2, 7, 3, 16, dtype=dtype)
    with _Kernels() as ours_fwd:
        ours = apply_rope(x, cos, sin)
    with _Kernels() as ours_bwd:
        (g_ours,) = torch.autograd.grad(ours, x, grad)
    with _Kernels() as ref_fwd:
        ref = _rope_formula(x, cos, sin)
    with _Kernels() as ref_bwd:
        (g_ref,) = torch.autograd.grad(ref, x, grad)
    if dtype == torch.bfloat16:  # HF's arithmetic, rounding for rounding: outputs identical to HF's
        assert torch.equal(ours, ref) and torch.equal(g_ours, g_ref)
        return
    tol = 1e-6 if dtype == torch.float32 else 1e-14  # a multiply-add may round once where the formula rounds twice
    torch.testing.assert_close(ours, ref, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(g_ours, g_ref, atol=tol * 10, rtol=tol)
    assert ours_fwd.n == 3 < ref_fwd.n and ours_bwd.n == 3 < ref_bwd.n
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: apply_rope(x, cos, sin), (x,))
    with torch.no_grad():  # inference: the same three kernels
        torch.testing.assert_close(apply_rope(x, cos, sin), ref, atol=tol * 10, rtol=tol)


def test_rope_compiles_to_the_formula_with_its_gradient():
    torch.manual_seed(0)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    graphs, grads = [], []

    def record(gm, example_inputs):  # a dynamo backend: keep the traced graph, run it as traced
        graphs.append(gm)
        return gm.forward

    for fn in (apply_rope, torch.compile(apply_rope, backend=record, fullgraph=True)):
        x = torch.randn(2, 5, 4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (fn(x, cos, sin) * torch.arange(320.0).view(2, 5, 4, 8)).sum().backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-6)
    traced = "\n".join(str(gm.graph) for gm in graphs)
    assert graphs and "addcmul" not in traced and "Rope" not in traced and "cat" in traced  # the formula, fusable


def test_rope_differentiates_cos_and_sin_when_they_need_it():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, requires_grad=True)
    cos, sin = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    grad = torch.randn(2, 5, 3, 8)
    ours = torch.autograd.grad(apply_rope(x, cos, sin), (x, cos, sin), grad)
    ref = torch.autograd.grad(_rope_formula(x, cos, sin), (x, cos, sin), grad)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["float32", "bfloat16", "autocast"])
def test_normed_linear_matches_autograd_and_keeps_x_not_the_normed_rows(mode):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    norm = RMSNorm(32).to(dtype)
    k, v = (torch.nn.Linear(32, n, bias=False).to(dtype) for n in (16, 24))
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = torch.randn(4, 8, 32).to(dtype).requires_grad_()
    inputs = (x, norm.weight, k.weight, v.weight)
    grads = (torch.randn(4, 8, 16), torch.randn(4, 8, 24))

    def run(fn):
        with torch.autocast("cpu", torch.bfloat16, enabled=mode == "autocast"):
            return _saved_bytes(fn, exclude=inputs[1:])

    ours, ours_bytes = run(lambda: normed_linear(x, norm, k, v))
    ref, ref_bytes = run(lambda: (k(norm(x)), v(norm(x))))
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == (torch.float32 if mode == "float32" else torch.bfloat16)
        assert torch.equal(a, b)  # the same arithmetic, autocast's casts included
    ours_g = torch.autograd.grad(ours, inputs, [g.to(ours[0].dtype) for g in grads])
    ref_g = torch.autograd.grad(ref, inputs, [g.to(ref[0].dtype) for g in grads])
    for a, b in zip(ours_g, ref_g):
        assert a.dtype == b.dtype
        _close(a, b, torch.float32 if mode == "float32" else torch.bfloat16)
    assert ours_bytes == x.untyped_storage().nbytes()  # x alone (and the weights)
    assert ref_bytes >= ours_bytes + x.numel() * ours[0].element_size()  # autograd also keeps the normed rows
    only_k = torch.autograd.grad(normed_linear(x, norm, k, v)[0].float().sum(), inputs, allow_unused=True)
    assert only_k[3] is None and only_k[2] is not None  # an unused projection gets no gradient, as autograd's


def test_add_rows_matches_index_add_and_keeps_no_rows():
    torch.manual_seed(0)
    y = torch.randn(40, 8, requires_grad=True)
    index = torch.randint(0, 10, (40,))
    ours, ours_bytes = _saved_bytes(lambda: AddRows.apply(y, index, 10))
    ref = torch.zeros(10, 8).index_add(0, index, y)
    assert torch.allclose(ours, ref, atol=1e-6)
    grad = torch.randn(10, 8)
    assert torch.equal(torch.autograd.grad(ours, y, grad)[0], torch.autograd.grad(ref, y, grad)[0])
    assert ours_bytes == index.untyped_storage().nbytes()


def test_add_rows_keeps_its_gradient_when_compiled():
    # torch 2.11's dynamo returned zero gradients for a Function whose forward returns an in-place op's result
    from dyndepth.models.moe import add_rows

    torch.manual_seed(0)
    index = torch.randint(0, 6, (12,))
    grads = []
    for fn in (add_rows, torch.compile(add_rows, backend="eager", fullgraph=True)):
        y = torch.randn(12, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (fn(y, index, 6) * torch.arange(18.0).view(6, 3)).sum().backward()
        grads.append(y.grad)
    assert grads[0].abs().sum() > 0 and torch.equal(grads[1], grads[0])


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
def test_gathered_grouped_matmul_matches_autograd_and_keeps_x_not_its_rows():
    torch.manual_seed(0)
    E, N, K, D_in, D_out = 4, 24, 3, 16, 8
    x = torch.randn(N, D_in, requires_grad=True)
    weight = torch.randn(E, D_out, D_in, requires_grad=True)
    expert = torch.randint(0, E, (N * K,))
    order = torch.argsort(expert, stable=True)
    rows = order // K
    offsets = torch.bincount(expert, minlength=E).cumsum(0).to(torch.int32)
    ours, ours_bytes = _saved_bytes(lambda: GatherGroupedMM.apply(x, rows, weight, offsets))
    ref, ref_bytes = _saved_bytes(lambda: F.grouped_mm(x.index_select(0, rows), weight.transpose(-2, -1),
                                                       offs=offsets))
    assert torch.equal(ours, ref)
    grad = torch.randn(N * K, D_out)
    for a, b in zip(torch.autograd.grad(ours, (x, weight), grad), torch.autograd.grad(ref, (x, weight), grad)):
        _close(a, b, torch.float32)
    assert ref_bytes - ours_bytes >= (K - 1) * x.numel() * x.element_size()  # x, not its K-fold gathered rows


def test_frozen_inputs_get_no_gradient_and_the_others_the_same_one():
    torch.manual_seed(0)
    norm = RMSNorm(16).requires_grad_(False)
    x = torch.randn(3, 16, requires_grad=True)
    grad = torch.randn(3, 16)
    (gx,) = torch.autograd.grad(norm(x), x, grad)
    (ref,) = torch.autograd.grad(norm.weight * F.rms_norm(x, (16,), eps=norm.eps), x, grad)
    _close(gx, ref, torch.float32)
    gate, up = torch.randn(5, 8), torch.randn(5, 8, requires_grad=True)  # frozen gate, no scale
    (gu,) = torch.autograd.grad(swiglu(gate, up), up, torch.ones(5, 8))
    assert torch.allclose(gu, F.silu(gate))


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_one_matmul_per_expert_forward_and_backward(dtype, act):
    torch.manual_seed(0)
    grouped = Experts(8, 16, 8, grouped=True, act=act)
    looped = Experts(8, 16, 8, grouped=False, act=act)
    looped.load_state_dict(grouped.state_dict())
    x = torch.randn(20, 16)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(20)])
    w = torch.rand(20, 3)
    results = []
    for experts in (grouped, looped):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = experts(xi, idx, wi)
        params = (experts.in_proj, experts.down_proj)
        results.append((y, *torch.autograd.grad(y.float().square().sum(), (xi, wi, *params))))
    for a, b in zip(*results):
        _close(a, b, dtype)
    with torch.no_grad():  # against the body written out per (token, expert), and the gathered decode path
        ref = torch.zeros(20, 16)
        for n in range(20):
            for k in range(3):
                e = idx[n, k]
                h = grouped.in_proj[e] @ x[n]
                a = F.gelu(h) if act == "gelu" else F.silu(h[:8]) * h[8:]
                ref[n] += w[n, k] * (grouped.down_proj[e] @ a)
        if dtype == torch.float32:
            torch.testing.assert_close(results[0][0], ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(looped._gathered(x, idx, w), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cached", [False, True])
def test_a_padded_subset_projects_and_queries_its_valid_entries_only(cached):
    # DND's rows select different counts and are padded to the longest: the padding's projections are never read,
    # so q, k, v and o run on the N valid entries (counted as such), with the same output and cache as before.
    from dyndepth import CausalLM, KVCache, preset
    from dyndepth.core.routing import pack_indices

    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3")).eval()
    attn = model.model.layers[0].self_attn
    B, T, D = 3, 10, model.config.hidden_size
    ids = torch.randint(0, 256, (B, T))
    keep = torch.zeros(B, T, dtype=torch.bool)
    keep[0, :9], keep[1, 2:4], keep[2, 7] = True, True, True  # 9, 2 and 1 selected: padded to K = 9
    idx, valid = pack_indices(keep)
    h = torch.randn(B, idx.shape[1], D)
    rows = {}
    for name in ("q_proj", "k_proj", "o_proj"):
        getattr(attn, name).register_forward_hook(lambda m, args, out, name=name: rows.setdefault(name, []).append(
            args[0].numel() // args[0].shape[-1]))
    outs, caches, executed = [], [], []
    for compact in (True, False):
        cache = KVCache.for_model(model.config, B, T) if cached else None
        ctx = model.make_context(ids, None, torch.arange(T).expand(B, T) if cached else None, cache)
        assert ctx.subset(idx, valid).entries is None  # listed on request only (a host sync)
        sub = ctx.subset(idx, valid, entries=True)
        assert sub.entries is not None and sub.entries[0].numel() == 12
        assert sub.attn_mask is None  # in position order: the causal kernel is exact (a cache masks by itself)
        if not compact:
            sub.entries = None  # the padded projections, as before
        with torch.no_grad():
            outs.append(attn(h, sub, 0))
        caches.append(cache)
        executed.append(float(ctx.ledger.total_tensor()))
    assert rows == {"q_proj": [12, 27], "k_proj": [12, 27], "o_proj": [12, 27]}  # 9 + 2 + 1 valid, then B * K
    torch.testing.assert_close(outs[0][valid], outs[1][valid], atol=1e-6, rtol=0)
    assert not outs[0][~valid].any()
    if cached:
        assert torch.equal(caches[0].valid, caches[1].valid)
        for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):  # (L, B, G, S + 1, H): the last
            torch.testing.assert_close(a[:, :, :, :T], b[:, :, :, :T], atol=1e-6, rtol=0)  # column takes padding
    assert executed[1] - executed[0] == pytest.approx((27 - 12) * (attn.flops_per_kv + attn.flops_per_query))


def test_a_subset_takes_the_causal_kernel_only_where_positions_follow_columns():
    from dyndepth import CausalLM, preset

    model = CausalLM(preset("tiny-qwen3")).eval()
    B, T = 2, 6
    ids = torch.randint(0, 256, (B, T))
    idx = torch.tensor([[0, 2, 3], [1, 4, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0
    for attention_mask in (None, mask):  # positions derived by the model, left padding or not: ordered
        assert model.make_context(ids, attention_mask, None, None).subset(idx, valid).attn_mask is None
    given = model.make_context(ids, None, torch.tensor([[5, 4, 3, 2, 1, 0]]).expand(B, T), None)
    assert given.subset(idx, valid).attn_mask is not None  # positions the caller chose: masked by position
    docs = model.make_context(ids, None, None, None, doc_ids=torch.tensor([[0, 0, 0, 1, 1, 1]]).expand(B, T))
    assert docs.subset(idx, valid).attn_mask is not None  # documents need the mask


def test_rope_scaling_matches_a_per_frequency_reference():
    """linear: every frequency / factor. llama3 (HF): wavelengths above old_len / low keep f / factor, below
    old_len / high keep f, and between them blend the two by (old_len / wavelength - low) / (high - low)."""
    plain = rope_inv_freq(preset("tiny-qwen3", head_dim=64, rope_theta=1e4))
    linear = preset("tiny-qwen3", head_dim=64, rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0})
    torch.testing.assert_close(rope_inv_freq(linear), plain / 4)
    lo, hi, factor, old = 1.0, 8.0, 8.0, 256
    llama3 = preset("tiny-qwen3", head_dim=64, rope_theta=1e4, rope_scaling={
        "rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
        "original_max_position_embeddings": old})
    expected, medium = [], 0
    for f in plain.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            expected.append(f)
        elif wavelen > old / lo:
            expected.append(f / factor)
        else:
            smooth, medium = (old / wavelen - lo) / (hi - lo), medium + 1
            expected.append((1 - smooth) * f / factor + smooth * f)
    assert medium >= 3  # the blend is exercised
    torch.testing.assert_close(rope_inv_freq(llama3), torch.tensor(expected))


def test_a_long_query_subset_sees_the_keys_its_positions_allow_whatever_their_columns():
    # A query subset of 512 or more is attended in chunks, each reading keys up to its last query. Without a cache
    # that bound was the query's column, but the mask is causal by position: with positions the caller gave (here
    # restarting, no documents) a query also sees keys in later columns, which the chunks cut off.
    from dyndepth import CausalLM, preset

    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3")).eval()
    attn = model.model.layers[0].self_attn
    B, T = 2, 520
    ids = torch.randint(0, 256, (B, T))
    h = torch.randn(B, T, model.config.hidden_size)
    idx = torch.arange(T).expand(B, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, -7:] = False  # padding entries of a row: they see every key, and must not widen a chunk's keys
    for positions, doc_ids in ((torch.arange(T).remainder(T // 2), None),  # a query at 3 sees keys at T/2 + 3
                               (torch.arange(T).remainder(T // 2), (torch.arange(T) >= T // 2).long()),
                               (None, None)):
        pos = None if positions is None else positions.expand(B, T)
        docs = None if doc_ids is None else doc_ids.expand(B, T)
        ctx = model.make_context(ids, None, pos, None, doc_ids=docs)
        with torch.no_grad():
            dense = attn(h, ctx, 0)
            subset = attn(h, ctx, 0, q_idx_BK=idx, q_valid_BK=valid)
        torch.testing.assert_close(subset[valid], dense[valid], atol=1e-6, rtol=0)


def test_norms_compute_float64_in_float64_and_pass_gradcheck():
    # the norm ran float64 input in float32: a float64 model was float32-accurate and gradcheck failed on every layer
    torch.manual_seed(0)
    norm = RMSNorm(8).double()
    k, v = (torch.nn.Linear(8, n, bias=False).double() for n in (4, 6))
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    exact = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight  # (2, 3, 8)
    torch.testing.assert_close(norm(x), exact, rtol=1e-14, atol=1e-14)
    # (gradcheck perturbs the weights it is given in place: the modules read them)
    assert torch.autograd.gradcheck(lambda x, w: norm(x), (x, norm.weight))
    assert torch.autograd.gradcheck(lambda *inputs: normed_linear(x, norm, k, v), (x, norm.weight, k.weight, v.weight))
