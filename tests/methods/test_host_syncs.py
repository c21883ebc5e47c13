"""Host syncs of one cached decode step, per method: each one stalls a GPU's launch queue (the CPU waits for
every kernel launched so far), so a decode step's budget of them is pinned here. A new sync in a decode path
fails this test; if it is needed, raise the budget below and say why."""

import contextlib
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dyndepth
from dyndepth import CausalLM, KVCache, preset
from dyndepth.methods import DNDConfig, GateSkipConfig, MoDConfig, attach_dnd, attach_gateskip, attach_mod, calibrate

# ops that copy a device value to the host (item / int / bool), or whose output shape depends on values
SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
           "aten::unique_consecutive", "aten::unique_dim"}


class _Syncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNCING:
            self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def _decode_step_syncs(model, mode, B: int = 4, prompt: int = 8) -> Counter:
    ids = torch.randint(0, 200, (B, prompt))
    pos = torch.arange(prompt + 1).expand(B, -1)
    with torch.no_grad(), mode:
        cache = KVCache.for_model(model.config, B, prompt + 1, num_slots=model.num_slots())
        model(ids, positions=pos[:, :prompt], cache=cache)
        with _Syncs() as syncs:
            model(ids[:, -1:], positions=pos[:, prompt:], cache=cache)
    return syncs.ops


# Every forward: the boundary's check (`check_inputs`: the ids' range and the positions' largest, one (3,) tensor read
# as three ints, one sync).
BOUNDARY = Counter({"aten::_local_scalar_dense": 3})


def _plain():
    return CausalLM(preset("tiny-qwen3")).eval(), Counter(), contextlib.nullcontext()


def _gateskip():
    model = CausalLM(preset("tiny-qwen3")).eval()
    attach_gateskip(model, GateSkipConfig())
    calibrate(model, [torch.randint(0, 200, (4, 24))], budget=0.5)
    # the pool's two counts (begin), then each branch call's kept count: at 4 rows and q = 0.5 all of them may skip
    # (chance 1/16), so the count decides run / skip whole / mask (an 8-row step reads none: test_gateskip.py)
    layers = model.config.num_hidden_layers
    return model, Counter({"aten::_local_scalar_dense": 2 + 2 * layers}), model.method.decoding(budget=0.5)


def _mod():
    model = CausalLM(preset("tiny-qwen3")).eval()
    attach_mod(model, MoDConfig(capacity=0.5, every=2, offset=1))
    routed = sum(i % 2 == 1 for i in range(model.config.num_hidden_layers))
    return model, Counter({"aten::_local_scalar_dense": routed}), contextlib.nullcontext()  # longest kept row


def _mod_threshold():
    # the calibration's capacity is checked on entering `decoding` and once by a forward, not read back from every
    # routed layer's buffer at each step (a sync per routed layer, and a graph break in every compiled decode step)
    model, own, _ = _mod()
    calibrate(model, [torch.randint(0, 200, (4, 24))], capacity=0.5)
    return model, own, model.method.decoding(mode="router_threshold")


def _dnd():
    model = CausalLM(preset("tiny-qwen3")).eval()
    attach_dnd(model, DNDConfig(layers=(0, 1), ratio=0.2))
    return model, Counter({"aten::nonzero": 2}), contextlib.nullcontext()  # each DND layer's selecting rows


def _dreamer():
    return dyndepth.build_model(dyndepth.preset("dreamer-tiny")).eval(), Counter(), contextlib.nullcontext()


@pytest.mark.parametrize("build", [_plain, _gateskip, _mod, _mod_threshold, _dnd, _dreamer],
                         ids=["plain", "gateskip", "mod", "mod_threshold", "dnd", "dreamer"])
def test_a_decode_step_syncs_the_host_only_where_its_method_decides_on_values(build):
    torch.manual_seed(0)
    model, own, mode = build()
    assert _decode_step_syncs(model, mode) == BOUNDARY + own
