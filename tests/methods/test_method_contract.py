"""Every registered method implements the whole typed `Method` protocol, member by member, with the protocol's
parameters (a runtime-checkable Protocol only checks that the names exist)."""

import dataclasses
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


def test_recipe_values_are_checked_whether_or_not_annotations_are_strings():
    # make_config compared annotations with the strings "float", "int", ...: a method file without
    # `from __future__ import annotations` had its recipe values taken unchecked ("abc" for a float)
    from dyndepth.methods.common import make_config

    Plain = dataclasses.make_dataclass("Plain", [("threshold", float, 1.0), ("flag", bool, False)])  # real types
    assert dataclasses.fields(Plain)[0].type is float

    assert make_config(Plain, {"threshold": 2, "flag": 1}) == Plain(threshold=2.0, flag=True)
    with pytest.raises(ValueError, match=r"Plain.threshold='abc' must be a float"):
        make_config(Plain, {"threshold": "abc"})
