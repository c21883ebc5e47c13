"""Analytic FLOPs of what actually ran, from a ModelConfig alone.

Shape legend: D hidden_size, N query heads, G kv heads, H head_dim, F intermediate size, E experts,
K experts per token, V vocab, T tokens, B batch.

Conventions (what counts):
- One multiply-add is 2 FLOPs: a matmul (n, a) @ (a, b) costs 2*n*a*b.
- Counted: the linear projections q_proj (D -> N*H), k_proj and v_proj (D -> G*H each), o_proj
  (N*H -> D); the attention scores QK^T and the weighted sum AV, 2*N*H FLOPs each per (query, key) pair
  actually attended (causal: a query at position p with c cached keys sees c + p + 1 keys; no credit is
  taken for masked pairs a dense kernel computes anyway); the dense SwiGLU MLP (gate, up, down:
  3 matmuls D*F); a MoE MLP's router (D -> E) plus the K experts a token runs (3 matmuls D*F_moe each);
  lm_head (D -> V) per token whose logits are computed; method gates (`gate_flops`).
- Not counted: norms (RMSNorm, q/k norms), RoPE, softmax, SiLU and elementwise products, biases,
  residual adds, the embedding lookup, gathers/scatters, MoE top-k selection and expert weighting, gate
  sigmoids and the mean that turns a gate into a score. These are O(D) per token, small next to the
  O(D^2) matmuls, and their real cost is memory traffic, which a FLOP count does not capture.

Counts can be Python ints or tensors (per-call counts of kept tokens): the functions only use
arithmetic, so the per-forward `ComputeLedger` (core/accounting.py) accumulates them without a host sync.
Whole-model counts follow the model's layer-application schedule (`layers`: the layer index of each
application), so a layer applied R times (depth recurrence) counts R times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from dyndepth.config import ModelConfig

if TYPE_CHECKING:
    import torch

Count = Union[int, float, "torch.Tensor"]  # tensors work too: everything here is plain arithmetic

BRANCHES = ("attn", "mlp")
GATE_KINDS = ("vector", "scalar")


def q_o_flops(config: ModelConfig) -> int:
    """Per query token: q_proj (D -> N*H) plus o_proj (N*H -> D). SwitchHead attention (`attn_num_experts` E
    > 0, models/switchhead.py): the output router (D -> N*E) plus K output experts per head (H -> D each)."""
    D, N, H = config.hidden_size, config.num_attention_heads, config.head_dim
    E = getattr(config, "attn_num_experts", 0)
    if E:
        return 2 * D * N * H + 2 * D * N * E + config.attn_experts_per_tok * 2 * N * H * D
    return 2 * D * N * H + 2 * N * H * D


def kv_flops(config: ModelConfig) -> int:
    """Per token that provides keys/values: k_proj and v_proj (D -> G*H each). SwitchHead: k_proj, the value
    router (D -> G*E) and K value experts per kv head (D -> H each)."""
    D, G, H = config.hidden_size, config.num_key_value_heads, config.head_dim
    E = getattr(config, "attn_num_experts", 0)
    if E:
        return 2 * D * G * H + 2 * D * G * E + config.attn_experts_per_tok * 2 * D * G * H
    return 2 * (2 * D * G * H)


def switchhead_router_flops(config) -> int:
    """Per token, SwitchHead's value and output routers (D -> (G + N) * E) once more: the training-only recomputation
    that feeds MoEUT's entropy regularizer (models/dreamer_layer.py)."""
    D, G, N = config.hidden_size, config.num_key_value_heads, config.num_attention_heads
    return 2 * D * (G + N) * config.attn_num_experts


def attn_score_flops(config: ModelConfig, attended_keys: Count) -> Count:
    """QK^T plus AV for `attended_keys` (query, key) pairs in total: 2 * 2 * N * H per pair."""
    return 4 * config.num_attention_heads * config.head_dim * attended_keys


def mlp_flops(config: ModelConfig, layer: int) -> int:
    """Per token through layer `layer`'s MLP: dense SwiGLU, or MoE router plus K experts."""
    D = config.hidden_size
    if config.is_moe_layer(layer):
        return moe_flops(config)
    return 3 * (2 * D * config.intermediate_size)


def lm_head_flops(config: ModelConfig) -> int:
    """Per token whose logits are computed: D -> V (tied or not, the matmul is the same)."""
    return 2 * config.hidden_size * config.vocab_size


def gate_flops(config: ModelConfig, kind: str = "vector") -> int:
    """Per token per gated branch: a vector gate Linear(D -> D) or a scalar gate / router Linear(D -> 1).

    Gates score every token, skipped ones included, so callers charge this for all tokens."""
    if kind not in GATE_KINDS:
        raise ValueError(f"gate kind {kind!r} is not supported; use one of {GATE_KINDS}.")
    D = config.hidden_size
    return 2 * D * D if kind == "vector" else 2 * D


def causal_attended_keys(T: Count, context: Count = 0) -> Count:
    """Sum over T new queries of the keys each sees, after `context` cached keys: T*context + T(T+1)/2."""
    return T * context + T * (T + 1) // 2


def branch_flops(config: ModelConfig, layer: int, branch: str, n_query_tokens: Count,
                 n_kv_tokens: Count | None = None, attended_keys: Count | None = None) -> Count:
    """FLOPs of one branch of one layer application.

    attn: `n_query_tokens` run q_proj/o_proj; `n_kv_tokens` (default: the same) run k_proj/v_proj;
      `attended_keys` is the total number of (query, key) pairs attended (see `causal_attended_keys`).
      GateSkip: kept tokens are queries, every token provides K/V, pairs = sum over kept queries of
      their visible keys. MoD / DND nested pass: the chosen tokens are both queries and keys.
    mlp: `n_query_tokens` run the MLP (`n_kv_tokens` and `attended_keys` must be left out).
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch {branch!r} is not supported; use one of {BRANCHES}.")
    if branch == "mlp":
        if n_kv_tokens is not None or attended_keys is not None:
            raise ValueError("the mlp branch has no keys: leave n_kv_tokens and attended_keys out.")
        return n_query_tokens * mlp_flops(config, layer)
    if attended_keys is None:
        raise ValueError("the attn branch needs attended_keys (total (query, key) pairs); "
                         "see causal_attended_keys.")
    n_kv = n_query_tokens if n_kv_tokens is None else n_kv_tokens
    return (n_query_tokens * q_o_flops(config) + n_kv * kv_flops(config)
            + attn_score_flops(config, attended_keys))


def layer_flops(config: ModelConfig, layer: int, T: Count, context: Count = 0) -> Count:
    """One sequence of T new tokens through a plain layer (both branches), after `context` cached tokens."""
    attn = branch_flops(config, layer, "attn", T, T, causal_attended_keys(T, context))
    return attn + branch_flops(config, layer, "mlp", T)


def forward_flops(config: ModelConfig, T: int, B: int = 1, context: int | None = None,
                  lm_head: bool = True, layers: list[int] | None = None) -> int:
    """Plain model: B sequences of T new tokens each, after `context` cached tokens (None: 0).

    `lm_head=False` leaves out the logits (e.g. a prefill that only needs the last position's logits
    adds `lm_head_flops(config) * B` itself). `layers`: the layer index of every application in the
    model's schedule (default: each layer once, in order)."""
    if T < 0 or B < 0 or (context is not None and context < 0):
        raise ValueError(f"T, B and context must be non-negative, got T={T}, B={B}, context={context}.")
    c = 0 if context is None else context
    applied = range(config.num_hidden_layers) if layers is None else layers
    per_seq = sum(layer_flops(config, i, T, c) for i in applied)
    if lm_head:
        per_seq += T * lm_head_flops(config)
    return B * per_seq


def decode_flops(config: ModelConfig, context_len: int, B: int = 1, lm_head: bool = True) -> int:
    """One decode step: B sequences each add one token after `context_len` cached tokens."""
    return forward_flops(config, 1, B, context=context_len, lm_head=lm_head)


def ideal_speedup(dense_flops: Count, actual_flops: Count) -> float:
    """dense / actual: the speedup a method would get if time were proportional to FLOPs."""
    if float(actual_flops) <= 0:
        raise ValueError(f"actual_flops must be positive, got {actual_flops}.")
    return float(dense_flops) / float(actual_flops)


# ------------------------------------------------------------------ depth-recurrent models (Dreamer)
# A shared group of `layers_per_group` layers is applied at recurrence steps 0..R-1 (models/dreamer.py). Each
# application runs sequence attention (counted as above), depth attention over the token's own earlier states
# and sparse expert attention in the FFN slot. `config` is a DreamerConfig (the fields read are named there).


def depth_attn_flops(config, step: int) -> int:
    """Per token, depth attention at recurrence step `step` (0-based).

    separate: q/o of the query; k/v of the step's input state, which enters the token's depth memory (once);
      QK^T and AV over the step + 1 memory entries (inputs of steps 0..step), plus the query state itself
      with `da_include_self` (its k/v too).
    merged_softmax: no projections of its own; the SA query also scores the token's SA keys of the `step`
      earlier steps (4 * N * H per pair, SA's heads).
    none: 0.
    """
    if config.da_mode == "none":
        return 0
    if config.da_mode == "merged_softmax":
        return step * 4 * config.num_attention_heads * config.head_dim
    D, width = config.hidden_size, config.da_num_heads * config.da_head_dim
    own = 1 if config.da_include_self else 0
    projections = 2 * D * width * 2 + (1 + own) * 2 * D * width * 2  # q + o, then k + v per projected state
    return projections + (step + 1 + own) * 4 * width


EXPERT_MATRICES = {"swiglu": 3, "gelu": 2}  # D x F matrices per expert, by body: gate, up, down / up, down


def expert_flops(config) -> int:
    """Per (token, expert) pair: one expert's D x F matrices (SwiGLU's gate, up, down, or GELU's up, down)."""
    return EXPERT_MATRICES[getattr(config, "expert_act", "swiglu")] * 2 * config.hidden_size * \
        config.moe_intermediate_size


def moe_flops(config) -> int:
    """Per token through a sparse MLP: the router's scores against the E experts, then K experts."""
    return 2 * config.hidden_size * config.num_experts + config.num_experts_per_tok * expert_flops(config)


def expert_attn_flops(config) -> int:
    """Per token through the FFN slot: sparse expert attention (scores against the E expert keys, then K
    SwiGLU or GELU experts of width F), or the dense SwiGLU FFN when `num_experts` is 0. Learned step encodings
    (the router's, and depth attention's with `da_step_encoding="learned"`) add one matrix-vector product per
    step, not per token: left out here, as torch's FLOP counter leaves out `mv`."""
    if not config.num_experts:
        return 3 * 2 * config.hidden_size * config.intermediate_size
    return moe_flops(config)


def recurrent_step_flops(config, step: int, T: Count, context: Count = 0) -> Count:
    """One sequence of T new tokens through one layer application at recurrence step `step`, after
    `context` cached tokens: sequence attention, depth attention and the FFN slot."""
    sa = T * (q_o_flops(config) + kv_flops(config)) + attn_score_flops(config, causal_attended_keys(T, context))
    return sa + T * (depth_attn_flops(config, step) + expert_attn_flops(config))


def recurrent_forward_flops(config, T: int, B: int = 1, context: int | None = None, lm_head: bool = True,
                            steps: int | None = None) -> int:
    """A depth-recurrent model's plain forward (every token runs every step): B sequences of T new tokens
    after `context` cached ones, `steps` recurrences (default `config.num_recurrences`) of the group."""
    if T < 0 or B < 0 or (context is not None and context < 0):
        raise ValueError(f"T, B and context must be non-negative, got T={T}, B={B}, context={context}.")
    R = config.num_recurrences if steps is None else steps
    c = 0 if context is None else context
    per_seq = sum(config.layers_per_group * recurrent_step_flops(config, r, T, c) for r in range(R))
    if lm_head:
        per_seq += T * lm_head_flops(config)
    return B * per_seq


def adapter_flops(config) -> int:
    """Per token per recurrence step, Huginn's input injection: Linear(2D -> D) of [state, embedding]."""
    D = config.hidden_size
    return 2 * (2 * D) * D
