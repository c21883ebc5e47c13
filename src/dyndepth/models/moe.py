"""Qwen3-MoE sparse MLP: softmax top-k router and stacked SwiGLU experts (GELU experts for Dreamer's `expert_act`).

Shape legend: N tokens, D hidden_size, E experts, K experts per token, F moe_intermediate_size.

`Experts` is shared with Dreamer's sparse expert attention (models/dreamer_layer.py).

Parameter names follow transformers v5's in-memory layout: `gate.weight (E, D)` is the router,
`experts.gate_up_proj (E, 2F, D)` (gate rows first, then up) and `experts.down_proj (E, D, F)`.
`interop/hf.py` splits them into the per-expert keys that checkpoints store on disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from dyndepth.config import ModelConfig
from dyndepth.core.accounting import accounting_enabled
from dyndepth.core.flops import EXPERT_MATRICES
from dyndepth.core.layers import matmul_dtype, needs_grad, swiglu

EXPERT_ACTS = tuple(EXPERT_MATRICES)  # swiglu, gelu


class Experts(nn.Module):
    """Stacked SwiGLU (or GELU: `act`) experts. (token, expert) pairs are sorted by expert and each expert runs one
    matmul on its group: with `grouped=True`, all groups in one `F.grouped_mm` call (no host sync; CPU, or CUDA in
    bf16), else one `F.linear` per expert (one host sync for the group sizes)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, grouped: bool = False, act: str = "swiglu") -> None:
        super().__init__()
        if act not in EXPERT_ACTS:
            raise ValueError(f"expert activation {act!r} is not one of {EXPERT_ACTS}.")
        self.act = act
        if act == "swiglu":
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))  # (E, 2F, D)
        else:  # gelu: down(gelu(up x)), no gate
            self.up_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))  # (E, F, D)
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))  # (E, D, F)
        self.grouped = grouped
        nn.init.normal_(self.in_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    @property
    def in_proj(self) -> torch.Tensor:
        """The input projection: gate and up stacked (E, 2F, D) for SwiGLU, up (E, F, D) for GELU."""
        return self.gate_up_proj if self.act == "swiglu" else self.up_proj

    def _activate(self, h: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """The input projection's output (..., 2F or F) -> the (..., F) activation, times the gates `scale`."""
        if self.act == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return swiglu(gate, up, scale)
        y = F.gelu(h)
        return y if scale is None else y * scale

    def forward(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
                traced_decode: bool = False) -> torch.Tensor:
        """`traced_decode`: the forward is a compiled decode step (`ForwardContext.traced_decode`), which may run
        every expert (see `_path`)."""
        N, K = idx_NK.shape
        E = self.down_proj.shape[0]
        path = self._path(x_ND, K, traced_decode)
        if path == "gathered":
            return self._gathered(x_ND, idx_NK, w_NK)
        if path == "every":
            return self._every_expert(x_ND, idx_NK, w_NK)
        grouped = path == "grouped"
        flat_NK = idx_NK.reshape(-1)  # (N*K,)
        order = torch.argsort(flat_NK, stable=True)  # group (token, k) pairs by expert
        w_sorted = w_NK.reshape(-1)[order, None]  # (N*K, 1) each pair's gate
        rows = order // K  # (N*K,) the token of each sorted pair
        if grouped:
            counts_E = group_sizes(flat_NK, E)  # (E,) on the device
            y = self._grouped(x_ND, rows, counts_E.cumsum(0).to(torch.int32), w_sorted)  # (N*K, D)
        else:
            x_sorted = x_ND.index_select(0, rows)  # (N*K, D); 4x faster than x_ND[rows] on CPU
            counts = torch.bincount(flat_NK, minlength=E).tolist()  # one host sync for the group sizes
            outs, start = [], 0
            for e, c in enumerate(counts):
                if c:
                    outs.append(self._expert(x_sorted[start:start + c], e, w_sorted[start:start + c]))  # (c, D)
                start += c
            y = torch.cat(outs)  # (N*K, D)
        return add_rows(y.to(x_ND.dtype), rows, N)  # (N, D): each token's K expert outputs summed

    def _path(self, x_ND: torch.Tensor, K: int, traced_decode: bool = False) -> str:
        """How `forward` runs N tokens with K experts each: "grouped" (one grouped matmul), "gathered" (few tokens,
        decoding: the K experts' weights gathered, no host sync), "every" (a traced decode step of a few tokens whose
        experts do not run grouped: Qwen3-MoE's in any dtype, Dreamer's in float32 on CUDA; `every_expert_pays`) or
        "loop" (one matmul per expert, one host sync)."""
        N, E = x_ND.shape[0], self.down_proj.shape[0]
        grouped = self.grouped and _grouped_mm_supported(x_ND) and self._aligned(matmul_dtype(x_ND))
        # few tokens: eager CPU runs them grouped (faster there), a compiled step gathers (dreamer-bench decode at
        # B = 1 / 8 on this CPU: 251 / 919 tok/s gathered against 137 / 412 grouped, 2026-12-06)
        if N * K < E and (not grouped or torch.compiler.is_compiling()):
            return "gathered"
        if grouped:
            return "grouped"
        # only a decode step: a compiled training forward or prefill of a few tokens (a small micro-batch, the
        # tokens GateSkip / MoD / DND route) takes the loop's graph break rather than E / K times the expert FLOPs
        return "every" if traced_decode and every_expert_pays(N) else "loop"

    def experts_per_token(self, x_ND: torch.Tensor, K: int, traced_decode: bool = False) -> int:
        """Experts `forward` runs per token of x (N, D): K, or all E on the every-expert path (the FLOP ledger's
        executed count)."""
        return self.down_proj.shape[0] if self._path(x_ND, K, traced_decode) == "every" else K

    def _aligned(self, dtype: torch.dtype) -> bool:
        """Whether the grouped matmul takes these widths: its operands' rows must be multiples of 16 bytes (a
        width of 90 in float32 is not), else one matmul per expert runs. Grouped is also faster than gathering the
        experts' weights when decoding (CPU)."""
        return all(n * dtype.itemsize % 16 == 0 for n in self.down_proj.shape[1:])  # D and F

    def _grouped(self, x_ND: torch.Tensor, rows_M: torch.Tensor, offsets_E: torch.Tensor,
                 w_M1: torch.Tensor) -> torch.Tensor:
        """Rows x[rows] (M, D), sorted by expert, expert e owning rows offsets[e-1]:offsets[e], each scaled by its
        gate (M, 1) -> (M, D). The gate scales the F-wide activation before the (linear) down projection."""
        dtype = matmul_dtype(x_ND)
        h = gather_grouped_mm(x_ND.to(dtype), rows_M, self.in_proj.to(dtype), offsets_E)  # (M, 2F or F)
        act = self._activate(h, w_M1.to(dtype))  # (M, F)
        return grouped_mm(act, self.down_proj.to(dtype).transpose(-2, -1), offsets_E)

    def _expert(self, x: torch.Tensor, e: int, w_c1: torch.Tensor) -> torch.Tensor:
        """One expert on its c rows, each output scaled by its gate after the down projection, as HF's Qwen3-MoE
        does (scaling the F-wide activation rounds differently in bfloat16: greedy decoding drifted from HF's)."""
        h = F.linear(x, self.in_proj[e])  # (c, 2F or F)
        return F.linear(self._activate(h, None), self.down_proj[e]) * w_c1.to(h.dtype)  # (c, D)

    def _every_expert(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, each output scaled by the token's gate for that expert (zero for the experts
        it did not choose): (N, D), shapes independent of the routing. The gate scales each expert's output after the
        down projection, as the eager paths do (`_expert`, `_gathered`): scaling the F-wide activation rounds
        otherwise in bfloat16, and a compiled decode step's logits left eager's by an ulp."""
        gates_NE = torch.zeros(x_ND.shape[0], self.down_proj.shape[0], dtype=x_ND.dtype, device=x_ND.device)
        gates_NE = gates_NE.scatter(1, idx_NK, w_NK.to(x_ND.dtype))  # (N, E)
        h = torch.einsum("nd,efd->enf", x_ND, self.in_proj)  # (E, N, 2F or F)
        y_END = torch.einsum("enf,edf->end", self._activate(h, None), self.down_proj)  # (E, N, D)
        # summed in x's dtype, as `add_rows` sums the loop's outputs (autocast's matmuls return its dtype)
        return (y_END * gates_NE.t()[..., None].to(y_END.dtype)).to(x_ND.dtype).sum(0)

    def _gathered(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        w_in = self.in_proj[idx_NK]  # (N, K, 2F or F, D)
        down = self.down_proj[idx_NK]  # (N, K, D, F)
        h = torch.einsum("nd,nkfd->nkf", x_ND, w_in)  # (N, K, 2F or F)
        y = torch.einsum("nkf,nkdf->nkd", self._activate(h, None), down)  # (N, K, D)
        return (y * w_NK[..., None]).sum(1)  # (N, D)


# A decode step torch.compile traces (`ForwardContext.traced_decode`, CUDA graphs on a GPU) whose experts do not run
# grouped (Qwen3-MoE's, which run one matmul per expert eagerly; Dreamer's in float32 on CUDA, where torch's grouped
# matmul runs bfloat16 only, see `_grouped_mm_supported`) runs every expert on every token up to this many tokens: one
# static graph without the group sizes' host sync, each expert's weights read once (what a decode step of a few rows
# costs anyway), for E / K times the routed FLOPs, which the FLOP ledger counts as executed (`experts_per_token`).
# Other compiled forwards (training, prefill) run the chosen experts only.
EVERY_EXPERT_MAX_TOKENS = 64


def every_expert_pays(n_tokens: int) -> bool:
    return n_tokens <= EVERY_EXPERT_MAX_TOKENS and torch.compiler.is_compiling()


def gather_grouped_mm(x_NI: torch.Tensor, rows_M: torch.Tensor, weight_EOI: torch.Tensor,
                      offsets_E: torch.Tensor) -> torch.Tensor:
    """x[rows] @ weight[e].T for rows grouped by expert (one `F.grouped_mm`; expert e owns rows
    offsets[e-1]:offsets[e]) -> (M, O); in training through `GatherGroupedMM`, which keeps x, not x[rows]."""
    if needs_grad(x_NI, weight_EOI):
        return GatherGroupedMM.apply(x_NI, rows_M, weight_EOI, offsets_E)
    return _gather_grouped_mm(x_NI, rows_M, weight_EOI, offsets_E)


def _gather_grouped_mm(x_NI, rows_M, weight_EOI, offsets_E) -> torch.Tensor:
    return grouped_mm(x_NI.index_select(0, rows_M), weight_EOI.transpose(-2, -1), offsets_E)


def add_rows(y_MD: torch.Tensor, index_M: torch.Tensor, n: int) -> torch.Tensor:
    """zeros(n, D).index_add_(0, index_M, y_MD): rows of y summed into the rows `index` names; in training
    through `AddRows`, which saves only the index."""
    if needs_grad(y_MD):
        return AddRows.apply(y_MD, index_M, n)
    return _add_rows(y_MD, index_M, n)


def _add_rows(y_MD: torch.Tensor, index_M: torch.Tensor, n: int) -> torch.Tensor:
    return y_MD.new_zeros(n, y_MD.shape[1]).index_add_(0, index_M, y_MD)


class GatherGroupedMM(torch.autograd.Function):
    """`gather_grouped_mm` saving x (N, I) and the row index for backward, not the gathered (M, I) rows (K times
    x's size): backward gathers them again, one copy, for the weight gradient."""

    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, rows_M: torch.Tensor, weight_EOI: torch.Tensor,
                offsets_E: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_NI, rows_M, weight_EOI, offsets_E)
        return _gather_grouped_mm(x_NI, rows_M, weight_EOI, offsets_E)

    @staticmethod
    def backward(ctx, grad_MO: torch.Tensor):
        x_NI, rows_M, weight_EOI, offsets_E = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_rows = grouped_mm(grad_MO, weight_EOI, offsets_E)  # (M, I)
            grad_x = torch.zeros(x_NI.shape, dtype=torch.float32, device=x_NI.device)  # K rows summed in fp32
            grad_x = grad_x.index_add_(0, rows_M, grad_rows.float()).to(x_NI.dtype)
        if ctx.needs_input_grad[2]:  # (E, O, I): each expert's rows, grad^T @ x
            grad_w = grouped_mm(grad_MO.t(), x_NI.index_select(0, rows_M), offsets_E)
        return grad_x, None, grad_w, None


class AddRows(torch.autograd.Function):
    """`add_rows` saving only the index for backward (a gather of the gradient); autograd's index_add would
    also keep the (M, D) rows."""

    @staticmethod
    def forward(ctx, y_MD: torch.Tensor, index_M: torch.Tensor, n: int) -> torch.Tensor:
        ctx.save_for_backward(index_M)
        if torch.compiler.is_compiling():  # torch 2.11's dynamo loses the gradient of a Function whose forward
            return y_MD.new_zeros(n, y_MD.shape[1]).index_add(0, index_M, y_MD)  # returns an in-place op's result
        return _add_rows(y_MD, index_M, n)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (index_M,) = ctx.saved_tensors
        return grad_ND.index_select(0, index_M), None, None


def expert_linear(x_MI: torch.Tensor, row_P: torch.Tensor, expert_P: torch.Tensor,
                  weight_EIO: torch.Tensor) -> torch.Tensor:
    """P (row, expert) pairs: x[row_P[p]] @ weight[expert_P[p]], (P, O) in pair order. The pairs are sorted by
    expert and run as one grouped matmul (CPU, or CUDA in bf16), else one matmul per expert; a few pairs
    (decoding) gather their experts' weights instead (no host sync). SwitchHead's expert projections."""
    E, P = weight_EIO.shape[0], expert_P.shape[0]
    dtype = matmul_dtype(x_MI)
    grouped = _grouped_mm_supported(x_MI) and all(n * dtype.itemsize % 16 == 0 for n in weight_EIO.shape[1:])
    if not grouped and P < E:
        return torch.bmm(x_MI[row_P][:, None], weight_EIO[expert_P])[:, 0]  # (P, O)
    if not grouped and every_expert_pays(x_MI.shape[0]) and not accounting_enabled():
        # a traced decode step without a FLOP ledger (attention counts its routed experts): every expert, every row
        return torch.einsum("mi,eio->emo", x_MI, weight_EIO)[expert_P, row_P]  # (P, O)
    order = torch.argsort(expert_P, stable=True)
    x_sorted = x_MI.index_select(0, row_P[order])  # (P, I) grouped by expert
    counts_E = group_sizes(expert_P, E)
    if grouped:  # (its operands need 16-byte row strides)
        y = grouped_mm(x_sorted.to(dtype), weight_EIO.to(dtype), counts_E.cumsum(0).to(torch.int32))
    else:
        outs, start = [], 0
        for e, c in enumerate(counts_E.tolist()):  # one host sync for the group sizes
            if c:
                outs.append(x_sorted[start:start + c] @ weight_EIO[e])
            start += c
        y = torch.cat(outs)
    return torch.empty_like(y).index_copy(0, order, y)  # back to pair order


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch's grouped matmul runs on CPU in float32, bfloat16 and float16 (float64 falls back to one matmul per
    expert), eager or compiled (`grouped_mm`), and on CUDA (compute capability 8.0+) in bfloat16."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cpu":
        return True
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled(x.device.type)
                                         and torch.get_autocast_dtype(x.device.type) == torch.bfloat16)
    return x.is_cuda and bf16 and torch.cuda.get_device_capability(x.device) >= (8, 0)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`F.grouped_mm(a, b, offs=offsets)`: (M, K) x (E, K, N) -> (M, N), or (K, M) x (M, N) -> (E, K, N) (offsets
    over M). In a forward torch.compile traces, a float32 or float16 call goes through an opaque custom op: the
    compiler's shape rule for the grouped matmul accepts bfloat16 only, while torch's CPU kernel runs the others
    too (compiled float32 experts fell back to one matmul per expert behind a host sync). Widths must be multiples of
    16 bytes (callers check: `Experts._aligned`), so the kernel's output is contiguous, as the custom op's fake says."""
    if a.dtype != torch.bfloat16 and (torch.compiler.is_compiling() or is_fake(a)):  # (fake: torch 2.11 traces a
        return _opaque_grouped_mm(a, b, offsets)  # compiled backward on fake tensors without is_compiling() set)
    return F.grouped_mm(a, b, offs=offsets)


@torch.library.custom_op("dyndepth::grouped_mm", mutates_args=())
def _opaque_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(a, b, offs=offsets)


@_opaque_grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:  # (M, K) x (E, K, N)
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offsets.shape[0], a.shape[0], b.shape[1])  # (K, M) x (M, N) -> (E, K, N)


def _grouped_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad: torch.Tensor):
    a, b, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # (an expanded gradient, stride 0, is not a layout the kernel takes)
    if b.dim() != 3:
        raise NotImplementedError("the (K, M) x (M, N) grouped matmul (a weight gradient) has no gradient itself.")
    grad_a = grouped_mm(grad, b.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None  # (M, K)
    grad_b = grouped_mm(a.t(), grad, offsets) if ctx.needs_input_grad[1] else None  # (E, K, N)
    return grad_a, grad_b, None


_opaque_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def group_sizes(expert_M: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64: how many of the M assignments go to each expert, a static shape (bincount's is data-dependent,
    which a compiled graph breaks on)."""
    return torch.zeros(num_experts, dtype=torch.int64, device=expert_M.device).index_add_(
        0, expert_M, torch.ones_like(expert_M, dtype=torch.int64))


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (N, E) in fp32, the top-k expert ids (N, K) and their weights (N, K)."""
        probs = F.softmax(self.gate(x_ND), dim=-1, dtype=torch.float32)  # (N, E)
        w, idx = torch.topk(probs, self.top_k, dim=-1)  # (N, K)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return probs, idx, w.to(x_ND.dtype)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, aux: list | None = None,
                traced_decode: bool = False) -> torch.Tensor:
        """x (..., D) -> (..., D). With `aux`, append router statistics for the balancing loss; `traced_decode`:
        see `Experts.forward`."""
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])  # (N, D)
        probs, idx, w = self.route(x_ND)
        if aux is not None:
            aux.append(router_stats(probs, idx, None if valid is None else valid.reshape(-1)))
        return self.experts(x_ND, idx, w, traced_decode).view(shape)


def router_stats(probs_NE: torch.Tensor, idx_NK: torch.Tensor, valid_N: torch.Tensor | None):
    """(assignments per expert (E,), summed probability per expert (E,), token count) over valid tokens."""
    E = probs_NE.shape[-1]
    weight_N = torch.ones(probs_NE.shape[0], device=probs_NE.device) if valid_N is None else valid_N.float()
    counts_E = torch.zeros(E, device=probs_NE.device).scatter_add_(
        0, idx_NK.reshape(-1), weight_N.repeat_interleave(idx_NK.shape[1])
    )
    prob_sum_E = (probs_NE * weight_N[:, None]).sum(0)
    return counts_E, prob_sum_E, weight_N.sum()


def load_balancing_loss(stats: list, num_experts: int) -> torch.Tensor:
    """Switch-style balancing loss over all MoE layers, as HF Qwen3-MoE computes it (unweighted).

    E * sum_e f_e * P_e, where f_e is the fraction of (token, slot) assignments to expert e and P_e the
    mean router probability of e, both pooled over every layer's valid tokens.
    """
    counts = torch.stack([s[0] for s in stats]).sum(0)
    prob_sum = torch.stack([s[1] for s in stats]).sum(0)
    rows = torch.stack([s[2] for s in stats]).sum().clamp(min=1)  # no valid token (an all-padding batch): 0, not
    # 0 / 0 (a NaN objective stops training, and the other families' auxiliary losses are 0 there)
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))
