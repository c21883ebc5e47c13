"""`dyndepth repro --profile quick` end to end on a tiny random base: every contender, the claims and the plots."""

import json

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

import dyndepth
from dyndepth.cli import app
from dyndepth.repro import ReproConfig, claims, interpolate, run_repro
from dyndepth.tokenizer import train_bpe

TEXT = ("The man turned on the faucet and water flowed from the spout. She bends down and grabs the pole. "
        "How do I open a jar? Twist the lid. A man is sitting on a roof and ripping tiles. ")
COPA = {"query": "The man turned on the faucet, therefore", "gold": 1,
        "choices": ["the toilet filled with water.", "water flowed from the spout."]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    docs = "\n<|endoftext|>\n".join(TEXT * (3 + i % 3) for i in range(12))
    (root / "train.txt").write_text(docs)
    (root / "val.txt").write_text(docs)
    (root / "data" / "eval_gauntlet").mkdir(parents=True)
    (root / "data" / "eval_gauntlet" / "copa.jsonl").write_text((json.dumps(COPA) + "\n") * 4)
    tok = train_bpe(iter([TEXT] * 20), vocab_size=300)
    base = root / "base"
    tok.save(base)
    config = dyndepth.preset("tiny-qwen3", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                             max_position_embeddings=256)
    torch.manual_seed(0)
    dyndepth.CausalLM(config).save_pretrained(base)
    return root


def test_quick_profile_writes_the_report(setup, tmp_path):
    cfg = ReproConfig.from_profile("quick", base=str(setup / "base"), data_dir=str(setup / "data"),
                                   train_data=str(setup / "train.txt"), val_data=str(setup / "val.txt"),
                                   text_split="eot", out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                                   val_batches=1000)
    result = run_repro(cfg)
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["base", "SFT", "GateSkip vector q=0%", "GateSkip vector q=15%", "GateSkip low-rank q=0%",
                          "GateSkip low-rank q=15%", "MoD c=50.0%", "DND 20%"]
    assert rows["base"]["compute"] == 1.0 and rows["SFT"]["compute"] == pytest.approx(1.0)
    assert rows["GateSkip vector q=0%"]["compute"] > 1.0  # total compute counts the gates
    assert rows["GateSkip low-rank q=0%"]["compute"] < rows["GateSkip vector q=0%"]["compute"]  # cheaper gates
    assert rows["DND 20%"]["compute"] > 1.0  # nested passes cost extra (MoD's predictor is untrained here)
    assert rows["DND 20%"]["latency_vs_sft"] > 0 and "latency_vs_sft" not in rows["SFT"]  # DND timed beside SFT
    for r in rows.values():
        assert r["tasks"]["copa"]["acc"]["n"] == 4 and r["chance"] == 0.5 and r["val_loss"] > 0
    # the held-out loss is over what the split holds (one pass at most), and the report said "1000 batches"
    scored = result["val_batches_scored"]
    assert 1 <= scored < 1000
    out = tmp_path / "out"
    report = (out / "REPORT.md").read_text()
    assert "## The papers' claims at this scale" in report and "GateSkip keeps >90%" in report
    assert f"held-out loss on {scored} batches of" in report
    for path in result["plots"].values():
        assert (out / path.split("/")[-1]).read_bytes()[:4] == b"\x89PNG"
    assert {"accuracy", "loss", "depth GateSkip vector", "depth DND 20%", "depth MoD c=50.0%"} <= set(result["plots"])
    (out / "REPORT.md").write_text("stale")
    cli = CliRunner().invoke(app, ["repro", "--render-only", "--out", str(out)])  # the same report, nothing rerun
    assert cli.exit_code == 0 and (out / "REPORT.md").read_text() == report
    cli = CliRunner().invoke(app, ["repro", "--out", str(out)])
    assert cli.exit_code != 0 and "repro needs BASE, --data-dir, --train-data" in cli.output


def _row(label, method, compute, val_loss, accuracy=0.6, budget=None):
    return {"label": label, "method": method, "compute": compute, "val_loss": val_loss, "accuracy": accuracy,
            "chance": 0.5, "latency": 1.0, "knobs": {} if budget is None else {"budget": budget}}


def test_claims_follow_the_numbers():
    rows = [_row("base", "base", 1.0, 3.0, 0.70),
            _row("GateSkip vector q=0%", "gateskip", 1.15, 3.0, 0.70, 0.0),
            _row("GateSkip vector q=15%", "gateskip", 0.98, 3.2, 0.66, 0.15),
            _row("GateSkip vector q=50%", "gateskip", 0.60, 4.0, 0.55, 0.5),
            _row("MoD c=50%", "mod", 0.75, 3.1),
            _row("SFT", "none", 1.0, 2.9), _row("DND 20%", "dnd", 1.1, 2.95)]
    found = {c["claim"].split(" (")[0]: c["holds"] for c in claims(rows)}
    # 94% of the accuracy is kept at 15%, but the gates eat the saving (98% of the base's FLOPs): not reproduced
    assert found["GateSkip keeps >90% of the baseline's accuracy at 15% compute saved"] is False
    assert found["GateSkip beats MoD at equal compute"] is False  # GateSkip at 75%: ~3.58 > 3.1
    assert found["DND beats the identically configured SFT at equal tokens, at a small overhead"] is False
    tie = rows[:-1] + [_row("DND 20%", "dnd", 1.1, 2.895)]  # 0.005 nats better: within the margin, a tie
    assert claims(tie)[-1]["holds"] is False
    assert claims(rows[:-1] + [_row("DND 20%", "dnd", 1.1, 2.8)])[-1]["holds"] is True
    slow = rows[:-2] + [dict(_row("SFT", "none", 1.0, 2.9), latency=1.02), dict(rows[-1], latency=1.2)]
    assert "latency +18%" in claims(slow)[-1]["measured"]  # each row's ratio to the base, timed in turn with it
    side_by_side = slow[:-1] + [dict(slow[-1], latency_vs_sft=1.05)]
    assert "latency +5%" in claims(side_by_side)[-1]["measured"]  # DND timed against SFT in one loop
    at_chance = [dict(r, accuracy=0.5) for r in rows]
    assert claims(at_chance)[0]["holds"] is None  # a base at chance cannot test retention
    better = rows[:-1] + [_row("DND 20%", "dnd", 1.1, 2.8, accuracy=0.59)]  # 0.1 nats better, 1 point less accurate
    assert claims(better)[-1]["holds"] is False
    better_at_chance = [dict(r, accuracy=0.5) for r in better[:-2]] + [dict(better[-2], accuracy=0.51),
                                                                      dict(better[-1], accuracy=0.505)]
    assert claims(better_at_chance)[-1]["holds"] is True  # accuracy at chance is not judged: the loss decides
    assert "at chance: not judged" in claims(better_at_chance)[-1]["measured"]
    costly = rows[:-1] + [_row("DND 20%", "dnd", 3.0, 2.8)]  # better, at +200% FLOPs: not "a small overhead"
    assert claims(costly)[-1]["holds"] is False
    cheap = rows + [_row("MoD c=12.5%", "mod", 0.45, 3.9)]  # below the vector curve's range (0.60-1.15)
    assert [c for c in claims(cheap) if "c=12.5%" in c["claim"]][0]["holds"] is None
    lowrank = [_row("GateSkip low-rank q=0%", "gateskip", 1.0, 3.0, budget=0.0),
               _row("GateSkip low-rank q=50%", "gateskip", 0.4, 3.5, budget=0.5)]
    mod = [c for c in claims(cheap + lowrank) if "c=12.5%" in c["claim"]][0]  # the low-rank curve covers 45%
    assert mod["holds"] is True and "low-rank gates" in mod["measured"]  # ~3.46 at 45%: MoD's 3.9 loses
    both = [c for c in claims(rows + lowrank) if "c=50%" in c["claim"]][0]  # both curves cover 75%: the better one
    assert "(low-rank gates) 3.208" in both["measured"] and both["holds"] is False  # vector ~3.68 at 75%


def test_interpolate_along_a_curve():
    pts = [{"compute": 0.6, "v": 4.0}, {"compute": 1.0, "v": 3.0}]
    assert interpolate(pts, 0.8, "v") == pytest.approx(3.5)
    assert interpolate(pts, 0.5, "v") is None


def test_a_study_folder_adds_dreamers_claims_and_table(tmp_path):
    from dyndepth.repro import dreamer_study

    curve = [{"tokens": t, "exact_match": 0.1 * i, "val_loss": 2.0 / i} for i, t in enumerate((100, 200, 400, 800), 1)]
    study = {"config": {"reference": "dreamer-tiny", "batch_size": 2, "seq_len": 32, "seeds": [0], "tasks": ["add"],
                        "tolerance": 0.05},
             "machine": "test", "shapes": {"reference": "D=128", "dense": "D=64", "moeut": "D=64"},
             "match": {"dense": {"mismatch": {"params": 0.01}, "within": True},
                       "moeut": {"mismatch": {"params": 0.01}, "within": True}},
             "curves": {"reference": [dict(p, expert_set_entropy=3.0) for p in curve], "dense": curve,
                        "moeut": [dict(p, expert_set_entropy=1.0) for p in curve]},
             "ratios": {"dense": ["-", "3.00", ">2.00", ">1.00"], "moeut": ["2.50", "2.20", "2.00", "1.00"]},
             "experts": {"reference": [16, 2], "moeut": [16, 2]}}
    (tmp_path / "study").mkdir()

    def claims(**ratios):
        (tmp_path / "study" / "study.json").write_text(json.dumps({**study, "ratios": {**study["ratios"], **ratios}}))
        found = dreamer_study(tmp_path / "study", tmp_path)
        return found, {c["claim"].split(" than")[0].split(" is ")[0]: c["holds"] for c in found["claims"]}

    found, holds = claims()  # at the budgets up to 400 (half of 800) every ratio is >= 2
    assert holds == {"Dreamer needs 2-8x fewer training tokens": True, "Dreamer's expert-selection diversity": True}
    assert "exp(H)" in found["claims"][1]["measured"] and "| reference |" in found["table"]
    assert "a mean of per-batch figures" in found["claims"][1]["measured"]  # a study saved before 2026-12-05
    study["curves"]["reference"][-1]["set_entropy_over"] = "corpus"
    assert "over the validation set" in claims()[0]["claims"][1]["measured"]
    assert claims(moeut=["2.50", "1.40", "2.00", "1.00"])[1]["Dreamer needs 2-8x fewer training tokens"] is False
    assert claims(moeut=["<=0.50", "2.20", "2.00", "1.00"])[1]["Dreamer needs 2-8x fewer training tokens"] is False
    never = claims(dense=[">8.00", ">4.00", ">2.00", ">1.00"])[1]  # never got there: >= 2x at budgets <= 400
    assert never["Dreamer needs 2-8x fewer training tokens"] is True
    study["curves"]["moeut"] = [dict(p, expert_set_entropy=2.5) for p in curve]  # exp(3) / exp(2.5) = 1.6x
    assert claims()[1]["Dreamer's expert-selection diversity"] is False
    study["experts"]["moeut"] = [4, 2]  # 6 possible sets against 120: the ratio measures the bound
    assert claims()[1]["Dreamer's expert-selection diversity"] is None
    with pytest.raises(ValueError, match="no study.json"):
        dreamer_study(tmp_path / "missing", tmp_path)


def test_a_low_rank_curve_outside_the_vector_curves_range_is_an_untestable_row():
    rows = [_row("base", "base", 1.0, 3.0), _row("GateSkip vector q=0%", "gateskip", 1.15, 3.0, budget=0.0),
            _row("GateSkip vector q=50%", "gateskip", 0.9, 3.4, budget=0.5),
            _row("GateSkip low-rank q=50%", "gateskip", 0.5, 3.5, budget=0.5)]
    row = [c for c in claims(rows) if "low-rank gates beat" in c["claim"]]  # was left out of the report
    assert len(row) == 1 and row[0]["holds"] is None and "do not overlap" in row[0]["measured"]


def test_plot_series_are_named_as_the_report_names_them():
    """The legends said none / mod / dnd where the report and the point labels say SFT / MoD / DND."""
    from dyndepth.repro import _series_name

    names = [_series_name(r) for r in (_row("SFT", "none", 1.0, 2.9), _row("MoD c=50%", "mod", 0.75, 3.1),
                                       _row("DND 20%", "dnd", 1.1, 2.95), _row("base", "base", 1.0, 3.0),
                                       _row("GateSkip vector q=15%", "gateskip", 0.98, 3.2, budget=0.15))]
    assert names == ["SFT", "MoD", "DND", "base", "GateSkip vector"]



def test_the_report_says_what_its_latency_column_is():
    """REPORT.md's table printed a latency column (1.22x, 0.48x, the base itself 2.42x) that its heading never
    defined: a time over the base's, not a speedup, and the base's row a control of the timing noise."""
    from dyndepth.repro import render

    config = {"profile": "quick", "base": "b", "post_steps": 2, "batch_size": 2, "seq_len": 32, "train_data": "t",
              "lr": 3e-4, "val_batches": 1, "val_data": "v", "tasks": ["copa"], "limit": 4}
    rows = [dict(_row("base", "base", 1.0, 3.0), ideal_compute=1.0, perplexity=20.0, tasks={})]
    report = render({"config": config, "date": "d", "machine": "m", "seconds": 60, "cpu_seconds": 60,
                     "base_params": 1e5, "rows": rows, "claims": [], "plots": {}})
    assert ("latency = the median time of a forward of one held-out batch (2 x 32 tokens) over the base model's"
            in report) and "the base's row: itself, a control" in report
    config["val_data"] = ""  # a one-document training text holds out its last tenth, not "held-out documents"
    report = render({"config": config, "date": "d", "machine": "m", "seconds": 60, "cpu_seconds": 60,
                     "base_params": 1e5, "rows": rows, "claims": [], "plots": {}})
    assert "1 batches of the training text's held-out part (every 100th document; of a one-document text, its " \
        "last 10%)" in report


def test_the_report_names_the_examples_each_task_scored():
    """The cpu profile's limit is 200 and COPA has 100 examples: REPORT.md said "200 examples each"."""
    from dyndepth.repro import render

    config = {"profile": "cpu", "base": "b", "post_steps": 2, "batch_size": 2, "seq_len": 32, "train_data": "t",
              "lr": 3e-4, "val_batches": 1, "val_data": "v", "tasks": ["piqa", "copa"], "limit": 200}
    tasks = {t: {"acc": {"value": 0.5, "stderr": 0.05, "chance": 0.5, "n": n}} for t, n in (("piqa", 200),
                                                                                          ("copa", 100))}
    rows = [dict(_row("base", "base", 1.0, 3.0), ideal_compute=1.0, perplexity=20.0, tasks=tasks)]
    report = render({"config": config, "date": "d", "machine": "m", "seconds": 60, "cpu_seconds": 60,
                     "base_params": 1e5, "rows": rows, "claims": [], "plots": {}})
    assert "tasks piqa (200), copa (100) (examples scored: at most 200 each;" in report
    assert "200 examples each" not in report


@pytest.mark.parametrize("override, message", [
    ({"tasks": ["gsm8k"]}, r"repro scores accuracy \(acc / acc_norm\) on \['gsm8k'\]"),  # a ZeroDivisionError, late
    ({"limit": 0}, "limit must be >= 1"), ({"post_steps": 0}, "post_steps must be >= 1"),
])
def test_bad_repro_settings_fail_before_any_work(override, message):
    from dyndepth.eval.run import OFFLINE_TASKS
    from dyndepth.repro import ACCURACY_TASKS, ReproConfig

    assert ACCURACY_TASKS == set(OFFLINE_TASKS) - {"gsm8k"}  # every offline task but the generative one
    with pytest.raises(ValueError, match=message):
        ReproConfig.from_profile("quick", base="b", data_dir="d", train_data="t", **override)


def test_a_missing_base_or_data_dir_is_named_before_any_text_is_tokenized(tmp_path):
    from dyndepth.repro import ReproConfig

    with pytest.raises(ValueError, match="repro BASE .*nobase.* is not a model folder"):  # (named the tokenizer path)
        ReproConfig.from_profile("quick", base=str(tmp_path / "nobase"), data_dir=str(tmp_path), train_data="t")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="repro --data-dir .*nodata.* is not a folder"):
        ReproConfig.from_profile("quick", base=str(tmp_path / "base"), data_dir=str(tmp_path / "nodata"),
                                 train_data="t")


def test_a_study_folder_without_its_study_json_is_named_before_any_work(tmp_path):
    # --study was read only as the report was written: after every contender trained and was scored, the error came
    # instead of results.json and REPORT.md, and the run's numbers were lost
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"repro --study '.*nostudy' has no study.json; run `dyndepth study tokens"):
        ReproConfig.from_profile("quick", base=str(tmp_path / "base"), data_dir=str(tmp_path), train_data="t",
                                 study=str(tmp_path / "nostudy"))


def test_a_cache_dir_or_out_at_a_file_is_named_before_any_work(tmp_path):
    # the text was tokenized into --cache-dir: a file there stopped with a FileExistsError traceback
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    kw = {"base": str(tmp_path / "base"), "data_dir": str(tmp_path), "train_data": "t"}
    for key, option in (("cache_dir", "--cache-dir"), ("out_dir", "--out")):
        with pytest.raises(ValueError, match=rf"repro {option}='{afile}/x' cannot be a folder: {afile} is a file"):
            ReproConfig.from_profile("quick", **kw, **{key: str(afile / "x")})


def test_calibration_batches_are_different_batches(tmp_path):
    from dyndepth.repro import calibration_batches
    from dyndepth.tokenizer import ByteTokenizer

    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of some text to calibrate on.\n" for i in range(400)))
    data = {"source": str(text), "tokenizer": "byte", "cache_dir": str(tmp_path / "cache"), "text_split": "line"}
    a, b = calibration_batches(data, {"batch_size": 2, "seq_len": 16, "seed": 0, "tokenizer": ByteTokenizer()})
    assert a.shape == b.shape == (2, 16) and not torch.equal(a, b)


def test_a_read_only_cache_dir_the_base_run_filled_is_accepted(tmp_path, monkeypatch):
    # --cache-dir is shared with the base run, which tokenized the same text: a cache that exists but is read-only
    # (another user's, a read-only mount) is only read, and was refused as unwritable before any work
    from readonly import simulate_read_only

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    cache = tmp_path / "cache"
    cache.mkdir()
    simulate_read_only(monkeypatch, cache)
    kw = {"base": str(tmp_path / "base"), "data_dir": str(tmp_path), "train_data": "t"}
    ReproConfig.from_profile("quick", **kw, cache_dir=str(cache), out_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="repro --out=.*: cannot write in"):  # an output folder must be writable
        ReproConfig.from_profile("quick", **kw, cache_dir=str(cache), out_dir=str(cache / "out"))
