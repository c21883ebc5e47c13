"""Hugging Face checkpoint folders and hub ids in: `from_pretrained` builds the model family that config.json
names (models/registry.py) and re-attaches the method recorded under `dyndepth_method`; `convert_checkpoint`
re-saves one. Writing lives with each model (`model.save_pretrained`, which knows its on-disk layout).
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path

import torch

from dyndepth.config import ConfigError
from dyndepth.core.layers import cast_state, float32_keys
from dyndepth.devices import DTYPES, resolve_device, resolve_dtype  # noqa: F401 (DTYPES: a public name)
from dyndepth.methods.registry import attach_method, upgrade_saved_method
from dyndepth.models import MODELS, PRESETS, model_spec
from dyndepth.models.qwen3 import CausalLM
from dyndepth.safetensors_io import CheckpointError, read_safetensors

log = logging.getLogger(__name__)

# a HF tokenizer's files, dyndepth's byte tokenizer, and GPT-2's original BPE pair
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "byte_tokenizer.json", "encoder.json", "vocab.bpe")
# what a hub download fetches: the weights and every tokenizer file (a dyndepth export's byte tokenizer was left
# behind, and `dyndepth generate user/model` found no tokenizer)
_HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]


# ----------------------------------------------------------------------------------------- weights

def resolve(path_or_id: str | Path) -> Path:
    """A local checkpoint folder, or a hub id downloaded (config, safetensors, tokenizer) to the HF cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json.")
    text = str(path_or_id)
    if text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or "\\" in text:  # a path, never a hub id
        raise CheckpointError(f"no such folder: {text} (from {Path.cwd()}); pass a checkpoint folder or a hub id.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{path_or_id!r} is not a local folder, and huggingface_hub (needed for hub ids) is not installed: "
            "pip install 'dyndepth[hf]'."
        ) from None
    try:
        # config.json first: a model dyndepth does not build (another family, quantized, sliding-window) was
        # refused only after its weights (gigabytes) had downloaded
        config = Path(snapshot_download(str(path_or_id), allow_patterns=["config.json"])) / "config.json"
        if config.is_file():
            raw_config = _read_json(config)
            _spec_of(raw_config).config_from_hf(raw_config)
        return Path(snapshot_download(str(path_or_id), allow_patterns=_HUB_PATTERNS))
    except (ConfigError, CheckpointError):  # (the config's own message)
        raise
    except Exception as e:  # network errors, unknown repo, gated repo
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        close = [] if "/" in text else difflib.get_close_matches(text, PRESETS, n=1)  # (generate, eval: presets too)
        hint = f"; did you mean the preset {close[0]!r}?" if close else ""
        raise CheckpointError(f"could not load {path_or_id!r}: there is no such local folder (from {Path.cwd()}), "
                              f"and as a hub id: {reason}{hint}") from None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from the checkpoint's source.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object; restore it.")
    return obj


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Memory-mapped tensors of `model.safetensors` or, without one, every shard named in its index. The single file
    comes first, as transformers reads them: its save_pretrained, writing one file over a sharded save, leaves the
    old index (naming shards it deleted) behind, and such a folder failed to load here (FileNotFoundError)."""
    single = folder / "model.safetensors"
    if single.exists():
        return read_safetensors(single)
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder} (found {found}).")
    state = {}
    for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
        state.update(read_safetensors(folder / shard))
    return state


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    for key in [k for k in state if k.endswith("rotary_emb.inv_freq")]:  # older Llama exports store the rotary
        del state[key]  # table; it is derived from config.json (transformers ignores it too)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
                   for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_few(missing)}")
    if extra:
        problems.append(f"unexpected tensors ({len(extra)}): {_few(extra)}")
    if wrong:
        problems.append(f"mis-shaped tensors ({len(wrong)}): {_few(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config.json: " + "; ".join(problems))


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _spec_of(raw_config: dict):
    model_type = raw_config.get("model_type")
    if model_type not in MODELS:
        raise ConfigError(f"unsupported architecture: model_type={model_type!r} (architectures="
                          f"{raw_config.get('architectures')}); dyndepth builds {sorted(MODELS)}.")
    return model_spec(model_type)


def model_from_config(raw_config: dict, source: str = "config.json") -> torch.nn.Module:
    """The model a config.json describes (as `pretrained_config` writes it), with its `dyndepth_method` attached,
    weights not loaded (under `torch.device("meta")` when the caller assigns them)."""
    spec = _spec_of(raw_config)
    model = spec.model_cls(spec.config_from_hf(raw_config))
    if "dyndepth_method" in raw_config:  # a checkpoint trained with an adaptive-depth method
        method = dict(raw_config["dyndepth_method"])
        name = method.pop("name", None)
        if name is None:
            raise CheckpointError(f"{source}: dyndepth_method has no name.")
        attach_method(model, name, method)
    return model


def from_pretrained(path_or_id: str | Path, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> torch.nn.Module:
    """Load a HF checkpoint folder or hub id, in eval mode (as transformers does: a method's training-only work,
    DND's controller statistics and router losses, stays off until `model.train()`; the trainer calls it). dtype None
    is transformers' default: config.json's dtype, else the stored one (no copy on CPU when the weights are
    stored in it, `safetensors_io.read_safetensors`; weights stored in several dtypes without one named: the
    embedding's)."""
    folder = resolve(path_or_id)
    config_path = folder / "config.json"
    if not config_path.exists():
        if (folder / "train_state.pt").exists():  # a training checkpoint (out_dir/step_N)
            raise CheckpointError(f"{folder} is a training checkpoint: load the run's exported out_dir/model, or "
                                  f"export this step with `dyndepth convert {folder} OUT`.")
        if (folder / "model" / "config.json").exists():  # a run's out_dir: the trainer exported its model there
            raise CheckpointError(f"{folder} is a training run's folder, not a model: load its exported model, "
                                  f"{folder / 'model'}.")
        steps = sorted(p.parent for p in folder.glob("step_*/train_state.pt"))
        if steps:  # a run stopped before its export
            raise CheckpointError(f"{folder} is a training run's folder, not a model, and holds no export: export "
                                  f"its last checkpoint with `dyndepth convert {steps[-1]} OUT`.")
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    raw_config = _read_json(config_path)
    spec = _spec_of(raw_config)
    dtype = resolve_dtype(dtype)
    device = None if device is None else resolve_device(device)
    state = spec.state_from_hf(read_state_dict(folder))
    raw_config = _tying(raw_config, spec, state, folder)
    if isinstance(raw_config.get("dyndepth_method"), dict):  # (an older folder's layout: upgraded)
        raw_config = {**raw_config, "dyndepth_method": upgrade_saved_method(raw_config["dyndepth_method"], state)}
    with torch.device("meta"):
        model = model_from_config(raw_config, str(config_path))
    config = model.config
    _check_method_tensors(model, state, folder)
    check_state_dict(model, state, str(folder))
    keep = float32_keys(model)
    if dtype is None:
        dtype = _one_dtype(state, keep, getattr(config, "torch_dtype", None))
    state = cast_state(state, dtype, keep)  # the buffers modules keep in float32 load as float32
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():  # non-persistent buffers (RoPE tables) are still on meta after loading
        if hasattr(module, "reset") and getattr(getattr(module, "inv_freq", None), "is_meta", False):
            module.reset()
    generation = folder / "generation_config.json"  # generate's default stop ids (and pad) come from it, as in HF
    model.generation_config = _read_json(generation) if generation.is_file() else None
    model.eval()
    return model.to(device) if device is not None else model


def _tying(raw_config: dict, spec, state: dict[str, torch.Tensor], folder: Path) -> dict:
    """transformers' rule for a config that ties lm_head to the embedding: a checkpoint holding both, different,
    loads them untied (its config is wrong), and one holding only lm_head.weight ties the embedding to it. The tied
    model dropped the checkpoint's own lm_head (logits far from transformers') or reported the embedding missing."""
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is None or not spec.config_from_hf(raw_config).tie_word_embeddings:
        return raw_config
    if embed is None:  # (state is ours: read_state_dict's fresh dict)
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    elif not torch.equal(head, embed):
        log.warning("%s/config.json ties lm_head to the embedding (tie_word_embeddings), but the checkpoint holds a "
                    "different lm_head.weight: loading them untied, as transformers 5 does; set tie_word_embeddings "
                    "to false in config.json to silence this.", folder)
        return {**raw_config, "tie_word_embeddings": False}
    return raw_config


def _check_method_tensors(model, state: dict[str, torch.Tensor], folder: Path) -> None:
    """config.json records a method and the folder holds none of its tensors: transformers loaded a dyndepth export
    (the method's tensors unexpected, dropped) and saved it again, keeping `dyndepth_method` in its config. Say so,
    rather than list the missing tensors."""
    name = getattr(getattr(model, "method", None), "name", None)
    if name is None or any(f".{name}." in f".{k}" for k in state):
        return
    if not any(f".{name}." in f".{k}" for k in model.state_dict()):  # (a method without tensors lacks none)
        return
    raise CheckpointError(f"{folder}/config.json records the method {name!r} (dyndepth_method), and the folder holds "
                          f"none of its tensors (model.layers.*.{name}.*): transformers' save_pretrained keeps that "
                          "config entry and drops the tensors it does not know. Delete dyndepth_method from "
                          "config.json to load the base model (then attach and post-train the method again); a folder "
                          "meant for transformers is exported without it: dyndepth convert SRC DST --plain.")


def _one_dtype(state: dict[str, torch.Tensor], keep: set[str], config_dtype: str | None) -> torch.dtype | None:
    """The dtype transformers' default ("auto") loads a checkpoint in: the floating dtype config.json names, else the
    stored one (the embedding's when the weights mix several: float32 norms beside bfloat16 matrices failed the
    first matmul); None where that is the stored dtype of every weight (zero-copy). A checkpoint stored in bfloat16
    whose config.json says float32 ran in bfloat16, transformers in float32 (and the reverse)."""
    stored = {v.dtype for k, v in state.items() if v.is_floating_point() and k not in keep}
    named = getattr(torch, config_dtype, None) if isinstance(config_dtype, str) else None
    if not (isinstance(named, torch.dtype) and named.is_floating_point):  # (absent, or "auto")
        named = None
    if stored <= {named} or named is None and len(stored) <= 1:
        return None
    return named or state["model.embed_tokens.weight"].dtype


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: str | None = None,
                       max_shard_bytes: int = 5 * 2**30, plain: bool = False) -> Path:
    """Re-save a HF checkpoint (optionally in another dtype or shard size), carrying its tokenizer files; `plain`:
    without its method (`save_pretrained(plain=True)`). (Training checkpoints are exported by
    `dyndepth.train.run.export_checkpoint`; `dyndepth convert` picks.)"""
    import shutil

    folder = resolve(src)
    model = from_pretrained(folder, dtype=dtype)
    out = save_model(model, dst, max_shard_bytes=max_shard_bytes, plain=plain)
    for name in TOKENIZER_FILES:
        have, want = folder / name, out / name
        if have.exists() and not (want.exists() and want.samefile(have)):  # in place: already there
            shutil.copyfile(have, want)
    return out


def save_model(model, path: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
               plain: bool = False) -> Path:
    """`model.save_pretrained`, `plain` (the method left out: a folder for transformers) for the decoder family
    only: the other families have no method to leave out and no transformers class to load them."""
    if not plain:
        return model.save_pretrained(path, dtype=dtype, max_shard_bytes=max_shard_bytes)
    if not isinstance(model, CausalLM):
        raise ValueError(f"plain export writes a transformers folder of the decoder family (Qwen3 / Qwen2 / Llama / "
                         f"Mistral), and a {type(model).__name__} has no transformers class (nor a method to leave "
                         "out); export it without --plain and load it with dyndepth.from_pretrained.")
    return model.save_pretrained(path, dtype=dtype, max_shard_bytes=max_shard_bytes, plain=True)
