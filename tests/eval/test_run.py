"""Every offline task YAML on tiny fixture files in the real formats, through `dyndepth eval` (run_eval + CLI)."""

import bz2
import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from typer.testing import CliRunner

from dyndepth.cli import app
from dyndepth.eval.perplexity import first_lines
from dyndepth.eval.run import OFFLINE_TASKS, WIKITEXT, format_table, run_eval

MC = {"query": "Question: Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "water", "sand"],
      "gold": 1}
PARTIAL = {"context_options": ["Sarah was a better surgeon than Maria so Sarah",
                               "Sarah was a better surgeon than Maria so Maria"],
           "continuation": "always got the easier cases.", "gold": 1}
GAUNTLET = {  # file -> rows, in the eval gauntlet's formats
    "arc_easy.jsonl": [MC] * 3, "arc_challenge.jsonl": [MC] * 2, "openbook_qa.jsonl": [MC] * 3,
    "boolq.jsonl": [{"query": "Passage: Ducks lay eggs.\nQuestion: do ducks lay eggs?", "choices": ["no", "yes"],
                     "gold": 1}] * 3,
    "copa.jsonl": [{"query": "The man turned on the faucet, therefore", "gold": 1,
                    "choices": ["the toilet filled with water.", "water flowed from the spout."]},
                   {"query": "The hamburger meat browned, because", "gold": 0,
                    "choices": ["the cook grilled it.", "the cook froze it."]}],
    "siqa.jsonl": [{"query": "Context: Tracy went home.\nQuestion: Why?\nChoices:\nA. tired\nB. hungry\nAnswer:",
                    "choices": ["A", "B"], "gold": 0}] * 3,
    "commonsense_qa.jsonl": [{"query": "Question: Where are books?\nChoices:\nA. bank\nB. library\nC. sea\nD. sky"
                              "\nAnswer:", "choices": ["A", "B", "C", "D"], "gold": 1}] * 3,
    "winogrande.jsonl": [PARTIAL] * 3, "winograd_wsc.jsonl": [PARTIAL] * 2,
    "lambada_openai.jsonl": [{"context": "He looked at the stone and did not care about", "continuation": "signs"}] * 3,
}
COUNTS = {"arc_easy": 3, "arc_challenge": 2, "openbookqa": 3, "boolq": 3, "copa": 2, "siqa": 3, "commonsense_qa": 3,
          "winogrande": 3, "wsc273": 2, "lambada": 3, "hellaswag": 2, "piqa": 3, "gsm8k": 2}
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "openbookqa": 0.25, "commonsense_qa": 0.25, "hellaswag": 0.25,
          "boolq": 0.5, "copa": 0.5, "siqa": 0.5, "winogrande": 0.5, "wsc273": 0.5, "piqa": 0.5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data folder laid out like ../shared/data, a few examples per task."""
    root = tmp_path_factory.mktemp("data")
    (root / "eval_gauntlet").mkdir()
    for name, rows in GAUNTLET.items():
        (root / "eval_gauntlet" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "hellaswag").mkdir()
    item = ("Roof shingle removal: A man is sitting on a roof. he\n3\nis using wrap.\nis ripping tiles.\n"
            "holds a cube.\nstarts pulling up roofing.\n")
    (root / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress((item * 2).encode()))
    (root / "piqa").mkdir()
    piqa = {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid."}
    (root / "piqa" / "valid.jsonl").write_text((json.dumps(piqa) + "\n") * 3)
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n0\n")
    (root / "gsm8k").mkdir()
    problem = {"question": "Janet has 3 eggs and buys 4. How many eggs?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}
    for split in ("test", "train"):
        (root / "gsm8k" / f"{split}.jsonl").write_text((json.dumps(problem) + "\n") * (2 if split == "test" else 6))
    (root / "wikitext2_tokens").mkdir()
    (root / "wikitext2_tokens" / "test.txt").write_text(" = Homarus gammarus = \n \n It is a lobster . \n" * 4)
    return root


def test_every_offline_task_runs_on_its_file_format(tiny_checkpoint, data_dir, tmp_path):
    folder, _ = tiny_checkpoint
    assert set(OFFLINE_TASKS) == set(COUNTS)
    result = run_eval(str(folder), tasks="all", data_dir=data_dir, batch_size=4,
                      model_args="max_length=128,max_gen_toks=8", out=tmp_path)
    rows = result["rows"]
    by_task = {}
    for r in rows:
        by_task.setdefault(r.task, {})[r.metric] = r
    assert set(by_task) == set(COUNTS) | {WIKITEXT}
    for task, n in COUNTS.items():
        for metric, r in by_task[task].items():
            assert r.n == n, (task, metric)
            if metric.startswith(("acc", "exact_match")):
                assert 0.0 <= r.value <= 1.0, (task, metric)
        assert (by_task[task].get("acc") or by_task[task].get("exact_match (strict-match)")) is not None, task
    for task, chance in CHANCE.items():
        assert by_task[task]["acc"].chance == pytest.approx(chance)
    assert by_task["lambada"]["perplexity"].value > 1 and by_task["lambada"]["acc"].chance is None
    assert {"exact_match (strict-match)", "exact_match (flexible-extract)"} <= set(by_task["gsm8k"])
    wiki = by_task[WIKITEXT]
    assert wiki["perplexity"].value > 1 and wiki["bits_per_byte"].value > 0
    saved = json.loads(result["path"].read_text())
    assert len(saved["rows"]) == len(rows) and saved["perplexity"][WIKITEXT]["tokens"] == wiki["perplexity"].n
    assert (tmp_path / "results.md").read_text().strip() == format_table(rows)


def test_a_groups_row_counts_its_subtasks_examples(tiny_checkpoint, data_dir, tmp_path):
    """A group (lm-eval's mmlu, or one of the user's) has no example count of its own in lm-eval's results: its row
    said n = 0 beside the accuracy it averaged over its subtasks' examples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dyndepth.eval.harness import DyndepthLM
    from dyndepth.eval.run import TASKS_DIR, _rows_from_lm_eval

    (tmp_path / "pair.yaml").write_text("group: pair\ntask: [dyndepth_copa, dyndepth_boolq]\naggregate_metric_list:\n"
                                        "  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n")
    manager = TaskManager(include_path=[str(TASKS_DIR), str(tmp_path)], include_defaults=False,
                          metadata={"data_dir": str(data_dir)})
    lm = DyndepthLM(pretrained=str(tiny_checkpoint[0]), device="cpu", batch_size=4)
    rows = _rows_from_lm_eval(lm_eval.simple_evaluate(model=lm, tasks=["pair"], task_manager=manager,
                                                      log_samples=True))
    n = {r.task: r.n for r in rows}
    assert (n["copa"], n["boolq"]) == (COUNTS["copa"], COUNTS["boolq"])
    assert n["pair"] == COUNTS["copa"] + COUNTS["boolq"]


def test_a_perplexity_window_without_perplexity_is_refused(tiny_checkpoint, data_dir, tmp_path):
    """--max-length / --stride set the perplexity window only: with lm-eval tasks and no perplexity file they were
    dropped without a word, and piqa ran at the model's whole context where the user asked for 64 tokens."""
    folder, _ = tiny_checkpoint
    for options, named in (({"max_length": 64}, "--max-length"), ({"stride": 8}, "--stride")):
        with pytest.raises(ValueError, match=f"{named} set the perplexity window, and nothing here is scored by "
                                             "perplexity: for the lm-eval tasks' context pass --model-args max_length"):
            run_eval(str(folder), tasks="copa", data_dir=data_dir, out=tmp_path, **options)
    assert not (tmp_path / "results.json").exists()  # (with a perplexity file: the next tests)


def test_two_batch_sizes_are_refused(tiny_checkpoint, data_dir, tmp_path):
    """--batch-size 32 beside --model-args batch_size=4 ran at 4 and said nothing of the 32 it was given."""
    folder, _ = tiny_checkpoint
    r = CliRunner().invoke(app, ["eval", str(folder), "--tasks", "copa", "--data-dir", str(data_dir), "--batch-size",
                                 "32", "--model-args", "batch_size=4", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "two batch sizes: --batch-size 32 and model_args batch_size=4" in r.output
    assert not (tmp_path / "results.json").exists()


def test_boolq_and_copa_requests_are_lm_evals_own(tiny_checkpoint, data_dir):
    """docs/eval.md says these follow lm-eval's boolq and copa, comparable with published numbers; the prompts were the
    gauntlet's: 'Passage: ' before BoolQ's passage, COPA's ', therefore' and single space before the alternative."""
    import importlib.util

    import lm_eval
    from lm_eval.tasks import TaskManager

    from dyndepth.eval.harness import DyndepthLM
    from dyndepth.eval.run import TASKS_DIR

    spec = importlib.util.spec_from_file_location(
        "copa_utils", Path(lm_eval.__file__).parent / "tasks" / "super_glue" / "copa" / "utils.py")
    copa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copa)
    lm = DyndepthLM(pretrained=str(tiny_checkpoint[0]), device="cpu")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,  # (indexing lm-eval's own: 6 s)
                          metadata={"data_dir": str(data_dir)})
    out = lm_eval.simple_evaluate(model=lm, tasks=["dyndepth_boolq", "dyndepth_copa"], task_manager=manager, limit=2,
                                  log_samples=True)
    args = {task: [tuple(a) for a in samples[0]["arguments"]] for task, samples in out["samples"].items()}
    because = [tuple(a) for a in out["samples"]["dyndepth_copa"][1]["arguments"]]
    # lm-eval's boolq: "{{passage}}\nQuestion: {{question}}?\nAnswer:" -> " no" / " yes" (SuperGLUE's fields)
    assert args["dyndepth_boolq"] == [("Ducks lay eggs.\nQuestion: do ducks lay eggs?\nAnswer:", " no"),
                                      ("Ducks lay eggs.\nQuestion: do ducks lay eggs?\nAnswer:", " yes")]
    doc = {"premise": "The man turned on the faucet.", "question": "effect", "label": 1,
           "choice1": "The toilet filled with water.", "choice2": "Water flowed from the spout."}
    assert args["dyndepth_copa"] == [(copa.doc_to_text(doc), " " + c) for c in copa.doc_to_choice(doc)]
    doc = {"premise": "The hamburger meat browned.", "question": "cause", "label": 0,  # (the gauntlet's comma too)
           "choice1": "The cook grilled it.", "choice2": "The cook froze it."}
    assert because == [(copa.doc_to_text(doc), " " + c) for c in copa.doc_to_choice(doc)]


def test_hellaswag_texts_are_lm_evals_preprocessed_ones(tmp_path):
    """The file's extraction (klosax/hellaswag_text_data) drops only the [header], [step], [substeps] and [title]
    markers; lm-eval's hellaswag drops every bracketed WikiHow span ('[www.kiddio.org]', '[not recommended]', 13 lines
    of the validation file) and then halves double spaces. The offline prompts kept those spans."""
    import importlib.util

    import lm_eval

    from dyndepth.eval.lm_eval_tasks import loaders

    spec = importlib.util.spec_from_file_location(
        "hellaswag_utils", Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    raw_query = ("Family Life: Ask the toddler what to do. [title] Visit a site like [www.kiddio.org] to find "
                 "creative activities.")
    raw_endings = ["Use a remover first, unless you want a lumpy finish [not recommended].",
                   "Stop before going to bed.   Do not be embarrassed.",  # (3 spaces: both halve them once)
                   "Search for \" local events in [insert name of town].", "Twist the lid."]
    # the same item as hellaswag_val_full.txt holds it (the extraction's replacements, by hand)
    item = ["Family Life: Ask the toddler what to do.. Visit a site like [www.kiddio.org] to find creative activities.",
            "2", raw_endings[0], "Stop before going to bed.  Do not be embarrassed.", raw_endings[2], raw_endings[3]]
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(("\n".join(item) + "\n").encode()))
    (doc,) = loaders.hellaswag(data_dir=str(tmp_path))["validation"]
    assert doc["query"] == utils.preprocess(raw_query)
    assert doc["choices"] == [utils.preprocess(e) for e in raw_endings]
    assert doc["gold"] == 2


def test_a_generation_knob_that_cannot_decode_fails_before_any_request(tiny_checkpoint, data_dir, tmp_path,
                                                                         monkeypatch):
    """An uncalibrated GateSkip budget failed at the first gsm8k request, after copa had scored, and nothing was
    written; with log-likelihood tasks only it is fine (they score by the batch quantile)."""
    import dyndepth
    from dyndepth.eval import harness
    from dyndepth.methods import attach_gateskip

    folder, tok = tiny_checkpoint
    model = dyndepth.from_pretrained(folder)
    attach_gateskip(model)
    model.save_pretrained(tmp_path / "gated")
    tok.save(tmp_path / "gated")
    scored = []
    monkeypatch.setattr(harness.DyndepthLM, "loglikelihood",
                        lambda self, requests, disable_tqdm=False: scored.append(1) or [(0.0, False)] * len(requests))
    with pytest.raises(ValueError, match="calibrat"):
        run_eval(str(tmp_path / "gated"), tasks="copa,gsm8k", data_dir=data_dir, limit=2,
                 model_args="skip_budget=0.3", out=tmp_path / "o")
    assert not scored  # refused before copa's requests
    out = run_eval(str(tmp_path / "gated"), tasks="copa", data_dir=data_dir, limit=2, model_args="skip_budget=0.3",
                   out=tmp_path / "o2")
    assert scored and out["path"].is_file()


def test_enable_thinking_beside_log_likelihood_tasks_fails_before_any_request(tiny_checkpoint, data_dir, tmp_path,
                                                                           monkeypatch):
    """enable_thinking=true cannot score log-likelihoods (as in the hf backend): with gsm8k listed before copa, gsm8k
    generated every answer first and copa's requests then failed, with nothing written."""
    from dyndepth.eval import harness

    generated = []
    monkeypatch.setattr(harness.DyndepthLM, "generate_until",
                        lambda self, requests, disable_tqdm=False: generated.append(1) or [""] * len(requests))
    with pytest.raises(ValueError, match=r"enable_thinking=true cannot score the log-likelihood tasks "
                                         r"\['dyndepth_copa'\]"):
        run_eval(str(tiny_checkpoint[0]), tasks="gsm8k,copa", data_dir=data_dir, limit=1,
                 model_args="enable_thinking=true,think_end_token=</think>,max_gen_toks=4", out=tmp_path)
    assert not generated and not (tmp_path / "results.json").exists()


def test_a_generation_budget_without_room_for_the_prompt_fails_before_any_request(tiny_checkpoint, data_dir,
                                                                                    tmp_path, monkeypatch):
    """max_gen_toks=256 (the default) in a 256-token window failed at the first gsm8k request, after copa had scored,
    and nothing was written; a budget that fits, or log-likelihood tasks only, run."""
    from dyndepth.eval import harness

    folder, _ = tiny_checkpoint
    scored = []
    monkeypatch.setattr(harness.DyndepthLM, "loglikelihood",
                        lambda self, requests, disable_tqdm=False: scored.append(1) or [(0.0, False)] * len(requests))
    with pytest.raises(ValueError, match="dyndepth_gsm8k generates up to max_gen_toks=256 new tokens.*max_length=256"):
        run_eval(str(folder), tasks="copa,gsm8k", data_dir=data_dir, limit=1, model_args="max_length=256",
                 out=tmp_path / "o")
    assert not scored  # refused before copa's requests
    out = run_eval(str(folder), tasks="copa,gsm8k", data_dir=data_dir, limit=1,
                   model_args="max_length=256,max_gen_toks=4", out=tmp_path / "o2")
    assert scored and out["path"].is_file()
    assert run_eval(str(folder), tasks="copa", data_dir=data_dir, limit=1, model_args="max_length=256",
                    out=tmp_path / "o3")["path"].is_file()


def test_a_tasks_own_generation_budget_without_room_for_the_prompt_fails_before_any_request(
        tiny_checkpoint, data_dir, tmp_path, monkeypatch):
    """The early check read the adapter's default max_gen_toks only: a task whose generation_kwargs set its own, at
    least max_length, failed at its first request after copa had scored. Tasks are built for the check only when
    one may generate (building reads the data sets)."""
    import shutil

    import lm_eval.evaluator  # (imported before the patch below: lm-eval < 0.4.12's simple_evaluate builds
    import lm_eval.tasks  # through its own get_task_dict, bound when lm-eval first imports it, lazily)

    from dyndepth.eval import harness, run

    folder, _ = tiny_checkpoint
    tasks_dir = tmp_path / "tasks"  # the offline tasks, gsm8k with its own max_gen_toks
    shutil.copytree(run.TASKS_DIR, tasks_dir)
    yaml = tasks_dir / "gsm8k.yaml"
    yaml.write_text(yaml.read_text().replace("  do_sample: false\n", "  do_sample: false\n  max_gen_toks: 64\n"))
    monkeypatch.setattr(run, "TASKS_DIR", tasks_dir)
    scored, built = [], []
    monkeypatch.setattr(harness.DyndepthLM, "loglikelihood",
                        lambda self, requests, disable_tqdm=False: scored.append(1) or [(0.0, False)] * len(requests))
    get_task_dict = lm_eval.tasks.get_task_dict
    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", lambda *a, **k: built.append(a[0]) or get_task_dict(*a, **k))
    with pytest.raises(ValueError, match="dyndepth_gsm8k generates up to max_gen_toks=64 new tokens.*max_length=64"):
        run_eval(str(folder), tasks="copa,gsm8k", data_dir=data_dir, limit=1, model_args="max_length=64,max_gen_toks=4",
                 out=tmp_path / "o")
    assert not scored  # refused before copa's requests
    built.clear()
    run_eval(str(folder), tasks="copa", data_dir=data_dir, limit=1, model_args="max_length=64", out=tmp_path / "o2")
    assert scored and not built  # built by simple_evaluate alone (the default 256 >= 64 had it built once more)


def test_whether_a_task_may_generate_is_read_from_the_task_index_through_groups_and_tags():
    from types import SimpleNamespace

    from dyndepth.eval.run import _may_generate

    def entry(kind, cfg=None, tags=()):
        return SimpleNamespace(kind=SimpleNamespace(name=kind), cfg=cfg, tags=set(tags))

    manager = SimpleNamespace(task_index={
        "mc": entry("TASK", {"output_type": "multiple_choice"}), "gen": entry("TASK", {"output_type": "generate_until"}),
        "default": entry("TASK", {}), "py": entry("PY_TASK"), "tag_mc": entry("TAG", tags={"mc"}),
        "group_mc": entry("GROUP", {"task": ["tag_mc", "mc"]}), "group_gen": entry("GROUP", {"task": ["mc", "gen"]}),
        "inline": entry("GROUP", {"task": [{"task": "x"}]})})
    assert not _may_generate(["mc", "tag_mc", "group_mc"], manager)
    for name in ("gen", "default", "py", "group_gen", "inline", "not_indexed"):  # (lm-eval's default output_type)
        assert _may_generate(["mc", name], manager), name


def test_a_bad_perplexity_window_fails_before_the_lm_eval_tasks(tiny_checkpoint, data_dir, tmp_path, monkeypatch):
    """--stride past the window, or a window past the model's context, failed in perplexity after every lm-eval task
    had scored (hours with --tasks all), and nothing was written."""
    from dyndepth.eval import harness

    folder, _ = tiny_checkpoint
    scored = []
    monkeypatch.setattr(harness.DyndepthLM, "loglikelihood",
                        lambda self, requests, disable_tqdm=False: scored.append(1) or [(0.0, False)] * len(requests))
    for window, message in (({"max_length": 16, "stride": 32}, "stride=32 must lie in"),
                            ({"max_length": 512}, "max_length=512 exceeds the model's max_position_embeddings")):
        with pytest.raises(ValueError, match=message):
            run_eval(str(folder), tasks="copa,wikitext2", data_dir=data_dir, limit=1, out=tmp_path / "o", **window)
    assert not scored  # refused before copa's requests


def test_a_missing_or_non_utf8_perplexity_file_fails_before_the_lm_eval_tasks(tiny_checkpoint, data_dir, tmp_path,
                                                                              monkeypatch):
    """--perplexity FILE that does not exist, or is not UTF-8, failed only after every lm-eval task had scored (hours
    with --tasks all), and nothing was written."""
    from dyndepth.data.sources import DataError
    from dyndepth.eval import harness

    folder, _ = tiny_checkpoint
    scored = []
    monkeypatch.setattr(harness.DyndepthLM, "loglikelihood",
                        lambda self, requests, disable_tqdm=False: scored.append(1) or [(0.0, False)] * len(requests))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    for path, error, message in ((tmp_path / "missing.txt", FileNotFoundError, "no such text file"),
                                 (latin1, DataError, "is not UTF-8 text")):
        with pytest.raises(error, match=message):
            run_eval(str(folder), tasks="copa", data_dir=data_dir, limit=1, perplexity=path, out=tmp_path / "o")
    assert not scored  # refused before copa's requests
    assert not (tmp_path / "o").exists()


def test_a_perplexity_run_reports_the_compute_its_knobs_give(tiny_checkpoint, tmp_path):
    """A perplexity run recorded no statistics of its forwards: with --model-args skip_budget=0.5, results.json showed
    neither the tokens that skipped nor the FLOPs per token (lm-eval tasks record both under lm_eval.config)."""
    from dyndepth import from_pretrained
    from dyndepth.methods import attach_gateskip

    folder, tok = tiny_checkpoint
    model = from_pretrained(folder)
    attach_gateskip(model)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt")
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    reports = {}
    for budget in (0.0, 0.5):
        result = run_eval(str(tmp_path / "ckpt"), perplexity=text, max_length=16, stride=8,
                          model_args=f"skip_budget={budget}", out=tmp_path / f"o{budget}")
        reports[budget] = json.loads(result["path"].read_text())["perplexity"]["notes.txt"]
    for budget, report in reports.items():
        stats = report["per_token_stats"]
        assert report["tokens_run"] >= report["tokens"]  # (windows overlap: context tokens run again)
        assert stats["gateskip/attn_skipped"] == pytest.approx(budget, abs=0.1)
        assert stats["flops/executed"] > 0
    assert reports[0.5]["per_token_stats"]["flops/executed"] < reports[0.0]["per_token_stats"]["flops/executed"]


def test_cli_eval_perplexity_and_errors(tiny_checkpoint, data_dir, tmp_path):
    folder, _ = tiny_checkpoint
    runner = CliRunner()
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 5)
    ok = runner.invoke(app, ["eval", str(folder), "--perplexity", str(text), "--stride", "8", "--max-length", "16",
                             "--out", str(tmp_path / "ppl")])
    assert ok.exit_code == 0, ok.output
    assert "| notes.txt | bits_per_byte |" in ok.output and (tmp_path / "ppl" / "results.json").is_file()
    cases = [
        (["--tasks", "dyndepth_hellaswag"], "--data-dir"),  # offline tasks need the folder (a bare "hellaswag"
        (["--tasks", "wikitext2"], "--data-dir"),           # would be lm-eval's own, which downloads)
        (["--tasks", "dyndepth_nosuch", "--data-dir", str(data_dir)], "unknown offline task"),
        (["--tasks", "piqa", "--data-dir", str(tmp_path / "missing")], "not a folder"),
        # lm-eval's name of an offline task went to lm-eval's registry: a `datasets` ConnectionError traceback
        (["--tasks", "copa,lambada_openai", "--data-dir", str(data_dir)], "offline copy is 'lambada'"),
        (["--tasks", "social_iqa", "--data-dir", str(data_dir)], "pass --tasks siqa"),
        (["--tasks", "piqa", "--data-dir", str(tmp_path)], "piqa"),  # a folder without the files
        (["--perplexity", str(text), "--model-args", "skip_budget=0.3"], "no adaptive-depth method"),
        (["--perplexity", str(text), "--model-args", "skip_budget"], "key=value"),
        (["--perplexity", str(text), "--stride", "0"], "stride=0 must be >= 1"),
        (["--perplexity", str(text), "--limit", "0"], "limit=0 must be >= 1"),
        ([], "nothing to evaluate"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["eval", str(folder), *extra, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, (extra, result.output)


def test_limit_scores_a_perplexity_file_up_to_its_nth_line(tiny_checkpoint, tmp_path):
    # --limit was ignored by perplexity (the whole file was scored): now the text up to the N-th non-empty line,
    # with that part's bytes and words, and the limit in results.json
    folder, _ = tiny_checkpoint
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox.\n\nJumps over the lazy dog.\nAnd runs away.\n")
    scored = {}
    for limit in (None, 2):
        out = run_eval(str(folder), perplexity=text, limit=limit, max_length=16, out=tmp_path / f"o{limit}")
        scored[limit] = json.loads(out["path"].read_text())["perplexity"]["notes.txt"]
    assert scored[2]["limit_lines"] == 2 and scored[None]["limit_lines"] is None
    assert scored[2]["bytes"] == len("The quick brown fox.\n\nJumps over the lazy dog.\n")
    assert scored[2]["words"] == 9 and scored[None]["words"] == 12
    assert 0 < scored[2]["tokens"] < scored[None]["tokens"]
    again = run_eval(str(folder), perplexity=text, limit=2, max_length=16, out=tmp_path / "oNone")  # same folder
    assert json.loads(again["path"].read_text())["perplexity"]["notes.txt"]["limit_lines"] == 2
    earlier = json.loads((tmp_path / "oNone" / "results.earlier_0.json").read_text())  # kept, not overwritten
    assert earlier["perplexity"]["notes.txt"] == scored[None] and (tmp_path / "oNone" / "results.earlier_0.md").exists()
    assert first_lines("a\n\nb\nc", 5) == "a\n\nb\nc" and first_lines("a\n\nb\nc", 1) == "a\n"
    by_arg = run_eval(str(folder), perplexity=text, model_args="max_length=16", out=tmp_path / "arg")
    assert json.loads(by_arg["path"].read_text())["perplexity"]["notes.txt"] == scored[None]  # the same window
    with pytest.raises(ValueError, match="two context windows: --max-length 32 and model_args max_length=16"):
        run_eval(str(folder), perplexity=text, max_length=32, model_args="max_length=16", out=tmp_path / "both")
    with pytest.raises(ValueError, match="two context windows"):  # refused before a task is loaded or run
        run_eval(str(folder), tasks="no_such_task", perplexity=text, max_length=32, model_args="max_length=16",
                 out=tmp_path / "both")
    with pytest.raises(ValueError, match="max_length=abc: give a positive number of tokens"):  # was "invalid
        run_eval(str(folder), perplexity=text, model_args="max_length=abc", out=tmp_path / "abc")  # literal for int()"
    text.write_text("  \n\n \t\n")  # only whitespace: was a ZeroDivisionError (no words)
    with pytest.raises(ValueError, match="empty or only whitespace"):
        run_eval(str(folder), perplexity=text, max_length=16, out=tmp_path / "blank")


def test_batch_size_auto_reaches_perplexity_too(tiny_checkpoint, data_dir, tmp_path):
    # the adapter reads batch_size=auto as 16 (as docs/eval.md says), but perplexity ran int('auto') after every
    # lm-eval task had scored: "invalid literal for int()", nothing written
    folder, _ = tiny_checkpoint
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox.\n\nJumps over the lazy dog.\n")
    fixed = run_eval(str(folder), perplexity=text, max_length=16, limit=2, model_args="batch_size=16",
                     out=tmp_path / "16")
    for tasks in (None, "copa"):
        out = run_eval(str(folder), tasks=tasks, data_dir=data_dir, perplexity=text, max_length=16, limit=2,
                       model_args="batch_size=auto", out=tmp_path / f"auto{tasks}")
        scored = json.loads(out["path"].read_text())["perplexity"]["notes.txt"]
        assert scored == json.loads(fixed["path"].read_text())["perplexity"]["notes.txt"]


@pytest.mark.parametrize("name", ["demo-tiny", "dreamer-tiny", "huginn-tiny"])
def test_a_preset_name_evaluates_with_the_byte_tokenizer(name, tmp_path):
    """Random weights of any family's preset (Dreamer's and Huginn's crashed)."""
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n")
    out = run_eval(name, perplexity=text, max_length=16, out=tmp_path / "o")
    assert json.loads(out["path"].read_text())["perplexity"]["t.txt"]["tokens"] > 0
    if name == "demo-tiny":  # a preset too small for the byte tokenizer names one that is not
        with pytest.raises(ValueError, match="vocab_size is 256; pass a preset whose vocab holds .* demo-tiny"):
            run_eval("tiny-qwen3", perplexity=text, max_length=16, out=tmp_path / "o2")


def test_an_offline_task_name_without_data_dir_warns_that_lm_eval_will_download(caplog):
    # `eval --tasks piqa` without --data-dir silently became lm-eval's hub task (network retries when offline)
    from dyndepth.eval.run import _resolve_tasks

    with caplog.at_level(logging.WARNING, logger="dyndepth.eval.run"):
        assert _resolve_tasks("piqa,my_task", None) == (["piqa", "my_task"], [], True)
    assert "piqa without --data-dir run as lm-eval's own task(s), which download" in caplog.text
    assert "my_task" not in caplog.text


def test_eval_options_snapshot():
    import typer.main

    cmd = typer.main.get_command(app).commands["eval"]
    assert sorted(p.name for p in cmd.params) == ["apply_chat_template", "batch_size", "data_dir", "limit",
                                                  "max_length", "model", "model_args", "num_fewshot", "out",
                                                  "perplexity", "stride", "tasks"]


def test_run_eval_takes_a_model_in_memory(tiny_checkpoint, data_dir, tmp_path):
    import dyndepth

    folder, tok = tiny_checkpoint
    model = dyndepth.from_pretrained(folder)
    result = run_eval(model, tasks="copa,wikitext2", data_dir=data_dir, model_args={"tokenizer": tok}, out=tmp_path)
    assert [(r.task, r.metric) for r in result["rows"]][:2] == [("copa", "acc"), ("copa", "acc_norm")]
    saved = json.loads(result["path"].read_text())
    assert saved["model"] == "CausalLM" and saved["model_args"]["tokenizer"] == "HFTokenizer"
    assert (saved["lm_eval"]["config"]["batch_size"], saved["lm_eval"]["config"]["device"]) == (8, "cpu")  # were None


def test_a_dreamer_takes_its_own_knobs_as_model_arguments(tmp_path):
    """`--model-args steps=2,exit_kl=0.05` sets Dreamer's inference knobs (it has no method attached: the old code
    refused them as 'no adaptive-depth method'), for the forwards only, and names them when misspelt."""
    import torch

    import dyndepth
    from dyndepth.eval.model_args import load_for_eval

    torch.manual_seed(0)
    dyndepth.build_model(dyndepth.preset("dreamer-tiny")).save_pretrained(tmp_path / "d")
    loaded = load_for_eval(str(tmp_path / "d"), tokenizer="byte", steps=2, exit_kl=0.05)
    assert loaded.knobs.fields == {"steps": 2, "exit_kl": 0.05}
    with loaded.knobs.scoring(loaded.model):
        assert loaded.model.knobs() == {"steps": 2, "exit_kl": 0.05}
    assert loaded.model.knobs() == {"steps": 4, "exit_kl": None}  # restored after the forwards
    with pytest.raises(ValueError, match=r"knobs of the DreamerLM model \['exit_kl', 'steps'\]"):
        load_for_eval(str(tmp_path / "d"), tokenizer="byte", depth=2)
    assert load_for_eval(str(tmp_path / "d"), tokenizer="byte", exit_kl="none").knobs.fields == {"exit_kl": None}
    with pytest.raises(ValueError, match="exit_kl must be a threshold in nats"):  # checked before any request
        load_for_eval(str(tmp_path / "d"), tokenizer="byte", exit_kl="off")
    for steps in (2.5, "2.5"):  # lm-eval passes numbers as floats: 2.5 ran 2 steps
        with pytest.raises(ValueError, match=r"model argument steps=.*2.5.* must be a whole number"):
            load_for_eval(str(tmp_path / "d"), tokenizer="byte", steps=steps)
    assert load_for_eval(str(tmp_path / "d"), tokenizer="byte", steps=3.0).knobs.fields["steps"] == 3
    torch.manual_seed(0)
    dyndepth.build_model(dyndepth.preset("huginn-tiny")).save_pretrained(tmp_path / "h")  # Huginn's steps too
    assert load_for_eval(str(tmp_path / "h"), tokenizer="byte", steps=2).knobs.fields == {"steps": 2}
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 5)
    ppl = {}
    for steps in (1, 4):
        args = ["--perplexity", str(text), "--max-length", "16", "--model-args", f"tokenizer=byte,steps={steps}"]
        result = CliRunner().invoke(app, ["eval", str(tmp_path / "d"), *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 0, result.output
        ppl[steps] = json.loads((tmp_path / "o" / "results.json").read_text())["perplexity"]["notes.txt"]["nll"]
    assert ppl[1] != ppl[4]  # the knob reached the forwards


def test_scoring_that_reads_later_tokens_is_named(tmp_path, caplog):
    """MoD's top-k (its default mode) and GateSkip's quantile ranking read a row's later tokens: the loader warns
    that a log-likelihood can then depend on the continuation it scores, and results.json records why; the causal
    modes (MoD's predictor, GateSkip at budget 0 or with calibrated thresholds) say nothing."""
    import torch

    import dyndepth
    from dyndepth.eval.model_args import load_for_eval
    from dyndepth.methods import attach_gateskip, attach_mod

    torch.manual_seed(0)
    mod = dyndepth.build_model(dyndepth.preset("tiny-qwen3", vocab_size=264))  # the byte tokenizer's ids
    attach_mod(mod, {"capacity": 0.5})
    mod.save_pretrained(tmp_path / "mod")
    with caplog.at_level(logging.WARNING, logger="dyndepth.eval.model_args"):
        assert "MoD's mode=topk keeps the top" in load_for_eval(str(tmp_path / "mod"), tokenizer="byte").lookahead
    assert "scoring forwards are not causal: MoD's mode=topk" in caplog.text
    assert load_for_eval(str(tmp_path / "mod"), tokenizer="byte", mode="predictor").lookahead == ""
    text = tmp_path / "notes.txt"  # a perplexity-only evaluation records it too (it had no scoring_lookahead)
    text.write_text("The quick brown fox jumps over the lazy dog. " * 5)
    for knobs, expected in (("tokenizer=byte", "MoD's mode=topk keeps the top"), ("tokenizer=byte,mode=predictor", None)):
        path = run_eval(str(tmp_path / "mod"), perplexity=text, max_length=16, model_args=knobs, out=tmp_path / "o")["path"]
        got = json.loads(path.read_text())["scoring_lookahead"]
        assert got is None if expected is None else expected in got
    gated = dyndepth.build_model(dyndepth.preset("tiny-qwen3", vocab_size=264))  # the byte tokenizer's ids
    attach_gateskip(gated, {"scope": "sequence"})
    gated.save_pretrained(tmp_path / "gated")
    assert load_for_eval(str(tmp_path / "gated"), tokenizer="byte").lookahead == ""  # budget 0: nothing skips
    late = load_for_eval(str(tmp_path / "gated"), tokenizer="byte", skip_budget=0.3).lookahead
    assert "quantile mode ranks each row's tokens, later ones included" in late
    dyndepth.build_model(dyndepth.preset("mor-tiny", vocab_size=264)).save_pretrained(tmp_path / "mor")
    assert load_for_eval(str(tmp_path / "mor"), tokenizer="byte").lookahead == ""  # its routing in the method slot


def test_the_cli_takes_lm_evals_few_shot_count_and_chat_template(tiny_checkpoint, data_dir, tmp_path, monkeypatch):
    # `dyndepth eval` had neither: few-shot counts and chat-templated prompts were reachable from Python only
    import shutil

    from dyndepth.eval.harness import DyndepthLM

    out = tmp_path / "fewshot"
    r = CliRunner().invoke(app, ["eval", str(tiny_checkpoint[0]), "--tasks", "gsm8k", "--data-dir", str(data_dir),
                                 "--limit", "1", "--num-fewshot", "1", "--model-args", "max_gen_toks=4",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "results.json").read_text())["lm_eval"]["n-shot"] == {"dyndepth_gsm8k": 1}  # (not 5)
    r = CliRunner().invoke(app, ["eval", str(tiny_checkpoint[0]), "--tasks", "copa", "--data-dir", str(data_dir),
                                 "--apply-chat-template", "--out", str(tmp_path / "none")])
    assert r.exit_code != 0 and "needs the tokenizer's chat template" in r.output  # before any request
    assert not (tmp_path / "none" / "results.json").exists()
    folder = tmp_path / "templated"
    shutil.copytree(tiny_checkpoint[0], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    contexts, scored = [], DyndepthLM.loglikelihood
    monkeypatch.setattr(DyndepthLM, "loglikelihood",
                        lambda self, reqs, **kw: contexts.extend(r.args[0] for r in reqs) or scored(self, reqs, **kw))
    r = CliRunner().invoke(app, ["eval", str(folder), "--tasks", "copa", "--data-dir", str(data_dir), "--limit", "1",
                                 "--apply-chat-template", "--out", str(tmp_path / "chat")])
    assert r.exit_code == 0, r.output
    assert contexts and all(c.startswith("<user>") and c.endswith("\n<assistant>") for c in contexts)
    with pytest.raises(ValueError, match="pass --tasks too"):
        run_eval(str(folder), perplexity=tmp_path / "x.txt", num_fewshot=2, out=tmp_path / "p")


def test_an_overflowed_perplexity_is_written_as_strict_json(tiny_checkpoint, tmp_path, monkeypatch):
    """An untrained model's perplexity past float's range is inf (word perplexity of a byte model, often): results.json
    held the bare word Infinity, which jq, JavaScript and strict JSON parsers refuse; it is null now."""
    from dyndepth.eval import perplexity

    def refuse(word):
        raise ValueError(f"{word} is not JSON")

    folder, _ = tiny_checkpoint
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n")
    monkeypatch.setattr(perplexity, "file_perplexity", lambda *a, **kw: perplexity.Perplexity(
        nll=1e4, tokens=10, bytes=45, words=9, max_length=16, stride=16))  # 1000 nats a token: e**1000 overflows
    result = run_eval(str(folder), perplexity=text, out=tmp_path / "out")
    saved = json.loads(result["path"].read_text(), parse_constant=refuse)["perplexity"]["notes.txt"]
    assert saved["perplexity"] is None and saved["word_perplexity"] is None and saved["nll"] == 1e4
    assert "| notes.txt | perplexity | inf |" in result["table"]


def test_model_arguments_of_lm_evals_requests_are_refused_by_a_perplexity_run(tiny_checkpoint, tmp_path):
    """--perplexity alone dropped add_bos_token / max_gen_toks / enable_thinking / think_end_token unread and unchecked
    (add_bos_token=maybe ran; add_bos_token=true did not change the score a user asked it to), as it refuses
    num_fewshot; the lm-eval task path checks and uses them."""
    folder, _ = tiny_checkpoint
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n")
    for args in ("add_bos_token=true", "max_gen_toks=32", "add_bos_token=maybe,enable_thinking=false",
                 "think_end_token=</think>"):
        with pytest.raises(ValueError, match=r"model argument\(s\) .* shape lm-eval's task requests; perplexity alone "
                                             r"reads none of them .* pass --tasks too, or drop them"):
            run_eval(str(folder), perplexity=text, model_args=args, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = run_eval(str(folder), perplexity=text, model_args="max_batch_size=4", out=tmp_path / "out")
    assert result["rows"]  # (max_batch_size: ignored by the task path too, and accepted by both)
