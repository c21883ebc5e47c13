import collections
import json
import math

import pytest
import torch
import torch.nn.functional as F

import dyndepth
from dyndepth.eval.dreamer import forward_report, render, run_study
from dyndepth.runconfig import RunConfig, TrainConfig, save_run_config


@pytest.fixture
def run_dir(tmp_path):
    """A `dyndepth train`-shaped folder: config.yaml (synthetic data) and an exported Dreamer in model/ (3 steps:
    the earliest a token can exit is after step 2, so at 2 steps an exit row could never exit)."""
    torch.manual_seed(0)
    model = dyndepth.build_model(dyndepth.preset("dreamer-tiny", num_recurrences=3))
    model.save_pretrained(tmp_path / "model")
    data = {"source": "synthetic", "tasks": ["add", "var"], "synthetic_examples": 200,
            "difficulty": {"add": {"digits": 1}, "var": {"hops": 1}}}
    rc = RunConfig(model={"preset": "dreamer-tiny"}, data=data, train=TrainConfig(batch_size=2, seq_len=32))
    save_run_config(rc, tmp_path / "config.yaml")
    return tmp_path


def test_study_sweeps_depth_and_writes_the_heatmap(run_dir):
    result = run_study(run_dir, examples_per_task=2, num_batches=1, exit_kls=(1e9, 1e-3))
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["R=1", "R=2", "R=3 (trained)", "R=5", "R=6", "exit KL<1e+09", "exit KL<0.001"]
    for row in result["rows"][:5]:  # fixed depth: every token runs every step
        assert row["avg_depth"] == pytest.approx(row["steps"]) and 0 <= row["exact_match"] <= 1
        assert row["flops_ideal"] == pytest.approx(row["flops_executed"])
    deeper = [r["flops_executed"] for r in result["rows"][:5]]
    assert deeper == sorted(deeper)  # more steps, more compute
    always, strict = result["rows"][-2:]
    assert always["avg_depth"] == 2 and always["flops_ideal"] < always["flops_executed"]  # every token exits early
    assert 2 <= strict["avg_depth"] <= 3 and strict["flops_ideal"] <= strict["flops_executed"]
    assert (run_dir / "expert_usage.png").stat().st_size > 0 and (run_dir / "quality_vs_depth.png").exists()
    usage = torch.tensor(result["expert_usage"])
    assert usage.shape == (3, 16) and torch.allclose(usage.sum(-1), usage.sum(-1)[0].expand(3))
    saved = json.loads((run_dir / "dreamer_study.json").read_text())
    assert 0 < saved["expert_diversity"] <= 1 and len(saved["state_change"]) == 3
    assert "| R=3 (trained) |" in render(result)


def test_the_study_scores_each_validation_window_once_however_many_batches_are_asked(run_dir):
    """--batches past what the validation split holds served its windows again (the loader starts a new epoch),
    weighting them twice in the losses; the trainer's evaluation stops at one pass, so must the study."""
    from dyndepth.data.build import build_loader
    from dyndepth.runconfig import load_run_config

    rc = load_run_config(run_dir / "config.yaml")
    held = build_loader(rc.data, split="val", batch_size=2, seq_len=32, seed=rc.train.seed).batches_per_epoch
    once, more = (run_study(run_dir, examples_per_task=0, num_batches=n, exit_kls=())["rows"] for n in (held, held + 3))
    assert [r["val_loss"] for r in more] == [r["val_loss"] for r in once]


def test_forward_report_weights_each_batch_by_its_valid_tokens():
    """Two batches of 8 and 24 tokens: loss per label, depth, FLOPs and expert diversity weighted by tokens, set
    entropy over both batches' tokens (the spec's corpus), state change averaged over batches, usage summed, each
    equal to the per-batch forwards combined by hand; the report runs evaluation forwards and restores training
    mode."""
    torch.manual_seed(0)
    model = dyndepth.build_model(dyndepth.preset("dreamer-tiny", num_recurrences=2)).train()
    batches = []
    for B in (1, 3):
        ids = torch.randint(0, 264, (B, 8))
        labels = ids.roll(-1, 1)
        labels[:, -2:] = -100
        batches.append({"input_ids": ids, "labels": labels})
    report = forward_report(model, batches)
    assert model.training
    model.eval()
    with torch.no_grad():
        outs = [model(b["input_ids"]) for b in batches]
    n = [b["input_ids"].numel() for b in batches]
    nll = sum(F.cross_entropy(o.logits.flatten(0, 1), b["labels"].flatten(), reduction="sum", ignore_index=-100)
              for o, b in zip(outs, batches))
    assert report["val_loss"] == pytest.approx(float(nll) / 24, rel=1e-6)  # 6 labels per row
    stat = [o.stats for o in outs]
    diversity = [float(s["dreamer/expert_diversity"]) for s in stat]
    assert diversity[0] != pytest.approx(diversity[1])  # so weighting by tokens matters
    assert report["expert_diversity"] == pytest.approx((diversity[0] * n[0] + diversity[1] * n[1]) / 32, rel=1e-6)
    sets = collections.Counter()  # definition b over the corpus: every (step, sorted set) of both batches' tokens
    for s_ in stat:
        for a, sets_NK in enumerate(s_["dreamer/expert_sets"]):
            sets.update((a, *sorted(row)) for row in sets_NK.tolist())
    per_step = [[c for (a, *_), c in sets.items() if a == step] for step in (0, 1)]
    entropy = [-sum(c / sum(cs) * math.log(c / sum(cs)) for c in cs) for cs in per_step]
    assert report["expert_set_entropy"] == pytest.approx(sum(entropy) / 2, rel=1e-6)
    one_batch = {"input_ids": torch.cat([b["input_ids"] for b in batches[1:]]), "labels": batches[1]["labels"]}
    rows = [{"input_ids": r[None], "labels": r[None]} for r in one_batch["input_ids"]]  # the spec's corpus is
    assert forward_report(model, rows)["expert_set_entropy"] == pytest.approx(  # the same however it is batched
        forward_report(model, [one_batch])["expert_set_entropy"], rel=1e-6)  # (a per-batch mean grew with B)
    assert report["avg_depth"] == pytest.approx(2.0)
    assert report["flops_executed"] == pytest.approx(sum(float(s["flops/executed"]) for s in stat) / 32, rel=1e-9)
    change = (stat[0]["dreamer/state_change"] + stat[1]["dreamer/state_change"]) / 2
    assert report["state_change"] == [round(float(c), 4) for c in change]
    usage = stat[0]["dreamer/expert_usage"] + stat[1]["dreamer/expert_usage"]
    torch.testing.assert_close(report["expert_usage"], usage)


def test_the_study_command_names_a_folder_it_cannot_study_in_one_line(run_dir, tmp_path_factory, capsys):
    from dyndepth.eval.dreamer import main

    missing = tmp_path_factory.mktemp("x") / "nope"
    with pytest.raises(SystemExit, match="error: .*nope is not a finished `dyndepth train` run folder"):
        main([str(missing)])
    assert not missing.exists()  # nothing created on the way to the error
    with pytest.raises(SystemExit, match="is an exported model: pass its run folder"):
        main([str(run_dir / "model")])
    dyndepth.CausalLM(dyndepth.preset("tiny-qwen3")).save_pretrained(run_dir / "model")  # not a Dreamer
    with pytest.raises(SystemExit, match="trained a 'qwen3' model; the Dreamer study needs a Dreamer run"):
        main([str(run_dir)])


def test_the_study_command_names_an_out_path_that_is_a_file_in_one_line(run_dir):
    """--out at a file (or under one) stopped the study with a FileExistsError / NotADirectoryError traceback."""
    from dyndepth.eval.dreamer import main

    blocker = run_dir / "a_file"
    blocker.write_text("")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit, match=r"error: --out=.*cannot be a folder: .*a_file is a file"):
            main([str(run_dir), "--out", str(out), "--examples", "0", "--batches", "1"])
    assert not (run_dir / "dreamer_study.json").exists()

def test_the_study_command_refuses_no_batches_and_negative_examples_in_one_line(run_dir):
    """--batches 0 ended in "TypeError: 'int' object is not iterable" (a mean over no batch), and --examples -1
    in "error: n must be >= 0, got -3" (the total over three tasks, under an internal name)."""
    from dyndepth.eval.dreamer import main

    for args, message in ((["--batches", "0"], r"--batches must be >= 1 \(validation batches\), got 0"),
                          (["--examples", "-1"], r"--examples must be >= 0 \(0: no exact match\), got -1")):
        with pytest.raises(SystemExit, match=f"error: {message}"):
            main([str(run_dir), *args])
    assert not (run_dir / "dreamer_study.json").exists()


def test_forward_report_keeps_packed_documents_apart_as_the_trainers_evaluation_does():
    """A batch the loader packs with data.intra_doc_mask carries positions and doc_ids: the report's loss is the
    trainer's `evaluate` loss (documents attend within themselves), not a forward across the document boundary."""
    torch.manual_seed(0)
    model = dyndepth.build_model(dyndepth.preset("dreamer-tiny", num_recurrences=2)).eval()
    ids = torch.randint(0, 264, (2, 16))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 9 + [1] * 7])
    positions = torch.cat([torch.arange(6), torch.arange(10), torch.arange(9), torch.arange(7)]).view(2, 16)
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1), "positions": positions, "doc_ids": doc_ids}
    with torch.no_grad():
        apart, across = (model(ids, **kw).logits for kw in ({"positions": positions, "doc_ids": doc_ids}, {}))
    loss = {name: float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))
            for name, logits in (("apart", apart), ("across", across))}
    assert loss["apart"] != pytest.approx(loss["across"], rel=1e-4)  # the boundary matters to this batch
    assert forward_report(model, [batch])["val_loss"] == pytest.approx(loss["apart"], rel=1e-6)


def test_the_expert_usage_heatmap_labels_each_row_with_its_step_and_layer(tmp_path, monkeypatch):
    """A group of G = 2 layers has R * G usage rows, application r * G + g: the heatmap's row 3 is step 1 of layer 1
    (its ticks read 0..3 as steps, so a 2-step model's figure showed 4 steps)."""
    from dyndepth import plots

    torch.manual_seed(0)
    model = dyndepth.build_model(dyndepth.preset("dreamer-tiny", num_recurrences=2, layers_per_group=2))
    model.save_pretrained(tmp_path / "model")
    data = {"source": "synthetic", "tasks": ["add"], "synthetic_examples": 200, "difficulty": {"add": {"digits": 1}}}
    save_run_config(RunConfig(model={"preset": "dreamer-tiny"}, data=data,
                              train=TrainConfig(batch_size=2, seq_len=32)), tmp_path / "config.yaml")
    figures = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi: figures.setdefault(path.name, fig) and path)
    result = run_study(tmp_path, examples_per_task=1, num_batches=1, exit_kls=())
    assert torch.tensor(result["expert_usage"]).shape == (4, 16)
    ax = figures["expert_usage.png"].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.0", "0.1", "1.0", "1.1"]
    assert ax.get_ylabel() == "step.layer"


def test_the_report_names_the_state_change_of_a_layer_group_per_application(tmp_path):
    """With a group of G = 2 layers the state change has R * G entries, one per layer application; the report called
    them "per step" (4 entries for a 2-step model)."""
    torch.manual_seed(0)
    dyndepth.build_model(dyndepth.preset("dreamer-tiny", num_recurrences=2, layers_per_group=2)).save_pretrained(
        tmp_path / "model")
    data = {"source": "synthetic", "tasks": ["add"], "synthetic_examples": 200, "difficulty": {"add": {"digits": 1}}}
    save_run_config(RunConfig(model={"preset": "dreamer-tiny"}, data=data,
                              train=TrainConfig(batch_size=2, seq_len=32)), tmp_path / "config.yaml")
    result = run_study(tmp_path, examples_per_task=0, num_batches=1, exit_kls=())
    assert len(result["state_change"]) == 4 and result["layers_per_group"] == 2
    assert "relative state change per layer application (step r, layer g at r * 2 + g): [" in render(result)

def test_forward_report_leaves_the_padding_of_whole_document_windows_out():
    """data.packing="documents" pads each window after its documents (attention_mask 0 there): the trainer's
    evaluation passes the mask, the report did not, so the padding counted as tokens in the ideal FLOPs per token and
    the expert statistics. With the mask the report is the trimmed rows' (but for the executed FLOPs: the padded rows
    do run)."""
    from dyndepth.data.loader import PackedLoader
    from dyndepth.data.shards import ShardSet
    from dyndepth.tokenizer import ByteTokenizer

    shards = ShardSet.from_documents([("Q: 1+1?", "2"), ("Q: hi?", "yo"), "plain"], ByteTokenizer())
    batch = PackedLoader(shards, 32, 1, shuffle=False, packing="documents").next_batch()
    n = int(batch["attention_mask"].sum())
    assert 0 < n < 32
    trimmed = {k: v[:, :n] for k, v in batch.items() if k != "attention_mask"}
    torch.manual_seed(0)
    model = dyndepth.build_model(dyndepth.preset("dreamer-tiny", num_recurrences=2))
    with model.override(exit_kl=0.1):  # under exit the padding's own depth counted too
        padded, alone = forward_report(model, [batch]), forward_report(model, [trimmed])
    for key in ("val_loss", "avg_depth", "flops_ideal", "expert_diversity", "expert_set_entropy"):
        assert padded[key] == pytest.approx(alone[key], rel=1e-5), key
    torch.testing.assert_close(padded["expert_usage"], alone["expert_usage"])


def test_the_study_reads_the_tokenizer_exported_beside_the_model_not_one_rebuilt_from_the_data_config(
        tmp_path, monkeypatch):
    """A bpe:N run's model/ carries the BPE it trained on. The study built the tokenizer from config.yaml's data
    section instead: with the BPE cache gone (or data.source edited since) it trained another BPE on the source as it
    is now, and scored the validation text (and generated) with ids the model never saw."""
    from dyndepth.data.build import tokenizer_fingerprint
    from dyndepth.eval import dreamer
    from dyndepth.tokenizer import load_tokenizer, train_bpe

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(words[(i + j) % 12] for j in range(8))
                                                   for i in range(600)) + "\n")
    own = train_bpe(iter(["0123456789 +-*/ = ()"] * 50), vocab_size=264)  # another BPE than the source gives
    torch.manual_seed(0)
    dyndepth.build_model(dyndepth.preset("dreamer-tiny", num_recurrences=2)).save_pretrained(tmp_path / "model")
    own.save(tmp_path / "model")
    data = {"source": str(tmp_path / "corpus.txt"), "tokenizer": "bpe:264", "cache_dir": str(tmp_path / "cache")}
    save_run_config(RunConfig(model={"preset": "dreamer-tiny"}, data=data,
                              train=TrainConfig(batch_size=2, seq_len=32)), tmp_path / "config.yaml")
    seen = []
    build_loader = dreamer.build_loader
    monkeypatch.setattr(dreamer, "build_loader", lambda *a, tokenizer, **kw: seen.append(tokenizer) or
                        build_loader(*a, tokenizer=tokenizer, **kw))
    run_study(tmp_path, examples_per_task=0, num_batches=1, exit_kls=())
    exported = tokenizer_fingerprint(load_tokenizer(tmp_path / "model"))
    assert [tokenizer_fingerprint(t) for t in seen] == [exported]
    assert not (tmp_path / "cache" / "tokenizers").exists()  # no BPE trained on the way


def test_the_study_of_a_bpe_run_without_an_exported_tokenizer_says_so(run_dir):
    """With no tokenizer in model/, a bpe:N run's ids cannot be known (another BPE would be trained): an error naming
    the fix, before any BPE is trained."""
    from dyndepth.runconfig import load_run_config

    (run_dir / "corpus.txt").write_text("some text\n" * 200)
    rc = load_run_config(run_dir / "config.yaml")
    data = {"source": str(run_dir / "corpus.txt"), "tokenizer": "bpe:300", "cache_dir": str(run_dir / "cache")}
    save_run_config(RunConfig(model=rc.model, data=data, train=rc.train), run_dir / "config.yaml")
    with pytest.raises(ValueError, match=r"model has no tokenizer .*bpe:300"):
        run_study(run_dir, examples_per_task=0, num_batches=1, exit_kls=())
    assert not (run_dir / "cache" / "tokenizers").exists()
