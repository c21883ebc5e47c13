"""Model configuration: one dataclass for the Qwen3, Qwen3-MoE, Qwen2, Llama and Mistral decoders (HF field names).

Field names are exactly those of HF `config.json`, so reading and writing a checkpoint's config is a
dictionary copy (see `interop/hf.py`). Derived values are filled in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import types
import typing
from dataclasses import dataclass, field

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen2", "llama", "mistral")
# Layout facts of the families transformers fixes (config.json carries no key for them): which norm q / k, which bias
# q / k / v alone, and which have neither an o_proj bias nor experts
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe")
QKV_BIAS_FAMILIES = ("qwen2",)
DENSE_UNBIASED_O_FAMILIES = ("qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ROPE_SCALING_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                     "yarn": ("factor",)}  # required


class ConfigError(ValueError):
    """A model configuration that dyndepth cannot build; the message names the field and the fix."""


# ------------------------------------------------------------------------------------ field checks

def check_fields(obj, owner: str, error: type[Exception] = ConfigError, infinite: tuple[str, ...] = ()) -> None:
    """The fields of dataclass `obj` against their annotations, in place, before any other check reads them: an int
    field holds a whole number (a numpy or torch integer becomes an int; a bool, a float or a string is refused), a
    float field a finite number (an int becomes a float; nan and inf are refused), a bool field a bool, a str field a
    string, `None` only where the annotation allows it, and lists / tuples hold such items (a list given for a tuple
    becomes one); a whole float (8.0) is taken for an int, as recipes coerce it, and the fields in `infinite` may hold
    inf. A value that fits no annotation is one `error` naming `owner.field`; other types are not checked.
    Dataclasses built from Python skip the coercion recipes do, so without this `budget="0.3"` or `beta_init=0` (an
    int parameter) failed inside torch, and nan passed every `< 0` check."""
    hints = _type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, conformed = _conform(value, hints[f.name], f.name in infinite)
        if not ok:
            raise error(f"{owner}.{f.name}={value!r} must be {_describe(hints[f.name])}.")
        if conformed is not value:
            setattr(obj, f.name, conformed)


@functools.cache
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)  # (resolving the annotations is most of a check's time: once a class)


def _conform(value, tp, infinite: bool = False) -> tuple[bool, object]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, conformed = _conform(value, arg, infinite)
            if ok:
                return True, conformed
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return (True, operator.index(value)) if is_whole(value) else (False, value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or \
                (math.isinf(value) and not infinite):
            return False, value
        return True, float(value)
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        items = args[:1] * len(value) if origin is list or args[1:] == (Ellipsis,) else args
        conformed = [_conform(item, item_tp) for item, item_tp in zip(value, items)]
        if len(items) != len(value) or not all(ok for ok, _ in conformed):
            return False, value
        return True, origin(item for _, item in conformed)
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    return True, value  # (other annotations: not checked here)


def _describe(tp) -> str:
    names = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string",
             type(None): "None", dict: "a table (dict)"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})" if args else "a list"
    return names.get(tp) or names.get(origin) or getattr(tp, "__name__", str(tp))


def is_whole(value) -> bool:
    """A Python, numpy or one-element torch integer; not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _positive(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_rope_scaling(rope_scaling: dict | None) -> None:
    """A config's `rope_scaling` (HF's dict, or None): a supported type with every key it needs, finite and > 0."""
    if rope_scaling is None:
        return
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}.")
    missing = [k for k in ROPE_SCALING_KEYS.get(rope_type, ()) if k not in rope_scaling]
    if missing:
        raise ConfigError(f"rope_scaling of type {rope_type!r} needs {missing}; got {rope_scaling}.")
    bad = [k for k in ROPE_SCALING_KEYS.get(rope_type, ()) if not _positive(rope_scaling[k])]
    if bad:
        raise ConfigError(f"rope_scaling {bad} must be finite numbers > 0; got {rope_scaling}.")


def position_limit(config) -> int:
    """The most positions a model places: `max_position_embeddings`, or under YaRN the length it extends to,
    factor x original_max_position_embeddings where that is longer (as vLLM reads it: Qwen3's model card adds
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768} to a config.json that keeps
    max_position_embeddings 40960, for texts up to 131072 tokens)."""
    limit = config.max_position_embeddings
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type")) == "yarn":
        limit = max(limit, int(scaling["factor"] * scaling.get("original_max_position_embeddings", limit)))
    return limit


def position_limit_name(config) -> str:
    """What `position_limit` is, for messages: "max_position_embeddings (N)", or YaRN's longer reach."""
    limit = position_limit(config)
    if limit == config.max_position_embeddings:
        return f"max_position_embeddings ({limit})"
    return f"YaRN's factor x original_max_position_embeddings ({limit})"


def check_at_least(obj, owner: str, names: tuple[str, ...], low: float = 1, error: type[Exception] = ConfigError,
                   what: str = "") -> None:
    """Each of `names` (numbers, None skipped) >= `low`, else one `error` naming `owner.name`."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < low:
            raise error(f"{owner}.{name} must be >= {low}{what}, got {value}.")


def check_above_zero(obj, owner: str, names: tuple[str, ...], error: type[Exception] = ConfigError) -> None:
    """Each of `names` > 0 (a norm's eps, a RoPE base), else one `error` naming `owner.name`."""
    for name in names:
        if not getattr(obj, name) > 0:
            raise error(f"{owner}.{name} must be > 0, got {getattr(obj, name)}.")


@dataclass
class ModelConfig:
    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "yarn", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o (Llama's, Qwen3's option)
    qkv_bias: bool | None = None  # biases on q, k and v only; None -> True for Qwen2 (Qwen2.5 too), its attention
    mlp_bias: bool = False  # Llama only
    qk_norm: bool | None = None  # per-head RMSNorm on q and k; None -> True for the Qwen3 family
    # Mixture of experts (Qwen3-MoE); num_experts == 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # Whether training adds router_aux_loss_coef x the balancing loss: false (transformers' default, which its
    # save_pretrained writes: Qwen3-30B-A3B's config.json says false) adds none, as transformers' Qwen3-MoE does; true
    # adds it. None (unset: dyndepth's own MoE configs, older exports) adds it too. Only false is written to a
    # config.json: transformers' generate fails with output_router_logits=true and an attention mask (its loss over
    # the cache), so true and None are left out (transformers reads its default, false; we read None, which trains)
    output_router_logits: bool | None = None
    # Special tokens (carried through export; generation reads eos_token_id as a default stop token).
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in ("float32", "bfloat16", ...)

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; dyndepth builds {SUPPORTED_MODEL_TYPES}."
            )
        check_at_least(self, "model", ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                       "decoder_sparse_step"))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_at_least(self, "model", ("num_experts", "router_aux_loss_coef"), low=0)
        check_above_zero(self, "model", ("rms_norm_eps", "rope_theta"))
        if self.num_experts:
            check_at_least(self, "model", ("num_experts_per_tok", "moe_intermediate_size"), what=" in a MoE model")
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if outside:
            raise ConfigError(f"model.mlp_only_layers {outside} name no layer of the {self.num_hidden_layers}-layer "
                              "model.")
        if self.qk_norm is None:
            self.qk_norm = self.model_type in QK_NORM_FAMILIES
        if self.qkv_bias is None:
            self.qkv_bias = self.model_type in QKV_BIAS_FAMILIES
        if self.model_type in DENSE_UNBIASED_O_FAMILIES and (self.attention_bias or self.num_experts):
            raise ConfigError(f"a {self.model_type} model has a dense MLP and no o_proj bias (transformers' "
                              f"{self.model_type.capitalize()}): attention_bias={self.attention_bias} and num_experts="
                              f"{self.num_experts} have no place in its layout; use model_type qwen3 / qwen3_moe "
                              "for those.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.head_dim < 2 or self.head_dim % 2:
            raise ConfigError(f"head_dim must be even (rotary embeddings) and >= 2, got {self.head_dim}.")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; only 'silu' (SwiGLU) is.")
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})."
            )
        check_rope_scaling(self.rope_scaling)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Qwen3-MoE's rule: sparse unless listed in `mlp_only_layers` or off the `decoder_sparse_step` grid."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count from the shapes alone (no model needed)."""
        D, H = self.hidden_size, self.head_dim
        attn = D * H * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        attn += 2 * H if self.qk_norm else 0
        if self.attention_bias or self.qkv_bias:  # q, k and v biases, and o's
            attn += H * (self.num_attention_heads + 2 * self.num_key_value_heads) + (D if self.attention_bias else 0)
        total = 0
        for i in range(self.num_hidden_layers):
            if self.is_moe_layer(i):
                mlp = self.num_experts * 3 * D * self.moe_intermediate_size + self.num_experts * D
            else:
                F = self.intermediate_size
                mlp = 3 * D * F + (2 * F + D if self.mlp_bias else 0)  # gate and up biases (F each), down's (D)
            total += attn + mlp + 2 * D
        total += D  # final norm
        if include_embedding:
            total += self.vocab_size * D * (1 if self.tie_word_embeddings else 2)
        return total


# Named presets, looked up by exact name. "tiny-*" are for tests and the CPU demo; the others match the
# shapes of the public checkpoints of the same name (weights still come from `from_pretrained`).
PRESETS: dict[str, dict] = {
    "tiny-qwen3": dict(
        model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    "tiny-qwen3-moe": dict(
        model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    ),
    "tiny-qwen2": dict(  # Qwen2 / Qwen2.5's layout: q / k / v biases, no q / k norm
        model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "tiny-llama": dict(
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
    # The CPU demo's model (~0.8M parameters); vocab 264 holds the byte tokenizer's 259 ids.
    "demo-tiny": dict(
        model_type="qwen3", vocab_size=264, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # A small Qwen3-shaped model (~42M parameters) for CPU benchmarks.
    "bench-small": dict(
        model_type="qwen3", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}.")
    return ModelConfig(**{**PRESETS[name], **overrides})
