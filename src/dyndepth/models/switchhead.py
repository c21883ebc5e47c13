"""SwitchHead attention: expert value and output projections chosen per head and per token.

Csordas et al. 2024, "SwitchHead: Accelerating Transformers with Mixture-of-Experts Attention" (arXiv:2312.07987),
the attention of MoEUT (RobertCsordas/moeut). An option of the Dreamer family (`attn_num_experts` > 0), so the
MoEUT-style baseline can use it; docs/baselines.md lists what differs from the authors' code.

Shape legend: M tokens (flattened), D hidden_size, N query heads, G kv heads, H head_dim, E experts per head,
K experts per head a token uses (`attn_experts_per_tok`).

    attn = switchhead_attention(config)   # the core Attention with these two parts as v_proj and o_proj

Queries and keys stay the core `Attention`'s (dense per head, q/k norm, RoPE, GQA), and so do the kernels, the KV
cache and the FLOP ledger (core/flops.py counts the experts). Values and outputs are sigma-MoE mixtures, each
head routing on its own:
    v_g(x_j) = sum over the top-K e of sigmoid(x_j W_vsel)_g:  s_ge * x_j W_v[g, e]        (the key's token)
    out(x_i) = sum_n sum over the top-K e of sigmoid(x_i W_osel)_n:  s_ne * a_n(i) W_o[n, e]  (the query's token)
with the chosen sigmoid scores as gates (no renormalisation) and a_n(i) head n's attention output. A value
depends only on its own token, so the cache stores mixed values and cached decoding equals the full forward.
"""

from __future__ import annotations

import torch
from torch import nn

from dyndepth.core.layers import Attention, linear_float32
from dyndepth.models.moe import expert_linear


class HeadExperts(nn.Module):
    """E experts per head, `heads` heads, each a (d_in, d_out) matrix, and a router D -> heads * E scoring them.
    Parameters `gate.weight (heads*E, D)` and `experts (heads*E, d_in, d_out)`, head-major: expert e of head n is
    row n*E + e."""

    def __init__(self, config, heads: int, d_in: int, d_out: int) -> None:
        super().__init__()
        E = config.attn_num_experts
        self.num_experts, self.top_k, self.heads = E, config.attn_experts_per_tok, heads
        self.gate = nn.Linear(config.hidden_size, heads * E, bias=False)
        self.experts = nn.Parameter(torch.empty(heads * E, d_in, d_out))
        nn.init.normal_(self.experts, std=config.initializer_range)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Router scores (..., heads, E), computed in fp32 whatever the model's dtype or autocast (bfloat16 rounding
        flips top-k choices; as expert attention's router), also the input of MoEUT's entropy regularizer."""
        return linear_float32(self.gate, h).unflatten(-1, (self.heads, self.num_experts))

    def mix(self, x_MI: torch.Tensor, h_MD: torch.Tensor, per_head_input: bool) -> torch.Tensor:
        """(M, heads, K, d_out): each head's K chosen experts applied to the token's input, times their gates.
        The input is x (M, d_in) for every head, or with `per_head_input` x (M*heads, d_in), one row per head."""
        w, idx = torch.topk(torch.sigmoid(self.scores(h_MD)), self.top_k, dim=-1)  # (M, heads, K)
        M, heads, K = idx.shape
        expert = idx + torch.arange(heads, device=idx.device)[:, None] * self.num_experts  # rows of the table
        row = torch.arange(M * heads if per_head_input else M, device=idx.device)
        row = row.repeat_interleave(K if per_head_input else heads * K)  # the input row of each (token, head, k)
        y = expert_linear(x_MI, row, expert.reshape(-1), self.experts).view(M, heads, K, -1)
        return y * w[..., None].to(y.dtype)


class ValueExperts(HeadExperts):
    """`v_proj` of SwitchHead: (..., D) -> (..., G*H), each kv head mixing its K chosen value experts, routed on
    the token itself (the key side)."""

    def __init__(self, config) -> None:
        super().__init__(config, config.num_key_value_heads, config.hidden_size, config.head_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h_MD = h.reshape(-1, h.shape[-1])
        v = self.mix(h_MD, h_MD, per_head_input=False).sum(2)  # (M, G, H)
        return v.view(*h.shape[:-1], -1)


class OutputExperts(HeadExperts):
    """`o_proj` of SwitchHead: attention output (..., N*H) and the query tokens' input h (..., D) -> (..., D), each
    query head's output through its K chosen experts, routed on h (the query side)."""

    routed = True  # Attention.project_out passes the query tokens' input

    def __init__(self, config) -> None:
        super().__init__(config, config.num_attention_heads, config.head_dim, config.hidden_size)

    def forward(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        h_MD = h.reshape(-1, h.shape[-1])
        out = self.mix(y.reshape(-1, y.shape[-1] // self.heads), h_MD, per_head_input=True)  # (M, N, K, D)
        return out.sum((1, 2)).view(*h.shape)


def switchhead_attention(config) -> Attention:
    """The core Attention with expert value and output projections (parameters `v_proj.gate.weight (G*E, D)`,
    `v_proj.experts (G*E, D, H)`, `o_proj.gate.weight (N*E, D)`, `o_proj.experts (N*E, H, D)`)."""
    return Attention(config, v_proj=ValueExperts(config), o_proj=OutputExperts(config))
