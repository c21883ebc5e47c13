import json
import logging
import time

import pytest
import torch
from tiny_loader import TinyLoader, sft_loader
from train_script import tiny_train_config

from dyndepth import CausalLM, preset
from dyndepth.train import Hook, lm_loss, train
from dyndepth.train.checkpoint import latest_checkpoint
from dyndepth.train.parallel import DistInfo
from dyndepth.train.trainer import forward_backward

ONE = DistInfo()  # a single CPU process


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel_l2(a: dict, b: dict) -> float:
    diff = sum((a[n] - b[n]).pow(2).sum() for n in a)
    return (diff / sum(b[n].pow(2).sum() for n in b)).sqrt().item()


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe"])
def test_grad_accumulation_2x2_equals_batch_4(name):
    cfg = tiny_train_config("unused", device="cpu")
    torch.manual_seed(0)
    model = CausalLM(preset(name))
    big = TinyLoader(4, 16).next_batch()
    forward_backward(model, model, [big], [], cfg, ONE)
    full = _grads(model)
    model.zero_grad(set_to_none=True)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    forward_backward(model, model, halves, [], cfg, ONE)
    accum = _grads(model)
    assert full.keys() == accum.keys() and len(full) > 5
    tol = 1e-6 if name == "tiny-qwen3" else 1e-4  # MoE balancing loss is not additive over micro-batches
    for n in full:
        torch.testing.assert_close(accum[n], full[n], atol=tol, rtol=0, msg=n)


def test_sft_accumulation_4x2_equals_one_batch_of_8():
    """Prompt-masked rows of varied lengths: the loss is token-weighted over the whole step, so splitting
    the 8 rows into 4 micro-batches leaves the gradient unchanged (per-micro-batch means differ by ~8%)."""
    cfg = tiny_train_config("unused")
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3"))
    big = sft_loader(8).next_batch()
    counts = (big["labels"] != -100).sum(1)
    assert counts.unique().numel() > 3 and counts.sum() < big["labels"].numel()  # varied, masked rows
    stats = forward_backward(model, model, [big], [], cfg, ONE)
    full = _grads(model)
    model.zero_grad(set_to_none=True)
    quarters = [{k: v[i:i + 2] for k, v in big.items()} for i in range(0, 8, 2)]
    stats4 = forward_backward(model, model, quarters, [], cfg, ONE)
    accum = _grads(model)
    assert _rel_l2(accum, full) < 1e-5
    assert stats4["loss"].item() == pytest.approx(stats["loss"].item(), rel=1e-5)
    assert stats4["trained_tokens"].item() == counts.sum().item()


def test_micro_batch_without_labels_weighs_nothing():
    cfg = tiny_train_config("unused")
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3"))
    batch = TinyLoader(2, 16).next_batch()
    forward_backward(model, model, [batch], [], cfg, ONE)
    alone = _grads(model)
    model.zero_grad(set_to_none=True)
    unlabelled = dict(batch, labels=torch.full_like(batch["labels"], -100))
    forward_backward(model, model, [batch, unlabelled], [], cfg, ONE)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, alone[n], rtol=1e-6, atol=1e-9, msg=n)


def test_auxiliary_losses_and_stats_are_means_over_micro_batches():
    """Two copies of a micro-batch give the gradient and the stats of one: the LM loss is token-weighted and
    the auxiliary losses (hooks', the MoE balancing loss) and logged stats are averaged over micro-batches."""
    cfg = tiny_train_config("unused")
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3-moe"))
    batch = TinyLoader(2, 16).next_batch()
    hook = CountingHook()
    stats = forward_backward(model, model, [batch], [hook], cfg, ONE)
    alone = _grads(model)
    model.zero_grad(set_to_none=True)
    stats2 = forward_backward(model, model, [batch, batch], [hook], cfg, ONE)
    assert stats["aux_loss"] > 0 and stats["counter/z"] > 0
    back_propagated = stats["loss"] + stats["aux_loss"] + stats["counter/aux_loss"]
    torch.testing.assert_close(stats["objective"], back_propagated)
    for k in ("loss", "aux_loss", "counter/aux_loss", "counter/z", "objective"):
        torch.testing.assert_close(stats2[k], stats[k], msg=k)
    router = "model.layers.0.mlp.gate.weight"  # only the balancing loss moves it much
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, alone[n], rtol=1e-4, atol=1e-7, msg=n)
    assert alone[router].abs().max() > 1e-4


def test_the_fp32_upcast_is_warned_on_rank_0_only(caplog):
    """Under torchrun every rank upcast its bf16 copy and each said so: the same warning once per GPU."""
    from dyndepth.train.parallel import DistInfo
    from dyndepth.train.trainer import setup_model

    cfg = tiny_train_config("unused", save_every=0)
    for rank in (0, 1):
        with caplog.at_level(logging.WARNING, logger="dyndepth"):
            caplog.clear()
            raw, *_ = setup_model(CausalLM(preset("tiny-qwen3")).to(torch.bfloat16), cfg, DistInfo(rank=rank))
        assert {p.dtype for p in raw.parameters()} == {torch.float32}  # upcast on every rank
        assert len([r for r in caplog.records if "upcast to float32" in r.getMessage()]) == (rank == 0), rank


def test_a_hook_without_saved_state_is_warned_on_rank_0_only(caplog):
    """A hook the checkpoint holds no state for starts fresh with a warning, which every rank printed."""
    from dyndepth.train.hooks import hooks_load_state_dict

    class Hook:
        def load_state_dict(self, state):
            raise AssertionError("no state to load")

    for warn in (True, False):  # (the trainer passes warn=info.is_main)
        with caplog.at_level(logging.WARNING, logger="dyndepth"):
            caplog.clear()
            hooks_load_state_dict([Hook()], {"other": {}}, warn=warn)
        assert ("no state for hook" in caplog.text) == warn


def test_bf16_model_trains_with_fp32_master_weights(tmp_path):
    """AdamW at lr 2e-5 on bf16 weights rounds most updates away; the trainer keeps fp32 masters."""
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3")).to(torch.bfloat16)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    cfg = tiny_train_config(str(tmp_path), steps=5, lr=2e-5, min_lr=2e-5, warmup=0, schedule="constant",
                            weight_decay=0.0, save_every=0, dtype="bfloat16")
    train(model, TinyLoader(2, 16), cfg)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    changed = sum((p.detach() != start[n]).sum().item() for n, p in model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    assert changed / total > 0.95  # bf16 in place: about 28%


def test_a_zero_lr_multiplier_holds_its_group_still_and_logs_the_schedules_lr(tmp_path):
    """lr_groups = {embeddings: 0} (a common freeze by LR) crashed with a ZeroDivisionError when that group came
    first (the logged lr divided the first group's lr by its multiplier); negative multipliers are refused."""
    from dyndepth.runconfig import RunConfigError

    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3"))
    start = model.model.embed_tokens.weight.detach().clone()
    cfg = tiny_train_config(str(tmp_path), steps=2, warmup=0, schedule="constant", save_every=0,
                            lr_groups={"model.embed_tokens.*": 0.0})
    train(model, TinyLoader(2, 16), cfg)
    assert torch.equal(model.model.embed_tokens.weight, start)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "lr" in x]
    assert lrs and all(lr == pytest.approx(3e-3) for lr in lrs)
    for bad in (-1, float("inf")):
        with pytest.raises(RunConfigError, match="multiplier must be a finite number >= 0"):
            tiny_train_config(str(tmp_path), lr_groups={"model.embed_tokens.*": bad})


class FakeClock:
    """`time.perf_counter` that moves only when told; eval batches take 1000 s each, steps 1 s."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class TickHook(Hook):
    name = "tick"

    def __init__(self, clock):
        self.clock = clock

    def after_step(self, model, step, stats, dist):
        self.clock.now += 1.0


class SlowEvalLoader(TinyLoader):
    def __init__(self, clock, *args, **kw):
        super().__init__(*args, **kw)
        self.clock = clock

    def next_batch(self):
        self.clock.now += 1000.0
        return super().next_batch()


def test_throughput_leaves_out_eval_and_checkpoint_time(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    cfg = tiny_train_config(str(tmp_path), steps=3, eval_every=1, eval_batches=1, save_every=1)
    train(CausalLM(preset("tiny-qwen3")), TinyLoader(4, 16), cfg, hooks=[TickHook(clock)],
          eval_loader=SlowEvalLoader(clock, 4, 16, seed=1))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in records if "loss" in r]
    assert tps == [pytest.approx(4 * 16 / 1.0)] * 3  # 1 s of training per step; the 1000 s evals left out


class CountingHook(Hook):
    """An auxiliary loss (logit z-loss) and a controller that counts steps in its state."""

    name = "counter"

    def __init__(self):
        self.calls, self.steps_seen, self.aux_calls = 0, [], 0

    def aux_loss(self, model, batch, out):
        self.aux_calls += 1
        z = out.logits.float().logsumexp(-1).pow(2).mean()
        return 1e-4 * z, {"z": z.detach()}

    def after_step(self, model, step, stats, dist):
        assert "loss" in stats and dist.world_size == 1
        self.calls += 1
        self.steps_seen.append(step)
        return {"calls": float(self.calls)}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_hooks_are_called_logged_and_checkpointed(tmp_path, caplog):
    cfg = tiny_train_config(str(tmp_path), steps=4, save_every=2, grad_accum=2)
    hook = CountingHook()
    torch.manual_seed(0)
    result = train(CausalLM(preset("tiny-qwen3")), TinyLoader(4, 16), cfg, hooks=[hook])
    assert hook.aux_calls == 8 and hook.steps_seen == [1, 2, 3, 4]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["counter/calls"] == 4.0 and records[-1]["counter/z"] > 0
    assert result.steps == 4 and result.last_checkpoint == latest_checkpoint(tmp_path)
    # resume from step 2: the hook state comes back from the checkpoint
    resumed = CountingHook()
    cfg2 = tiny_train_config(str(tmp_path), steps=4, save_every=2, grad_accum=2,
                             resume=str(tmp_path / "step_0000002"))
    train(CausalLM(preset("tiny-qwen3")), TinyLoader(4, 16), cfg2, hooks=[resumed])
    assert resumed.steps_seen == [3, 4] and resumed.calls == 4
    # a hook the checkpoint has no state for (a run that trained without it) starts fresh, with a warning
    other = CountingHook()
    other.name = "other"
    cfg3 = tiny_train_config(str(tmp_path), steps=6, save_every=2, grad_accum=2, resume=True)
    with caplog.at_level("WARNING", logger="dyndepth.train.hooks"):
        train(CausalLM(preset("tiny-qwen3")), TinyLoader(4, 16), cfg3, hooks=[other])
    assert "no state for hook 'other'" in caplog.text and other.steps_seen == [5, 6] and other.calls == 2
    # resume=true where nothing was saved (e.g. the recipe's relative out_dir read from another directory) started a
    # new run without a word
    cfg4 = tiny_train_config(str(tmp_path / "elsewhere"), steps=1, save_every=0, resume=True)
    with caplog.at_level("WARNING", logger="dyndepth.train.trainer"):
        train(CausalLM(preset("tiny-qwen3")), TinyLoader(4, 16), cfg4)
    assert f"{(tmp_path / 'elsewhere').resolve()} holds no checkpoint: starting a new run there" in caplog.text


def test_the_progress_bar_ends_on_the_last_eval(tmp_path, capsys):
    """The bar showed an eval loss only at the next logged step, so a run that evaluates at its last step ended with
    the previous eval on the bar (eval=8.3436 at 100%, above "step 40: eval loss 7.7988")."""
    cfg = tiny_train_config(str(tmp_path), steps=4, eval_every=2, eval_batches=1, save_every=0, progress=True)
    torch.manual_seed(0)
    result = train(CausalLM(preset("tiny-qwen3")), TinyLoader(4, 16), cfg, eval_loader=TinyLoader(4, 16, seed=1))
    last_bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"eval={result.evals[-1][1]:.4f}" in last_bar and "100%" in last_bar, last_bar


def test_eval_metrics_plot_and_config_written(tmp_path, caplog):
    cfg = tiny_train_config(str(tmp_path), steps=6, eval_every=3, eval_batches=2, save_every=0,
                            lr=1e-2, warmup=1, plot=True)
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3"))
    with caplog.at_level("INFO", logger="dyndepth"):
        result = train(model, TinyLoader(4, 16), cfg, eval_loader=TinyLoader(4, 16, seed=1))
    assert [s for s, _ in result.evals] == [3, 6]
    assert f"step 6: eval loss {result.evals[1][1]:.4f}" in caplog.text  # on the console (was in metrics.jsonl only)
    # the final eval is the token-weighted loss of the trained model on the same first 2 eval batches
    model.eval()
    ref_loader = TinyLoader(4, 16, seed=1)
    with torch.no_grad():
        ref = torch.stack([lm_loss(model(b["input_ids"]).logits, b["labels"])
                           for b in (ref_loader.next_batch() for _ in range(2))]).mean()
    assert result.evals[1][1] == pytest.approx(ref.item(), rel=1e-5)
    assert result.evals[1][1] != result.evals[0][1]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert evals[0]["eval_ppl"] == pytest.approx(torch.tensor(evals[0]["eval_loss"]).exp().item(), rel=1e-5)
    train_recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, 7))
    assert all(r["mfu"] > 0 and r["tokens_per_s"] > 0 for r in train_recs)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "config.yaml").exists()
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_0000006"]  # saved at the end only


def test_activation_checkpointing_and_bf16_autocast_run(tmp_path):
    torch.manual_seed(0)
    base = train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16),
                 tiny_train_config(str(tmp_path / "a"), steps=2, save_every=0))
    torch.manual_seed(0)
    ckpt = train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16),
                 tiny_train_config(str(tmp_path / "b"), steps=2, save_every=0, activation_checkpointing=True))
    assert [round(x, 5) for _, x in base.losses] == [round(x, 5) for _, x in ckpt.losses]
    torch.manual_seed(0)
    bf16 = train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16),
                 tiny_train_config(str(tmp_path / "c"), steps=2, save_every=0, dtype="bfloat16"))
    assert abs(bf16.losses[0][1] - base.losses[0][1]) < 0.05


def test_evaluation_scores_each_validation_window_at_most_once():
    """eval_batches past the split rolled into the next epoch and served windows again: the loss moved with it."""
    from dyndepth.data.loader import loader_from_texts
    from dyndepth.runconfig import TrainConfig
    from dyndepth.tokenizer import ByteTokenizer
    from dyndepth.train.trainer import evaluate

    torch.manual_seed(0)
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz" * 3]
    val = loader_from_texts(texts, ByteTokenizer(), seq_len=32, batch_size=2, shuffle=False)
    model, cfg = CausalLM(preset("demo-tiny")), TrainConfig(device="cpu")
    once = evaluate(model, val, val.batches_per_epoch, cfg, DistInfo())
    assert 1 < val.batches_per_epoch < 5
    assert [evaluate(model, val, n, cfg, DistInfo()) for n in (5, 9)] == [once, once]
    assert evaluate(model, val, 1, cfg, DistInfo()) != once  # (the cap, not a constant)
    assert model.training  # evaluation puts the model back in training mode


def test_a_loader_without_state_dict_is_refused_before_the_first_step(tmp_path):
    """Every run saves at least its last step, and a checkpoint holds the loader's position: a loader with only
    next_batch() trained every step, then crashed with an AttributeError in that save (no checkpoint, no export)."""

    class Batches:
        def __init__(self):
            self.inner, self.served = TinyLoader(2, 16), 0

        def next_batch(self):
            self.served += 1
            return self.inner.next_batch()

    loader = Batches()
    with pytest.raises(ValueError, match=r"has no state_dict\(\).*load_state_dict"):
        train(CausalLM(preset("tiny-qwen3")), loader, tiny_train_config(str(tmp_path), steps=3, save_every=0))
    assert loader.served == 0 and latest_checkpoint(tmp_path) is None


def test_the_token_count_carries_over_a_resume_with_another_batch_layout(tmp_path):
    """`tokens` was step x this run's tokens per step: 2 steps of 2 x 16 tokens resumed with batch 4 logged 192
    tokens at step 3 (3 x 64) instead of 2 x 32 + 64 = 128, as if the earlier steps had used the new layout."""
    import shutil

    torch.manual_seed(0)
    train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16), tiny_train_config(str(tmp_path / "a"), steps=2, batch_size=2))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    train(CausalLM(preset("tiny-qwen3")), TinyLoader(4, 16),
          tiny_train_config(str(tmp_path / "b"), steps=4, batch_size=4, resume=True))
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records if "loss" in r] == [32, 64, 128, 192]


def test_a_stat_some_micro_batches_report_is_their_mean():
    """A statistic only some micro-batches have (gateskip/packed: none where every branch call kept every token) was
    summed over those and divided by all of them: with grad_accum=2 it logged half its value, where two ranks of
    one micro-batch each logged all of it (`reduce_stats` averages over the ranks that report a key)."""

    class Sometimes(Hook):
        name, calls = "sometimes", 0

        def aux_loss(self, model, batch, out):
            self.calls += 1
            return torch.zeros(()), ({"share": 0.75} if self.calls == 1 else {})

    model = CausalLM(preset("tiny-qwen3"))
    batch = TinyLoader(2, 16).next_batch()
    stats = forward_backward(model, model, [batch, batch], [Sometimes()], tiny_train_config("unused"), ONE)
    assert float(stats["sometimes/share"]) == 0.75
    assert float(stats["sometimes/aux_loss"]) == 0.0  # (reported by both: their mean)


def test_hook_losses_add_up_controllers_run_without_grad_and_names_are_unique():
    from dyndepth.train.hooks import check_hooks, hooks_after_step, hooks_aux_loss

    first, second = CountingHook(), CountingHook()
    second.name = "other"
    model = CausalLM(preset("tiny-qwen3"))
    batch = TinyLoader(2, 16).next_batch()
    out = model(batch["input_ids"])
    total, stats = hooks_aux_loss([first, second], model, batch, out)
    torch.testing.assert_close(total, stats["counter/aux_loss"] + stats["other/aux_loss"])
    assert stats["counter/aux_loss"] > 0

    class Probe(Hook):
        name, grad_enabled = "probe", None

        def after_step(self, model, step, stats, dist):
            self.grad_enabled = torch.is_grad_enabled()

    probe = Probe()
    hooks_after_step([probe], model, 1, {}, ONE)
    assert probe.grad_enabled is False  # a controller may update parameters in place
    with pytest.raises(ValueError, match="share the name"):
        check_hooks([first, CountingHook()])


def test_evaluation_averages_over_labelled_tokens_only():
    from dyndepth.runconfig import TrainConfig
    from dyndepth.train.trainer import evaluate

    class OneBatch:
        def __init__(self, batch):
            self.batch = batch

        def next_batch(self):
            return dict(self.batch)

    torch.manual_seed(0)
    model = CausalLM(preset("tiny-qwen3"))
    batch = TinyLoader(2, 16).next_batch()
    batch["labels"][:, :10] = -100  # a prompt-masked batch
    got = evaluate(model, OneBatch(batch), 1, TrainConfig(device="cpu"), ONE)
    with torch.no_grad():
        expected = lm_loss(model(batch["input_ids"]).logits, batch["labels"]).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_a_warmup_longer_than_the_run_is_warned(tmp_path, caplog):
    """--set train.steps=2 on a recipe with 500 warm-up steps trained at 0.4% of train.lr without a word."""
    with caplog.at_level(logging.WARNING, logger="dyndepth.train.trainer"):
        train(CausalLM(preset("tiny-qwen3")), TinyLoader(2, 16),
              tiny_train_config(str(tmp_path), steps=2, save_every=0, warmup=500))
    assert "train.warmup=500 is longer than the run (train.steps=2): the learning rate only rises to 0.004" in caplog.text


def test_the_validation_windows_no_whole_batch_holds_are_counted_as_never_scored(tmp_path, caplog):
    """A validation split of 7 windows in batches of 2 (or a world size that does not divide it): its last window is
    never scored, at any train.eval_batches; the run said the split's 3 batches were scored (or nothing, at
    eval_batches=3), so its last document's loss went missing without a word."""
    from dyndepth.data.loader import PackedLoader
    from dyndepth.data.shards import ShardSet
    from dyndepth.tokenizer import ByteTokenizer

    val = PackedLoader(ShardSet.from_documents(["x" * 127], ByteTokenizer()), 16, 2, shuffle=False)
    assert (val.num_windows, val.batches_per_epoch, val.left_out) == (7, 3, 1)
    with caplog.at_level(logging.WARNING, logger="dyndepth.train.trainer"):
        train(CausalLM(preset("tiny-qwen3", vocab_size=264)), TinyLoader(2, 16),
              tiny_train_config(str(tmp_path), steps=1, save_every=0, eval_every=1, eval_batches=3), eval_loader=val)
    assert ("train.eval_batches=3: the validation split holds 3 batch(es) per rank; each evaluation scores those once, "
            "and its last 1 window(s) never: they fill no whole batch of 1 rank(s) x batch_size 2") in caplog.text


@pytest.mark.parametrize("method", [None, "mod", "dnd"])
def test_a_padded_window_of_whole_documents_trains_as_its_documents_alone(method):
    # packing="documents" pads each window after its last document; the trainer passes the loader's attention_mask,
    # so the padding is neither attended to nor ranked nor counted by a method: the loss is the unpadded row's, and
    # (with intra_doc_mask) the sum of each document's loss alone
    import numpy as np

    from dyndepth.data.loader import PackedLoader
    from dyndepth.data.shards import ShardSet
    from dyndepth.methods.registry import attach_method
    from dyndepth.tokenizer import ByteTokenizer
    from dyndepth.train.trainer import _forward

    shards = ShardSet.from_documents([("Q: 1+1?", "2"), ("Q: hi?", "yo"), "plain"], ByteTokenizer())
    batch = PackedLoader(shards, 32, 1, shuffle=False, packing="documents", intra_doc_mask=True).next_batch()
    n = int(batch["attention_mask"].sum())
    assert 0 < n < 32
    torch.manual_seed(0)
    model = CausalLM(preset("demo-tiny")).train()
    if method:
        attach_method(model, method, {"layers": (0, 1), "router_init_std": 0.5} if method == "dnd" else {})
    padded = lm_loss(_forward(model, batch).logits, batch["labels"], reduction="sum")
    trimmed = {k: v[:, :n] for k, v in batch.items() if k != "attention_mask"}
    torch.testing.assert_close(padded, lm_loss(_forward(model, trimmed).logits, trimmed["labels"], reduction="sum"))
    if method is None:
        ids, labels, docs = (trimmed[k][0] for k in ("input_ids", "labels", "doc_ids"))
        alone = sum(lm_loss(model(ids[docs == d][None]).logits, labels[docs == d][None], reduction="sum")
                    for d in docs.unique())
        torch.testing.assert_close(padded, alone)
    assert np.all(batch["labels"][0, n:].numpy() == -100)
