"""Model families, registered by model_type (registry.py): the decoder (qwen3.py: Qwen3, Qwen3-MoE, Llama),
Dreamer (dreamer.py: depth-recurrent attention mixtures), the Huginn-style recurrent baseline (huginn.py) and
MoEUT presets (moeut.py: Dreamer configurations)."""

from dyndepth.models import dreamer, huginn, moeut, qwen3  # noqa: F401  (registers every model_type and its presets)
from dyndepth.models.registry import MODELS, PRESETS, build_config, build_model, model_spec, preset

__all__ = ["MODELS", "PRESETS", "build_config", "build_model", "model_spec", "preset"]
