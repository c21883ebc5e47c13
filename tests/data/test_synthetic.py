"""Synthetic tasks: determinism, independently recomputed answers, knobs, spans, scoring, splits."""

import hashlib
import re
import string

import pytest

from dyndepth.data.synthetic import (
    TASKS,
    TERMINATOR,
    AddConfig,
    Example,
    TaskMix,
    answer_mask,
    answer_span,
    exact_match,
    make_examples,
    normalize_prediction,
    prompt_split,
    render_corpus,
    render_with_mask,
    score,
    task_config,
)

# ---------------------------------------------------------------------------------------------------
# Independent reference answers, parsed back from the prompt text


def _ref_var(prompt: str) -> str:
    *statements, query = prompt.split(";")
    env: dict[str, int] = {}
    for stmt in statements:
        name, expr = stmt.split("=")
        m = re.fullmatch(r"([a-z])([+\-*])(\d+)", expr)
        if m is None:
            env[name] = int(expr)
        else:
            src, op, const = env[m.group(1)], m.group(2), int(m.group(3))
            env[name] = {"+": src + const, "-": src - const, "*": src * const}[op]
    assert query.endswith("?")
    return str(env[query[:-1]])


def _reference(task: str, prompt: str) -> str:
    if task in ("add", "mul"):
        m = re.fullmatch(r"(\d+)([+*])(\d+)=", prompt)
        assert m is not None, prompt
        a, b = int(m.group(1)), int(m.group(3))
        return str(a + b if task == "add" else a * b)
    if task == "var":
        return _ref_var(prompt)
    body = re.fullmatch(rf"{task}:(.*)=", prompt).group(1)
    if task == "sort":
        return ",".join(str(v) for v in sorted(int(x) for x in body.split(",")))
    if task == "parity":
        return str(sum(int(b) for b in body) % 2)
    assert task == "copy"
    return body


HARD = {
    "add": {"digits": 7}, "mul": {"digits": 4}, "var": {"hops": 6, "distractors": 4, "max_value": 20},
    "sort": {"length": 12, "max_value": 99}, "parity": {"length": 21}, "copy": {"length": 15},
}


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("difficulty", [None, HARD])
def test_answers_match_independent_reference(task, difficulty):
    examples = make_examples([task], 200, seed=11, difficulty=difficulty)
    assert {ex.task for ex in examples} == {task}
    for ex in examples:
        assert ex.answer == _reference(task, ex.prompt), ex


# ---------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_identical_and_different_seed_differs():
    a = make_examples(None, 60, seed=3)
    assert a == make_examples(None, 60, seed=3)
    assert render_corpus(60, 3) == render_corpus(60, 3)
    assert a != make_examples(None, 60, seed=4)
    assert make_examples(None, 25, seed=3) == a[:25]  # prefix-stable: does not depend on n


def test_golden_stream_is_stable_across_machines_and_versions():
    # Pins the exact bytes of the default mix (checked identical on CPython 3.7-3.13). If this fails
    # after a deliberate format change, update the constants: the data the demo trains on changed.
    text = render_corpus(120, seed=0)
    assert text.startswith("54+273=327\n46*98=4508\nb=4;y=b-1;w=y-9;w?-6\nsort:0,1,4,8,5=0,1,4,5,8\n")
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "89de3ec45fd65cd1"
    val = render_corpus(60, seed=0, split="val")
    assert hashlib.sha256(val.encode()).hexdigest()[:16] == "1646a1cae697b9d8"


def test_texts_are_printable_ascii_with_one_terminator():
    for ex in make_examples(None, 120, seed=5, difficulty=HARD):
        assert ex.text.endswith(TERMINATOR) and ex.text.count(TERMINATOR) == 1
        assert ex.answer and all(c in string.printable for c in ex.text)
        assert len(ex.text.encode()) == len(ex.text)  # one byte-level token per character


# ---------------------------------------------------------------------------------------------------
# Difficulty knobs and mixing


def test_digits_knob_bounds_operands():
    for digits in (1, 3, 6):
        operands = [x for ex in make_examples("add", 100, 0, {"add": {"digits": digits}})
                    for x in re.findall(r"\d+", ex.prompt)]
        assert max(len(x) for x in operands) == digits


SIZE_OF = {  # (knob, size of one example as that knob measures it)
    "sort": ("length", lambda ex: len(ex.answer.split(","))),
    "parity": ("length", lambda ex: len(ex.prompt) - len("parity:=")),
    "copy": ("length", lambda ex: len(ex.answer)),
    "var": ("hops", lambda ex: ex.prompt.count(";") - 1),  # hops + 1 statements, then the query
}


@pytest.mark.parametrize("task", sorted(SIZE_OF))
def test_length_knobs_change_size(task):
    knob, size = SIZE_OF[task]
    for value in (3, 9):
        assert {size(ex) for ex in make_examples(task, 30, 1, {task: {knob: value}})} == {value}


def test_var_max_value_bounds_every_plus_minus_constant():
    # a '*' that would pass 999 became '-'/'+' keeping its constant 2 or 3: at hops=25, max_value=1, 1621 of
    # 3000 programs had a +/- constant above max_value
    for max_value in (1, 2):
        for ex in make_examples("var", 300, 0, {"var": {"hops": 25, "max_value": max_value}}, split=None):
            assert all(1 <= int(c) <= max_value for c in re.findall(r"=[a-z][+-](\d+)", ex.prompt)), ex.prompt
            assert ex.answer == _ref_var(ex.prompt)


def test_knob_resolution_and_validation():
    assert task_config("add") == TASKS["add"].default
    assert task_config("add", {"digits": 5}) == AddConfig(digits=5)
    assert task_config("add", AddConfig(digits=2)).digits == 2
    with pytest.raises(ValueError, match="unknown difficulty knobs"):
        task_config("add", {"length": 5})
    with pytest.raises(ValueError, match="out of range"):
        AddConfig(digits=0)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_examples(["addition"], 3, 0)
    with pytest.raises(ValueError, match="alphabet"):
        task_config("copy", {"alphabet": "a b"})


def test_round_robin_and_weights():
    exs = make_examples(["add", "copy", "parity"], 30, 0)
    assert [ex.task for ex in exs[:6]] == ["add", "copy", "parity"] * 2
    weighted = make_examples(TaskMix(("add", "copy"), weights=(1.0, 0.0)), 20, 0)
    assert {ex.task for ex in weighted} == {"add"}
    with pytest.raises(ValueError, match="weights"):
        TaskMix(("add", "copy"), weights=(1.0,))


def test_mix_difficulty_is_used():
    mix = TaskMix(("add",), difficulty={"add": {"digits": 9}})
    exs = make_examples(mix, 20, 0)
    assert max(len(x) for ex in exs for x in re.findall(r"\d+", ex.prompt)) == 9


# ---------------------------------------------------------------------------------------------------
# Spans and masks


def test_answer_span_and_mask():
    examples = make_examples(None, 60, seed=2)
    for ex in examples:
        start, end = answer_span(ex)
        assert ex.text[start:end] == ex.answer and ex.text[:start] == ex.prompt
        mask = answer_mask(ex)
        assert len(mask) == len(ex.text)
        assert "".join(c for c, m in zip(ex.text, mask, strict=True) if m) == ex.answer + TERMINATOR
        assert sum(answer_mask(ex, include_terminator=False)) == len(ex.answer)
    text, mask = render_with_mask(examples)
    assert text == "".join(ex.text for ex in examples) and len(mask) == len(text)
    assert sum(mask) == sum(len(ex.answer) + 1 for ex in examples)


# ---------------------------------------------------------------------------------------------------
# Exact-match scoring


def test_score_accepts_right_rejects_wrong():
    ex = Example("add", "12+30=", "42")
    assert score("add", "42", ex)
    assert score("add", "42\n", ex)
    assert score("add", "42  \n7+1=9\n", ex)  # generation ran on past the terminator
    assert score("add", " 42", ex)
    assert not score("add", "43", ex)
    assert not score("add", "4", ex)
    assert not score("add", "420\n", ex)  # extra characters before the terminator are wrong
    assert not score("add", "\n42", ex)
    assert normalize_prediction("1,2,3\nsort:") == "1,2,3"
    with pytest.raises(ValueError, match="example of task"):
        score("mul", "42", ex)


def test_exact_match_per_task():
    examples = make_examples(["add", "sort"], 8, seed=0, split="val")
    preds = [ex.answer + "\ngarbage" if i % 4 != 0 else "x" for i, ex in enumerate(examples)]
    acc = exact_match(examples, preds)
    assert acc == {"add": 0.5, "sort": 1.0, "overall": 0.75}
    assert exact_match([], []) == {}
    with pytest.raises(ValueError, match="predictions"):
        exact_match(examples, preds[:-1])


# ---------------------------------------------------------------------------------------------------
# Train/validation split


def test_train_val_disjoint_by_prompt():
    train = make_examples(None, 600, seed=0, split="train")
    val = make_examples(None, 300, seed=0, split="val")
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in val}
    assert all(prompt_split(ex.task, ex.prompt) == "val" for ex in val)
    # other seeds draw from the same partition, so they cannot leak either
    assert not {ex.prompt for ex in make_examples(None, 300, seed=9)} & {ex.prompt for ex in val}


def test_small_prompt_space_is_filtered_or_refused():
    tiny = {"add": {"digits": 1}}  # only 100 distinct prompts
    val = {ex.prompt for ex in make_examples("add", 50, 0, tiny, split="val")}
    train = {ex.prompt for ex in make_examples("add", 300, 0, tiny, split="train")}
    assert val and train and not val & train
    single = {"copy": {"length": 1, "alphabet": "a"}}  # one possible prompt: one split cannot be filled
    outcomes = []
    for split in ("train", "val"):
        try:
            outcomes.append(len(make_examples("copy", 2, 0, single, split=split)))
        except ValueError as err:
            assert "too few distinct prompts" in str(err)
            outcomes.append(None)
    assert sorted(outcomes, key=str) == [2, None]
    assert len(make_examples("copy", 2, 0, single, split=None)) == 2
    with pytest.raises(ValueError, match="split"):
        make_examples("add", 2, 0, split="test")
