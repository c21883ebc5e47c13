"""dyndepth: token-adaptive depth for transformer language models."""

from dyndepth.config import PRESETS, ConfigError, ModelConfig, preset
from dyndepth.core.cache import KVCache
from dyndepth.interop.hf import from_pretrained
from dyndepth.interop.safetensors_io import CheckpointError
from dyndepth.models.qwen3 import CausalLM, DecoderOutput

__all__ = [
    "CausalLM", "CheckpointError", "ConfigError", "DecoderOutput", "KVCache", "ModelConfig", "PRESETS",
    "from_pretrained", "preset",
]
__version__ = "0.1.0"
