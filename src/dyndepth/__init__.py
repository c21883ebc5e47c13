"""dyndepth: token-adaptive depth for transformer language models."""

from dyndepth.config import ConfigError, ModelConfig
from dyndepth.core.cache import KVCache
from dyndepth.interop.hf import from_pretrained
from dyndepth.models import PRESETS, build_model, preset
from dyndepth.models.qwen3 import CausalLM, DecoderOutput, Trace
from dyndepth.safetensors_io import CheckpointError

__all__ = [
    "CausalLM", "CheckpointError", "ConfigError", "DecoderOutput", "KVCache", "ModelConfig", "PRESETS", "Trace",
    "build_model", "from_pretrained", "preset",
]
__version__ = "0.1.0"
