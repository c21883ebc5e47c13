import itertools
import math

import pytest

from dyndepth import CausalLM, preset
from dyndepth.runconfig import TrainConfig
from dyndepth.train.optim import apply_freeze, build_optimizer, build_scheduler, lr_multiplier, param_groups


def _cfg(**kw):
    return TrainConfig(**{"steps": 100, "warmup": 10, "lr": 1.0, "min_lr": 0.1, **kw})


def test_cosine_schedule_key_steps():
    cfg = _cfg(schedule="cosine")
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)  # 1/warmup
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(55, cfg) == pytest.approx(0.55)  # halfway: (1 + min)/2
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(500, cfg) == pytest.approx(0.1)


def test_wsd_and_constant_schedules():
    cfg = _cfg(schedule="wsd", decay_frac=0.2)
    assert lr_multiplier(5, cfg) == pytest.approx(0.6)
    assert lr_multiplier(79, cfg) == 1.0  # stable until step 80
    assert lr_multiplier(80, cfg) == 1.0
    assert lr_multiplier(90, cfg) == pytest.approx(0.55)  # linear decay halfway
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    long_decay = _cfg(schedule="wsd", decay_frac=1.0)  # the decay starts after warm-up, not inside it
    assert [lr_multiplier(s, long_decay) for s in (9, 10, 55)] == [1.0, 1.0, pytest.approx(0.55)]
    const = _cfg(schedule="constant")
    assert [lr_multiplier(s, const) for s in (0, 10, 99)] == [pytest.approx(0.1), 1.0, 1.0]


def test_scheduler_drives_group_lrs_with_multipliers():
    model = CausalLM(preset("tiny-qwen3"))
    cfg = _cfg(lr=2e-3, min_lr=2e-4, lr_groups={"model.layers.1.*": 10.0})
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(10):
        opt.step()
        sched.step()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2e-3 * g["lr_mult"])
    assert {g["lr_mult"] for g in opt.param_groups} == {1.0, 10.0}


def test_param_groups_decay_freeze_and_multipliers():
    model = CausalLM(preset("tiny-qwen3"))
    cfg = _cfg(weight_decay=0.1, freeze=["model.embed_tokens.*"], lr_groups={"*.self_attn.*": 0.5})
    frozen = apply_freeze(model, cfg.freeze)
    assert frozen == ["model.embed_tokens.weight"]
    groups = param_groups(model, cfg)
    names = {n: g for g in groups for n in g["names"]}
    assert "model.embed_tokens.weight" not in names  # frozen (and tied lm_head with it)
    assert names["model.norm.weight"]["weight_decay"] == 0.0
    assert names["model.layers.0.input_layernorm.weight"]["weight_decay"] == 0.0
    assert names["model.layers.0.mlp.up_proj.weight"]["weight_decay"] == 0.1
    assert names["model.layers.0.self_attn.q_proj.weight"]["lr"] == pytest.approx(0.5)
    assert names["model.layers.0.self_attn.q_norm.weight"]["weight_decay"] == 0.0
    assert names["model.layers.0.mlp.up_proj.weight"]["lr"] == pytest.approx(1.0)
    opt_params = {id(p) for g in build_optimizer(model, cfg).param_groups for p in g["params"]}
    assert id(model.model.embed_tokens.weight) not in opt_params
    assert len(opt_params) == sum(1 for p in model.parameters() if p.requires_grad)


def test_globs_matching_nothing_are_errors():
    model = CausalLM(preset("tiny-qwen3"))
    with pytest.raises(ValueError, match="matches no parameter"):
        apply_freeze(model, ["model.nothing.*"])
    with pytest.raises(ValueError, match="matches no trainable"):
        param_groups(model, _cfg(lr_groups={"*.gateskip.*": 10.0}))


def test_cosine_is_monotone_after_warmup():
    cfg = _cfg()
    values = [lr_multiplier(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert not math.isnan(sum(values))


def test_the_documented_backbone_freeze_leaves_a_tied_models_gates_trainable():
    # docs/methods.md freezes GateSkip's backbone with these globs; on a tied model (Qwen3-0.6B, demo-tiny) the head is
    # the embedding, named once by named_parameters(): "freeze glob 'lm_head.*' matches no parameter"
    from dyndepth.train import build_hooks

    model = CausalLM(preset("demo-tiny"))
    assert model.config.tie_word_embeddings
    build_hooks({"name": "gateskip"}, model, 10)
    globs = ["model.embed_tokens.*", "model.layers.*.self_attn.*", "model.layers.*.mlp.*",
             "model.layers.*.*layernorm*", "model.norm.*", "lm_head.*"]
    frozen = apply_freeze(model, globs)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".gateskip." in n for n in trainable), trainable
    assert len(frozen) == len(set(frozen)) == sum(1 for p in model.parameters() if not p.requires_grad)
    head_only = CausalLM(preset("demo-tiny"))
    assert apply_freeze(head_only, ["lm_head.*"]) == ["lm_head.weight"]  # the one tensor it shares with the embedding
    assert not head_only.model.embed_tokens.weight.requires_grad
