"""A model compiled and checkpointed as the trainer applies them (train.compile with train.activation_checkpointing:
the checkpoint wraps each compiled layer), with dynamo's graphs but no code generation (backend aot_eager: the
compiled graph's saved tensors, without inductor's compile time)."""

import contextlib

import torch

from dyndepth.train.parallel import apply_activation_checkpointing, apply_compile


@contextlib.contextmanager
def compiled_and_checkpointed(model, monkeypatch):
    """`model` with its layers compiled (aot_eager) and checkpointed, inside; dynamo's caches reset around it."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    try:
        apply_compile(model, checkpointed=True)
        apply_activation_checkpointing(model)
        yield model
    finally:
        torch._dynamo.reset()
