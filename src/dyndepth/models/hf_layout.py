"""How the decoder family (Qwen3, Qwen3-MoE, Qwen2, Llama, Mistral) is laid out in a HF checkpoint: config.json
fields and the per-expert weight keys.

Parameter names are HF's already, so the only reshaping is Qwen3-MoE's experts, which checkpoints store
per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`) and which we keep stacked
(`mlp.experts.gate_up_proj (E, 2F, D)`, `mlp.experts.down_proj (E, D, F)`, as transformers v5 does).
"""

from __future__ import annotations

import re

import torch

from dyndepth.config import (
    DENSE_UNBIASED_O_FAMILIES,
    QK_NORM_FAMILIES,
    QKV_BIAS_FAMILIES,
    SUPPORTED_MODEL_TYPES,
    ConfigError,
    ModelConfig,
)
from dyndepth.safetensors_io import CheckpointError

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_ALIASES = {"num_local_experts": "num_experts"}  # names some transformers versions write instead
# transformers' class defaults where ModelConfig's (Qwen3-0.6B's shape) differ, for the fields a config.json leaves out:
# Llama 1's names no num_key_value_heads (as many as the query heads), a Qwen3-MoE one may lack norm_topk_prob (False)
_HF_DEFAULTS = {
    "qwen3": {"hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768},
    "qwen3_moe": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24, "num_attention_heads": 32,
                  "num_key_value_heads": 4, "max_position_embeddings": 32768, "num_experts": 128,
                  "norm_topk_prob": False},
    "qwen2": {"hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "max_position_embeddings": 32768},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "bos_token_id": 1, "eos_token_id": 2},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
}


def config_from_hf(d: dict) -> ModelConfig:
    """ModelConfig from a config.json dict (transformers v4 or v5 layout)."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported architecture: model_type={model_type!r} (architectures={d.get('architectures')}); "
            f"dyndepth's decoder loads {list(SUPPORTED_MODEL_TYPES)}."
        )
    sliding = sliding_layers(d)
    if sliding:
        mistral = model_type == "mistral"
        window = d.get("sliding_window", 4096) if d.get("use_sliding_window") or mistral else None
        # (layer_types alone names sliding layers: it read "window None tokens", and transformers cannot run it either)
        size = f"window {window} tokens" if window is not None else "layer_types names them but sets no window"
        fix = ('sliding_window to null (Mistral 7B v0.3 and later ship so; a config.json without the key takes '
               'transformers\' default, 4096)') if mistral else \
            "use_sliding_window=false (and layer_types to full_attention)"
        reads = "sliding_window" if mistral else "use_sliding_window / max_window_layers / layer_types"
        raise ConfigError(
            f"sliding-window attention ({size}, on layers {sliding[0]}..{sliding[-1]} as transformers "
            f"reads {reads}) is not supported: dyndepth's attention is full. Use a checkpoint without sliding layers; "
            f"or, where every text stays within the window (full attention equals sliding attention there), set "
            f"{fix} in its config.json.")
    if d.get("quantization_config"):  # (packed or float8 weights and their scales: the tensors would not fit)
        method = d["quantization_config"].get("quant_method") if isinstance(d["quantization_config"], dict) else None
        raise ConfigError(f"quantized checkpoints are not supported (quantization_config: quant_method={method!r}); "
                          "load the unquantized checkpoint (e.g. Qwen/Qwen3-0.6B, not Qwen/Qwen3-0.6B-FP8).")
    rope = dict(d.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # (v4 names it "type", as transformers reads)
    scaling = d.get("rope_scaling") or (rope if rope_type != "default" else None)
    fields = {_ALIASES.get(k, k): v for k, v in d.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    defaults = dict(_HF_DEFAULTS[model_type])
    if model_type == "llama":
        defaults["num_key_value_heads"] = fields.get("num_attention_heads", defaults["num_attention_heads"])
    fields = {**defaults, **fields}
    fields["torch_dtype"] = d.get("dtype") or d.get("torch_dtype")
    return ModelConfig.from_dict({**fields, "rope_theta": theta, "rope_scaling": scaling})


def sliding_layers(d: dict) -> list[int]:
    """The layers a config.json's model runs with a sliding window, as transformers (5.x) reads it: none unless
    use_sliding_window (which sets the window, sliding_window, default 4096; without it transformers drops the window).
    Qwen3 slides layers i >= max_window_layers (default 28), or those layer_types names "sliding_attention";
    Qwen3-MoE slides every layer. A layer_types naming sliding layers without a window is listed too: transformers
    cannot run it (its cache takes a window of None)."""
    model_type, types = d.get("model_type"), d.get("layer_types")
    n = d.get("num_hidden_layers", _HF_DEFAULTS.get(model_type, {}).get("num_hidden_layers", 0))
    if model_type == "mistral":  # every layer slides unless sliding_window is null (its class default: 4096)
        return list(range(n)) if d.get("sliding_window", 4096) is not None else []
    named = [i for i, t in enumerate(types or []) if t == "sliding_attention"]
    if not d.get("use_sliding_window") or d.get("sliding_window", 4096) is None:
        return named
    if model_type == "qwen3_moe":
        return list(range(n))
    if model_type in ("qwen3", "qwen2"):
        return named if types is not None else list(range(d.get("max_window_layers", 28), n))
    return named  # (Llama has no sliding window)


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict:
    d = config.to_dict()
    # qk_norm, qkv_bias and a Qwen3 mlp_bias are ours (HF's Qwen3 always norms q / k, its Qwen2 and Llama never; only
    # Qwen2 has q / k / v biases alone, only Llama an MLP bias): written only where they differ from the family's, so
    # that such a model loads back (it has other tensors)
    if config.qk_norm == (config.model_type in QK_NORM_FAMILIES):
        d.pop("qk_norm")
    if config.model_type != "llama" and not config.mlp_bias:
        d.pop("mlp_bias")
    if config.qkv_bias == (config.model_type in QKV_BIAS_FAMILIES):  # (Qwen2's q / k / v biases: its layout's, no key)
        d.pop("qkv_bias")
    if config.model_type in DENSE_UNBIASED_O_FAMILIES:  # (always false there: ModelConfig refuses an o_proj bias)
        d.pop("attention_bias")
    if config.model_type == "mistral":  # full attention: transformers' Mistral slides 4096 tokens unless told null
        d["sliding_window"] = None
    if not config.num_experts and config.model_type != "qwen3_moe":  # (qwen3_moe's default is 128 experts)
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                  "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "output_router_logits"):
            d.pop(k)
    if d.get("output_router_logits", False) is not False:  # written only as false, transformers' default: its generate
        d.pop("output_router_logits")  # fails on true with an attention mask (lm-eval's hf backend decodes so); unset
        # and true both train the loss here (ModelConfig.output_router_logits), so a reload trains as before
    if config.model_type == "qwen3" and config.num_experts:  # HF's Qwen3 has no experts (it loaded dense MLPs,
        d["model_type"] = "qwen3_moe"  # reporting the experts unexpected): these layers are its Qwen3-MoE's
    dtype_name = str(dtype).removeprefix("torch.")
    d.update(architectures=[ARCHITECTURES[d["model_type"]]], torch_dtype=dtype_name, dtype=dtype_name)
    # v5 reads rope_parameters (v4 rope_theta / rope_scaling), its type under v5's name: a v4 {"type": "linear"} was
    # written as {"rope_type": "default", "type": "linear"}, unscaled rope to a reader of rope_parameters alone
    scaling = dict(config.rope_scaling or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    d["rope_parameters"] = {**scaling, "rope_type": rope_type, "rope_theta": config.rope_theta}
    return d


def stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert on-disk keys -> stacked `gate_up_proj (E, 2F, D)` and `down_proj (E, D, F)`."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for key, t in state.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            out[key] = t
        else:
            groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
    for prefix, experts in groups.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))) or any(len(experts[e]) != 3 for e in ids):
            raise CheckpointError(f"{prefix}: expert tensors are incomplete (experts {ids}).")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in ids])  # (E, 2F, D)
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in ids])  # (E, D, F)
    return out


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `stack_experts`: the per-expert layout real Qwen3-MoE checkpoints use."""
    out = {}
    for key, t in state.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key.removesuffix(".gate_up_proj")
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate
                out[f"{prefix}.{e}.up_proj.weight"] = up
        elif key.endswith(".mlp.experts.down_proj"):
            prefix = key.removesuffix(".down_proj")
            for e, w in enumerate(t):
                out[f"{prefix}.{e}.down_proj.weight"] = w
        else:
            out[key] = t
    return out
