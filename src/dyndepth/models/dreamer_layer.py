"""The Dreamer layer: sequence attention, depth attention and sparse expert attention, shared across steps.

Shape legend: B batch, T tokens, S key / cache length, D hidden_size, N query heads, G kv heads, H head_dim,
L depth-memory entries (earlier steps of the same token), E experts, K experts per token, F expert width.

One application at recurrence step r (pre-norm residual, SA -> DA -> EA; docs/methods.md lists our choices):
    x = x + SA(norm_sa(x))                      # causal over tokens, RoPE over positions, this step's KV slot
    x = x + DA(norm_da(x), depth memory)        # over the token's own states entering steps 0..r (RoPE over r)
    x = x + EA(norm_ea(x), r)                   # top-k of E experts, chosen on biased logits, sigmoid gates
The depth memory (K/V of the state entering each step) lives on `ctx.model_state` (`DepthState`) for one
forward only: a token's depth memory is read by that token alone, so a decode step starts it afresh and the
KV cache holds sequence attention only, one slot per application (as an R-layer decoder).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dyndepth.core.context import ForwardContext, causal_mask
from dyndepth.core.flops import (
    depth_attn_flops,
    expert_attn_flops,
    expert_flops,
    lm_head_flops,
    switchhead_router_flops,
)
from dyndepth.core.layers import (
    Attention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_keeping_float32,
    apply_rope,
    needs_grad,
    normed_linear,
)
from dyndepth.models.moe import Experts, router_stats
from dyndepth.models.switchhead import switchhead_attention


@dataclass
class DepthState:
    """What one forward keeps besides the residual stream (`ctx.model_state`), indexed by layer or application."""

    mem_k: list[list[torch.Tensor]]  # [layer][step] (B, T, N_da, H_da): K of the state entering each step
    mem_v: list[list[torch.Tensor]]
    usage: dict = field(default_factory=dict)  # application -> (E,) selections by valid (running) tokens
    visited: dict = field(default_factory=dict)  # layer -> (B*T, E) bool: experts a token has used so far
    set_ids: dict = field(default_factory=dict)  # application -> (B*T,) id of the token's top-k set
    change: dict = field(default_factory=dict)  # application -> mean |x_out - x_in| / |x_in| over valid tokens
    aux: list = field(default_factory=list)  # router statistics for the optional balancing loss
    sel_logits: list = field(default_factory=list)  # [application] (B, T, E) router scores (entropy regularizer)
    attn_sel_logits: list = field(default_factory=list)  # [application] SwitchHead's (value, output) router scores
    z_losses: list = field(default_factory=list)  # [application] router z-loss over running tokens (ea_z_loss_coef)
    step_rope: dict = field(default_factory=dict)  # layer -> depth attention's RoPE cos, sin (1, steps, H), all steps
    embed: torch.Tensor | None = None  # (B, T, D) the embedding, for input injection
    exit_kl: float | None = None  # per-token exit threshold (ours); None: every token runs every step
    exit_head: Callable | None = None  # x (B, T, D) -> logits (B, T, V): the model's norm + lm_head
    active: torch.Tensor | None = None  # (B, T) bool: tokens still recurring (exit)
    prev_logp: torch.Tensor | None = None  # (B*T, V) log-probs after the previous step (exit)
    depth: torch.Tensor | None = None  # (B, T) steps each token ran (exit)
    steps: int = 0  # recurrence steps this forward runs
    # Whether this forward records the analysis statistics (expert usage and load, diversity, state change): full
    # forwards do; cached ones (generation's prefill and decode steps) skip their ~25 ops per application, whose
    # results generation would drop.
    collect: bool = True
    embedding_entry_grad: bool = False  # truncated backprop: the embedding's depth-memory entry keeps its gradient


EXIT_BLOCK = 512  # tokens per block of the per-token exit check's log-softmax (bounds its (n, V) temporaries)
STACKED_MAX_TOKENS = 128  # depth attention over a stacked memory up to this many tokens without gradients


def step_row(table_RD: torch.Tensor, step: int) -> torch.Tensor:
    """Row `step` of a learned per-step table (R, D); steps past training (an inference `steps` override) reuse
    the last trained step's row."""
    return table_RD[min(step, table_RD.shape[0] - 1)]


def _times(linear: nn.Module, e: torch.Tensor) -> torch.Tensor:
    """W e of a bias-free projection: its weight times e, or, for a quantized one (no `weight`), the module on e. (A
    Linear is not called on e: a row of a parameter made under no_grad trips module hooks as an input.)"""
    return linear.weight.to(e.dtype) @ e if isinstance(linear, nn.Linear) else linear(e[None])[0]


class DepthAttention(nn.Module):
    """Attention of each token over its own states at earlier steps: multi-head, q/k norm, and the step encoded by
    RoPE over the step index (default) or by a learned per-step embedding (`da_step_encoding`)."""

    def __init__(self, config) -> None:
        super().__init__()
        D, N, H = config.hidden_size, config.da_num_heads, config.da_head_dim
        self.num_heads, self.head_dim, self.encoding = N, H, config.da_step_encoding
        self.q_proj = nn.Linear(D, N * H, bias=False)
        self.k_proj = nn.Linear(D, N * H, bias=False)
        self.v_proj = nn.Linear(D, N * H, bias=False)
        self.o_proj = nn.Linear(N * H, D, bias=False)
        self.q_norm = RMSNorm(H, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(H, config.rms_norm_eps) if config.qk_norm else None
        if self.encoding == "rope":
            rope = SimpleNamespace(head_dim=H, rope_theta=config.da_rope_theta, rope_scaling=None,
                                   max_position_embeddings=config.num_recurrences)
            self.rotary_emb = RotaryEmbedding(rope)  # angles by recurrence step, not by position
        else:  # (R, D), learned from zero, added to the normed state every projection reads
            self.step_embed = nn.Parameter(torch.zeros(config.num_recurrences, D))

    def step_table(self, steps: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos, sin (1, steps, H) of steps 0..steps - 1, in one call (a forward's: a decode step is op-bound)."""
        return self.rotary_emb(torch.arange(steps, device=device)[None], dtype)

    def step_encoding(self, step: int, dtype: torch.dtype, device, table: tuple | None = None):
        """What step `step` is encoded with: RoPE's cos, sin (1, 1, H), sliced from `table` (a `step_table` that
        covers the step) or computed, or the step itself, whose learned row the projections add (not the row: a
        view of a parameter made under no_grad trips module hooks as an input)."""
        if self.encoding != "rope":
            return step
        if table is None or table[0].shape[1] <= step:
            table = self.step_table(step + 1, dtype, device)
        cos, sin = table
        return cos[:, step:step + 1], sin[:, step:step + 1]

    def _project(self, x_BTD: torch.Tensor, norm: RMSNorm | None, enc, *linears: nn.Linear) -> tuple[torch.Tensor, ...]:
        """linear(norm(x)) for each projection; with learned encodings linear(norm(x) + e_step), as W e_step added."""
        ys = normed_linear(x_BTD, norm, *linears)
        if self.encoding == "learned":  # one matrix-vector product per step, not per token (as the router's encoding)
            e = step_row(self.step_embed, enc).to(ys[0].dtype)  # (D,)
            ys = tuple(y + _times(linear, e).to(y.dtype) for y, linear in zip(ys, linears))
        return ys

    def _heads(self, y: torch.Tensor, norm: RMSNorm | None, enc) -> torch.Tensor:
        """A projection (B, T, N * H) as heads (B, T, N, H), q/k-normed and, with RoPE, rotated by the step's angle."""
        B, T, _ = y.shape
        y = y.view(B, T, self.num_heads, self.head_dim)
        if norm is not None:
            y = norm(y)
        return apply_rope(y, *enc) if self.encoding == "rope" else y

    def project_kv(self, x_BTD: torch.Tensor, norm: RMSNorm | None, enc) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the state x (before the layer's `norm`; None: normed already) at the step `enc` encodes
        (`step_encoding`), (B, T, N, H) each."""
        B, T, _ = x_BTD.shape
        k, v = self._project(x_BTD, norm, enc, self.k_proj, self.v_proj)
        return self._heads(k, self.k_norm, enc), v.view(B, T, self.num_heads, -1)

    def forward(self, x_BTD: torch.Tensor, norm: RMSNorm | None, enc, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
        """Queries from the state x (before the layer's `norm`; None: normed already) at the step `enc` encodes; keys
        and values: the memory's L entries, (B, T, N, H) each, every one visible. Each token attends over its own
        L <= R entries with elementwise products, not a batched attention kernel: per entry (on a CPU, 2x faster
        than SDPA over a stacked memory, forward and backward, and nothing stacked is saved for backward), or,
        for a few tokens without gradients (a decode step), over the memory stacked (B, T, N, L, H): ~10 ops
        where the per-entry products take ~7 L (3x faster in a B = 1 decode step on a CPU; past ~128 tokens
        the stacking copies cost more than the ops they save)."""
        B, T, _ = x_BTD.shape
        q = self._heads(*self._project(x_BTD, norm, enc, self.q_proj), self.q_norm, enc)  # (B, T, N, H)
        q32 = q.float() * self.head_dim**-0.5  # products, softmax and sum in float32, as SDPA accumulates
        if B * T <= STACKED_MAX_TOKENS and not needs_grad(q, *keys, *values):
            scores = (q32[..., None, :] * torch.stack(keys, -2).float()).sum(-1)  # (B, T, N, L)
            p = torch.softmax(scores, dim=-1)
            y = (p[..., None] * torch.stack(values, -2).float()).sum(-2)  # (B, T, N, H)
        else:
            scores = torch.stack([(q32 * k.float()).sum(-1) for k in keys], -1)  # (B, T, N, L)
            p = torch.softmax(scores, dim=-1)
            y = p[..., 0, None] * values[0].float()
            for j in range(1, len(values)):
                y = y + p[..., j, None] * values[j].float()  # (B, T, N, H)
        return self.o_proj(y.to(q.dtype).reshape(B, T, self.num_heads * self.head_dim))  # (B, T, D)


class ExpertAttention(nn.Module):
    """Sparse expert attention: a query from the normed state plus a depth-step encoding scores E learned expert
    keys; the top-k experts are chosen on logits + balancing bias, gated by their sigmoid scores (renormalized
    to sum to 1 with `norm_topk_prob`) and run as fine-grained SwiGLU (or GELU: `expert_act`) experts, grouped by
    expert."""

    def __init__(self, config) -> None:
        super().__init__()
        D, E = config.hidden_size, config.num_experts
        self.top_k, self.norm_topk_prob, self.encoding = config.num_experts_per_tok, config.norm_topk_prob, \
            config.ea_depth_encoding
        self.expert_keys = nn.Parameter(torch.randn(E, D) / D**0.5)  # (E, D): unit-variance scores at init
        if self.encoding == "learned":
            self.step_embed = nn.Parameter(torch.zeros(config.num_recurrences, D))  # (R, D), learned from zero
        elif self.encoding == "rope":
            self.rotary_emb = RotaryEmbedding(SimpleNamespace(head_dim=D, rope_theta=config.da_rope_theta,
                                                              rope_scaling=None,
                                                              max_position_embeddings=config.num_recurrences))
        # Balancing bias: selection only, no gradient; the trainer hook moves it toward uniform load in small
        # steps (gamma 1e-3: below a bfloat16 ulp at 1), so it stays float32 in any model dtype, on disk too.
        self.register_buffer("expert_bias", torch.zeros(E))  # (E,) float32, saved with the weights
        self.experts = Experts(E, D, config.moe_intermediate_size, grouped=True, act=config.expert_act)

    float32_buffers = ("expert_bias",)
    _apply = apply_keeping_float32

    def route(self, h_ND: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (N, E), chosen experts (N, K) and their gates (N, K). The scores are computed in float32 whatever
        the model's dtype or autocast (D x E a token, next to the experts' 3 D F K): in bfloat16 their rounding
        changed the top-k set of ~1.6% of tokens at dreamer-bench's shapes."""
        with torch.autocast(h_ND.device.type, enabled=False):
            q, keys, bias = h_ND.float(), self.expert_keys.float(), None
            if self.encoding == "learned":  # steps past training reuse the last step's encoding
                # (h + e) @ keys^T as h @ keys^T + keys @ e: the matmul keeps h (the experts keep it too), not h + e
                bias = keys @ step_row(self.step_embed, step).float()  # (E,)
            elif self.encoding == "rope":
                cos, sin = self.rotary_emb(torch.full((1,), step, device=q.device), q.dtype)  # (1, D)
                q = apply_rope(q[:, None], cos, sin)[:, 0]
            scores = F.linear(q, keys, bias)  # (N, E) float32
        idx = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices  # (N, K) on biased logits
        chosen = scores.gather(1, idx)  # (N, K) unbiased logits of the chosen
        # renormalized sigmoid scores, sigma_i / sum_j sigma_j, as a softmax of log-sigmoids: equal, and finite where
        # every chosen score is below ~-87 (each sigmoid 0 in float32: 0 / 0, then NaN through the whole sequence)
        gates = torch.softmax(F.logsigmoid(chosen), -1) if self.norm_topk_prob else torch.sigmoid(chosen)
        return scores, idx, gates.to(h_ND.dtype)

    def forward(self, h_ND: torch.Tensor, step: int,
                traced_decode: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, idx, gates = self.route(h_ND, step)
        return self.experts(h_ND, idx, gates, traced_decode), idx, scores  # (N, D), (N, K), (N, E)


def rename_old_sandwich_norms(state: dict) -> dict:
    """Checkpoints written before 2026-12-03 name a layer's sandwich post-norms post_sublayer_norms.0 / .1 / .2
    (SA, DA, FFN; .1 was made, never trained, without separate DA): rename them sa / da / ffn, dropping .1 where
    the layer has no depth attention. In place; returns `state` (the model spec's `state_from_hf`)."""
    for key in [k for k in state if k.startswith("post_sublayer_norms.") or ".post_sublayer_norms." in k]:
        prefix, _, rest = key.partition("post_sublayer_norms.")
        index, _, leaf = rest.partition(".")
        if index not in ("0", "1", "2"):
            continue
        weight = state.pop(key)
        part = ("sa", "da", "ffn")[int(index)]
        if part != "da" or any(k.startswith(f"{prefix}depth_attn.") for k in state):
            state[f"{prefix}post_sublayer_norms.{part}.{leaf}"] = weight
    return state


def _rename_old_sandwich_norms(state: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of a DreamerLayer: old post-norm names (`rename_old_sandwich_norms`)."""
    rename_old_sandwich_norms(state)


class DreamerLayer(nn.Module):
    """One layer of the shared group (layer `index` of `layers_per_group`); applied once per recurrence step,
    with KV-cache slot = step * layers_per_group + index."""

    def __init__(self, config, index: int) -> None:
        super().__init__()
        self.config, self.index = config, index
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = switchhead_attention(config) if config.attn_num_experts else Attention(config)
        if config.da_mode == "separate":
            self.depth_layernorm = RMSNorm(D, eps)
            self.depth_attn = DepthAttention(config)
        self.post_attention_layernorm = RMSNorm(D, eps)
        if config.num_experts:
            self.mlp = ExpertAttention(config)
        else:
            self.mlp = SwiGLU(D, config.intermediate_size)
        if config.sa_step_encoding:  # (R, D), learned from zero: which step sequence attention runs at
            self.sa_step_embed = nn.Parameter(torch.zeros(config.num_recurrences, D))
        parts = ("sa", "da", "ffn") if config.da_mode == "separate" else ("sa", "ffn")  # every one runs (DDP)
        if config.sandwich_norm:  # post-norm on each sub-block's output (Huginn-style), optional
            self.post_sublayer_norms = nn.ModuleDict({part: RMSNorm(D, eps) for part in parts})
        if config.sub_block_gate is not None:  # a learned scalar on each sub-block's output, optional
            self.sub_block_gates = nn.ParameterDict(
                {part: nn.Parameter(torch.full((1,), float(config.sub_block_gate))) for part in parts})
        self._register_load_state_dict_pre_hook(_rename_old_sandwich_norms)  # checkpoints before 2026-12-03

    def _out(self, part: str, y: torch.Tensor) -> torch.Tensor:
        """A sub-block's output as it joins the residual stream: its sandwich norm, then its gate (when on)."""
        if self.config.sandwich_norm:
            y = self.post_sublayer_norms[part](y)
        if self.config.sub_block_gate is not None:
            y = y * self.sub_block_gates[part].to(y.dtype)
        return y

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext, slot: int) -> torch.Tensor:
        st: DepthState = ctx.model_state
        step = slot // self.config.layers_per_group
        x_in = x_BTD
        if self.config.input_injection and self.index == 0:  # re-add the embedding at every later step
            if step == 0:
                st.embed = x_in
            else:
                x_BTD = x_BTD + st.embed
        da = self.config.da_mode
        if da == "separate":  # the state entering this step joins the token's depth memory
            depth = self.depth_attn
            # every step's angles, once a forward: made at step 0 even when there (activation checkpointing's
            # recomputation finds the forward's table; skipping it there traced another graph than the forward's)
            if depth.encoding == "rope" and (step == 0 or self.index not in st.step_rope):
                st.step_rope[self.index] = depth.step_table(st.steps, x_BTD.dtype, x_BTD.device)
            enc = depth.step_encoding(step, x_BTD.dtype, x_BTD.device, st.step_rope.get(self.index))
            # truncated backprop: the embedding's entry keeps its gradient, the embedding's path to the trained steps
            keep = st.embedding_entry_grad and step == 0 and self.index == 0
            with torch.enable_grad() if keep else contextlib.nullcontext():
                k, v = self._recompute(ctx, lambda x: self.depth_attn.project_kv(x, self.depth_layernorm, enc), x_BTD)
            _remember(st, self.index, step, k, v)  # (B, T, N_da, H_da) each
        h = self.input_layernorm(x_BTD)
        if self.config.sa_step_encoding:
            h = h + step_row(self.sa_step_embed, step).to(h.dtype)
        if ctx.training and self.config.attn_num_experts and self.config.attn_entropy_coef:
            # the regularizer's scores, recomputed from the same input (the routers' matmuls once more, in training)
            attn = self.self_attn
            st.attn_sel_logits.append((attn.v_proj.scores(h), attn.o_proj.scores(h)))  # (B, T, G, E), (B, T, N, E)
            n = h.shape[0] * h.shape[1]
            ctx.ledger.add(slot, "router", executed=n * switchhead_router_flops(self.config), ideal=0)
        if da == "merged_softmax":
            sa = self._out("sa", merged_attention(self.self_attn, h, ctx, slot, st, self.index, step))
        else:
            sa = self._out("sa", self.self_attn(h, ctx, slot, ideal_q_BT=st.active))
        if da == "separate":  # sequential (default) or parallel to SA, from the same input
            x_sa = x_BTD + sa
            da_in = x_BTD if self.config.da_parallel else x_sa
            x_BTD = x_sa + self._out("da", self._depth(da_in, ctx, slot, st, step, enc))
        else:
            x_BTD = x_BTD + sa
        x_BTD = x_BTD + self._out("ffn", self._ffn(self.post_attention_layernorm(x_BTD), ctx, slot, step))
        if st.active is not None:  # exited tokens keep their state (they still wrote K/V above)
            x_BTD = torch.where(st.active[..., None], x_BTD, x_in)
        if not ctx.training and st.collect:  # an analysis statistic (eval/dreamer.py): training skips its 3 passes
            self._record_change(st, ctx, slot, x_in, x_BTD)
        if st.exit_kl is not None and self.index == self.config.layers_per_group - 1:
            self._exit_check(st, ctx, slot, step, x_BTD)
        return x_BTD

    def _recompute(self, ctx: ForwardContext, fn: Callable, *args: torch.Tensor):
        """fn(*args); in training with `da_recompute`, its activations are recomputed in backward, not saved (only
        the tensor arguments are kept). `fn` must be pure: it runs again, identically, in backward."""
        if self.config.da_recompute and ctx.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)  # nothing random in fn
        return fn(*args)

    def _depth(self, x_BTD: torch.Tensor, ctx: ForwardContext, slot: int, st: DepthState, step: int,
               enc) -> torch.Tensor:
        """Depth attention of the state `x_BTD` (before `depth_layernorm`) over the token's memory, (B, T, D)."""
        keys, values = st.mem_k[self.index][:step + 1], st.mem_v[self.index][:step + 1]
        L = len(keys)

        def attend(x: torch.Tensor, *memory: torch.Tensor) -> torch.Tensor:
            ks, vs = list(memory[:L]), list(memory[L:])
            if self.config.da_include_self:  # the query state itself as one more entry (k/v not remembered)
                k, v = self.depth_attn.project_kv(x, self.depth_layernorm, enc)
                ks, vs = ks + [k], vs + [v]
            return self.depth_attn(x, self.depth_layernorm, enc, ks, vs)

        y = self._recompute(ctx, attend, x_BTD, *keys, *values)
        if ctx.ledger.enabled:
            B, T, _ = x_BTD.shape
            per_token, n = depth_attn_flops(self.config, step), _ideal_tokens(ctx, st)
            ctx.ledger.add(slot, "depth_attn", executed=B * T * per_token, ideal=n * per_token, tokens=n)
        return y

    def _ffn(self, h_BTD: torch.Tensor, ctx: ForwardContext, slot: int, step: int) -> torch.Tensor:
        """The FFN slot: sparse expert attention (with its statistics), or the dense SwiGLU."""
        B, T, D = h_BTD.shape
        st: DepthState = ctx.model_state
        if ctx.ledger.enabled:
            per_token, n = expert_attn_flops(self.config), _ideal_tokens(ctx, st)
            executed, part = per_token, "experts" if self.config.num_experts else "mlp"
            if self.config.num_experts:  # all E experts, not K, on a traced step's every-expert path
                K = self.config.num_experts_per_tok
                run = self.mlp.experts.experts_per_token(h_BTD.reshape(B * T, D), K, ctx.traced_decode)
                executed += (run - K) * expert_flops(self.config)
            ctx.ledger.add(slot, part, executed=B * T * executed, ideal=n * per_token, tokens=n)
        if not self.config.num_experts:
            return self.mlp(h_BTD)
        y, idx_NK, scores_NE = self.mlp(h_BTD.reshape(B * T, D), step, ctx.traced_decode)
        run_N = _running(ctx, st).reshape(-1)  # (B*T,) valid tokens that are still recurring
        E = self.config.num_experts
        if st.collect:
            counts = torch.zeros(E, device=y.device).index_add_(0, idx_NK.reshape(-1), run_N.float().repeat_interleave(
                idx_NK.shape[1]))  # (E,)
            st.usage[slot] = counts
            hit = torch.zeros(B * T, E, dtype=torch.bool, device=y.device).scatter_(1, idx_NK, True)  # (B*T, E)
            new, seen = hit & run_N[:, None], st.visited.get(self.index)
            st.visited[self.index] = new if seen is None else seen | new
            if not ctx.training:  # the chosen set of each running token, -1 for the others (diversity, definition b)
                st.set_ids[slot] = idx_NK.sort(-1).values.masked_fill(~run_N[:, None], -1)  # (B*T, K)
        if ctx.training and self.config.ea_entropy_coef:
            st.sel_logits.append(scores_NE.view(B, T, E))
        if ctx.training and self.config.ea_z_loss_coef:  # mean over running tokens of logsumexp(scores)^2
            z_N = torch.logsumexp(scores_NE, dim=-1).square()
            st.z_losses.append((z_N * run_N).sum() / run_N.sum().clamp(min=1))
        if ctx.training and self.config.ea_aux_loss_coef:
            probs = torch.softmax(F.logsigmoid(scores_NE), -1)  # normalized sigmoid scores (finite: see `route`)
            st.aux.append(router_stats(probs, idx_NK, run_N))
        return y.view(B, T, D)

    def _exit_check(self, st: DepthState, ctx: ForwardContext, slot: int, step: int, x_BTD: torch.Tensor) -> None:
        """Per-token exit (ours): after each step, a running token whose next-token distribution moved less than
        `exit_kl` (KL(p_step || p_step-1), nats) since the previous step stops recurring."""
        st.depth = st.depth + st.active
        if step == st.steps - 1:  # no step left to skip
            return
        B, T, _ = x_BTD.shape
        if ctx.ledger.enabled:
            per_token = lm_head_flops(self.config)
            ctx.ledger.add(slot, "exit", executed=B * T * per_token, ideal=_running(ctx, st).sum() * per_token)
        with torch.no_grad():  # block by block: the temporaries are (EXIT_BLOCK, V), the one (B*T, V) is prev_logp
            x_ND = x_BTD.reshape(B * T, -1)
            first, kl_N = st.prev_logp is None, x_BTD.new_zeros(B * T, dtype=torch.float32)
            for start in range(0, B * T, EXIT_BLOCK):
                rows = slice(start, start + EXIT_BLOCK)
                logp = F.log_softmax(st.exit_head(x_ND[rows]).float(), dim=-1)  # (n, V)
                if first and start == 0:
                    st.prev_logp = logp.new_empty(B * T, logp.shape[-1])  # (B*T, V) log-probs after this step
                elif not first:
                    kl_N[rows] = (logp.exp() * (logp - st.prev_logp[rows])).sum(-1)
                st.prev_logp[rows] = logp
            if not first:
                st.active = st.active & ~(kl_N.view(B, T) < st.exit_kl)

    def _record_change(self, st: DepthState, ctx: ForwardContext, slot: int, x_in, x_out) -> None:
        with torch.no_grad():
            rel = (x_out - x_in).float().norm(dim=-1) / x_in.float().norm(dim=-1).clamp(min=1e-6)  # (B, T)
            valid = ctx.valid_or_all
            st.change[slot] = (rel * valid).sum() / valid.sum().clamp(min=1)


def _running(ctx: ForwardContext, st: DepthState) -> torch.Tensor:
    """(B, T) bool: valid tokens that run this step (all valid ones unless per-token exit froze some)."""
    return ctx.valid_or_all if st.active is None else ctx.valid_or_all & st.active


def _ideal_tokens(ctx: ForwardContext, st: DepthState):
    if ctx.valid is None and st.active is None:
        return ctx.positions.numel()
    return _running(ctx, st).sum()


def merged_attention(attn: Attention, h_BTD: torch.Tensor, ctx: ForwardContext, slot: int, st: DepthState,
                     index: int, step: int) -> torch.Tensor:
    """`da_mode="merged_softmax"`: one softmax over this step's sequence keys (causal) and the token's own SA
    keys of the earlier steps (depth keys), with SA's projections. The scores are materialised (B, N, T, S + L):
    an ablation for small scales, not a fast path. Records its FLOPs (every pair it computes) in the ledger."""
    B, T, _ = h_BTD.shape
    N, G, H = attn.num_heads, attn.num_kv_heads, attn.head_dim
    k, v = attn.project_kv(h_BTD, ctx.cos, ctx.sin)  # (B, T, G, H)
    if ctx.cache is not None:
        k_all, v_all, k_valid = ctx.cache.update(slot, k, v, ctx.positions, ctx.valid, ctx.cache_source)
        S = k_all.shape[2]
        mask = causal_mask(ctx.positions, torch.arange(S, device=k.device).expand(B, S), k_valid, ctx.valid)
    else:
        k_all, v_all, S = k.transpose(1, 2), v.transpose(1, 2), T  # (B, G, T, H)
        mask = ctx.attn_mask if ctx.attn_mask is not None else causal_mask(
            ctx.positions, ctx.positions, ctx.valid, ctx.valid, ctx.doc_ids)
    mem_k, mem_v = st.mem_k[index][:step], st.mem_v[index][:step]  # the token's SA K/V at earlier steps
    L = len(mem_k)
    q = attn.project_q(h_BTD, ctx.cos, ctx.sin)  # (B, T, N, H)
    rep = N // G
    scores = torch.matmul(q.transpose(1, 2), k_all.repeat_interleave(rep, 1).transpose(-1, -2))  # (B, N, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    if L:  # per token: (1, H) @ (H, L) with the token's own depth keys
        dk = torch.stack(mem_k, 2).repeat_interleave(rep, 3).permute(0, 3, 1, 4, 2)  # (B, N, T, H, L)
        depth = torch.matmul(q.transpose(1, 2)[..., None, :], dk)[..., 0, :]  # (B, N, T, L)
        scores = torch.cat([scores, depth], -1)  # (B, N, T, S + L)
    p = torch.softmax(scores.float() / H**0.5, dim=-1).to(q.dtype)
    y = torch.matmul(p[..., :S], v_all.repeat_interleave(rep, 1))  # (B, N, T, H)
    if L:
        dv = torch.stack(mem_v, 2).repeat_interleave(rep, 3).permute(0, 3, 1, 2, 4)  # (B, N, T, L, H)
        y = y + torch.matmul(p[..., S:, None].transpose(-1, -2), dv)[..., 0, :]  # (B, N, T, H)
    _remember(st, index, step, k, v)
    if ctx.ledger.enabled:
        n_q = B * T if ctx.valid is None and st.active is None else _running(ctx, st).sum()
        visible = (mask[:, 0] & _running(ctx, st)[..., None]).sum()
        n_kv = B * T if ctx.valid is None else ctx.valid.sum()
        per_pair = 4 * N * H
        executed = B * T * (attn.flops_per_query + attn.flops_per_kv) + B * T * (S + L) * per_pair
        ctx.ledger.add(slot, "attn", executed=executed,
                       ideal=n_q * attn.flops_per_query + n_kv * attn.flops_per_kv + (visible + n_q * L) * per_pair,
                       tokens=n_q)
    return attn.project_out(y.transpose(1, 2).reshape(B, T, N * H), h_BTD)  # (B, T, D)


def _remember(st: DepthState, index: int, step: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Depth-memory entry `step` of layer `index`. Indexed by step, never by list length, so recomputing a layer
    call (activation checkpointing) reads the same earlier entries."""
    mem_k, mem_v = st.mem_k[index], st.mem_v[index]
    if len(mem_k) > step:
        mem_k[step], mem_v[step] = k, v
    else:
        mem_k.append(k)
        mem_v.append(v)
