"""Model families, registered by model_type (registry.py): the decoder (qwen3.py: Qwen3, Qwen3-MoE, Qwen2, Llama,
Mistral), Dreamer (dreamer.py: depth-recurrent attention mixtures) and the baselines matched against it: Huginn-style
(huginn.py), MoEUT presets (moeut.py: Dreamer configurations) and Mixture-of-Recursions (mor.py)."""

from dyndepth.models import dreamer, huginn, moeut, mor, qwen3  # noqa: F401  (registers every model_type and presets)
from dyndepth.models.registry import MODELS, PRESETS, build_config, build_model, model_spec, preset, preset_model

__all__ = ["MODELS", "PRESETS", "build_config", "build_model", "model_spec", "preset", "preset_model"]
