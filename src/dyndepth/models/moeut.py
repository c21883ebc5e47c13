"""MoEUT-style shared-layer MoE baseline, as a configuration of the Dreamer family (no code of its own).

Csordas et al. 2024, "MoEUT: Mixture-of-Experts Universal Transformers" (RobertCsordas/moeut). A MoEUT model is a
group of G = 2 distinct layers looped R / G times, each layer a pre-norm attention plus a sigma-MoE FFN: expert
scores are sigmoid(x . expert keys), the top-k experts are chosen on them and gated by the scores themselves (no
renormalisation), and an entropy regulariser on the mean softmax of the scores balances the experts. In dyndepth
that is `DreamerConfig` with depth attention off, no depth encoding in the router, no balancing bias and the
entropy regulariser on (`MOEUT`). SwitchHead attention experts (models/switchhead.py), MoEUT's attention, are the
fields `attn_num_experts` / `attn_experts_per_tok` (preset `moeut-switchhead-tiny`); without them the attention is the
standard one. What differs from the MoEUT code (SwiGLU experts instead of ReLU key-value experts, pre-norm instead
of peri-norm, RoPE on every channel) is listed in docs/baselines.md.
"""

from __future__ import annotations

from dyndepth.models.dreamer import DreamerConfig
from dyndepth.models.registry import register_model

# The fields that make a Dreamer config a MoEUT one (σ-MoE routing, G = 2 groups, entropy coefficient 0.01 as in
# the MoEUT code's FFN regulariser).
MOEUT = {"model_type": "dreamer", "da_mode": "none", "layers_per_group": 2, "norm_topk_prob": False,
         "ea_depth_encoding": "none", "ea_bias_update_rate": 0.0, "ea_entropy_coef": 0.01}


def moeut_config(**fields) -> DreamerConfig:
    """A MoEUT-style config: `MOEUT` plus the given width / depth / expert fields. `num_recurrences` counts loops of
    the group, so the model applies num_recurrences * layers_per_group layers."""
    clash = sorted(k for k in fields if k in MOEUT and fields[k] != MOEUT[k] and k != "layers_per_group")
    if clash:
        raise ValueError(f"moeut_config: {clash} define MoEUT; build a DreamerConfig directly to change them.")
    return DreamerConfig(**{**MOEUT, **fields})


def is_moeut(config) -> bool:
    return all(getattr(config, k, None) == v for k, v in MOEUT.items() if k != "layers_per_group")


PRESETS = {
    "moeut-tiny": {**MOEUT, "vocab_size": 264, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "head_dim": 32, "num_recurrences": 2, "num_experts": 16, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 96, "max_position_embeddings": 1024},
}
# MoEUT's own attention: SwitchHead with E = 4 experts per head, 2 per token (entropy coefficient 0.001).
PRESETS["moeut-switchhead-tiny"] = {**PRESETS["moeut-tiny"], "attn_num_experts": 4, "attn_experts_per_tok": 2}

register_model((), None, presets=PRESETS)  # presets only: model_type "dreamer" builds them
