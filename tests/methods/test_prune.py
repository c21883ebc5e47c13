"""Static layer pruning by GateSkip gate importance or ShortGPT block influence."""

import pytest
import torch
from gated import gated_model

import dyndepth
from dyndepth import CausalLM, preset
from dyndepth.methods.prune import block_influence, layer_importance, prune_layers


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def close_layer(model, i):
    """sigmoid(-12) ~ 6e-6: the layer's branches barely touch the residual stream."""
    with torch.no_grad():
        for gate in (model.model.layers[i].gateskip.attn_gate, model.model.layers[i].gateskip.mlp_gate):
            gate.proj.weight.zero_()
            gate.proj.bias.fill_(-12.0)


def test_prune_removes_the_layer_with_closed_gates(tmp_path):
    model, method = gated_model(layers=4, budget=0.25)
    close_layer(model, 2)
    batches = [torch.randint(0, 256, (2, 16))]
    for by in ("gate", "influence"):
        scores = layer_importance(model, batches, by=by)
        assert len(scores) == 4 and min(range(4), key=scores.__getitem__) == 2
    ids = torch.randint(0, 256, (2, 12))
    with method.override(budget=0.0):
        ref = logits(model, ids)
    kept = [model.model.layers[i] for i in (0, 1, 3)]
    assert prune_layers(model, 1, batches, by="gate") == [2]
    assert list(model.model.layers) == kept and model.config.num_hidden_layers == 3
    with method.override(budget=0.0):
        torch.testing.assert_close(logits(model, ids), ref, atol=1e-3, rtol=0)  # the layer did ~nothing
    out = model(ids)
    assert out.logits.shape == (2, 12, 256) and float(out.stats["gateskip/attn_skipped"]) > 0.2
    model.save_pretrained(tmp_path)
    assert not any(".layers.3." in k for k in model.state_dict())
    loaded = dyndepth.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(loaded, ids), out.logits, atol=0, rtol=0)


@pytest.mark.parametrize("step,only,drop,expected_dense", [(1, [1, 3], 1, [2]), (2, [], 0, [1])])
def test_prune_moe_keeps_every_layer_kind(tmp_path, step, only, drop, expected_dense):
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3-moe", num_hidden_layers=4, decoder_sparse_step=step,
                            mlp_only_layers=only)).eval()
    scores = [1.0] * 4
    scores[drop] = 0.0
    assert prune_layers(model, 1, scores=scores) == [drop]
    config = model.config
    assert config.mlp_only_layers == expected_dense and config.decoder_sparse_step == 1
    kinds = [hasattr(layer.mlp, "experts") for layer in model.model.layers]
    assert kinds == [config.is_moe_layer(i) for i in range(3)]
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(logits(dyndepth.from_pretrained(tmp_path).eval(), ids), logits(model, ids))


def test_pruning_leaves_other_models_built_from_the_same_config_alone(tmp_path):
    """`CausalLM(config)` keeps the object: pruning edited it in place, so a second model built from it saved a
    config.json of 2 layers beside 3 layers of weights and could not be loaded."""
    config = preset("tiny-qwen3-moe", num_hidden_layers=3)
    pruned, other = CausalLM(config).eval(), CausalLM(config).eval()
    prune_layers(pruned, 1, scores=[1.0, 0.0, 1.0])
    assert pruned.config.num_hidden_layers == 2 and other.config.num_hidden_layers == 3 == config.num_hidden_layers
    other.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(logits(dyndepth.from_pretrained(tmp_path).eval(), ids), logits(other, ids))


def test_block_influence_on_a_plain_model():
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3", num_hidden_layers=3)).eval()
    with torch.no_grad():  # layer 1 adds nothing to the residual stream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    scores = block_influence(model, [torch.randint(0, 256, (2, 10))])
    assert abs(scores[1]) < 1e-6 and min(scores[0], scores[2]) > 1e-4
    with pytest.raises(ValueError, match="attach_gateskip"):
        layer_importance(model, [torch.randint(0, 256, (1, 4))], by="gate")
    assert prune_layers(model, 1, [torch.randint(0, 256, (2, 10))], by="influence") == [1]


def test_pruning_layer_zero_keeps_shared_gates_and_per_layer_thresholds(tmp_path):
    model, method = gated_model(layers=3, gate="scalar", shared=True, budget=0.3)
    shared = model.model.gateskip
    taus = [layer.gateskip.tau.clone() for layer in model.model.layers]
    assert prune_layers(model, 1, scores=[0.0, 1.0, 2.0]) == [0]
    assert model.model.gateskip is shared and method.shared is shared
    assert [torch.equal(g.tau, t) for g, t in zip(method.layer_gates, taus[1:])] == [True, True]
    ids = torch.randint(0, 256, (2, 10))
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(dyndepth.from_pretrained(tmp_path).eval(), ids), logits(model, ids))


def test_prune_refuses_bad_requests():
    model, _ = gated_model(layers=2)
    with pytest.raises(ValueError, match="prune between"):
        prune_layers(model, 2, scores=[0.0, 1.0])
    with pytest.raises(ValueError, match="batches"):
        prune_layers(model, 1)
    with pytest.raises(ValueError, match="scores"):
        prune_layers(model, 1, scores=[0.0])
    assert prune_layers(model, 0, scores=[0.0, 1.0]) == [] and len(model.model.layers) == 2
    plain = CausalLM(preset("tiny-qwen3"))  # the error said to attach GateSkip, whose fresh gates score alike
    with pytest.raises(ValueError, match="carries no method; score it by ShortGPT block influence instead"):
        prune_layers(plain, 1, batches=[torch.randint(0, 256, (1, 8))])
    for name in ("huginn-tiny", "mor-tiny", "dreamer-tiny"):  # "got 20 scores for 8 layers": scores per application
        recurrent = dyndepth.build_model(dyndepth.preset(name))
        with pytest.raises(ValueError, match=r"decoder family \(CausalLM.*applies its layers repeatedly"):
            prune_layers(recurrent, 1, batches=[torch.randint(0, 256, (1, 8))])


@pytest.mark.parametrize("attach", ["dnd", "mod"])
def test_pruning_a_model_whose_method_names_layers_by_index_is_refused(attach):
    """DND's band and MoD's routed blocks are layer indices: a pruned DND / MoD model crashed in its forward, or
    saved a folder that did not load."""
    from dyndepth.methods import DNDConfig, attach_dnd, attach_mod

    model = CausalLM(preset("tiny-qwen3", num_hidden_layers=3))
    attach_dnd(model, DNDConfig(layers=(1, 2))) if attach == "dnd" else attach_mod(model)
    with pytest.raises(ValueError, match=f"the attached {attach} method names its layers by index"):
        prune_layers(model, 1, scores=[0.0, 1.0, 2.0])
    assert len(model.model.layers) == 3  # nothing removed


def test_layer_scores_take_dataloader_lists_and_tokenizer_dicts():
    """prune_layers scored layers from tensors and (ids, mask) tuples only: a DataLoader's [ids, mask] lists and HF
    dicts reached the model as its input_ids (an unclear error)."""
    from torch.utils.data import DataLoader, TensorDataset

    model, _ = gated_model(layers=3, budget=0.25)
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for by in ("gate", "influence"):
        want = layer_importance(model, [(ids, mask)], by=by)
        for batches in (DataLoader(TensorDataset(ids, mask), batch_size=2), [{"input_ids": ids, "attention_mask": mask}]):
            assert layer_importance(model, batches, by=by) == pytest.approx(want)
    with pytest.raises(ValueError, match="a batch must be a tensor of token ids"):
        prune_layers(model, 1, [42], by="influence")


def test_non_finite_scores_are_refused_not_sorted():
    """NaN compares false with everything, so the sort by score removed an arbitrary layer (here layer 0, whose
    forward broke, or any other)."""
    for scores, layer in (([float("nan"), 1.0, 0.5], 0), ([1.0, 0.0, float("inf")], 2)):
        model = CausalLM(preset("tiny-qwen3", num_hidden_layers=3))
        with pytest.raises(ValueError, match=f"layer {layer} scored (nan|inf): prune by finite scores only"):
            prune_layers(model, 1, scores=scores)
        assert len(model.model.layers) == 3
    model = CausalLM(preset("tiny-qwen3", num_hidden_layers=3))
    assert prune_layers(model, 1, scores=torch.tensor([2.0, 0.0, 1.0])) == [1]  # a tensor of scores is fine
