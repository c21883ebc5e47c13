"""Building blocks shared by every model and method: RMSNorm, RoPE, SwiGLU, attention.

Shape legend: B batch, T query tokens, S key length, D hidden_size, N query heads, G kv heads,
H head_dim, F intermediate size.

Attention is split into its steps (`project_q`, `project_kv`, `attend`, `project_out`) so a method can run
them on different token sets: GateSkip computes K/V for every token but queries only for kept ones;
DND's nested pass takes queries and keys from the selected tokens only. A variant replaces steps, not the
forward: SwitchHead (models/switchhead.py) mixes expert value and output projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dyndepth.config import ModelConfig
from dyndepth.core import flops
from dyndepth.core.context import ForwardContext, causal_mask, subset_mask


def apply_keeping_float32(module: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """`nn.Module._apply` for a module whose buffers named in its `float32_buffers` stay float32 whatever
    `model.to(dtype)` asks (thresholds compared with float32 scores, balancing biases moved by small steps):
    they follow the device only. Such a module sets `_apply = apply_keeping_float32`."""
    saved = {n: module._buffers[n] for n in module.float32_buffers}
    nn.Module._apply(module, fn, recurse)
    for n, old in saved.items():
        new = module._buffers[n]
        src = new if old.is_meta else old  # `to_empty` from meta: nothing to copy, take the new storage
        module._buffers[n] = src.to(device=new.device, dtype=torch.float32)
    return module


def float32_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the buffers the model's modules keep in float32 (`float32_buffers`): saving in a 16-bit
    dtype and loading into one keep them float32 too (a bfloat16 threshold of 0.50123 would read 0.5)."""
    return {f"{name}.{b}" if name else b for name, m in model.named_modules()
            for b in getattr(m, "float32_buffers", ())}


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype | None, keep: set[str]) -> dict[str, torch.Tensor]:
    """A state dict's floating-point tensors cast to `dtype` (None: as is), the keys in `keep` (`float32_keys`) to
    float32; integer buffers (calibration budgets in parts per million) keep their dtype."""
    return {k: v.float() if k in keep else v if dtype is None or not v.is_floating_point() else v.to(dtype)
            for k, v in state.items()}


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight multiply, as HF Qwen3/Llama do."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_grad(x, self.weight):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will differentiate through an op on these tensors: the memory-lean autograd functions
    below (and the experts', models/moe.py) run only then, the plain ops otherwise."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype RMSNorm computes in: float32 for 16-bit x (as HF), float64 for float64 x (a float32 norm made a
    float64 model float32-accurate, and gradcheck fail on every layer)."""
    return torch.promote_types(x.dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == norm_dtype(x):  # the same arithmetic without the two casts (decode is op-bound)
        return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """`rms_norm` that saves only its input for backward and recomputes the normalized rows there. Autograd
    would also keep the normalized (..., D) tensor (and, for bf16 input, its float32 copy of the input) until
    backward: one activation-sized tensor per norm call, and a model calls several per layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        return *_rms_norm_backward(x, weight, ctx.eps, grad, *ctx.needs_input_grad[:2]), None


def _rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, eps: float, grad: torch.Tensor, need_x: bool,
                       need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of `rms_norm(x, weight, eps)` for x and weight, from x (the normalized rows recomputed)."""
    dtype = norm_dtype(x)
    xf = x.to(dtype)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    y = xf * rstd  # (..., D) normalized, float32 (float64 for float64 x)
    grad_x = grad_w = None
    if need_w:  # forward multiplied the weight by y in x's dtype
        y_x = y.to(x.dtype)
        grad_w = (grad * y_x).reshape(-1, x.shape[-1]).sum(0, dtype=dtype).to(weight.dtype)
    if need_x:
        grad_y = (grad * weight).to(dtype)
        grad_x = (rstd * (grad_y - y * (grad_y * y).mean(-1, keepdim=True))).to(x.dtype)
    return grad_x, grad_w


def normed_linear(x: torch.Tensor, norm: RMSNorm | None, *linears: nn.Linear) -> tuple[torch.Tensor, ...]:
    """linear(norm(x)) for each of `linears` (bias-free), (..., O_i) each; `norm` None: x is normed already. In
    training through `NormedLinear`, which saves x, not the normed rows the projections would keep (recomputed
    in backward: one activation-sized tensor less per call, for an elementwise pass)."""
    if all(isinstance(linear, nn.Linear) for linear in linears):  # (a quantized projection runs as called)
        if any(linear.bias is not None for linear in linears):
            raise ValueError("normed_linear takes bias-free projections (bias=False).")
        weights = [linear.weight for linear in linears]
        if norm is not None and needs_grad(x, norm.weight, *weights):
            return NormedLinear.apply(x, norm.weight, norm.eps, *weights)
    h = x if norm is None else norm(x)
    return tuple(linear(h) for linear in linears)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's when it is on for x's device, else x's (for ops autocast does
    not cast, and autograd functions that cast by hand)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def linear_float32(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) in float32 whatever x's and the weights' dtype or autocast, for routers and gates whose rounding
    would flip decisions (a quantized module computes in its own way, its output cast)."""
    with torch.autocast(x.device.type, enabled=False):
        if isinstance(module, nn.Linear):
            return F.linear(x.float(), module.weight.float(), None if module.bias is None else module.bias.float())
        return module(x.float()).float()


class NormedLinear(torch.autograd.Function):
    """`normed_linear` saving x (and the weights) for backward. The matmuls run in autocast's dtype when it is
    on, as `nn.Linear` would, with explicit casts so backward needs no autocast state."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, *weights: torch.Tensor):
        ctx.save_for_backward(x, norm_weight, *weights)
        ctx.eps, ctx.dtype = eps, matmul_dtype(x)
        ctx.set_materialize_grads(False)  # an unused output: None, so its weight gets no gradient, as autograd's
        h = rms_norm(x, norm_weight, eps).to(ctx.dtype)
        return tuple(F.linear(h, w.to(ctx.dtype)) for w in weights)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x, norm_weight, *weights = ctx.saved_tensors
        D = x.shape[-1]
        h = None  # the normed rows (rows, D) in the matmul dtype, recomputed once if a weight needs them
        grad_h, grad_weights = None, []
        for i, (g, w) in enumerate(zip(grads, weights)):
            if g is None:
                grad_weights.append(None)
                continue
            g2 = g.reshape(-1, g.shape[-1]).to(ctx.dtype)  # (rows, O)
            if ctx.needs_input_grad[3 + i]:  # grad^T @ h, in the weight's dtype
                if h is None:
                    h = rms_norm(x, norm_weight, ctx.eps).to(ctx.dtype).reshape(-1, D)
                grad_weights.append((g2.t() @ h).to(w.dtype))
            else:
                grad_weights.append(None)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                part = (g2 @ w.to(ctx.dtype)).to(norm_dtype(x))  # (rows, D), summed over the projections in
                # float32 (float64 for float64 x)
                grad_h = part if grad_h is None else grad_h + part
        grad_x = grad_nw = None
        if grad_h is not None:
            grad_x, grad_nw = _rms_norm_backward(x, norm_weight, ctx.eps, grad_h.view(x.shape),
                                                 *ctx.needs_input_grad[:2])
        return grad_x, grad_nw, None, *grad_weights


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (H/2,) with the config's scaling (default, linear, llama3 or yarn), as transformers
    computes them."""
    H = config.head_dim
    one_over_f = config.rope_theta ** (torch.arange(0, H, 2, dtype=torch.int64).float() / H)  # (H/2,)
    inv_freq = 1.0 / one_over_f
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    old_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif rope_type == "yarn":
        inv_freq = _yarn_inv_freq(one_over_f, scaling, H, config.rope_theta, old_len)
    return inv_freq


def _yarn_inv_freq(one_over_f: torch.Tensor, scaling: dict, H: int, theta: float, old_len: int) -> torch.Tensor:
    """YaRN (Peng et al. 2023): frequencies that turn fewer than beta_slow times over the pretraining length are
    interpolated (f / factor), those turning more than beta_fast times kept, and the band between blended by a
    linear ramp over the frequency index (the arithmetic in transformers' order, so the angles match it exactly)."""
    def index_of(turns: float) -> float:  # the frequency index that turns `turns` times over old_len positions
        return H * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = index_of(scaling.get("beta_fast") or 32), index_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, H - 1)
    if low == high:
        high += 0.001
    keep = 1 - ((torch.arange(H // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 1: f as it is
    return 1.0 / (scaling["factor"] * one_over_f) * (1 - keep) + 1.0 / one_over_f * keep


def rope_attention_scaling(config: ModelConfig) -> float:
    """What cos and sin are multiplied by: 1, or YaRN's attention factor (given, or 0.1 ln(factor) + 1, or the
    ratio of that with `mscale` to that with `mscale_all_dim` where a config names both)."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(m: float) -> float:
        return 1.0 if scaling["factor"] <= 1 else 0.1 * m * math.log(scaling["factor"]) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"])
    return mscale(1.0)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions. `inv_freq` stays float32 on whatever device the model moves to:
    `model.to(torch.bfloat16)` would otherwise round the frequencies and shift every angle."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.attention_scaling = rope_attention_scaling(config)

    def reset(self) -> None:
        """Recompute the frequencies in float32 on the buffer's device (also after meta-device init)."""
        device = None if self.inv_freq.is_meta else self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.config).to(device)
        self.attention_scaling = rope_attention_scaling(self.config)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if not self.inv_freq.is_meta:
            self.reset()
        return self

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions_BT[..., None].float() * self.inv_freq.float()  # (B, T, H/2), always fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, H), HF's split-halves layout
        if self.attention_scaling != 1.0:  # YaRN: q and k scaled alike, the attention logits by its square
            scale = self.attention_scaling
            return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BTNH: torch.Tensor, cos_BTH: torch.Tensor, sin_BTH: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (HF's layout: element i pairs with i + H/2), cos / sin broadcast over heads.
    Eager runs it as one product and two half-width multiply-adds (`_rotate`): 3 kernels where the formula takes
    5 (a decode step is launch-bound; a training step's rotations are memory-bound), and in training through
    `Rope`, which saves only cos and sin (3 kernels backward, the formula's 5). Compiled, in 16-bit or mixed
    dtypes, and where cos / sin need a gradient, the formula: inductor fuses it, and a multiply-add may skip an
    intermediate rounding HF's formula makes (bf16 outputs would differ from HF's by an ulp; float32 ones agree
    to an ulp)."""
    cos, sin = cos_BTH.unsqueeze(-2), sin_BTH.unsqueeze(-2)  # (B, T, 1, H): broadcast over heads
    if (torch.compiler.is_compiling() or x_BTNH.dtype not in (torch.float32, torch.float64)
            or cos.dtype != x_BTNH.dtype or sin.dtype != x_BTNH.dtype or cos.requires_grad or sin.requires_grad):
        return x_BTNH * cos + rotate_half(x_BTNH) * sin
    if needs_grad(x_BTNH):
        return Rope.apply(x_BTNH, cos, sin)
    return _rotate(x_BTNH, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """(x1, x2) -> (x1 c1 - x2 s1, x2 c2 + x1 s2) by halves, `apply_rope`'s rotation; `inverse`: its transpose,
    (x1 c1 + x2 s2, x2 c2 - x1 s1), the gradient of the rotation (the inverse when the halves' angles agree)."""
    h = x.shape[-1] // 2
    y = x * cos
    s1, s2 = (sin[..., h:], sin[..., :h]) if inverse else (sin[..., :h], sin[..., h:])
    y[..., :h].addcmul_(x[..., h:], s1, value=1 if inverse else -1)
    y[..., h:].addcmul_(x[..., :h], s2, value=-1 if inverse else 1)
    return y


class Rope(torch.autograd.Function):
    """`_rotate` saving cos and sin for backward (autograd keeps the same, but runs 5 kernels each way where this
    runs 3)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_shape = x.shape
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad_x = _rotate(grad, cos, sin, inverse=True)
        return grad_x.sum_to_size(ctx.x_shape), None, None  # summed over the dims x was broadcast along


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def swiglu(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up, times `scale` (broadcast over the last dim; MoE experts' gates) when given. Training
    saves only gate and up: the activation is recomputed in backward, where autograd would also keep
    silu(gate) (and up * scale) through the forward."""
    if needs_grad(gate, up, scale):
        return SwiGLUFunction.apply(gate, up, scale)
    return _swiglu(gate, up, scale)


def _swiglu(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return F.silu(gate) * (up if scale is None else up * scale)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(gate, up, scale)
        return _swiglu(gate, up, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, scale = ctx.saved_tensors
        grad_gate = grad_up = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * (up if scale is None else up * scale), gate)
        if ctx.needs_input_grad[1] or (scale is not None and ctx.needs_input_grad[2]):
            grad_up_scaled = grad * F.silu(gate)  # d / d(up * scale)
            if ctx.needs_input_grad[1]:
                grad_up = grad_up_scaled if scale is None else grad_up_scaled * scale
            if scale is not None and ctx.needs_input_grad[2]:  # summed over the dims scale was broadcast along
                grad_scale = (grad_up_scaled * up).sum_to_size(scale.shape)
        return grad_gate, grad_up, grad_scale


def _padded(t_N: torch.Tensor, B: int, T: int, rows_N: torch.Tensor, cols_N: torch.Tensor) -> torch.Tensor:
    """Values of N (row, column) entries (N, ...) placed in a (B, T, ...) zero tensor."""
    return t_N.new_zeros(B, T, *t_N.shape[1:]).index_put((rows_N, cols_N), t_N)


class Attention(nn.Module):
    """Grouped-query attention with q/k norm and RoPE. `v_proj` / `o_proj` default to Linear layers; a variant
    passes its own parts (SwitchHead's experts, models/switchhead.py): v_proj maps (..., D) -> (..., G*H), and an
    o_proj with `routed = True` is called as o_proj(y, h) with the query tokens' normed input h."""

    def __init__(self, config: ModelConfig, v_proj: nn.Module | None = None, o_proj: nn.Module | None = None) -> None:
        super().__init__()
        D, N, G, H = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = N, G, H
        self.flops_per_query = flops.q_o_flops(config)  # q_proj + o_proj (core/flops.py)
        self.flops_per_kv = flops.kv_flops(config)  # k_proj + v_proj
        bias = config.attention_bias or bool(getattr(config, "qkv_bias", False))  # q, k, v (o: attention_bias)
        self.q_proj = nn.Linear(D, N * H, bias=bias)
        self.k_proj = nn.Linear(D, G * H, bias=bias)
        self.v_proj = v_proj if v_proj is not None else nn.Linear(D, G * H, bias=bias)
        self.o_proj = o_proj if o_proj is not None else nn.Linear(N * H, D, bias=config.attention_bias)
        self.routed_output = getattr(self.o_proj, "routed", False)
        if config.qk_norm:
            self.q_norm = RMSNorm(H, config.rms_norm_eps)
            self.k_norm = RMSNorm(H, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project_q(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., N, H) queries with q-norm and RoPE; cos / sin (..., H)."""
        q = self.q_proj(h).view(*h.shape[:-1], self.num_heads, self.head_dim)  # (..., N, H)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q, cos, sin)

    def project_k(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., G, H) keys with k-norm and RoPE; cos / sin (..., H)."""
        k = self.k_proj(h).view(*h.shape[:-1], self.num_kv_heads, self.head_dim)  # (..., G, H)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rope(k, cos, sin)

    def project_kv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(..., D) -> keys and values (..., G, H) each."""
        return self.project_k(h, cos, sin), self.v_proj(h).view(*h.shape[:-1], self.num_kv_heads, self.head_dim)

    def _project_kv_entries(self, h_BTD: torch.Tensor, ctx: ForwardContext):
        """K / V (B, T, G, H) and the rows projected. In a padded per-row subset (`ctx.entries`, see
        `ForwardContext.subset`), only its valid entries are projected: zeros at the padding, which no query
        sees and the cache does not store. DND's rows select different counts, so padding can be most of it."""
        B, T, _ = h_BTD.shape
        if ctx.entries is None:
            return *self.project_kv(h_BTD, ctx.cos, ctx.sin), B * T
        rows_N, cols_N = ctx.entries
        k_N, v_N = self.project_kv(h_BTD[rows_N, cols_N], ctx.cos[rows_N, cols_N], ctx.sin[rows_N, cols_N])
        return _padded(k_N, B, T, rows_N, cols_N), _padded(v_N, B, T, rows_N, cols_N), rows_N.numel()

    def project_out(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Attention output (..., N*H) -> (..., D); `h` (..., D), the query tokens' normed input, routes a routed
        o_proj (SwitchHead's output experts)."""
        return self.o_proj(y, h) if self.routed_output else self.o_proj(y)

    def forward(self, h_BTD: torch.Tensor, ctx: ForwardContext, slot: int, q_idx_BK: torch.Tensor | None = None,
                q_valid_BK: torch.Tensor | None = None, ideal_q_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Attention branch on normed input. Every token computes K/V (and writes them to the cache).

        Queries come from every token (B, T, D) -> (B, T, D), or, with `q_idx_BK` (column indices per
        row, see `core.routing.pack_padded`), only from those tokens: (B, K, D), zero where `q_valid_BK`
        is False. The second form is how GateSkip saves the q/o projections and the attention of skipped
        tokens while they still provide keys and values to the others; its q/o projections run on the
        valid entries only, so rows padded to the longest row cost attention pairs, not projections.
        `ideal_q_BT` (B, T) bool, with every token a query: only these queries count in the ideal FLOPs
        (a caller that runs the branch densely and discards the other outputs).
        Records executed and ideal FLOPs in `ctx.ledger` (see core/accounting.py).
        """
        B, T, _ = h_BTD.shape
        k, v, kv_rows = self._project_kv_entries(h_BTD, ctx)  # (B, T, G, H)
        if ctx.kv_hook is not None:  # a method may replace some tokens' K/V (GateSkip's copy_prev policy)
            k, v = ctx.kv_hook(slot, k, v)
        if ctx.cache is not None:
            k_all, v_all, k_valid = ctx.cache.update(slot, k, v, ctx.positions, ctx.valid,  # (B, G, S, H)
                                                     ctx.cache_source)
            key_pos = ctx.cache.columns[None, :k_valid.shape[1]]  # (1, S) cache column s holds position s
            if ctx.also_read is not None:  # another slot's entries too, in the same softmax: (B, G, 2S, H)
                if q_idx_BK is not None:
                    raise ValueError("a context that also reads another slot takes queries from every token.")
                k2, v2, valid2 = ctx.cache.read(ctx.also_read)
                k_all, v_all = torch.cat([k_all, k2], 2), torch.cat([v_all, v2], 2)
                k_valid, key_pos = torch.cat([k_valid, valid2], 1), torch.cat([key_pos, key_pos], 1)
        else:
            k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)  # (B, G, T, H)
        rows_N = None  # with q_idx_BK or in a padded subset: the query entries whose q / o projections run
        if q_idx_BK is None:
            pos_q, valid_q = ctx.positions, ctx.valid  # discarded queries attend as usual: outputs are dropped
            ideal_q = valid_q
            if ideal_q_BT is not None:
                ideal_q = ideal_q_BT if valid_q is None else valid_q & ideal_q_BT
            if ctx.entries is None:
                q = self.project_q(h_BTD, ctx.cos, ctx.sin)  # (B, T, N, H)
            else:  # a padded subset: its valid entries query, the padding does not
                rows_N, cols_N = ctx.entries
                h_ND = h_BTD[rows_N, cols_N]  # (N, D)
                q = self._project_q_subset(h_ND, ctx, (B, T), rows_N, cols_N, cols_N)  # (B, T, N, H)
        else:
            if q_idx_BK.shape[1] == 0:  # every token skipped: K/V written, nothing else
                self._record(ctx, slot, h_BTD, kv_rows, 0, 0, 0)
                return h_BTD.new_zeros(B, 0, h_BTD.shape[2])
            pos_q = ctx.positions.gather(1, q_idx_BK)  # (B, K)
            valid_q = q_valid_BK if ctx.valid is None else q_valid_BK & ctx.valid.gather(1, q_idx_BK)
            ideal_q = valid_q
            rows_N, cols_N = q_valid_BK.nonzero(as_tuple=True)  # the valid entries (one host sync)
            t_N = q_idx_BK[rows_N, cols_N]  # (N,) source column of each valid entry
            h_ND = h_BTD[rows_N, t_N]  # (N, D) the query tokens' input
            q = self._project_q_subset(h_ND, ctx, q_idx_BK.shape, rows_N, cols_N, t_N)  # (B, K, N, H)
        Tq = q.shape[1]
        if ctx.cache is not None:
            mask = causal_mask(pos_q, key_pos, k_valid, valid_q)
            last_key = pos_q
        else:
            mask = ctx.attn_mask
            # positions in column order: no visible key lies right of the query's own column; otherwise (positions
            # the caller gave) a key in a later column may hold an earlier position, so the mask bounds each chunk
            last_key = q_idx_BK if ctx.ordered else None
            if q_idx_BK is not None:
                doc_q = None if ctx.doc_ids is None else ctx.doc_ids.gather(1, q_idx_BK)
                mask = subset_mask(pos_q, ctx.positions, ctx.valid, valid_q, doc_q, ctx.doc_ids)
        if q_idx_BK is None or mask is None:
            y = self.attend(q, k_all, v_all, mask)  # (B, T, N*H)
            # causal kernels skip the upper triangle; with a mask, SDPA computes every pair
            pairs = B * Tq * k_all.shape[2] if mask is not None else B * Tq * (Tq + 1) // 2
        else:
            y, pairs = self.attend_chunks(q, k_all, v_all, mask, last_key, valid_q)  # (B, K, N*H)
        if rows_N is None:
            out, q_rows = self.project_out(y, h_BTD), B * Tq
        else:
            o_N = self.project_out(y[rows_N, cols_N], h_ND)  # (N, D): valid entries only
            out, q_rows = _padded(o_N, B, Tq, rows_N, cols_N), rows_N.numel()
        if ctx.ledger.enabled:  # (the counts are a decode step's only ops besides the model's)
            n_q = B * Tq if ideal_q is None else ideal_q.sum()
            self._record(ctx, slot, h_BTD, kv_rows, q_rows, pairs, self._visible_pairs(mask, ideal_q, B, Tq), n_q)
        return out  # (B, T or K, D)

    def _project_q_subset(self, h_ND, ctx: ForwardContext, shape_BK, rows_N, cols_N, t_N) -> torch.Tensor:
        """Queries (B, K, N, H) of the chosen tokens, projected for the valid entries only (zeros elsewhere)."""
        B, K = shape_BK
        q_N = self.project_q(h_ND, ctx.cos[rows_N, t_N], ctx.sin[rows_N, t_N])  # (N, N_h, H)
        return _padded(q_N, B, K, rows_N, cols_N)

    @staticmethod
    def _visible_pairs(mask_B1KS: torch.Tensor | None, valid_q_BK: torch.Tensor | None, B: int, Tq: int):
        """(query, key) pairs the causal mask lets the valid queries see: the ideal attention work."""
        if mask_B1KS is None:  # causal fast path: positions 0..T-1, query t sees t + 1 keys
            if valid_q_BK is None:
                return B * Tq * (Tq + 1) // 2
            return (valid_q_BK * torch.arange(1, Tq + 1, device=valid_q_BK.device)).sum()
        seen = mask_B1KS[:, 0] if valid_q_BK is None else mask_B1KS[:, 0] & valid_q_BK[..., None]  # (B, K, S)
        return seen.sum()

    def _record(self, ctx: ForwardContext, slot: int, h_BTD: torch.Tensor, kv_rows, q_rows, pairs, ideal_pairs,
                ideal_q=0) -> None:
        """Executed FLOPs from the shapes given to the kernels; ideal ones from valid queries and keys."""
        B, T, _ = h_BTD.shape
        n_kv = B * T if ctx.valid is None else ctx.valid.sum()
        per_pair = 4 * self.num_heads * self.head_dim
        ctx.ledger.add(slot, "attn", executed=q_rows * self.flops_per_query + kv_rows * self.flops_per_kv
                       + pairs * per_pair, ideal=ideal_q * self.flops_per_query + n_kv * self.flops_per_kv
                       + ideal_pairs * per_pair, tokens=ideal_q)

    def attend(self, q_BTNH: torch.Tensor, k_BGSH: torch.Tensor, v_BGSH: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA with GQA; `mask` is a boolean (B, 1, T, S) or None for the causal fast path (T == S).
        Returns (B, T, N*H), before o_proj."""
        B, T, N, H = q_BTNH.shape
        q = q_BTNH.transpose(1, 2)  # (B, N, T, H)
        # enable_gqa reads each kv head for its group of query heads, without materialising the expanded
        # cache (measured 5x faster than repeat_interleave for a decode step over 1024 cached tokens)
        y = F.scaled_dot_product_attention(q, k_BGSH, v_BGSH, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=N != k_BGSH.shape[1])
        return y.transpose(1, 2).reshape(B, T, N * H)  # (B, T, N*H)

    def attend_chunks(self, q_BKNH, k_BGSH, v_BGSH, mask_B1KS, last_key_BK, valid_q_BK=None, min_chunk: int = 256):
        """`attend` for sorted query subsets, in chunks that each read keys only up to their last query.

        A boolean mask makes SDPA compute every (query, key) block, so a subset of a long causal sequence
        would pay for the masked upper triangle; chunking skips most of it (exact: those keys are masked).
        `last_key_BK` (B, K) is the last key column each query may see, or None to read it from the mask (the
        last key any valid query of the chunk sees: padding queries see every key, and their outputs are dropped).
        Returns (B, K, N*H) and the (query, key) pairs computed.
        """
        B, K = q_BKNH.shape[:2]
        n = max(1, min(8, K // min_chunk))
        if n == 1:
            return self.attend(q_BKNH, k_BGSH, v_BGSH, mask_B1KS), B * K * k_BGSH.shape[2]
        size = -(-K // n)
        outs, pairs = [], 0
        for c0 in range(0, K, size):
            c1 = min(K, c0 + size)
            if last_key_BK is not None:
                stop = int(last_key_BK[:, c0:c1].max()) + 1  # one host sync per chunk
            else:
                seen_BKS = mask_B1KS[:, 0, c0:c1]
                if valid_q_BK is not None:
                    seen_BKS = seen_BKS & valid_q_BK[:, c0:c1, None]
                seen_S = seen_BKS.any(1).any(0)  # (S,) keys any valid query of the chunk sees
                stop = max(1, int((seen_S * torch.arange(1, seen_S.numel() + 1, device=seen_S.device)).max()))
            outs.append(self.attend(q_BKNH[:, c0:c1], k_BGSH[:, :, :stop], v_BGSH[:, :, :stop],
                                    mask_B1KS[:, :, c0:c1, :stop]))
            pairs += B * (c1 - c0) * stop
        return torch.cat(outs, dim=1), pairs  # (B, K, N*H)
