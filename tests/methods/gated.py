"""A GateSkip model for tests: tiny, random, with gates spread so token importances clearly differ."""

import torch

from dyndepth import CausalLM, preset
from dyndepth.methods import GateSkipConfig, attach_gateskip


def gated_model(name="tiny-qwen3", eos=None, vocab=None, layers=None, **cfg):
    torch.manual_seed(0)
    overrides = {"eos_token_id": eos}
    if vocab is not None:
        overrides["vocab_size"] = vocab
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    model = CausalLM(preset(name, **overrides)).eval()
    method = attach_gateskip(model, GateSkipConfig(**cfg))
    with torch.no_grad():
        for layer in model.model.layers[:1] if method.cfg.shared else model.model.layers:
            for gate in (layer.gateskip.attn_gate, layer.gateskip.mlp_gate):
                gate.proj.weight.normal_(0, 0.5)
                gate.proj.bias.zero_()
    return model, method
