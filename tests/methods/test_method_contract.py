"""Every registered method implements the whole typed `Method` protocol, member by member, with the protocol's
parameters (a runtime-checkable Protocol only checks that the names exist)."""

import inspect

import pytest

from dyndepth import CausalLM, preset
from dyndepth.core.method import Method
from dyndepth.methods import attach_method
from dyndepth.methods.registry import METHODS

MEMBERS = [n for n, v in vars(Method).items() if inspect.isfunction(v) and not n.startswith("_")]


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_implements_the_protocol_with_its_signatures(name):
    options = {"layers": (0, 1)} if name == "dnd" else {}  # DND's default band needs a deeper model
    method = attach_method(CausalLM(preset("tiny-qwen3", num_hidden_layers=2)), name, options)
    assert isinstance(method, Method) and method.name == name and method.config is not None
    assert len(MEMBERS) >= 12
    for member in MEMBERS:
        want = list(inspect.signature(getattr(Method, member)).parameters)[1:]  # without self
        got = inspect.signature(getattr(method, member)).parameters
        kinds = {p.kind for p in got.values()}
        if inspect.Parameter.VAR_KEYWORD in kinds and want == ["knobs"]:
            continue
        assert list(got)[:len(want)] == want, (member, list(got), want)
