"""calibrate: the recorded thresholds are each routing point's rank threshold over the real tokens, the model's
train / eval mode is restored; text_batches: the first windows of a text, arguments checked."""

import pytest
import torch
from gated import gated_model

import dyndepth
from dyndepth.core.routing import rank_threshold
from dyndepth.methods import calibrate
from dyndepth.methods.calibration import text_batches


def test_a_masked_batch_calibrates_over_its_real_tokens_and_the_mode_is_restored():
    model, method = gated_model(budget=0.0, eos=5)
    ids = torch.randint(6, 256, (2, 12))
    ids[0, 3] = 5  # EOS: outside the pool
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    model.train()
    taus = calibrate(model, [(ids, mask)], budget=0.3)
    assert model.training  # (left in eval mode, training went on without its gate penalty and ramp)
    trace = dyndepth.Trace()
    with method.override(budget=0.3), torch.no_grad():
        model.eval()(ids, attention_mask=mask, trace=trace)
    st = trace.ctx.state
    assert int(st.pool.sum()) == 18
    for key, scores in st.scores.items():
        torch.testing.assert_close(taus[key], rank_threshold(scores, st.pool, 0.3).reshape(()))


@pytest.mark.parametrize("name, knobs", [("gateskip", {"budget": 0.3}), ("mod", {"capacity": 0.5})])
def test_nan_scores_are_named_not_fitted_around_nor_blamed_on_the_batch_size(name, knobs):
    torch.manual_seed(0)
    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3")).eval()
    dyndepth.methods.attach_method(model, name)
    with torch.no_grad():  # every token that runs layer 0's MLP turns NaN (float16 overflow, a diverged checkpoint)
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    # GateSkip fitted a finite threshold around its NaN scores; MoD's error asked for larger batches
    with pytest.raises(ValueError, match="routing point .* hold NaN.*bfloat16 or float32"):
        calibrate(model, [torch.randint(0, 256, (4, 24))], **knobs)


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_text_batches_are_the_first_windows_and_refuse_empty_requests():
    text = "abcdefghijklmnopqrstuvwxyz" * 4  # 104 tokens
    batches = text_batches(CharTokenizer(), text, num_batches=2, batch_size=3, seq_len=8)
    assert [tuple(b.shape) for b in batches] == [(3, 8), (3, 8)]  # 2 x 3 windows of 8, not all 13 windows
    assert batches[1][2].tolist() == [ord(c) for c in text[40:48]]
    for name, args in (("batches", (0, 3, 8)), ("batch_size", (2, 0, 8)), ("seq_len", (2, 3, 0))):
        with pytest.raises(ValueError, match=f"calibration {name}=0 must be >= 1"):
            text_batches(CharTokenizer(), text, *args)
    with pytest.raises(ValueError, match="fewer than one window of seq_len=200"):
        text_batches(CharTokenizer(), text, 1, 1, 200)


@pytest.mark.parametrize("name, knobs", [("gateskip", {"budget": 0.3, "mode": "threshold"}),
                                         ("mod", {"capacity": 0.5, "mode": "router_threshold"})])
def test_training_drops_the_calibration_its_steps_make_stale(name, knobs, tmp_path):
    """A calibrated checkpoint post-trained on (dyndepth train, one rank or many) kept its thresholds marked as fitted
    for the knob, so decoding at that knob skipped by thresholds of the old gates (a budget-0.3 calibration skipped
    63-85% after a few steps) with no word; now the first step drops them and decoding asks for calibrate."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from tiny_loader import TinyLoader
    from train_script import tiny_train_config

    from dyndepth.methods import attach_method
    from dyndepth.train import train

    model = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
    method = attach_method(model, name)
    calibrate(model, [torch.randint(0, 256, (2, 16))], **{k: v for k, v in knobs.items() if k != "mode"})
    with method.override(**knobs):  # calibrated: accepted
        model.eval()(torch.randint(0, 256, (1, 8)))
    train(model, TinyLoader(2, 16), tiny_train_config(str(tmp_path), steps=1, save_every=0, warmup=0),
          hooks=method.trainer_hooks(1))
    with pytest.raises(ValueError, match="not calibrated"), method.override(**knobs):
        model.eval()(torch.randint(0, 256, (1, 8)))


@pytest.mark.parametrize("name", ["dreamer-tiny", "huginn-tiny"])
def test_a_recurrent_family_is_told_it_has_no_thresholds(name):
    """The error said to attach GateSkip, which refuses these families."""
    model = dyndepth.build_model(dyndepth.preset(name))
    with pytest.raises(ValueError, match=r"decoder family \(CausalLM\); a \w+LM has no thresholds to fit"):
        calibrate(model, [torch.randint(0, 256, (2, 8))], budget=0.3)


def test_thresholds_record_is_strict_json_with_null_for_keep_all():
    """-inf (a routing point that keeps every token: MoD at capacity 1.0) is null, not `-Infinity`; NaN is refused."""
    import json

    from dyndepth.methods.calibration import thresholds_record

    record = thresholds_record({(0, "attn"): torch.tensor(0.25), 1: torch.tensor(float("-inf"))})
    assert record == {"0/attn": 0.25, "1": None}
    json.dumps(record, allow_nan=False)
    with pytest.raises(ValueError, match="calibration threshold 3 is nan: the calibration scores were not finite"):
        thresholds_record({3: torch.tensor(float("nan"))})


def test_dataloader_lists_and_tokenizer_dicts_calibrate_like_tuples():
    """A DataLoader yields [ids, mask] lists and an HF tokenizer {"input_ids", "attention_mask"} dicts; both were
    passed to the model as its input_ids and failed with an unclear error."""
    from torch.utils.data import DataLoader, TensorDataset

    model, _ = gated_model()
    ids = torch.randint(0, 256, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    want = calibrate(model, [(ids[:2], mask[:2]), (ids[2:], mask[2:])], budget=0.3)
    for batches in (DataLoader(TensorDataset(ids, mask), batch_size=2),
                    [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]):
        got = calibrate(model, batches, budget=0.3)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key])
    with pytest.raises(ValueError, match="a batch must be a tensor of token ids"):
        calibrate(model, ["some text"], budget=0.3)


def test_no_batches_is_named_as_such():
    """An empty list (or a used-up iterator) was reported as knobs that route no token or batches of padding."""
    model, _ = gated_model()
    batches = iter([torch.randint(0, 256, (2, 12))])
    calibrate(model, batches, budget=0.3)
    for empty in ([], batches):
        with pytest.raises(ValueError, match="calibrate got no batches"):
            calibrate(model, empty, budget=0.3)


def test_thresholds_that_ties_make_skip_past_the_budget_are_named(caplog):
    # saturated gates (every score the same float) fit a threshold at that value: deciding by it skipped every token
    # at a 30% budget, and nothing said so
    from dyndepth.methods import GateSkipConfig, attach_gateskip

    torch.manual_seed(0)
    ids = torch.randint(0, 200, (4, 32))
    for bias, warned in ((20.0, True), (5.0, False)):  # sigmoid(20) is 1.0 in float32; sigmoid(5 + noise) is not tied
        model = dyndepth.build_model(dyndepth.preset("tiny-qwen3")).eval()
        method = attach_gateskip(model, GateSkipConfig(gate="scalar", init_bias=bias))
        caplog.clear()
        with caplog.at_level("WARNING", logger="dyndepth.methods.calibration"):
            calibrate(model, [ids], budget=0.3)
        assert ("tie at its threshold" in caplog.text) == warned
        with method.override(budget=0.3, mode="threshold"), torch.no_grad():
            skipped = float(model(ids).stats["gateskip/attn_skipped"])
        assert (skipped == 1.0) == warned  # what the warning is about
