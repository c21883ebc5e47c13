"""Hugging Face checkpoints: config.json + (sharded) safetensors in, the same out.

Parameter names are HF's already, so import is a `load_state_dict`; the only reshaping is Qwen3-MoE's
experts, which checkpoints store per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`) and which
we keep stacked (`mlp.experts.gate_up_proj (E, 2F, D)`, `mlp.experts.down_proj (E, D, F)`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dyndepth.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig
from dyndepth.interop.safetensors_io import CheckpointError, read_safetensors, write_json, write_safetensors
from dyndepth.models.qwen3 import CausalLM

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "llama": "LlamaForCausalLM"}
_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_ALIASES = {"num_local_experts": "num_experts"}  # names some transformers versions write instead
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------- config

def config_from_hf(d: dict) -> ModelConfig:
    """ModelConfig from a config.json dict (transformers v4 or v5 layout)."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported architecture: model_type={model_type!r} (architectures={d.get('architectures')}); "
            f"dyndepth loads {list(SUPPORTED_MODEL_TYPES)}."
        )
    if d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or []):
        raise ConfigError("sliding-window attention layers are not supported yet; use a checkpoint without them.")
    rope = dict(d.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    fields = {_ALIASES.get(k, k): v for k, v in d.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    fields["torch_dtype"] = d.get("dtype") or d.get("torch_dtype")
    return ModelConfig.from_dict({**fields, "rope_theta": theta, "rope_scaling": scaling})


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict:
    d = config.to_dict()
    d.pop("qk_norm")
    if config.model_type != "llama":
        d.pop("mlp_bias")
    if not config.num_experts:
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                  "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"):
            d.pop(k)
    dtype_name = str(dtype).removeprefix("torch.")
    d.update(architectures=[ARCHITECTURES[config.model_type]], torch_dtype=dtype_name, dtype=dtype_name)
    rope_parameters = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    d["rope_parameters"] = rope_parameters  # v5 reads this; v4 reads rope_theta / rope_scaling
    return d


# ----------------------------------------------------------------------------------------- weights

def resolve(path_or_id: str | Path) -> Path:
    """A local checkpoint folder, or a hub id downloaded (config, safetensors, tokenizer) to the HF cache."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{path_or_id!r} is not a local folder, and huggingface_hub (needed for hub ids) is not installed: "
            "pip install 'dyndepth[hf]'."
        ) from None
    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # network errors, unknown repo, gated repo
        raise CheckpointError(f"could not load {path_or_id!r}: not a local folder, and the hub said: {e}") from None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Memory-mapped tensors of `model.safetensors` or every shard named in its index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard))
        return state
    single = folder / "model.safetensors"
    if not single.exists():
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder} (found {found}).")
    return read_safetensors(single)


def stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert on-disk keys -> stacked `gate_up_proj (E, 2F, D)` and `down_proj (E, D, F)`."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for key, t in state.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            out[key] = t
        else:
            groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
    for prefix, experts in groups.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))) or any(len(experts[e]) != 3 for e in ids):
            raise CheckpointError(f"{prefix}: expert tensors are incomplete (experts {ids}).")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in ids])  # (E, 2F, D)
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in ids])  # (E, D, F)
    return out


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `stack_experts`: the per-expert layout real Qwen3-MoE checkpoints use."""
    out = {}
    for key, t in state.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key.removesuffix(".gate_up_proj")
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate
                out[f"{prefix}.{e}.up_proj.weight"] = up
        elif key.endswith(".mlp.experts.down_proj"):
            prefix = key.removesuffix(".down_proj")
            for e, w in enumerate(t):
                out[f"{prefix}.{e}.down_proj.weight"] = w
        else:
            out[key] = t
    return out


def attach_method(model: CausalLM, spec: dict):
    from dyndepth.methods import METHODS

    name = spec.get("name")
    if name not in METHODS:
        raise CheckpointError(f"config.json names method {name!r}, which this dyndepth does not know "
                              f"({sorted(METHODS)}); upgrade dyndepth or export the model without it.")
    return METHODS[name][0](model, {k: v for k, v in spec.items() if k != "name"})


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
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


def from_pretrained(path_or_id: str | Path, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> CausalLM:
    """Load a HF checkpoint folder or hub id. dtype None keeps the stored dtype (zero-copy on CPU)."""
    folder = resolve(path_or_id)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    raw_config = json.loads(config_path.read_text())
    config = config_from_hf(raw_config)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}.")
        dtype = DTYPES[dtype]
    state = stack_experts(read_state_dict(folder))
    with torch.device("meta"):
        model = CausalLM(config)
        if "dyndepth_method" in raw_config:  # a checkpoint trained with an adaptive-depth method
            attach_method(model, raw_config["dyndepth_method"])
    check_state_dict(model, state, str(folder))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset()  # a non-persistent buffer: still on meta after loading
    return model.to(device) if device is not None else model


def save_pretrained(model: CausalLM, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json and safetensors (sharded above `max_shard_bytes`), each file atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: (v if dtype is None else v.to(dtype)) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = split_experts(state)
    save_dtype = dtype or next(model.parameters()).dtype
    shards, current, size = [], {}, 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(shards[0], path / "model.safetensors")
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, path / name)
            weight_map.update(dict.fromkeys(shard, name))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                   path / "model.safetensors.index.json")
    hf_config = config_to_hf(model.config, save_dtype)
    if model.method is not None:  # transformers ignores this key (and warns about the method's tensors)
        hf_config["dyndepth_method"] = model.method.to_dict()
    write_json(hf_config, path / "config.json")
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: str | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> Path:
    """Re-save a checkpoint (optionally in another dtype or shard size), carrying its tokenizer files.
    A dyndepth training checkpoint (`step_*/` with train_state.pt) is exported to HF format first."""
    import shutil

    if (Path(src) / "train_state.pt").exists():
        from dyndepth.train.run import export_checkpoint

        export_checkpoint(src, dst)
        if dtype is None:
            return Path(dst)
        src = dst
    folder = resolve(src)
    model = from_pretrained(folder, dtype=dtype)
    out = save_pretrained(model, dst, max_shard_bytes=max_shard_bytes)
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, out / name)
    return out
