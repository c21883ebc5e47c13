import random

import numpy as np
import pytest
import torch

from dyndepth import ModelConfig, preset


@pytest.fixture(autouse=True)
def _isolate():
    """Seed everything, and restore the default dtype and any process group after each test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def tiny_config() -> ModelConfig:
    """2 layers, D=64, N=4, G=2, H=16, V=256 (STYLE.md section 6)."""
    return preset("tiny-qwen3")


@pytest.fixture
def tiny_moe_config() -> ModelConfig:
    return preset("tiny-qwen3-moe")
