"""Weight-only int8 / int4 quantization (GateSkip spec section 7: GateSkip combined with 4-bit weights).

Shape legend: N out_features, K in_features, G groups per row.

Quantization: every nn.Linear (gates included, as the paper quantizes everything but lm_head) becomes a
`QuantLinear` holding symmetric integer weights and one float scale per output channel (or per group of
`group_size` input columns): w ~= q * scale, q in [-127, 127] (8 bits) or [-8, 7] (4 bits, two values
packed per byte). Activations stay in float; the layer dequantizes on the fly, or on CPU with 8-bit
per-channel weights calls torch's int8 weight-only kernel `torch._weight_int8pack_mm`. MoE expert stacks
are plain parameters, not nn.Linear, and stay in float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dyndepth.config import is_whole
from dyndepth.core.layers import apply_keeping_float32, needs_grad

_INT8_PACK_MM = getattr(torch, "_weight_int8pack_mm", None)
_QMAX = {8: 127, 4: 7}


class QuantLinear(nn.Module):
    """Weight-only quantized Linear: `qweight` int8 (N, K) for 8 bits, uint8 (N, K // 2) for 4 bits (two
    values per byte, offset by 8), `scale` float32 (N, G) with G = K // group_size. The scale stays float32 under
    `model.to(dtype)` / `.half()` (a bfloat16 scale lost 8 mantissa bits for good, and a round trip back to
    float32 did not restore the model); the bias follows the model's dtype, as an nn.Linear's does."""

    float32_buffers = ("scale",)
    _apply = apply_keeping_float32

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if bits not in _QMAX:
            raise ValueError(f"bits={bits} is not supported; use 8 or 4.")
        if in_features % group_size or (bits == 4 and group_size % 2):
            raise ValueError(f"group_size={group_size} must divide in_features={in_features} (and be even "
                             "for 4 bits); pick a divisor of in_features.")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        cols = in_features if bits == 8 else in_features // 2
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.int8 if bits == 8
                                                    else torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, in_features // group_size, device=device,
                                                 dtype=torch.float32))  # (N, G), whatever the default dtype
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int | None = None) -> QuantLinear:
        N, K = linear.weight.shape
        group = group_size or K
        q = cls(K, N, bits, group, linear.bias is not None, linear.weight.device, linear.weight.dtype)
        w_NGC = linear.weight.detach().float().reshape(N, K // group, group)  # (N, G, K / G)
        scale_NG = w_NGC.abs().amax(-1).clamp(min=1e-12) / _QMAX[bits]  # (N, G)
        q_NK = torch.round(w_NGC / scale_NG[..., None]).clamp(-_QMAX[bits] - (bits == 4), _QMAX[bits])
        q_NK = q_NK.reshape(N, K).to(torch.int8)
        if bits == 4:
            u_NK = (q_NK + 8).to(torch.uint8)  # 0..15
            q_NK = u_NK[:, 0::2] | (u_NK[:, 1::2] << 4)  # (N, K / 2)
        q.qweight.copy_(q_NK)
        q.scale.copy_(scale_NG)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def int_weight(self) -> torch.Tensor:
        """The integer weights (N, K) as int8."""
        if self.bits == 8:
            return self.qweight
        low = (self.qweight & 0xF).to(torch.int8) - 8  # (N, K / 2) even columns
        high = (self.qweight >> 4).to(torch.int8) - 8  # odd columns
        return torch.stack([low, high], dim=-1).reshape(self.out_features, self.in_features)  # (N, K)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weights (N, K) these integers stand for: q * scale in float32, rounded once to `dtype` (a
        product of a bfloat16 scale rounded it twice)."""
        N, K, G = self.out_features, self.in_features, self.scale.shape[1]
        w_NGC = self.int_weight().reshape(N, G, K // G).float() * self.scale.float()[..., None]  # (N, G, K / G)
        return w_NGC.reshape(N, K).to(dtype)

    def uses_int8_kernel(self, x: torch.Tensor) -> bool:
        # not when autograd differentiates through it: the kernel has no derivative (training float gates on an
        # int8 base raised "derivative for aten::_weight_int8pack_mm is not implemented" on CPU)
        return (_INT8_PACK_MM is not None and self.bits == 8 and self.scale.shape[1] == 1
                and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and not needs_grad(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N)."""
        if not self.uses_int8_kernel(x) or x.numel() == 0:
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        # float16 runs the kernel in float32: its scales take x's dtype, and in float16 a row's scale under 3e-8 (its
        # largest |w| under ~4e-6) became 0, zeroing the row's outputs, and rows of small weights lost digits
        dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
        x_MK = x.reshape(-1, self.in_features).contiguous().to(dtype)  # (M, K)
        y = _INT8_PACK_MM(x_MK, self.qweight, self.scale[:, 0].to(dtype)).to(x.dtype)  # (M, N)
        y = y.reshape(*x.shape[:-1], self.out_features)  # (..., N)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def _default_group(bits: int, in_features: int) -> int:
    """Per output channel for 8 bits; groups of 32 columns for 4 bits (whole rows when 32 does not divide)."""
    return 32 if bits == 4 and in_features % 32 == 0 else in_features


def quantize_weights(model: nn.Module, bits: int = 8, skip: str | tuple[str, ...] = ("lm_head",),
                     quantize_gates: bool = True, group_size: int | None = None) -> list[str]:
    """Replace every nn.Linear of `model` in place by a `QuantLinear`; return the replaced module names.

    A module stays in float when any entry of `skip` (one string or several) is a substring of its qualified name,
    and GateSkip's gates (names containing ".gateskip.") too when `quantize_gates=False`. `group_size` None: per
    output channel for 8 bits, groups of 32 input columns for 4 bits.
    """
    if bits not in _QMAX:
        raise ValueError(f"bits={bits} is not supported; use 8 or 4.")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)  # ("lm_head" was its letters: every name has an "l")
    if not all(isinstance(s, str) and s for s in skip):
        raise ValueError(f"skip={skip!r} must be module-name substrings (non-empty strings), e.g. ('lm_head',).")
    if group_size is not None and (not is_whole(group_size) or group_size < 1):
        raise ValueError(f"group_size={group_size!r} must be a whole number >= 1 (input columns per scale), or None.")
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(s in name for s in skip):
            continue
        if not quantize_gates and ".gateskip." in f".{name}.":
            continue
        targets.append(name)
    groups = {name: group_size or _default_group(bits, model.get_submodule(name).in_features) for name in targets}
    for name, group in groups.items():  # all checked before any is replaced: a refusal leaves the model as it was
        if model.get_submodule(name).in_features % group:
            raise ValueError(f"{name}: group_size={group} does not divide in_features="
                             f"{model.get_submodule(name).in_features}; pick a divisor of every layer's in_features.")
        if bits == 4 and group % 2:  # (QuantLinear refused it mid-way: earlier layers stayed replaced)
            raise ValueError(f"{name}: 4 bits pack two values per byte, so a group needs an even number of columns, "
                             f"and group_size={group} is odd; give an even group_size that divides every layer's "
                             "in_features, or use bits=8.")
    for name, group in groups.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantLinear.from_linear(getattr(parent, child), bits, group))
    return targets


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (numel * element size), tied tensors counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
