"""The run configuration: one `RunConfig` per run, loaded from a recipe plus `section.key=value` overrides.

Precedence is CLI overrides > recipe file > dataclass defaults. The `train` section is typed
(`TrainConfig`); `model`, `method`, `data` and `eval` are plain dicts owned by their subsystems.
`model` is a preset name (`model = "demo-tiny"`, the default), or a table `{preset = "...", <ModelConfig field> = ...}`,
or `{pretrained = "path or hub id", dtype = "bfloat16"}`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dyndepth.config import check_fields

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("float32", "bfloat16")
PARALLEL = ("none", "ddp", "fsdp")
NONFINITE = ("stop", "skip")
SECTIONS = ("model", "method", "train", "data", "eval")
DEFAULT_PRESET = "demo-tiny"  # a recipe without [model]: its vocab holds the default byte tokenizer's 259 ids


class RunConfigError(ValueError):
    """A recipe or override that cannot be applied; the message names the key and the fix."""


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch per rank
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup: int = 100
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_frac: float = 0.2  # WSD: fraction of steps spent decaying to min_lr
    clip: float = 1.0  # max grad norm; 0 disables clipping
    nonfinite: str = "stop"  # a step with a non-finite loss or grad norm: stop (an error) | skip (no update)
    dtype: str = "float32"  # autocast dtype: float32 (off) | bfloat16
    compile: bool = False
    activation_checkpointing: bool = False
    eval_every: int = 0  # 0: evaluate only at the end (when an eval loader is given)
    eval_batches: int = 10  # batches of batch_size windows per rank (not grad_accum's): the set follows the layout
    save_every: int = 0  # 0: save only at the end
    keep_last: int = 3  # checkpoints kept in out_dir (older ones pruned after a verified save); 0: every one
    log_every: int = 10  # log and plot every n steps: that step's loss and stats, not a mean over the n
    seed: int = 0
    out_dir: str = "runs/default"
    resume: bool | str = False  # True: latest checkpoint in out_dir; a string: that checkpoint folder
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "dyndepth"
    freeze: list[str] = field(default_factory=list)  # parameter-name globs, e.g. "model.embed_tokens.*"
    lr_groups: dict[str, float] = field(default_factory=dict)  # glob -> LR multiplier, first match wins
    parallel: str = "none"  # none | ddp | fsdp
    device: str = "auto"  # auto | cpu | cuda
    peak_tflops: float | None = None  # MFU denominator per device; None: a default from the device name
    progress: bool = True  # tqdm bar on rank 0
    plot: bool = True  # loss-curve PNG (out_dir/loss.png) at the end

    def __post_init__(self) -> None:
        check_fields(self, "train", RunConfigError, infinite=("clip",))  # (recipes coerce strings; Python does not)
        for name, allowed in (("schedule", SCHEDULES), ("dtype", DTYPES), ("parallel", PARALLEL),
                              ("nonfinite", NONFINITE)):
            if getattr(self, name) not in allowed:
                raise RunConfigError(f"train.{name}={getattr(self, name)!r} is not one of {allowed}.")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise RunConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("clip", "warmup", "eval_every", "save_every", "keep_last", "weight_decay", "lr", "min_lr",
                     "seed"):  # (a negative min_lr took the schedule below zero: gradient ascent)
            if getattr(self, name) < 0:
                raise RunConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}.")
        if self.seed >= 2**31:  # each rank seeds numpy with seed + rank, below 2**32 (a bare "Seed must be between 0
            # and 2**32 - 1" once the data were built; past 2**64 torch's "Overflow when unpacking long long")
            raise RunConfigError(f"train.seed must be below 2**31 ({2**31}), got {self.seed}.")
        if self.eps <= 0 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise RunConfigError(f"train.eps ({self.eps}) must be > 0 and train.betas {list(self.betas)} must lie in "
                                 "[0, 1).")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise RunConfigError(f"train.peak_tflops must be > 0 (the accelerator's peak, for MFU), got "
                                 f"{self.peak_tflops}; leave it unset to use the known peak of the device.")
        bad = {glob: m for glob, m in self.lr_groups.items()
               if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < float("inf")}
        if bad:  # a negative multiplier trained those weights by gradient ascent
            glob, m = next(iter(bad.items()))
            raise RunConfigError(f"train.lr_groups[{glob!r}] = {m!r}: a multiplier must be a finite number >= 0 (0 "
                                 "freezes the group's learning rate).")
        if not str(self.out_dir).strip():  # "" wrote the run's checkpoints and files into the working directory
            raise RunConfigError("train.out_dir is empty; name the run's folder, e.g. --set train.out_dir=runs/mine.")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise RunConfigError(f"train.decay_frac must be in [0, 1], got {self.decay_frac}.")
        if self.min_lr > self.lr:
            raise RunConfigError(f"train.min_lr ({self.min_lr}) exceeds train.lr ({self.lr}).")


@dataclass
class RunConfig:
    model: dict = field(default_factory=lambda: {"preset": DEFAULT_PRESET})
    method: dict = field(default_factory=dict)  # {"name": "gateskip", ...}; empty: the plain model
    train: TrainConfig = field(default_factory=TrainConfig)
    data: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"]["betas"] = list(self.train.betas)
        return d


# ------------------------------------------------------------------------------------------ coercion

def _parse_scalar(text: str):
    """An override value without a declared type: JSON, then int/float/bool words, a TOML inline table or array
    (as a recipe writes it: `{ "model.layers.*" = 2.0 }`), else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for parse in (int, float, json.loads, _toml_value):
        try:
            return parse(text)
        except (ValueError, json.JSONDecodeError):
            pass
    return text


def _toml_value(text: str):
    """A TOML inline table or array, else ValueError (TOMLDecodeError is one): only these, since TOML would read
    other bare text, e.g. a date, as something other than the string it names."""
    if not text.strip().startswith(("{", "[")):
        raise ValueError(text)
    return _tomllib().loads(f"value = {text}")["value"]


def _tomllib():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


def _coerce_scalar(value, tp):
    """bool / int / float / str from a parsed value; TypeError when it does not fit."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("yes", "no", "on", "off"):
            return value.lower() in ("yes", "on")
        raise TypeError
    if isinstance(value, bool) or (tp is int and isinstance(value, float) and not value.is_integer()):
        raise TypeError
    if tp in (int, float):
        return tp(value)
    if tp is str and not isinstance(value, str):
        raise TypeError
    return value


def _coerce_container(value, tp, key: str):
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return {str(k): _coerce(v, args[1], key) for k, v in value.items()} if args else dict(value)
    if not isinstance(value, (list, tuple)):
        raise TypeError
    if origin is tuple:
        if len(args) != len(value) or Ellipsis in args:
            raise TypeError
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    return [_coerce(v, args[0], key) for v in value] if args else list(value)


def _coerce(value, tp, key: str):
    """Convert `value` (from a recipe or a CLI string) to the field type `tp`, or raise naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except RunConfigError:
                continue
        raise RunConfigError(f"{key}: cannot read {value!r} as {tp}.")
    container = tp in (list, tuple, dict) or origin in (list, tuple, dict)
    if isinstance(value, str) and tp is not str:
        value = _parse_scalar(value)
        if container and isinstance(value, str):  # comma list: "a,b" -> ["a", "b"]
            value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return _coerce_container(value, tp, key) if container else _coerce_scalar(value, tp)
    except (TypeError, ValueError):
        raise RunConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}.") from None


def _train_types() -> dict:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


# ------------------------------------------------------------------------------------------- loading

def read_recipe(path: Path) -> dict:
    """A recipe file (.toml, .yaml, .json) as written: its sections as dicts, nothing resolved."""
    if not path.exists():
        raise RunConfigError(f"recipe {path} does not exist.")
    if path.is_dir():  # (an IsADirectoryError traceback; a run's folder is a plausible guess to resume)
        saved = ([p for p in sorted(path.glob("step_*/config.yaml")) if p.parent.name[5:].isdigit()]
                 or sorted(path.glob("config.yaml")))  # the newest checkpoint's, else the run's
        hint = f" (to continue its run: dyndepth train {saved[-1]} --resume)" if saved else ""
        raise RunConfigError(f"recipe {path} is a folder; pass a recipe file (.toml or .yaml, e.g. "
                             f"recipes/tiny_cpu.toml){hint}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # (a bare "'utf-8' codec can't decode byte ..." without the file's name)
        raise RunConfigError(f"recipe {path} is not UTF-8 text ({e.reason} at byte {e.start}); pass a recipe "
                             "file (.toml or .yaml).") from None
    if path.suffix == ".toml":
        tomllib = _tomllib()
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RunConfigError(f"{path}: invalid TOML ({e}).") from None
    if path.suffix in (".yaml", ".yml", ".json"):
        try:
            raw = yaml.load(text, _RecipeLoader) or {}
        except yaml.YAMLError as e:
            raise RunConfigError(f"{path}: invalid YAML/JSON {_yaml_problem(e)}; fix the recipe there.") from None
        if not isinstance(raw, dict):
            raise RunConfigError(f"recipe {path} must be a mapping of sections ({list(SECTIONS)}), got a "
                                 f"{type(raw).__name__}; see recipes/tiny_cpu.toml.")
        return raw
    raise RunConfigError(f"recipe {path}: unknown format {path.suffix!r}; use .toml, .yaml or .json.")


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: the later one silently replaced the first (a
    second `train:` section dropped the whole first one, steps and out_dir included), as TOML refuses it."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key of its own: an override, wanted
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float)):  # (a list or mapping as a key: PyYAML's own error follows)
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice (the later would "
                                                        "replace the first); give it once", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line, where and what (PyYAML's own message spans lines, quoting the text under a caret)."""
    mark = getattr(e, "problem_mark", None)
    what = "; ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p) or str(e)
    where = f"at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where} ({' '.join(what.split())})".strip()


NAMED_KEYS = {("data", "source"), ("data", "val_source"), ("data", "tokenizer"), ("data", "cache_dir"),
              ("data", "text_field"), ("model", "pretrained"), ("model", "preset")}  # paths and names: never numbers


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise RunConfigError(f"override {override!r} must look like section.key=value, e.g. train.lr=3e-4.")
    dotted, value = override.split("=", 1)
    parts = dotted.strip().split(".")
    if parts[0] not in SECTIONS:
        raise RunConfigError(f"override {override!r}: unknown section {parts[0]!r}; valid sections: {SECTIONS}.")
    if len(parts) == 1:  # e.g. model=tiny-qwen3
        raw[parts[0]] = value
        return
    node = raw.setdefault(parts[0], {})
    if node is None:  # an empty YAML section
        node = raw[parts[0]] = {}
    if isinstance(node, str):  # model = "preset-name" followed by model.key=value
        node = raw[parts[0]] = {"preset": node}
    if not isinstance(node, dict):
        raise RunConfigError(f"override {override!r}: section {parts[0]!r} must be a table/mapping, got {node!r}.")
    if parts[:1] == ["model"] and parts[1:] in (["pretrained"], ["preset"]):
        _replace_model_source(node, parts[1])
    for p in parts[1:-1]:
        node = node.setdefault(p, {})
    # train values are coerced to their declared type later; free-form sections get a best guess here
    parsed = value if parts[0] == "train" else _parse_scalar(value)
    if tuple(parts) in NAMED_KEYS and isinstance(parsed, (bool, int, float)):  # a folder named 2024 (or 1e3, true) is
        parsed = value  # a path, not a number: it was refused as "data.source=2024 is not a source: write a path"
    node[parts[-1]] = parsed


def _replace_model_source(model: dict, source: str) -> None:
    """An override of model.pretrained or model.preset replaces where the recipe's model comes from: a checkpoint
    takes its shape from its config.json, so `model.pretrained=X` drops the recipe's preset and shape fields (keeping
    dtype); `model.preset=Y` drops a recipe's pretrained and its dtype (keeping the fields that adjust the preset)."""
    keep = {"dtype"} if source == "pretrained" else set(model) - {"pretrained", "dtype"}  # (dtype: checkpoints')
    for key in set(model) - keep:
        del model[key]


def build_run_config(raw: dict) -> RunConfig:
    """A validated RunConfig from a nested dict (recipe contents with overrides applied)."""
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise RunConfigError(f"unknown section(s) {sorted(unknown)}; valid sections: {list(SECTIONS)}.")
    for name in SECTIONS:  # None: an empty YAML section; model may be a preset name, not empty
        value, allowed = raw.get(name), (str, dict) if name == "model" else (type(None), dict)
        if name in raw and not isinstance(value, allowed):
            raise RunConfigError(f"section {name!r} must be a table/mapping, got {value!r}.")
    types_ = _train_types()
    train_raw = raw.get("train") or {}
    bad = [k for k in train_raw if k not in types_]
    if bad:
        raise RunConfigError(f"unknown key train.{bad[0]}; valid train keys: {sorted(types_)}.")
    train = TrainConfig(**{k: _coerce(v, types_[k], f"train.{k}") for k, v in train_raw.items()})
    model = raw.get("model", {"preset": DEFAULT_PRESET})
    if isinstance(model, str):
        model = {"preset": model}
    return RunConfig(model=dict(model), method=dict(raw.get("method") or {}), train=train,
                     data=dict(raw.get("data") or {}), eval=_eval_section(raw.get("eval") or {}))


EVAL_KEYS = {"enabled": bool}  # [eval]: whether the run holds out data and evaluates on it


def _eval_section(section: dict) -> dict:
    bad = [k for k in section if k not in EVAL_KEYS]
    if bad:
        raise RunConfigError(f"unknown key eval.{bad[0]}; valid eval keys: {sorted(EVAL_KEYS)} (how often and on how "
                             "many batches: train.eval_every, train.eval_batches).")
    return {k: _coerce(v, EVAL_KEYS[k], f"eval.{k}") for k, v in section.items()}


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Recipe (.toml/.yaml/.json; None: defaults only) plus overrides like "train.lr=3e-4"."""
    raw = read_recipe(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(raw, override)
    return build_run_config(raw)


def save_run_config(config: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again by `load_run_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_config_text(config))
    tmp.replace(path)
    return path


def run_config_text(config: RunConfig) -> str:
    """The YAML `save_run_config` writes."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
