"""Moved to `dyndepth.safetensors_io` (a leaf module models and training share); kept for old imports."""

from dyndepth.safetensors_io import CheckpointError, read_safetensors, write_json, write_safetensors  # noqa: F401
