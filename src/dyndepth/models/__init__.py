"""Model families, registered by model_type (registry.py): the decoder (qwen3.py: Qwen3, Qwen3-MoE, Llama) and
Dreamer (dreamer.py: depth-recurrent attention mixtures)."""

from dyndepth.models import dreamer, qwen3  # noqa: F401  (registers qwen3 / qwen3_moe / llama, dreamer, presets)
from dyndepth.models.registry import MODELS, PRESETS, build_config, build_model, model_spec, preset

__all__ = ["MODELS", "PRESETS", "build_config", "build_model", "model_spec", "preset"]
