"""Building blocks shared by every model and method: RMSNorm, RoPE, SwiGLU, attention, the forward context.

Shape legend: B batch, T query tokens, S key length, D hidden_size, N query heads, G kv heads,
H head_dim, F intermediate size.

Attention is split into its steps (`project_q`, `project_kv`, `attend`, `o_proj`) so a method can run
them on different token sets: GateSkip computes K/V for every token but queries only for kept ones;
DND's nested pass takes queries and keys from the selected tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dyndepth.config import ModelConfig
from dyndepth.core.cache import KVCache
from dyndepth.core.routing import gather_padded


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight multiply, as HF Qwen3/Llama do."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (H/2,) with the config's scaling (default, linear or llama3)."""
    H = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, H, 2, dtype=torch.int64).float() / H))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions. `inv_freq` stays float32 on whatever device the model moves to:
    `model.to(torch.bfloat16)` would otherwise round the frequencies and shift every angle."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset(self) -> None:
        """Recompute the frequencies in float32 on the buffer's device (also after meta-device init)."""
        device = None if self.inv_freq.is_meta else self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if not self.inv_freq.is_meta:
            self.reset()
        return self

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions_BT[..., None].float() * self.inv_freq.float()  # (B, T, H/2), always fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, H), HF's split-halves layout
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BTNH: torch.Tensor, cos_BTH: torch.Tensor, sin_BTH: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTH.unsqueeze(-2), sin_BTH.unsqueeze(-2)  # (B, T, 1, H): broadcast over heads
    return x_BTNH * cos + rotate_half(x_BTNH) * sin


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class ForwardContext:
    """Everything a layer needs besides its input, built once per forward and passed explicitly.

    positions (B, T): sequence position of every token (RoPE angle and cache column).
    valid (B, T) | None: False marks PAD; None means every token is real.
    cos, sin (B, T, H): rotary tables for `positions`.
    attn_mask (B, 1, T, T) | None: for cache-free calls with padding; None with no padding (causal fast path).
    cache: the KV cache or None. doc_ids (B, T) | None: packed-document ids (training only).
    collect_aux: record router statistics for auxiliary losses (training).
    aux: per-forward MoE router statistics; losses / stats: what methods add, summed / logged by the model.
    """

    positions: torch.Tensor
    valid: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    attn_mask: torch.Tensor | None = None
    cache: KVCache | None = None
    doc_ids: torch.Tensor | None = None
    collect_aux: bool = False
    aux: list = field(default_factory=list)
    losses: list = field(default_factory=list)  # weighted auxiliary losses added by methods
    stats: dict = field(default_factory=dict)  # detached method statistics for logging
    method: dict = field(default_factory=dict)  # the attached method's per-forward scratch state
    kv_hook: object = None  # optional (slot, k, v) -> (k, v), set by a method for one forward


def causal_mask(q_pos_BT: torch.Tensor, k_pos_BS: torch.Tensor, k_valid_BS: torch.Tensor | None,
                q_valid_BT: torch.Tensor | None = None, doc_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: key s is visible to query t if it is valid and not later in position.

    Causality is by position, never by storage order, so left padding, packed subsets and cache
    columns all follow one rule. `doc_ids` (queries and keys are the same tokens) also hides other
    documents of a packed row. PAD queries see every key: their outputs are discarded, and a row
    with no visible key would make SDPA return NaN.
    """
    mask = k_pos_BS[:, None, :] <= q_pos_BT[:, :, None]  # (B, T, S)
    if k_valid_BS is not None:
        mask = mask & k_valid_BS[:, None, :]
    if doc_ids_BT is not None:
        mask = mask & (doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :])
    if q_valid_BT is not None:
        mask = mask | ~q_valid_BT[:, :, None]
    return mask[:, None]  # (B, 1, T, S)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        D, N, G, H = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = N, G, H
        bias = config.attention_bias
        self.q_proj = nn.Linear(D, N * H, bias=bias)
        self.k_proj = nn.Linear(D, G * H, bias=bias)
        self.v_proj = nn.Linear(D, G * H, bias=bias)
        self.o_proj = nn.Linear(N * H, D, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(H, config.rms_norm_eps)
            self.k_norm = RMSNorm(H, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project_q(self, h_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = h_BTD.shape
        q = self.q_proj(h_BTD).view(B, T, self.num_heads, self.head_dim)  # (B, T, N, H)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q, cos, sin)

    def project_kv(self, h_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = h_BTD.shape
        k = self.k_proj(h_BTD).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, G, H)
        v = self.v_proj(h_BTD).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, G, H)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rope(k, cos, sin), v

    def attend(self, q_BTNH: torch.Tensor, k_BGSH: torch.Tensor, v_BGSH: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA with GQA; `mask` is a boolean (B, 1, T, S) or None for the causal fast path (T == S)."""
        B, T, N, H = q_BTNH.shape
        q = q_BTNH.transpose(1, 2)  # (B, N, T, H)
        # enable_gqa reads each kv head for its group of query heads, without materialising the expanded
        # cache (measured 5x faster than repeat_interleave for a decode step over 1024 cached tokens)
        y = F.scaled_dot_product_attention(q, k_BGSH, v_BGSH, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=N != k_BGSH.shape[1])
        return y.transpose(1, 2).reshape(B, T, N * H)  # (B, T, N*H)

    def forward(self, h_BTD: torch.Tensor, ctx: ForwardContext, slot: int,
                q_idx_BK: torch.Tensor | None = None, q_valid_BK: torch.Tensor | None = None) -> torch.Tensor:
        """Attention branch on normed input. Every token computes K/V (and writes them to the cache).

        Queries come from every token (B, T, D) -> (B, T, D), or, with `q_idx_BK` (column indices per
        row, see `core.routing.pack_padded`), only from those tokens: (B, K, D). The second form is
        how GateSkip saves the q/o projections and the attention of skipped tokens while they still
        provide keys and values to the others.
        """
        k, v = self.project_kv(h_BTD, ctx.cos, ctx.sin)  # (B, T, G, H)
        if ctx.kv_hook is not None:  # a method may replace some tokens' K/V (GateSkip's copy_prev policy)
            k, v = ctx.kv_hook(slot, k, v)
        if q_idx_BK is None:
            h_q, cos_q, sin_q, pos_q, valid_q = h_BTD, ctx.cos, ctx.sin, ctx.positions, ctx.valid
        else:
            h_q, cos_q, sin_q, pos_q = (gather_padded(t, q_idx_BK) for t in (h_BTD, ctx.cos, ctx.sin, ctx.positions))
            valid_q = q_valid_BK if ctx.valid is None else q_valid_BK & ctx.valid.gather(1, q_idx_BK)
        if ctx.cache is not None:
            k_all, v_all, k_valid = ctx.cache.update(slot, k, v, ctx.positions, ctx.valid)  # (B, G, S, H)
        else:
            k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)  # (B, G, T, H)
        if q_idx_BK is not None and q_idx_BK.shape[1] == 0:  # every token skipped: K/V written, nothing else
            return h_BTD.new_zeros(h_BTD.shape[0], 0, h_BTD.shape[2])
        q = self.project_q(h_q, cos_q, sin_q)  # (B, K, N, H)
        if ctx.cache is not None:
            S = k_all.shape[2]
            k_pos = torch.arange(S, device=h_BTD.device).expand(h_BTD.shape[0], S)  # (B, S)
            mask = causal_mask(pos_q, k_pos, k_valid, valid_q)
            last_key = pos_q  # cache column s holds position s
        else:
            mask = ctx.attn_mask
            last_key = q_idx_BK  # without a cache, no visible key lies right of the query's own column
            if q_idx_BK is not None:
                doc_q = None if ctx.doc_ids is None else ctx.doc_ids.gather(1, q_idx_BK)
                mask = subset_mask(pos_q, ctx.positions, ctx.valid, valid_q, doc_q, ctx.doc_ids)
        if q_idx_BK is None or mask is None:
            return self.o_proj(self.attend(q, k_all, v_all, mask))  # (B, T, D)
        return self.o_proj(self.attend_chunks(q, k_all, v_all, mask, last_key))  # (B, K, D)

    def attend_chunks(self, q_BKNH, k_BGSH, v_BGSH, mask_B1KS, last_key_BK, min_chunk: int = 256):
        """`attend` for sorted query subsets, in chunks that each read keys only up to their last query.

        A boolean mask makes SDPA compute every (query, key) block, so a subset of a long causal sequence
        would pay for the masked upper triangle; chunking skips most of it (exact: those keys are masked).
        """
        K = q_BKNH.shape[1]
        n = max(1, min(8, K // min_chunk))
        if n == 1:
            return self.attend(q_BKNH, k_BGSH, v_BGSH, mask_B1KS)
        size = -(-K // n)
        outs = []
        for c0 in range(0, K, size):
            c1 = min(K, c0 + size)
            stop = int(last_key_BK[:, c0:c1].max()) + 1  # one host sync per chunk
            outs.append(self.attend(q_BKNH[:, c0:c1], k_BGSH[:, :, :stop], v_BGSH[:, :, :stop],
                                    mask_B1KS[:, :, c0:c1, :stop]))
        return torch.cat(outs, dim=1)  # (B, K, N*H)


def subset_mask(q_pos_BK, k_pos_BT, k_valid_BT, q_valid_BK, q_doc_BK=None, k_doc_BT=None) -> torch.Tensor:
    """causal_mask for queries that are a subset of the keys (documents compared separately)."""
    mask = causal_mask(q_pos_BK, k_pos_BT, k_valid_BT, None)  # (B, 1, K, T)
    if q_doc_BK is not None:
        mask = mask & (q_doc_BK[:, None, :, None] == k_doc_BT[:, None, None, :])
    if q_valid_BK is not None:
        mask = mask | ~q_valid_BK[:, None, :, None]
    return mask
