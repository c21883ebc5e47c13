"""Synthetic reasoning tasks with exact answers, generated in code from a seed.

Every example is ``prompt + answer + TERMINATOR`` in printable ASCII, so a byte-level tokenizer maps
one character to one token. The prompt is cheap boilerplate; the answer characters are where the
computation happens, so that is where a token-adaptive method should spend its depth.
``answer_span`` and ``answer_mask`` locate them in the full text.

Formats (one line each)::

    add     123+456=579            mul     12*34=408
    var     q=3;k=q+4;x=k*2;x?14   sort    sort:3,1,2=1,2,3
    parity  parity:10110=1         copy    copy:abcd=abcd

Determinism: each stream is a ``random.Random`` seeded with a string (Python hashes it with SHA-512,
identically on every platform), and only ``randrange``/``choice``/``choices``/``shuffle`` are drawn,
whose algorithms have not changed across Python 3 versions. Global ``random`` and ``hash()`` are never
used. Train and validation are disjoint by prompt: a stable hash of (task, prompt) assigns every
possible prompt to exactly one split, whatever ``n`` or ``seed`` is asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TERMINATOR = "\n"
VAL_FRACTION = 0.1  # share of each task's prompt space that belongs to the validation split
SPLITS = ("train", "val")
_MAX_TRIES = 1000  # draws per example before a split is declared impossible to fill
_VAR_MAX_ABS = 999  # keeps variable-binding values (and answers) short


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """Full training text: prompt, answer, terminator."""
        return self.prompt + self.answer + TERMINATOR


# Difficulty knobs, one dataclass per task


def _check(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is out of range; choose a value in [{low}, {high}]")


@dataclass(frozen=True)
class AddConfig:
    digits: int = 3  # each operand is uniform in [0, 10**digits)

    def __post_init__(self) -> None:
        _check("AddConfig.digits", self.digits, 1, 40)


@dataclass(frozen=True)
class MulConfig:
    digits: int = 2  # each operand is uniform in [0, 10**digits)

    def __post_init__(self) -> None:
        _check("MulConfig.digits", self.digits, 1, 20)


@dataclass(frozen=True)
class VarConfig:
    hops: int = 2  # derived assignments between the literal and the queried variable
    max_value: int = 9  # literals and +/- constants are in [0, max_value] / [1, max_value]
    distractors: int = 0  # unrelated literal assignments mixed into the program

    def __post_init__(self) -> None:
        _check("VarConfig.hops", self.hops, 0, 25)
        _check("VarConfig.max_value", self.max_value, 1, 99)
        _check("VarConfig.distractors", self.distractors, 0, 25)
        _check("VarConfig.hops + distractors", self.hops + self.distractors, 0, 25)  # 26 letter names


@dataclass(frozen=True)
class SortConfig:
    length: int = 5  # how many numbers to sort
    max_value: int = 9  # numbers are uniform in [0, max_value]

    def __post_init__(self) -> None:
        _check("SortConfig.length", self.length, 1, 200)
        _check("SortConfig.max_value", self.max_value, 1, 10**6)


@dataclass(frozen=True)
class ParityConfig:
    length: int = 8  # bits in the string; the answer is 1 when the count of ones is odd

    def __post_init__(self) -> None:
        _check("ParityConfig.length", self.length, 1, 1000)


@dataclass(frozen=True)
class CopyConfig:
    length: int = 8
    alphabet: str = string.ascii_lowercase

    def __post_init__(self) -> None:
        _check("CopyConfig.length", self.length, 1, 1000)
        bad = [c for c in self.alphabet if c not in string.printable or c.isspace()]
        if not self.alphabet or bad:
            raise ValueError(f"CopyConfig.alphabet must be non-empty printable ASCII without whitespace, "
                             f"got bad characters {bad!r}")


# Generators: (rng, knobs) -> (prompt, answer)


def _gen_add(rng: random.Random, cfg: AddConfig) -> tuple[str, str]:
    a, b = rng.randrange(10**cfg.digits), rng.randrange(10**cfg.digits)
    return f"{a}+{b}=", str(a + b)


def _gen_mul(rng: random.Random, cfg: MulConfig) -> tuple[str, str]:
    a, b = rng.randrange(10**cfg.digits), rng.randrange(10**cfg.digits)
    return f"{a}*{b}=", str(a * b)


def _gen_var(rng: random.Random, cfg: VarConfig) -> tuple[str, str]:
    names = list(string.ascii_lowercase)
    rng.shuffle(names)  # random names: the model must bind by name, not by position
    value = rng.randrange(cfg.max_value + 1)
    statements = [f"{names[0]}={value}"]
    for i in range(1, cfg.hops + 1):
        op = rng.choice("+-*")
        const = rng.randrange(2, 4) if op == "*" else rng.randrange(1, cfg.max_value + 1)
        if op == "*" and abs(value * const) > _VAR_MAX_ABS:
            op = "-" if value > 0 else "+"  # shrink towards zero instead of overflowing
            const = min(const, cfg.max_value)  # a +/- constant stays in [1, max_value]
        value = value + const if op == "+" else value - const if op == "-" else value * const
        statements.append(f"{names[i]}={names[i - 1]}{op}{const}")
    for j in range(cfg.distractors):
        literal = f"{names[cfg.hops + 1 + j]}={rng.randrange(cfg.max_value + 1)}"
        statements.insert(rng.randrange(len(statements) + 1), literal)
    return ";".join(statements) + f";{names[cfg.hops]}?", str(value)


def _gen_sort(rng: random.Random, cfg: SortConfig) -> tuple[str, str]:
    values = [rng.randrange(cfg.max_value + 1) for _ in range(cfg.length)]
    return "sort:" + ",".join(map(str, values)) + "=", ",".join(map(str, sorted(values)))


def _gen_parity(rng: random.Random, cfg: ParityConfig) -> tuple[str, str]:
    bits = "".join(rng.choice("01") for _ in range(cfg.length))
    return f"parity:{bits}=", str(bits.count("1") % 2)


def _gen_copy(rng: random.Random, cfg: CopyConfig) -> tuple[str, str]:
    s = "".join(rng.choice(cfg.alphabet) for _ in range(cfg.length))
    return f"copy:{s}=", s


@dataclass(frozen=True)
class Task:
    name: str
    default: Any  # the task's knob dataclass at its default difficulty
    generate: Callable[[random.Random, Any], tuple[str, str]]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("add", AddConfig(), _gen_add),
        Task("mul", MulConfig(), _gen_mul),
        Task("var", VarConfig(), _gen_var),
        Task("sort", SortConfig(), _gen_sort),
        Task("parity", ParityConfig(), _gen_parity),
        Task("copy", CopyConfig(), _gen_copy),
    )
}


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


def task_config(name: str, override: Any = None) -> Any:
    """The knobs for task ``name``: defaults, a full knob dataclass, or a dict of field overrides."""
    default = _task(name).default
    if override is None:
        return default
    if isinstance(override, type(default)):
        return override
    if isinstance(override, Mapping):
        fields = {f.name for f in dataclasses.fields(default)}
        unknown = sorted(set(override) - fields)
        if unknown:
            raise ValueError(f"unknown difficulty knobs {unknown} for task {name!r}; "
                             f"{type(default).__name__} has {sorted(fields)}")
        return dataclasses.replace(default, **override)
    raise ValueError(f"difficulty for task {name!r} must be a {type(default).__name__} or a dict of its "
                     f"fields, got {type(override).__name__}")


# Mixing, splitting, rendering


@dataclass(frozen=True)
class TaskMix:
    """Which tasks to interleave, how often, and at what difficulty.

    ``weights=None`` cycles through ``tasks`` round-robin (exactly balanced); otherwise each example's
    task is drawn with these relative weights. ``difficulty`` maps a task name to its knob dataclass or
    to a dict of knob overrides, e.g. ``{"add": {"digits": 5}}``.
    """

    tasks: tuple[str, ...] = tuple(TASKS)
    weights: tuple[float, ...] | None = None
    difficulty: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("TaskMix.tasks is empty; name at least one of " + str(sorted(TASKS)))
        for name in (*self.tasks, *self.difficulty):
            _task(name)
        if self.weights is not None and (
            len(self.weights) != len(self.tasks) or any(w < 0 for w in self.weights) or sum(self.weights) <= 0
        ):
            raise ValueError(f"TaskMix.weights must be {len(self.tasks)} non-negative numbers with a "
                             f"positive sum (one per task), got {self.weights}")


def prompt_split(task: str, prompt: str) -> str:
    """The split ('train' or 'val') that owns this prompt; stable across machines and versions."""
    digest = hashlib.blake2b(f"{task}\x00{prompt}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") % 10_000 < VAL_FRACTION * 10_000 else "train"


def _as_mix(tasks: TaskMix | Sequence[str] | str | None, difficulty: Mapping[str, Any] | None) -> TaskMix:
    if isinstance(tasks, TaskMix):
        return dataclasses.replace(tasks, difficulty={**tasks.difficulty, **(difficulty or {})})
    names = tuple(TASKS) if tasks is None else (tasks,) if isinstance(tasks, str) else tuple(tasks)
    return TaskMix(tasks=names, difficulty=dict(difficulty or {}))


def _draw(rng: random.Random, task: Task, cfg: Any, split: str | None) -> Example:
    for _ in range(_MAX_TRIES):
        prompt, answer = task.generate(rng, cfg)
        if split is None or prompt_split(task.name, prompt) == split:
            return Example(task.name, prompt, answer)
    raise ValueError(f"task {task.name!r} at {cfg} has too few distinct prompts to fill the {split!r} split; "
                     f"raise its difficulty knobs or pass split=None")


def make_examples(
    tasks: TaskMix | Sequence[str] | str | None,
    n: int,
    seed: int,
    difficulty: Mapping[str, Any] | None = None,
    split: str | None = "train",
) -> list[Example]:
    """``n`` examples interleaving ``tasks`` (None: all), deterministic in ``seed``.

    ``split`` is 'train' or 'val' (disjoint by prompt) or None for the unfiltered stream. The first
    ``k`` examples do not depend on ``n``.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    mix = _as_mix(tasks, difficulty)
    configs = {name: task_config(name, mix.difficulty.get(name)) for name in mix.tasks}
    rng = random.Random(f"dyndepth.synthetic:{split}:{seed}")
    examples = []
    for i in range(n):
        if mix.weights is None:
            name = mix.tasks[i % len(mix.tasks)]
        else:
            name = rng.choices(mix.tasks, weights=mix.weights)[0]
        examples.append(_draw(rng, TASKS[name], configs[name], split))
    return examples


def render_corpus(
    n: int,
    seed: int,
    tasks: TaskMix | Sequence[str] | str | None = None,
    split: str | None = "train",
    difficulty: Mapping[str, Any] | None = None,
) -> str:
    """A training text stream: ``n`` examples' full texts, one per line."""
    return "".join(ex.text for ex in make_examples(tasks, n, seed, difficulty, split))


def answer_span(example: Example) -> tuple[int, int]:
    """``(start, end)`` character offsets of the answer in ``example.text``."""
    start = len(example.prompt)
    return start, start + len(example.answer)


def answer_mask(example: Example, include_terminator: bool = True) -> list[bool]:
    """Per character of ``example.text``: True for the hard (answer) characters.

    The terminator counts as hard by default: emitting it means knowing where the answer ends. For a
    causal LM, character ``i`` is predicted from position ``i - 1``; shifting is the caller's job.
    """
    start, end = answer_span(example)
    end += len(TERMINATOR) if include_terminator else 0
    return [start <= i < end for i in range(len(example.text))]


def render_with_mask(examples: Sequence[Example], include_terminator: bool = True) -> tuple[str, list[bool]]:
    """The concatenated texts and their concatenated answer masks (same length)."""
    mask: list[bool] = []
    for ex in examples:
        mask.extend(answer_mask(ex, include_terminator))
    return "".join(ex.text for ex in examples), mask


# Exact-match scoring


def normalize_prediction(prediction: str) -> str:
    """Cut a decoded generation at the first terminator and strip surrounding whitespace."""
    return prediction.split(TERMINATOR, 1)[0].strip()


def score(task: str, prediction: str, example: Example) -> bool:
    """Exact match of a generated continuation of ``example.prompt`` against its answer."""
    _task(task)
    if task != example.task:
        raise ValueError(f"scoring task {task!r} against an example of task {example.task!r}; "
                         f"pass example.task")
    return normalize_prediction(prediction) == example.answer


def exact_match(examples: Sequence[Example], predictions: Sequence[str]) -> dict[str, float]:
    """Accuracy per task, plus 'overall' over all examples (empty input gives ``{}``)."""
    if len(examples) != len(predictions):
        raise ValueError(f"got {len(examples)} examples but {len(predictions)} predictions; "
                         f"pass one prediction per example")
    hits: dict[str, list[bool]] = {}
    for ex, pred in zip(examples, predictions, strict=True):
        hits.setdefault(ex.task, []).append(score(ex.task, pred, ex))
    result = {task: sum(h) / len(h) for task, h in hits.items()}
    return result | ({"overall": sum(map(sum, hits.values())) / len(examples)} if examples else {})
