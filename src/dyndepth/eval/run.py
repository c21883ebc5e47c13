"""`dyndepth eval`: offline lm-eval tasks, lm-eval's own tasks and perplexity, reported in one table.

    run_eval("ckpt/", tasks="hellaswag,piqa,wikitext2", data_dir="../shared/data", limit=100)
    run_eval("ckpt/", perplexity="notes.txt", stride=256, max_length=512, model_args="skip_budget=0.3")

With `data_dir`, task names are the offline tasks shipped in lm_eval_tasks/ (`OFFLINE_TASKS`, or
"all"), which read their files from that folder, plus the pseudo-task "wikitext2": sliding-window
perplexity of <data_dir>/wikitext2_tokens/test.txt (with `limit`, like --perplexity FILE, of the text up to its
limit-th non-empty line). Any other name, and every name without `data_dir`, goes to lm-eval's own task registry
(which may download its data sets; a name with an offline copy, such as "piqa", warns). Results go to
<out>/results.json (rows, perplexities and lm-eval's raw results) and <out>/results.md (the table).
"""

from __future__ import annotations

import datetime
import logging
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)
TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
PREFIX = "dyndepth_"  # offline task names in lm-eval's registry: dyndepth_hellaswag, ...
WIKITEXT = "wikitext2"
WIKITEXT_FILES = ("wikitext2_tokens/test.txt", "wikitext2/test.txt", "wiki.test.tokens")
OFFLINE_TASKS = sorted(p.stem for p in TASKS_DIR.glob("*.yaml") if not p.name.startswith("_"))
# lm-eval's names of tasks with an offline copy under another name; with --data-dir these went to lm-eval's registry,
# which downloads (offline: a `datasets` ConnectionError traceback after the model had loaded)
LM_EVAL_NAMES = {"lambada_openai": "lambada", "social_iqa": "siqa"}
REQUEST_ARGS = ("max_gen_toks", "add_bos_token", "enable_thinking", "think_end_token")  # model args of lm-eval's
# requests alone (a perplexity run reads none; max_batch_size, ignored by both, is accepted by both)
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics (LAMBADA perplexity); lm-eval's 100,000 takes minutes


@dataclass
class Row:
    task: str
    metric: str
    value: float
    stderr: float | None
    chance: float | None  # accuracy of guessing uniformly, for multiple-choice tasks
    n: int  # examples scored (tokens, for perplexity)


def run_eval(model, tasks: str | Sequence[str] | None = None, data_dir: str | Path | None = None,
             limit: int | None = None, batch_size: int | None = None, model_args: str | dict | None = None,
             perplexity: str | Path | None = None, stride: int | None = None, max_length: int | None = None,
             out: str | Path = "runs/eval", num_fewshot: int | None = None, apply_chat_template: bool = False) -> dict:
    """Evaluate `model` (checkpoint folder, hub id, preset name or CausalLM) and write the results.

    model_args: 'k=v,...' or a dict of the lm-eval adapter's arguments (tokenizer, dtype, device,
    max_length, ...) and method knobs (skip_budget, ...; see eval/model_args.py). num_fewshot (None: each task's
    own) and apply_chat_template (the tokenizer's chat template, few-shot examples as turns) are lm-eval's.
    batch_size: sequences per forward (None: model_args' batch_size, else 8).
    Returns {"rows": [Row], "table": str, "path": results.json}.
    """
    from dyndepth.eval.model_args import ADAPTER_ARGS, batch_count, load_for_eval, parse_model_args, token_count

    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (examples per task; leave it unset for every example).")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot} must be >= 0 (leave it unset for each task's own).")
    args = parse_model_args(model_args) if not isinstance(model_args, dict) else dict(model_args)
    if "pretrained" in args and args["pretrained"] != model:
        raise ValueError("the model is given twice (MODEL and pretrained= in --model-args); drop pretrained=.")
    args["pretrained"] = model
    if batch_size is not None and args.get("batch_size", batch_size) != batch_size:  # (one was dropped unsaid)
        raise ValueError(f"two batch sizes: --batch-size {batch_size} and model_args batch_size={args['batch_size']}; "
                         "give one.")
    args.setdefault("batch_size", 8 if batch_size is None else batch_size)
    perplexity_window = {"--stride": stride, "--max-length": max_length}  # as given (max_length may take model_args')
    window = token_count("max_length", args.get("max_length"))  # the adapter's window is perplexity's too
    if window is not None:
        if max_length is not None and window != max_length:  # (refused before any task runs)
            raise ValueError(f"two context windows: --max-length {max_length} and model_args max_length="
                             f"{args['max_length']}; give one.")
        max_length = window
    harness_tasks, ppl_files, need_defaults = _resolve_tasks(tasks, data_dir)
    if perplexity is not None:
        ppl_files.append((Path(perplexity).name, Path(perplexity)))
    if not harness_tasks and not ppl_files:
        raise ValueError("nothing to evaluate: pass --tasks (e.g. hellaswag,piqa with --data-dir) "
                         "and/or --perplexity FILE.")
    if not harness_tasks and (num_fewshot is not None or apply_chat_template):
        raise ValueError("num_fewshot and apply_chat_template shape lm-eval's task prompts; perplexity alone reads "
                         "neither: pass --tasks too, or drop them.")
    request_args = [k for k in REQUEST_ARGS if k in args]
    if not harness_tasks and request_args:  # (they were dropped unread, unchecked: add_bos_token=maybe ran too)
        raise ValueError(f"model argument(s) {', '.join(request_args)} shape lm-eval's task requests; perplexity "
                         "alone reads none of them (it scores the text behind the tokenizer's BOS, else EOS, token, "
                         "whatever add_bos_token says): pass --tasks too, or drop them.")
    given = [name for name, value in perplexity_window.items() if value is not None]
    if given and not ppl_files:  # (lm-eval's tasks ran at the model's whole context, and the option was dropped)
        raise ValueError(f"{' and '.join(given)} set the perplexity window, and nothing here is scored by perplexity: "
                         "for the lm-eval tasks' context pass --model-args max_length=N, or add --perplexity FILE "
                         "(or the task wikitext2 with --data-dir).")
    lm_eval_options = {"num_fewshot": num_fewshot, "apply_chat_template": apply_chat_template}
    if ppl_files:  # a missing or non-UTF-8 file failed after every lm-eval task had run, and nothing was written
        from dyndepth.eval.perplexity import read_text_file

        for _, path in ppl_files:
            read_text_file(path)

    rows: list[Row] = []
    raw: dict = {}
    if harness_tasks:
        manager = _task_manager(harness_tasks, data_dir, need_defaults)  # bad task names fail before loading
        lm = _adapter(args)
        model_obj, tok, knobs = lm.model, lm.tokenizer, lm.knobs
        if ppl_files:  # a bad perplexity window failed after every lm-eval task had run, and nothing was written
            from dyndepth.eval.perplexity import window_of

            window_of(model_obj, max_length, stride)
        if apply_chat_template and not getattr(tok, "chat_template", None):  # (else: at the first request)
            raise ValueError("apply_chat_template needs the tokenizer's chat template, and this one has none "
                             "(chat_template.jinja or tokenizer_config.json's chat_template); drop the option, or pass "
                             "--model-args tokenizer=FOLDER of a tokenizer that has one.")
        _check_generation(lm, harness_tasks, manager)
        raw = _run_lm_eval(lm, harness_tasks, manager, limit, **lm_eval_options)
        config = raw.setdefault("config", {})  # (lm-eval records these from its own arguments: None for a model)
        config.update({k: v for k, v in (("batch_size", lm.batch_size), ("device", str(lm.device)))
                       if config.get(k) is None})
        rows += _rows_from_lm_eval(raw)
        lookahead = raw["config"].get("scoring_lookahead")  # (the adapter's model info)
    else:
        scoring_only = set(ADAPTER_ARGS) - {"pretrained", "tokenizer", "dtype", "device"}  # lm-eval's batching etc.
        loaded = load_for_eval(**{k: v for k, v in args.items() if k not in scoring_only})
        model_obj, tok, knobs, lookahead = loaded.model, loaded.tokenizer, loaded.knobs, loaded.lookahead or None
    perplexities = {}
    for name, path in ppl_files:
        result, compute = _perplexity(model_obj, tok, knobs, path, stride, max_length, batch_count(args["batch_size"]),
                                      limit)
        perplexities[name] = {"file": str(path), "limit_lines": limit, **result.to_dict(), **compute}
        rows += [Row(name, metric, getattr(result, metric), None, None, result.tokens)
                 for metric in ("perplexity", "bits_per_byte", "word_perplexity")]

    table = format_table(rows)
    path = _write(out, model, args, tasks, data_dir, limit, rows, perplexities, raw, table, lookahead)
    return {"rows": rows, "table": table, "path": path}


def score_tasks(model, tokenizer, tasks: str | Sequence[str], data_dir: str | Path | None = None,
                limit: int | None = None, batch_size: int = 8) -> list[Row]:
    """The lm-eval rows of `run_eval` for a model in memory, under whatever method knobs are set on it now
    (nothing is loaded or written): `dyndepth repro` scores every post-trained setting through this."""
    harness_tasks, _, need_defaults = _resolve_tasks(tasks, data_dir)
    if not harness_tasks:
        raise ValueError(f"no lm-eval task in {tasks!r} (perplexity pseudo-tasks are scored separately).")
    manager = _task_manager(harness_tasks, data_dir, need_defaults)
    lm = _adapter({"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size,
                   "device": str(next(model.parameters()).device)})
    return _rows_from_lm_eval(_run_lm_eval(lm, harness_tasks, manager, limit))


def _resolve_tasks(tasks, data_dir) -> tuple[list[str], list[tuple[str, Path]], bool]:
    """-> (lm-eval task names, perplexity (name, file) pairs, whether lm-eval's own tasks are needed)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks or []) if t.strip()]
    if data_dir is None:
        offline = [n for n in names if n in (WIKITEXT, "all") or n.startswith(PREFIX)]
        if offline:
            raise ValueError(f"{offline[0]!r} reads local files: pass --data-dir DIR (the folder holding "
                             "eval_gauntlet/, hellaswag/, piqa/, gsm8k/, wikitext2_tokens/).")
        shadowed = [n for n in names if n in OFFLINE_TASKS]
        if shadowed:
            log.warning("%s without --data-dir run as lm-eval's own task(s), which download their data sets; pass "
                        "--data-dir DIR for the offline copies.", ", ".join(shadowed))
        return names, [], True
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} is not a folder.")
    if "all" in names:
        names = [n for n in names if n != "all"] + OFFLINE_TASKS + [WIKITEXT]
    harness, ppl, need_defaults = [], [], False
    for name in dict.fromkeys(names):  # keep order, drop repeats
        if name == WIKITEXT:
            found = [data_dir / f for f in WIKITEXT_FILES if (data_dir / f).is_file()]
            if not found:
                raise FileNotFoundError(f"wikitext2: none of {list(WIKITEXT_FILES)} exists under {data_dir}.")
            ppl.append((WIKITEXT, found[0]))
        elif name in OFFLINE_TASKS or name.removeprefix(PREFIX) in OFFLINE_TASKS:
            harness.append(PREFIX + name.removeprefix(PREFIX))
        elif name in LM_EVAL_NAMES:
            raise ValueError(f"{name!r} is lm-eval's name, which downloads its data set; with --data-dir the offline "
                             f"copy is {LM_EVAL_NAMES[name]!r}: pass --tasks {LM_EVAL_NAMES[name]}.")
        elif name.startswith(PREFIX):
            raise ValueError(f"unknown offline task {name!r}; offline tasks: {OFFLINE_TASKS + [WIKITEXT, 'all']}.")
        else:
            harness.append(name)
            need_defaults = True
    return harness, ppl, need_defaults


def _adapter(args: dict):
    from dyndepth.eval.harness import DyndepthLM

    return DyndepthLM(**args)


def _quiet_custom_dataset_hint(record: logging.LogRecord) -> bool:
    """lm-eval logs, per task with a `custom_dataset`, how to pass --metadata; `dyndepth eval` already does."""
    return "Custom kwargs can be passed" not in str(record.msg)


def _task_manager(names: list[str], data_dir, need_defaults: bool):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(f"lm-eval tasks need the lm-eval package ({e}); pip install 'dyndepth[eval]'.") from None
    manager = TaskManager(include_path=str(TASKS_DIR) if data_dir is not None else None,
                          include_defaults=need_defaults or data_dir is None,
                          metadata={"data_dir": str(Path(data_dir).resolve())} if data_dir is not None else None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}: not one of lm-eval's (`lm_eval ls tasks`) nor, "
                         f"with --data-dir, of the offline tasks {OFFLINE_TASKS + [WIKITEXT, 'all']}.")
    return manager


def _check_generation(lm, names: list[str], manager) -> None:
    """What only generation reads failed on the first generate_until request, after every log-likelihood task had
    scored, and nothing was written: knobs used only while generating (a GateSkip budget decodes by calibrated
    thresholds) and a max_gen_toks, the adapter's default or a task's own generation_kwargs, that leaves no room for
    the prompt within max_length (a model or window of 256 tokens against the adapter's 256 new ones), and
    enable_thinking beside log-likelihood tasks, which it cannot score. When a selected task may generate, these are
    checked before any request on the tasks built (once more: that reads their data sets, so not when the task index
    says that none generates)."""
    if not _may_generate(names, manager):
        return
    from lm_eval.tasks import get_task_dict

    from dyndepth.eval.harness import _generation_options

    def leaves(tree):
        for value in tree.values():
            yield from leaves(value) if isinstance(value, dict) else [value]

    tasks = list(leaves(get_task_dict(names, manager)))
    generating = [t for t in tasks if getattr(t, "OUTPUT_TYPE", None) == "generate_until"]
    scoring = [t.config.task for t in tasks if t not in generating]
    if scoring and lm.enable_thinking:  # (the adapter refuses their requests, as the hf backend does: at the first)
        raise ValueError(f"enable_thinking=true cannot score the log-likelihood tasks {scoring}; evaluate them in a "
                         "run without it, and the generative tasks with it.")
    if generating and (lm.knobs.generate or lm.knobs.decode_fields):
        lm.check_decoding()
    for task in generating:  # (a task's own max_gen_toks, as generate_until reads it)
        budget = _generation_options(task.config.generation_kwargs or {}, lm.max_gen_toks)["max_new_tokens"]
        if budget >= lm.max_length:
            raise ValueError(f"{task.config.task} generates up to max_gen_toks={budget} new tokens, which leaves no "
                             f"room for the prompt within max_length={lm.max_length}; pass --model-args "
                             f"max_gen_toks=N with N < {lm.max_length} (or a larger max_length).")


def _may_generate(names, manager) -> bool:
    """Whether a task of `names` may be a generate_until one, by lm-eval's task index (the parsed YAML, no data set):
    a YAML task says so by its output_type (lm-eval's default: generate_until), a group or tag by its members; a
    Python task, an inline config or an index this lm-eval version lays out otherwise may. lm-eval before 0.4.12
    indexes a dict per name, {"type", "yaml_path", "task"} with the YAML unparsed: its task's YAML is read here (the
    tasks were built twice there, each data set read once more)."""
    for name in names:
        entry = getattr(manager, "task_index", {}).get(name)
        if isinstance(entry, dict):  # (lm-eval < 0.4.12; a group's members there are -1: not indexed, it may generate)
            kind, members = str(entry.get("type")).upper(), entry.get("task")
            cfg = _task_yaml(entry.get("yaml_path")) if kind == "TASK" else {}
        else:
            kind, cfg = getattr(getattr(entry, "kind", None), "name", None), getattr(entry, "cfg", None) or {}
            members = cfg.get("task") if kind == "GROUP" else sorted(getattr(entry, "tags", ()))
        if kind == "TASK":
            if cfg.get("output_type", "generate_until") == "generate_until":
                return True
        elif kind in ("GROUP", "TAG"):
            if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members) \
                    or _may_generate(members, manager):
                return True
        else:
            return True
    return False


def _task_yaml(path) -> dict:
    """A task's YAML as lm-eval reads it for its index (includes merged, !function tags left unresolved); {} where it
    cannot be read, so the task counts as one that may generate."""
    import yaml
    from lm_eval import utils

    try:
        return utils.load_yaml_config(path, mode="simple") if isinstance(path, (str, Path)) else {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}


def _run_lm_eval(lm, names: list[str], manager, limit, **options) -> dict:
    """lm-eval's simple_evaluate of `names`; `options`: its num_fewshot and apply_chat_template (few-shot examples
    then go in as turns, lm-eval's fewshot_as_multiturn default)."""
    from lm_eval import simple_evaluate

    task_log = logging.getLogger("lm_eval.api.task")
    if _quiet_custom_dataset_hint not in task_log.filters:
        task_log.addFilter(_quiet_custom_dataset_hint)
    raw = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=True,
                          bootstrap_iters=BOOTSTRAP_ITERS, **options)
    return raw or {}


def _rows_from_lm_eval(raw: dict) -> list[Row]:
    rows = []
    for task, metrics in raw.get("results", {}).items():
        samples = raw.get("samples", {}).get(task, [])
        config = raw.get("configs", {}).get(task, {})
        chance = None
        if config.get("output_type") == "multiple_choice" and samples:
            chance = sum(1 / len(s["arguments"]) for s in samples) / len(samples)
        n = _examples(raw, task)
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(Row(task.removeprefix(PREFIX), metric if filt == "none" else f"{metric} ({filt})",
                            float(value), float(stderr) if isinstance(stderr, (int, float)) else None,
                            chance if metric.startswith("acc") else None, int(n)))
    return rows


def _examples(raw: dict, task: str) -> int:
    """Examples a task scored; a group's (mmlu), its subtasks' (lm-eval counts none for it: the table said n = 0)."""
    subtasks = raw.get("group_subtasks", {}).get(task)
    if subtasks:
        return sum(_examples(raw, t) for t in subtasks)
    return raw.get("n-samples", {}).get(task, {}).get("effective", len(raw.get("samples", {}).get(task, [])))


def _perplexity(model, tok, knobs, path: Path, stride, max_length, batch_size: int, limit: int | None):
    """Sliding-window perplexity of the file (`limit`: of its first `limit` non-empty lines only), and what its
    forwards ran: {"tokens_run", "per_token_stats"}, as the lm-eval adapter records them (`add_stats`)."""
    from dyndepth.eval.model_args import add_stats
    from dyndepth.eval.perplexity import file_perplexity

    sums: dict[str, float] = {}
    tokens = 0.0

    def record(stats: dict) -> None:
        nonlocal tokens
        tokens += add_stats(sums, stats)

    with knobs.scoring(model):
        result = file_perplexity(model, tok, path, limit=limit, max_length=max_length, stride=stride,
                                 batch_size=batch_size, progress=True, record=record)
    return result, {"tokens_run": tokens, "per_token_stats": {k: v / max(tokens, 1.0) for k, v in sums.items()}}


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table: task, metric, value, stderr, chance, n."""
    def num(x: float | None) -> str:
        if x is None:
            return "-"
        return f"{x:.4f}" if abs(x) < 1000 else f"{x:.4g}"

    lines = ["| task | metric | value | stderr | chance | n |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.task} | {r.metric} | {num(r.value)} | {num(r.stderr)} | {num(r.chance)} | {r.n} |" for r in rows]
    return "\n".join(lines)


def _write(out, model, args, tasks, data_dir, limit, rows, perplexities, raw, table, lookahead) -> Path:
    from dyndepth import jsonio
    from dyndepth.train.metrics import set_aside

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm_eval_part = {k: v for k, v in raw.items() if k != "samples"}
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
              "model": _name(model), "model_args": {k: _name(v) for k, v in args.items()}, "tasks": tasks,
              "data_dir": str(data_dir) if data_dir is not None else None, "limit": limit,
              "rows": [asdict(r) for r in rows], "perplexity": perplexities, "lm_eval": lm_eval_part,
              "scoring_lookahead": lookahead}  # (None: causal scoring; see `Method.lookahead`)
    path = out / "results.json"
    if path.exists() or (out / "results.md").exists():  # an earlier evaluation's, kept
        log.warning("%s: the earlier results in this folder moved to %s (and .md)", out,
                    set_aside(path, out / "results.md", label="earlier").name)
    path.write_text(jsonio.dumps(record, indent=2, default=str) + "\n")  # strict: an inf perplexity as null
    (out / "results.md").write_text(table + "\n")
    return path


def _name(value) -> str:
    """How a model argument appears in results.json: objects (a model, a tokenizer) by their class name."""
    return str(value) if isinstance(value, (str, Path, int, float, bool)) or value is None else type(value).__name__
