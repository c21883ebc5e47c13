"""Readers for the offline evaluation files, called by the task YAMLs beside this file (`custom_dataset`).

lm-eval calls each with the run's metadata as keyword arguments; `data_dir` (from `dyndepth eval
--data-dir DIR`, or `lm_eval --metadata '{"data_dir": "DIR"}'`, or the DYNDEPTH_DATA_DIR environment
variable) is the folder holding `hellaswag/`, `piqa/`, `eval_gauntlet/` and `gsm8k/` as laid out in
docs/eval.md. Multiple-choice docs come out uniform, {query, choices, gold}, so one YAML template
scores them all; the other shapes are kept as the files have them.
"""

from __future__ import annotations

import bz2
import json
import os
import re
from pathlib import Path

import datasets

ENV_VAR = "DYNDEPTH_DATA_DIR"
BRACKETED = re.compile(r"\[.*?\]")  # lm-eval's hellaswag drops every bracketed WikiHow span


def _find(data_dir: str | None, task: str, *candidates: str) -> Path:
    """The first of `candidates` (paths relative to the data folder) that exists."""
    data_dir = data_dir or os.environ.get(ENV_VAR)
    if not data_dir:
        raise FileNotFoundError(
            f"{task} reads local files but no data folder was given: pass --data-dir DIR to dyndepth eval "
            f"(or --metadata '{{\"data_dir\": \"DIR\"}}' to lm_eval, or set {ENV_VAR}).")
    root = Path(data_dir).expanduser()
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    raise FileNotFoundError(f"{task}: none of {list(candidates)} exists under {root}; the data folder must hold "
                            "the layout described in docs/eval.md (e.g. eval_gauntlet/, hellaswag/, piqa/, gsm8k/).")


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}); "
                                     "expected one JSON object per line.") from None
    return rows


def _splits(**splits: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def hellaswag(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """hellaswag_val_full.txt(.bz2): 6 lines per item: '<activity>: <context>', gold 0-3, four endings (`_wikihow`)."""
    path = _find(data_dir, "hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", "hellaswag_val_full.txt.bz2",
                 "hellaswag/hellaswag_val_full.txt", "hellaswag_val_full.txt")
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path} has {len(lines)} lines; the HellaSwag text format has 6 per item.")
    rows = []
    for i in range(0, len(lines), 6):
        query, gold, *endings = lines[i:i + 6]
        if gold.strip() not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}:{i + 2}: expected a gold label 0-3, got {gold!r}.")
        rows.append({"query": _wikihow(query), "choices": [_wikihow(e) for e in endings], "gold": int(gold)})
    return _splits(validation=rows)


def _wikihow(text: str) -> str:
    """A line of the file as lm-eval's hellaswag preprocesses it: the file's extraction removed only the [header],
    [step], [substeps] and [title] markers, lm-eval removes every bracketed span ('[www.kiddio.org]', '[insert name]';
    13 lines of the validation file) and then halves double spaces. Lines without such a span are left as they are
    (they went through the same halving once, as lm-eval's did)."""
    cut = BRACKETED.sub("", text)
    return text if cut == text else cut.replace("  ", " ")


def piqa(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """valid.jsonl {goal, sol1, sol2} with valid-labels.lst, one 0/1 label per line in the same order."""
    path = _find(data_dir, "piqa", "piqa/valid.jsonl", "valid.jsonl")
    labels_path = path.with_name("valid-labels.lst")
    if not labels_path.is_file():
        raise FileNotFoundError(f"piqa: {labels_path} is missing; PIQA's labels ship beside valid.jsonl.")
    docs = _jsonl(path)
    labels = [int(x) for x in labels_path.read_text().split()]
    if len(labels) != len(docs):
        raise ValueError(f"{labels_path} has {len(labels)} labels for {len(docs)} questions in {path}.")
    rows = [{"query": d["goal"], "choices": [d["sol1"], d["sol2"]], "gold": y} for d, y in zip(docs, labels)]
    return _splits(validation=rows)


def gauntlet(data_dir: str | None = None, file: str = "", split: str = "test", **_) -> datasets.DatasetDict:
    """A MosaicML eval-gauntlet jsonl as it is: {query, choices, gold}, {context_options, continuation, gold}
    (WinoGrande, WSC: partial scoring) or {context, continuation} (LAMBADA)."""
    path = _find(data_dir, file.removesuffix(".jsonl"), f"eval_gauntlet/{file}", file)
    return _splits(**{split: _jsonl(path)})


def gsm8k(data_dir: str | None = None, **_) -> datasets.DatasetDict:
    """test.jsonl {question, answer ending in '#### N'}; train.jsonl beside it supplies the few-shot examples."""
    test = _find(data_dir, "gsm8k", "gsm8k/test.jsonl", "test.jsonl")
    train = test.with_name("train.jsonl")
    if not train.is_file():
        raise FileNotFoundError(f"gsm8k: {train} is missing; the 5-shot prompt draws its examples from it.")
    return _splits(test=_jsonl(test), train=_jsonl(train))
