"""`dyndepth study tokens` (bench/study.py): the tokens-to-accuracy interpolation, and a smoke run through the CLI
that trains the reference and two matched baselines and writes the table, the JSON and the plot."""

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import dyndepth
from dyndepth.bench.study import (
    moe_expert_sets,
    ratios,
    study_config,
    tokens_to_reach,
    train_and_evaluate,
    training_key,
)
from dyndepth.cli import app
from dyndepth.eval.dreamer import SetCounts


def test_tokens_to_reach_interpolates_in_log_tokens_on_the_running_maximum():
    curve = [(100, 0.1), (400, 0.3), (1600, 0.2), (6400, 0.5)]
    assert tokens_to_reach(curve, 0.05) == ("<=", 100.0)
    kind, t = tokens_to_reach(curve, 0.2)
    assert kind == "=" and t == pytest.approx(200.0)  # halfway between 100 and 400 in log tokens
    kind, t = tokens_to_reach(curve, 0.4)  # the dip at 1600 counts as 0.3 (running maximum)
    assert kind == "=" and t == pytest.approx(1600 * 2 ** (2 * 0.5))
    assert tokens_to_reach(curve, 0.9) == (">", 6400.0)
    curves = {"reference": [{"tokens": 100, "exact_match": 0.2}, {"tokens": 400, "exact_match": 0.0}],
              "dense": [{"tokens": 100, "exact_match": 0.1}, {"tokens": 400, "exact_match": 0.3}]}
    assert ratios(curves, "reference") == {"dense": ["2.00", "-"]}
    losses = {"reference": [{"tokens": 100, "val_loss": 2.0}, {"tokens": 400, "val_loss": 1.0}],
              "dense": [{"tokens": 100, "val_loss": 3.0}, {"tokens": 400, "val_loss": 1.5}]}  # lower is better
    assert ratios(losses, "reference", key="val_loss") == {"dense": ["2.52", ">1.00"]}


def test_mean_curves_keep_how_the_set_entropy_was_taken():
    """repro labels a study's diversity claim by it: the pooled rows' label was dropped, so every study read as the
    per-batch mean of studies before 2026-12-05."""
    from dyndepth.bench.study import mean_curves

    rows = [{"model": "reference", "tokens": 100, "exact_match": e, "val_loss": 1.0, "expert_set_entropy": h,
             "set_entropy_over": "corpus"} for e, h in ((0.2, 3.0), (0.4, 2.0))]
    assert mean_curves(rows)["reference"] == [{"tokens": 100, "exact_match": pytest.approx(0.3), "val_loss": 1.0,
                                               "expert_set_entropy": 2.5, "set_entropy_over": "corpus"}]


def test_moe_set_entropy_counts_distinct_top_k_sets_per_layer_over_every_batch():
    model = dyndepth.build_model(dyndepth.preset("tiny-qwen3-moe")).eval()  # 4 experts, top-2: 6 possible sets
    ids = torch.randint(0, 256, (4, 32))
    sets = SetCounts()
    sets.add(moe_expert_sets(model, ids))
    assert 0 < sets.entropy() <= math.log(6)
    halves = SetCounts()  # the corpus's distribution, whatever the batching
    for part in ids.split(2):
        halves.add(moe_expert_sets(model, part))
    assert halves.entropy() == pytest.approx(sets.entropy())
    with torch.no_grad():  # uniform routing: every layer's router scores equal, one set for every token
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
    uniform = SetCounts()
    uniform.add(moe_expert_sets(model, ids))
    assert uniform.entropy() == 0.0
    assert moe_expert_sets(dyndepth.build_model(dyndepth.preset("tiny-qwen3")), ids) is None


def test_bad_profiles_and_budgets_are_one_clear_error():
    with pytest.raises(ValueError, match="profile 'huge'"):
        study_config("huge")
    with pytest.raises(ValueError, match="at least one step"):
        study_config("smoke", budgets=[10])
    with pytest.raises(ValueError, match="increase strictly"):
        study_config("smoke", budgets=[256, 128])
    tokens = study_config("smoke").batch_size * study_config("smoke").seq_len
    with pytest.raises(ValueError, match=r"give training steps \[1, 1, 2\].*at least \d+ tokens apart"):
        study_config("smoke", budgets=[tokens, tokens + tokens // 2, 2 * tokens])  # (one row, then a refused rerun)
    for seeds in ([0, -1], [2**31]):  # train.seed's error, after the match and every model of the seeds before
        with pytest.raises(ValueError, match=rf"study seeds must lie in \[0, 2\*\*31\), got {seeds[-1]}"):
            study_config("smoke", seeds=seeds)


def test_the_gpu_profile_is_described_by_its_models_size():
    """`dyndepth study tokens --help` and the module said the gpu profile's model has ~100M parameters;
    dreamer-small has 85.8M."""
    from dyndepth.bench import study

    with torch.device("meta"):
        model = dyndepth.build_model(dyndepth.preset(study.PROFILES["gpu"]["reference"]))
    n = sum(p.numel() for p in model.parameters())
    size = f"{n / 1e6:.1f}M parameters"
    assert size == "85.8M parameters" and size in study.__doc__.replace("\n", " ")
    help_text = CliRunner().invoke(app, ["study", "tokens", "--help"], terminal_width=200).output
    help_text = " ".join(help_text.replace("│", " ").split())  # (the help box's borders and wrapping)
    assert "100M" not in help_text and f"gpu (dreamer-small, {size}" in help_text


def test_the_smoke_profile_trains_every_model_and_writes_the_report(tmp_path):
    words = ["the", "ship", "sailed", "north", "and", "a", "storm", "rose", "over", "sea", "at", "night"]
    rng = torch.Generator().manual_seed(0)
    for name, n in (("train.txt", 60), ("val.txt", 20)):  # books separated by end-of-text lines, as Gutenberg's
        books = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (300,), generator=rng))
                 for _ in range(n)]
        (tmp_path / name).write_text("\n<|endoftext|>\n".join(books))
    result = CliRunner().invoke(app, ["study", "tokens", "--profile", "smoke", "--out", str(tmp_path / "out"),
                                      "--text", str(tmp_path / "train.txt"), "--text-val", str(tmp_path / "val.txt")])
    assert result.exit_code == 0, result.output
    tmp_path = tmp_path / "out"
    data = json.loads((tmp_path / "study.json").read_text())
    assert {(r["model"], r["tokens"]) for r in data["rows"]} == {
        (m, t) for m in ("reference", "dense", "moeut") for t in (128, 256)}
    assert "expert_diversity" in data["curves"]["reference"][-1] and "expert_diversity" in data["curves"]["moeut"][-1]
    assert (tmp_path / "accuracy_vs_tokens.png").stat().st_size > 0
    assert "tokens to ref. accuracy" in (tmp_path / "study.md").read_text()
    text = data["text"]  # the same models on the text file: held-out loss at each budget, no exact match
    assert {(r["model"], r["tokens"]) for r in text["rows"]} == {
        (m, t) for m in ("reference", "dense", "moeut") for t in (128, 256)}
    assert all(0 < r["val_loss"] < math.log(264) + 1 and "exact_match" not in r for r in text["rows"])
    assert set(text["ratios"]) == {"dense", "moeut"} and len(text["ratios"]["dense"]) == 2
    assert (tmp_path / "text_loss_vs_tokens.png").stat().st_size > 0
    assert "bits/byte@256" in (tmp_path / "study.md").read_text()
    with pytest.raises(ValueError, match="does not exist"):
        study_config("smoke", text=str(tmp_path / "missing.txt"))


def test_a_rerun_reuses_finished_runs_of_the_same_model_only(tmp_path):
    cfg = study_config("smoke", out_dir=str(tmp_path))
    config = dyndepth.preset("dreamer-tiny")
    rows = [{"model": "reference", "step": s, "exact_match": 0.5} for s in cfg.steps]
    (tmp_path / "reference" / "seed0").mkdir(parents=True)
    (tmp_path / "reference" / "seed0" / "rows.json").write_text(json.dumps({"config": config.to_dict(), "rows": rows}))
    assert train_and_evaluate("reference", config, 0, cfg, {}, None, []) == rows  # nothing trained
    with pytest.raises(ValueError, match="another model"):
        train_and_evaluate("reference", dyndepth.preset("dreamer-tiny", hidden_size=64), 0, cfg, {}, None, [])
    text = {"source": "a.txt", "tokenizer": "byte"}
    (tmp_path / "text" / "reference" / "seed0").mkdir(parents=True)
    (tmp_path / "text" / "reference" / "seed0" / "rows.json").write_text(
        json.dumps({"config": config.to_dict(), "data": text, "rows": rows}))
    assert train_and_evaluate("reference", config, 0, cfg, text, None, None, corpus="text") == rows
    with pytest.raises(ValueError, match="other data"):  # the same model on another text file is trained anew
        train_and_evaluate("reference", config, 0, cfg, {**text, "source": "b.txt"}, None, None, corpus="text")
    # a run saved with its training settings is reused under the same ones only (another lr, dtype or device was
    # silently reused)
    (tmp_path / "reference" / "seed0" / "rows.json").write_text(
        json.dumps({"config": config.to_dict(), "train": training_key(cfg), "rows": rows}))
    assert train_and_evaluate("reference", config, 0, cfg, {}, None, []) == rows
    for change in ({"lr": 1e-3}, {"dtype": "bfloat16"}, {"device": "cuda"}, {"examples_per_task": 7}):
        with pytest.raises(ValueError, match="other training or evaluation settings"):
            train_and_evaluate("reference", config, 0, dataclasses.replace(cfg, **change), {}, None, [])


def test_a_short_validation_text_is_scored_once_not_wrapped_around(tmp_path, monkeypatch):
    """text_eval_batches past what --text-val holds served its windows again (a new epoch of the loader), weighting
    them twice in the held-out loss; the trainer's evaluation stops at one pass, and so does the study."""
    from pathlib import Path

    from dyndepth.bench import study

    (tmp_path / "train.txt").write_text("a longer training book\n" * 50)
    (tmp_path / "val.txt").write_text("a short held-out book\n" * 5)  # 110 bytes: 3 windows of 33

    def train(model, loader, cfg, hooks):  # (the batches the evaluation hook was given; nothing trained)
        seen.append(hooks[-1].val_batches)
        Path(cfg.out_dir).mkdir(parents=True)

    seen = []
    monkeypatch.setattr(study, "train", train)
    cfg = study_config("smoke", out_dir=str(tmp_path / "out"), seq_len=32, batch_size=1, text_eval_batches=5)
    text = {"source": str(tmp_path / "train.txt"), "val_source": str(tmp_path / "val.txt"), "tokenizer": "byte",
            "cache_dir": str(tmp_path / "data")}
    train_and_evaluate("reference", dyndepth.preset("dreamer-tiny"), 0, cfg, text, None, None, corpus="text")
    starts = [tuple(b["input_ids"][0, :8].tolist()) for b in seen[0]]
    assert cfg.text_eval_batches > 3 and len(starts) == len(set(starts)) == 3


def test_the_text_table_names_the_held_out_tokens_it_scored(tmp_path):
    """--text-val shorter than text_eval_batches windows: 3 windows of 1 x 32 were scored and the heading said
    "5 x 1 x 32 held-out tokens"."""
    from dyndepth.bench.study import mean_curves, render_text

    (tmp_path / "train.txt").write_text("a longer training book\n" * 50)
    (tmp_path / "val.txt").write_text("a short held-out book\n" * 5)  # 110 bytes: 3 windows of 33
    cfg = study_config("smoke", out_dir=str(tmp_path / "out"), seq_len=32, batch_size=1, text_eval_batches=5,
                       text=str(tmp_path / "train.txt"), text_val=str(tmp_path / "val.txt"))
    text = {"source": cfg.text, "val_source": cfg.text_val, "tokenizer": "byte", "cache_dir": str(tmp_path / "data")}
    rows = train_and_evaluate("reference", dyndepth.preset("dreamer-tiny"), 0, cfg, text, None, None, corpus="text")
    table = render_text({"config": dataclasses.asdict(cfg), "text": {"rows": rows, "curves": mean_curves(rows),
                                                                      "ratios": {}}})
    assert "byte tokenizer, 96 held-out tokens" in table and "5 x 1 x 32" not in table


def test_the_text_table_says_what_was_held_out_of_a_one_document_text():
    """`--text tinyshakespeare/input.txt` (no end-of-text line: one document) held out its last 10% and the heading
    said "held out: 1% of its documents"."""
    from dyndepth.bench.study import render_text

    cfg = dataclasses.asdict(study_config("smoke"))
    rows = [{"model": "reference", "tokens": 128, "val_loss": 2.0, "val_tokens": 64}]
    table = render_text({"config": {**cfg, "text": "input.txt", "text_val": ""},
                         "text": {"rows": rows, "curves": {"reference": rows}, "ratios": {}}})
    assert "(held out: every 100th document; of a one-document text, its last 10%)" in table


def test_runs_are_keyed_by_the_texts_content_not_how_its_path_is_spelled(tmp_path):
    import os

    from dyndepth.bench.study import data_key

    (tmp_path / "a.txt").write_text("one book")
    key = data_key({"source": str(tmp_path / "a.txt"), "tokenizer": "byte", "cache_dir": str(tmp_path / "x")})
    relative = os.path.relpath(tmp_path / "a.txt")
    assert key == data_key({"source": relative, "tokenizer": "byte", "cache_dir": str(tmp_path / "y")})
    (tmp_path / "a.txt").write_text("another book")
    assert key != data_key({"source": str(tmp_path / "a.txt"), "tokenizer": "byte"})


def test_a_saved_config_matches_after_the_config_class_gained_a_field():
    from dyndepth.bench.study import same_config

    config = dyndepth.preset("mor-tiny")
    old = {k: v for k, v in config.to_dict().items() if k not in ("causal_path", "aux_router_hidden")}
    assert same_config(old, config)  # a run saved before the field existed, which had its default behaviour
    assert not same_config({**old, "hidden_size": 64}, config) and not same_config(None, config)
    assert not same_config({**config.to_dict(), "router_noise": 0.1}, config)  # a field this class does not have


def test_device_auto_names_the_device_that_trains():
    """`study tokens --device auto` ran the match, then crashed in torch.device("auto") before the first training
    run."""
    assert study_config("smoke", device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_diverged_runs_rows_are_strict_json_and_read_back_as_nan(tmp_path):
    """A run whose loss diverged has val_loss NaN: rows.json and study.json held the bare word NaN (not JSON: jq and
    JavaScript refuse the file). The writers write null; the readers (a rerun reusing rows.json, repro reading
    study.json) take it back as NaN, so the means and the tables stay NaN rather than failing on None."""
    from dyndepth import jsonio
    from dyndepth.bench.study import mean_curves, read_study, render

    cfg = study_config("smoke", out_dir=str(tmp_path))
    config = dyndepth.preset("dreamer-tiny")
    rows = [{"model": "reference", "step": s, "tokens": 64 * s, "exact_match": 0.0, "val_loss": math.nan}
            for s in cfg.steps]
    text = jsonio.dumps({"config": config.to_dict(), "rows": rows})
    assert "NaN" not in text and '"val_loss": null' in text
    (tmp_path / "reference" / "seed0").mkdir(parents=True)
    (tmp_path / "reference" / "seed0" / "rows.json").write_text(text)
    reused = train_and_evaluate("reference", config, 0, cfg, {}, None, [])
    assert all(math.isnan(r["val_loss"]) for r in reused)
    curves = mean_curves(reused)
    study = {"config": {"reference": "dreamer-tiny", "batch_size": 2, "seq_len": 32, "seeds": [0], "tasks": ["add"],
                        "tolerance": 0.05}, "machine": "test", "shapes": {"reference": "D=128"}, "match": {},
             "rows": reused, "curves": curves, "ratios": {}}
    (tmp_path / "study.json").write_text(jsonio.dumps(study))
    assert "| nan |" in render(read_study(tmp_path / "study.json"))  # (it failed formatting None as a float)
