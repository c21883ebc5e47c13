"""SwitchHead attention: expert value and output projections chosen per head and per token.

Csordas et al. 2024, "SwitchHead: Accelerating Transformers with Mixture-of-Experts Attention" (arXiv:2312.07987),
the attention of MoEUT (RobertCsordas/moeut). An option of the Dreamer family (`attn_num_experts` > 0), so the
MoEUT-style baseline can use it; docs/baselines.md lists what differs from the authors' code.

Shape legend: M tokens (B*T flattened), D hidden_size, N query heads, G kv heads, H head_dim, E experts per head,
K experts per head a token uses (`attn_experts_per_tok`).

Queries and keys are the core `Attention`'s (dense per head, q/k norm, RoPE, GQA); the kernels, the KV cache and
the FLOP ledger are the same. Values and outputs are sigma-MoE mixtures, each head routing on its own:
    v_g(x_j) = sum over the top-K e of sigmoid(x_j W_vsel)_g:  s_ge * x_j W_v[g, e]        (the key's token)
    out(x_i) = sum_n sum over the top-K e of sigmoid(x_i W_osel)_n:  s_ne * a_n(i) W_o[n, e]  (the query's token)
with the chosen sigmoid scores as gates (no renormalisation) and a_n(i) head n's attention output. A value
depends only on its own token, so the cache stores mixed values and cached decoding equals the full forward.
With K = E every expert runs and the projection is dense again (a check in tests/models/test_moeut.py).
"""

from __future__ import annotations

import torch
from torch import nn

from dyndepth.core import flops
from dyndepth.core.layers import Attention
from dyndepth.models.moe import expert_linear


class SwitchHeadAttention(Attention):
    """`Attention` with expert value and output projections: parameters `v_gate.weight (G*E, D)`,
    `v_experts (G*E, D, H)`, `o_gate.weight (N*E, D)`, `o_experts (N*E, H, D)` (head-major: expert e of head n
    is row n*E + e). `q_proj`, `k_proj` and the q/k norms are the core's."""

    def __init__(self, config) -> None:
        super().__init__(config)
        del self.v_proj, self.o_proj  # replaced by the experts below
        D, N, G, H = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        E = config.attn_num_experts
        self.num_experts, self.top_k = E, config.attn_experts_per_tok
        self.v_gate = nn.Linear(D, G * E, bias=False)
        self.o_gate = nn.Linear(D, N * E, bias=False)
        self.v_experts = nn.Parameter(torch.empty(G * E, D, H))  # (G*E, D, H)
        self.o_experts = nn.Parameter(torch.empty(N * E, H, D))  # (N*E, H, D)
        nn.init.normal_(self.v_experts, std=config.initializer_range)
        nn.init.normal_(self.o_experts, std=config.initializer_range)
        self.flops_per_query = flops.q_o_flops(config)  # q_proj, the output router and K output experts per head
        self.flops_per_kv = flops.kv_flops(config)  # k_proj, the value router and K value experts per kv head

    def route(self, gate: nn.Linear, h_MD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (M, heads, E) fp32, each head's top-K experts as rows of the expert table (M, heads, K), and
        their sigmoid gates (M, heads, K) in h's dtype."""
        M, E = h_MD.shape[0], self.num_experts
        scores = gate(h_MD).float().view(M, -1, E)  # (M, heads, E)
        w, idx = torch.topk(torch.sigmoid(scores), self.top_k, dim=-1)  # (M, heads, K)
        first = torch.arange(scores.shape[1], device=h_MD.device)[:, None] * E  # (heads, 1) head n's first row
        return scores, idx + first, w.to(h_MD.dtype)

    def selection_scores(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router scores of the value side (..., G, E) and the output side (..., N, E), fp32: the input of MoEUT's
        entropy regularizer (models/dreamer.py)."""
        E = self.num_experts
        return (self.v_gate(h).float().unflatten(-1, (-1, E)), self.o_gate(h).float().unflatten(-1, (-1, E)))

    def project_kv(self, h_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Keys (the core's) and expert-mixed values, (B, T, G, H) each."""
        B, T, D = h_BTD.shape
        h_MD = h_BTD.reshape(B * T, D)
        _, expert, w = self.route(self.v_gate, h_MD)  # (M, G, K)
        M, G, K = expert.shape
        row = torch.arange(M, device=h_MD.device).repeat_interleave(G * K)  # (M*G*K,) token of each pair
        y = expert_linear(h_MD, row, expert.reshape(-1), self.v_experts).view(M, G, K, -1)  # (M, G, K, H)
        v = (y * w[..., None].to(y.dtype)).sum(2)  # (M, G, H)
        return self.project_k(h_BTD, cos, sin), v.view(B, T, G, self.head_dim)

    def project_out(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """(..., N*H) attention output -> (..., D), the experts routed on the query tokens' input h (..., D)."""
        lead, D = h.shape[:-1], h.shape[-1]
        h_MD = h.reshape(-1, D)
        _, expert, w = self.route(self.o_gate, h_MD)  # (M, N, K)
        M, N, K = expert.shape
        row = torch.arange(M * N, device=h.device).repeat_interleave(K)  # (M*N*K,) (token, head) of each pair
        out = expert_linear(y.reshape(M * N, self.head_dim), row, expert.reshape(-1), self.o_experts)  # (M*N*K, D)
        out = (out.view(M, N * K, D) * w.view(M, N * K, 1).to(out.dtype)).sum(1)  # (M, D)
        return out.view(*lead, D)

