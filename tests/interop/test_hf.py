import json
import os
import stat

import pytest
import torch

import dyndepth
from dyndepth import CausalLM, CheckpointError, ConfigError, preset
from dyndepth.core.layers import float32_keys
from dyndepth.methods import attach_method
from dyndepth.models.hf_layout import config_from_hf, split_experts, stack_experts
from dyndepth.safetensors_io import read_safetensors, write_safetensors


def test_safetensors_reader_is_memory_mapped_and_exact(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(7).bfloat16()}
    write_safetensors(tensors, tmp_path / "x.safetensors")
    got = read_safetensors(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert torch.equal(got[k], v)
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file
    mask = os.umask(0o022)
    try:  # safetensors wrote its file private (0600): other users could not read an exported model
        write_safetensors(tensors, tmp_path / "y.safetensors")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "y.safetensors").stat().st_mode) == 0o644


def _offsets(path) -> dict:
    """Each tensor's data offset in a safetensors file, from its header."""
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_our_files_put_tensors_at_aligned_addresses_and_another_writers_stay_mapped(tmp_path):
    """CPU kernels choose their code path by their operands' alignment: weights viewed at the 8-byte-aligned offsets
    of a safetensors file rounded otherwise than in torch's 64-byte-aligned memory, and a saved and reloaded model's
    float32 logits moved by ~6e-7. Our files put every tensor whose size allows it on a 64-byte boundary (mapped) and
    the rest is copied into aligned memory; another writer's file stays mapped whole (a copy would hold a hub
    checkpoint in each torchrun rank's own memory)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dyndepth.safetensors_io import ALIGN, ALIGNED

    tensors = {"w": torch.randn(16, 8), "norm": torch.randn(7), "c": torch.randn(3, 5).bfloat16(),
               "flag": torch.tensor([True, False, True]), "i": torch.arange(10), "scalar": torch.tensor(2.5),
               "empty": torch.empty(0, 4), "h": torch.randn(32).half()}
    write_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt", "k": "v"})
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    loaded = load_file(tmp_path / "ours.safetensors")  # the safetensors library reads our layout
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v", ALIGNED: str(ALIGN)}
    ours, theirs = (read_safetensors(tmp_path / f"{name}.safetensors") for name in ("ours", "theirs"))
    for k, v in tensors.items():
        assert torch.equal(ours[k], v) and torch.equal(theirs[k], v) and torch.equal(loaded[k], v), k
        assert ours[k].data_ptr() % ALIGN == 0, k
    for got, path, keys in ((ours, "ours", ("h", "w")), (theirs, "theirs", tuple(k for k in tensors if k != "empty"))):
        at = _offsets(tmp_path / f"{path}.safetensors")  # mapped, not copied: as far apart as in the file
        assert {got[k].data_ptr() - at[k] for k in keys} == {got[keys[0]].data_ptr() - at[keys[0]]}, path


def test_a_saved_and_reloaded_model_gives_the_same_logits_bit_for_bit(tmp_path):
    # moeut-switchhead-tiny's grouped matmuls read their weights at 8-byte-aligned addresses after a load: 5.8e-7 off
    torch.manual_seed(0)
    model = dyndepth.build_model(preset("moeut-switchhead-tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed_tokens" not in name:
                p.normal_(0, 0.3)
    ids = torch.randint(0, 200, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0
    model.save_pretrained(tmp_path)
    loaded = dyndepth.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)


def test_a_git_lfs_pointer_or_a_text_file_in_place_of_the_weights_is_named_not_a_memory_error(tmp_path):
    """A repository cloned without git-lfs holds ~130-byte pointer files: their first 8 bytes, read as the header's
    length, asked for exabytes, and loading raised a bare MemoryError."""
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 1503300328\n"
    (tmp_path / "model.safetensors").write_text(pointer)
    with pytest.raises(CheckpointError, match="is a git-lfs pointer, not the weights: fetch them"):
        read_safetensors(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_text("hello, not a safetensors file")
    with pytest.raises(CheckpointError, match=r"not a valid safetensors file \(its header length, \d+, runs past "):
        read_safetensors(tmp_path / "model.safetensors")

def test_truncated_and_garbage_files_get_clear_errors(tmp_path):
    write_safetensors({"a": torch.randn(64)}, tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-16])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(tmp_path / "t.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        read_safetensors(tmp_path / "g.safetensors")


def test_a_header_whose_byte_range_does_not_fit_the_shape_is_damage(tmp_path):
    """A range shorter than shape x dtype read the next tensor's bytes as this one's (the safetensors library refuses
    such a file)."""
    write_safetensors({"a": torch.arange(2.0), "b": torch.arange(2.0, 4.0)}, tmp_path / "x.safetensors")
    data = bytearray((tmp_path / "x.safetensors").read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["a"]["shape"] = [4]  # 4 floats in a range of 8 bytes
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    (tmp_path / "x.safetensors").write_bytes(bytes(data[:8]) + text + bytes(data[8 + n:]))
    with pytest.raises(CheckpointError, match=r"damaged: tensor 'a' spans bytes 0-8, but its shape \[4\] of F32"):
        read_safetensors(tmp_path / "x.safetensors")


def test_an_older_llama_export_with_rotary_tables_loads_and_convert_keeps_the_chat_template(tmp_path):
    """Older Llama-family exports store rotary_emb.inv_freq (derived from config.json; transformers ignores it): it
    was an unexpected tensor. `convert` left chat_template.jinja (transformers 5's file) behind."""
    torch.manual_seed(0)
    model = CausalLM(preset("tiny-llama")).eval()
    model.save_pretrained(tmp_path / "src")
    state = read_safetensors(tmp_path / "src" / "model.safetensors")
    state = {k: v.clone() for k, v in state.items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    write_safetensors(state, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "src" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    loaded = dyndepth.from_pretrained(tmp_path / "src")
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    from dyndepth.interop.hf import convert_checkpoint

    convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst" / "chat_template.jinja").read_text() == (tmp_path / "src" / "chat_template.jinja").read_text()


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-moe", "tiny-qwen2", "tiny-llama"])
def test_save_then_load_round_trips_every_tensor(tmp_path, name):
    model = CausalLM(preset(name))
    model.save_pretrained(tmp_path)
    loaded = dyndepth.from_pretrained(tmp_path)
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not any(m.training for m in loaded.modules())  # eval mode, as transformers loads (DND's controller fed
    # on inference forwards of a freshly loaded model)


@pytest.mark.parametrize("name, fields", [("tiny-llama", {"qk_norm": True}), ("tiny-qwen3", {"qk_norm": False}),
                                          ("tiny-qwen3", {"mlp_bias": True}), ("tiny-qwen3-moe", {"num_experts": 0}),
                                          ("tiny-qwen3", {"qkv_bias": True}), ("tiny-qwen2", {"qkv_bias": False}),
                                          ("tiny-qwen2", {"qk_norm": True})])
def test_a_decoder_variant_off_its_familys_layout_loads_back(tmp_path, name, fields):
    # config.json left out qk_norm and a Qwen3 mlp_bias, so the folder was read as the family's own layout: missing or
    # unexpected q_norm / k_norm and MLP bias tensors, a checkpoint its own library could not load
    model = CausalLM(preset(name, **fields)).eval()
    model.save_pretrained(tmp_path)
    loaded = dyndepth.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    CausalLM(preset(name)).save_pretrained(tmp_path / "plain")  # the family's own layout writes no field of ours
    written = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not {"qk_norm", "qkv_bias"} & written.keys()


@pytest.mark.parametrize("name", ["tiny-qwen3", "dreamer-tiny"])
def test_save_pretrained_takes_a_dtype_name_as_from_pretrained_does(tmp_path, name):
    # "bfloat16" reached tensor.to as a device: RuntimeError "Invalid device string: 'bfloat16'"
    dyndepth.build_model(preset(name)).save_pretrained(tmp_path, dtype="bfloat16")
    assert next(dyndepth.from_pretrained(tmp_path).parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype 'bf16' is not one of \['float32', 'bfloat16', 'float16'"):
        dyndepth.build_model(preset(name)).save_pretrained(tmp_path, dtype="bf16")


def test_sharded_checkpoint_and_dtype_conversion(tmp_path):
    model = CausalLM(preset("tiny-qwen3"))
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)

    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    a = dyndepth.from_pretrained(tmp_path / "sharded", dtype="bfloat16")
    b = dyndepth.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert next(b.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, 256, (1, 6))
    torch.testing.assert_close(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("config_dtype", ["bfloat16", None])
def test_a_checkpoint_with_float32_norms_beside_bfloat16_weights_loads_in_one_dtype(tmp_path, config_dtype):
    # both were kept as stored, and the first forward failed: "expected m1 and m2 to have the same dtype"
    model = CausalLM(preset("tiny-qwen3")).eval()
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    state = read_safetensors(tmp_path / "model.safetensors")
    state = {k: v.float() if "norm" in k else v.clone() for k, v in state.items()}
    write_safetensors(state, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = config_dtype  # without one, the embedding's dtype
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = dyndepth.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 256, (1, 6))
    assert torch.equal(loaded(ids).logits, model.to(torch.bfloat16)(ids).logits)
    assert dyndepth.from_pretrained(tmp_path, dtype="float32").model.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", ["gateskip", "mod", "dnd", "dreamer"])
def test_float32_buffers_stay_float32_through_bfloat16_saves_loads_and_casts(tmp_path, kind):
    # Thresholds compared with float32 scores (GateSkip / DND tau, MoD's threshold) and Dreamer's balancing bias:
    # 0.50123 rounds to 0.5 in bfloat16, which moves a threshold past the scores it was set between.
    if kind == "dreamer":
        model = dyndepth.build_model(preset("dreamer-tiny"))
    else:
        model = CausalLM(preset("tiny-qwen3"))
        attach_method(model, kind, {"layers": (0, 1)} if kind == "dnd" else {})
    keys = float32_keys(model)
    assert keys and all(k.endswith(("tau", "threshold", "expert_bias")) for k in keys)
    state = model.state_dict()
    ppm = [k for k, v in state.items() if k.endswith("_ppm")]  # calibration budgets (int64), GateSkip and MoD
    assert ppm or kind in ("dnd", "dreamer")
    with torch.no_grad():
        for k in keys:
            state[k].fill_(0.50123)
        for k in ppm:
            state[k].fill_(300_001)  # 299,008 in bfloat16
    model.to(torch.bfloat16)
    assert all(model.state_dict()[k].dtype == torch.float32 for k in keys)
    model.save_pretrained(tmp_path)  # in the model's dtype, bfloat16
    on_disk = {}
    for f in tmp_path.glob("*.safetensors"):
        on_disk.update(read_safetensors(f))
    for source in (on_disk, dyndepth.from_pretrained(tmp_path, dtype="bfloat16").state_dict()):
        for k in keys:  # the HF layout keeps these names
            assert source[k].dtype == torch.float32 and float(source[k].flatten()[0]) == pytest.approx(0.50123), k
        for k in ppm:
            assert source[k].dtype == torch.int64 and int(source[k]) == 300_001, k
    assert on_disk["model.embed_tokens.weight"].dtype == torch.bfloat16
    with torch.device("meta"):  # meta init then `to_empty` (FSDP2's path) keeps them float32, without data to copy
        meta = dyndepth.build_model(model.config)
        if kind != "dreamer":
            attach_method(meta, kind, {"layers": (0, 1)} if kind == "dnd" else {})
    meta.to_empty(device="cpu")
    assert all(meta.state_dict()[k].dtype == torch.float32 for k in keys)


def test_expert_split_and_stack_are_inverse():
    state = CausalLM(preset("tiny-qwen3-moe")).state_dict()
    split = split_experts(state)
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in split
    restacked = stack_experts(split)
    assert restacked.keys() == state.keys()
    assert all(torch.equal(restacked[k], state[k]) for k in state)


def test_mismatched_checkpoints_name_the_tensors(tmp_path):
    CausalLM(preset("tiny-qwen3")).save_pretrained(tmp_path)
    state = read_safetensors(tmp_path / "model.safetensors")
    state = {k: v.clone() for k, v in state.items()}
    del state["model.layers.0.self_attn.q_proj.weight"]
    state["model.layers.0.extra.weight"] = torch.zeros(1)
    state["model.norm.weight"] = torch.zeros(3)
    write_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        dyndepth.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing tensors (1): model.layers.0.self_attn.q_proj.weight" in msg
    assert "unexpected tensors (1): model.layers.0.extra.weight" in msg
    assert "model.norm.weight: checkpoint (3,) vs model (64,)" in msg


def test_unsupported_architecture_and_missing_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        dyndepth.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        dyndepth.from_pretrained(tmp_path / ".." / tmp_path.name / "..")
    CausalLM(preset("tiny-llama")).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        dyndepth.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama",\n}')  # a hand edit gone wrong
    with pytest.raises(CheckpointError, match=r"m/config.json is not valid JSON"):
        dyndepth.from_pretrained(tmp_path / "m")


def test_a_quantized_checkpoint_is_refused_by_name(tmp_path):
    # an FP8 / GPTQ / AWQ checkpoint failed on its scale tensors as "does not match its config.json", and one whose
    # weights still fit the shapes (a recorded bitsandbytes config) loaded silently
    CausalLM(preset("tiny-qwen3")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"quantized checkpoints are not supported \(quantization_config: "
                                          r"quant_method='fp8'\); load the unquantized checkpoint"):
        dyndepth.from_pretrained(tmp_path)


def test_a_native_familys_config_json_with_a_field_it_lacks_is_refused_by_name(tmp_path):
    # a hand edit for more test-time depth, "num_recurrence": 4, loaded silently with the trained count
    dyndepth.build_model(preset("dreamer-tiny")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_recurrence": 4}))
    with pytest.raises(ConfigError, match=r"config.json: \['num_recurrence'\] is not a field of DreamerConfig"):
        dyndepth.from_pretrained(tmp_path)


def test_a_save_over_another_sharding_leaves_only_its_own_weight_files(tmp_path):
    """A sharded save then a whole one into the same folder: the old shards and index go (the loader read the
    index, so the folder held the old weights), and the other way round."""
    a, b = CausalLM(preset("tiny-qwen3")), CausalLM(preset("tiny-qwen3"))
    (tmp_path / "model_ema.safetensors").write_bytes(b"a user's file")  # not ours: kept
    a.save_pretrained(tmp_path, max_shard_bytes=20_000)
    b.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "model_ema.safetensors"]
    ids = torch.randint(0, 256, (1, 5))
    torch.testing.assert_close(dyndepth.from_pretrained(tmp_path)(ids).logits, b(ids).logits)
    a.save_pretrained(tmp_path, max_shard_bytes=20_000)
    assert not (tmp_path / "model.safetensors").exists()
    torch.testing.assert_close(dyndepth.from_pretrained(tmp_path)(ids).logits, a(ids).logits)


def test_v5_rope_parameters_and_aliases_are_read():
    cfg = config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                          "num_key_value_heads": 4, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                                                        "factor": 8.0, "low_freq_factor": 1.0,
                                                                        "high_freq_factor": 4.0}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "llama3"
    moe = config_from_hf({"model_type": "qwen3_moe", "num_local_experts": 6, "num_experts_per_tok": 2})
    assert moe.num_experts == 6


def test_a_save_without_generation_defaults_removes_a_previous_saves(tmp_path):
    # write_pretrained removed a previous save's stale weight files but kept its generation_config.json, whose stop
    # ids the next from_pretrained then read back for a model that never had them
    first = dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
    first.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert dyndepth.from_pretrained(tmp_path).generation_config == {"eos_token_id": 3}
    dyndepth.CausalLM(dyndepth.preset("tiny-qwen3")).save_pretrained(tmp_path)
    assert not (tmp_path / "generation_config.json").exists()
    assert dyndepth.from_pretrained(tmp_path).generation_config is None


def test_a_hub_download_fetches_a_dyndepth_exports_byte_tokenizer(tmp_path, monkeypatch):
    # allow_patterns named only HF's tokenizer files: `dyndepth generate user/model` of an uploaded out_dir/model
    # (byte_tokenizer.json) downloaded the weights and then found no tokenizer
    import fnmatch
    import shutil

    import huggingface_hub

    from dyndepth.interop.hf import resolve
    from dyndepth.tokenizer import ByteTokenizer, load_tokenizer

    repo = tmp_path / "repo"  # what the hub holds
    CausalLM(preset("demo-tiny")).save_pretrained(repo)
    ByteTokenizer().save(repo)

    def download(repo_id, allow_patterns):
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, tmp_path / "cache" / f.name)
        return str(tmp_path / "cache")

    (tmp_path / "cache").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert isinstance(load_tokenizer(resolve("user/model")), ByteTokenizer)


def test_a_mistyped_preset_name_is_suggested_when_the_hub_cannot_find_it(monkeypatch):
    """`dyndepth generate demo-tiyn -p x` (generate and eval take a preset name) said only "there is no such local
    folder ..., and as a hub id: ConnectError ...", never naming the preset it was meant to be."""
    import huggingface_hub

    from dyndepth.interop.hf import resolve

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"as a hub id: Name or service not known; did you mean the preset "
                                              r"'demo-tiny'\?"):
        resolve("demo-tiyn")
    with pytest.raises(CheckpointError, match=r"did you mean the preset 'dreamer-tiny'\?"):  # every family's presets
        resolve("dreamer-tinyy")  # (was: 'demo-tiny', the closest Qwen3 preset)
    with pytest.raises(CheckpointError, match=r"Name or service not known$"):  # nothing close: no suggestion
        resolve("Qwen/Qwen3-0.6B")  # a hub id, not the random-weight preset qwen3-0.6b


def test_a_hub_model_of_an_unsupported_family_is_refused_before_its_weights_download(tmp_path, monkeypatch):
    """`dyndepth generate google/gemma-2-2b` (or Qwen/Qwen3-8B-FP8) downloaded every safetensors file
    (gigabytes) and only then read config.json and refused it."""
    import huggingface_hub

    from dyndepth.interop.hf import resolve

    asked = []

    def download(repo_id, allow_patterns):
        asked.append(list(allow_patterns))
        return str(tmp_path / repo_id)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    for repo_id, config, error in [
            ("gemma", {"model_type": "gemma2"}, r"unsupported architecture: model_type='gemma2'"),
            ("mistral", {"model_type": "mistral"}, r"sliding-window attention \(window 4096 tokens"),  # (v0.1's)
            ("fp8", {"model_type": "qwen3", "quantization_config": {"quant_method": "fp8"}}, "quantized checkpoints")]:
        (tmp_path / "user" / repo_id).mkdir(parents=True)
        (tmp_path / "user" / repo_id / "config.json").write_text(json.dumps(config))
        asked.clear()
        with pytest.raises(ConfigError, match=error):
            resolve(f"user/{repo_id}")
        assert asked == [["config.json"]]


@pytest.mark.parametrize("kind", ["gateskip", "mod"])
@pytest.mark.parametrize("calibrated", [True, False])
def test_a_folder_with_the_calibrated_knob_in_config_json_loads_its_thresholds(tmp_path, kind, calibrated):
    """Before 2026-12-02 config.json's dyndepth_method held the knob the thresholds were calibrated at
    (calibrated_budget / calibrated_capacity, null: none) and the folder had no *_ppm buffers: such a folder was
    refused ('GateSkipConfig has no field calibrated_budget'). It loads, its thresholds calibrated as saved."""
    from dyndepth.methods import calibrate

    model = CausalLM(preset("tiny-qwen3"))
    attach_method(model, kind, {})
    field, knob = ("calibrated_budget", "budget") if kind == "gateskip" else ("calibrated_capacity", "capacity")
    if calibrated:
        calibrate(model, [torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(i))
                          for i in range(2)], **{knob: 0.5})
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = read_safetensors(path)
    ppm = [k for k in state if k.endswith("_ppm")]
    assert ppm
    write_safetensors({k: v.clone() for k, v in state.items() if k not in ppm}, path)  # the old layout
    config = json.loads((tmp_path / "config.json").read_text())
    config["dyndepth_method"][field] = 0.5 if calibrated else None
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = dyndepth.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert {int(loaded.state_dict()[k]) for k in ppm} == ({500_000} if calibrated else {-1})
    ids = torch.randint(0, 256, (2, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    if calibrated and kind == "gateskip":  # decoding skips by the loaded thresholds
        assert torch.equal(loaded.generate(ids, 4, skip_budget=0.5), model.generate(ids, 4, skip_budget=0.5))


@pytest.mark.parametrize("kind", ["gateskip", "mod"])
def test_thresholds_an_older_dyndepth_saved_in_bfloat16_are_dropped_not_decoded_by(tmp_path, kind, caplog):
    """Before 2026-12-03 a bfloat16 save cast the calibrated thresholds with the model: GateSkip's tau near its ~0.99
    gates rounds to one bfloat16 step (2^-8), and the float32 gates compared with it skipped 8% at a budget
    calibrated for 30%, silently. Such thresholds load dropped (uncalibrated), with a warning naming the fix."""
    from dyndepth.methods import calibrate

    model = CausalLM(preset("tiny-qwen3"))
    attach_method(model, kind, {})
    knob = "budget" if kind == "gateskip" else "capacity"
    calibrate(model, [torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)],
              **{knob: 0.5})
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    threshold = ".gateskip.tau" if kind == "gateskip" else ".mod.threshold"
    state = {k: v.bfloat16() if k.endswith(threshold) else v.clone() for k, v in read_safetensors(path).items()}
    write_safetensors(state, path)  # the old layout: thresholds in the model's dtype
    with caplog.at_level("WARNING"):
        loaded = dyndepth.from_pretrained(tmp_path)
    ppm = [v for k, v in loaded.state_dict().items() if k.endswith("_ppm")]
    assert ppm and all(int(v) == -1 for v in ppm)
    assert "bfloat16" in caplog.text and "dyndepth calibrate" in caplog.text
    if kind == "gateskip":  # decoding at the budget asks for a calibration instead of skipping another share
        with pytest.raises(ValueError, match="calibrat"):
            loaded.generate(torch.randint(0, 256, (1, 4)), 2, skip_budget=0.5)


def test_a_shared_gate_gateskip_folder_from_before_its_per_layer_thresholds_loads_its_gates(tmp_path, caplog):
    """Before 2026-12-02 a GateSkip with shared=True kept its one gate pair and one threshold pair under
    model.layers.0.gateskip (layer 0's thresholds applied at every layer): such a folder was refused, 'missing
    tensors (...): model.gateskip.attn_gate.proj.bias, ...'. Its gates load; its thresholds are dropped, with a warning."""
    model = CausalLM(preset("tiny-qwen3"))
    attach_method(model, "gateskip", {"shared": True})
    with torch.no_grad():
        for p in model.model.gateskip.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = read_safetensors(path)
    old = {k.replace("model.gateskip.", "model.layers.0.gateskip."): v.clone() for k, v in state.items()
           if "tau" not in k or k.startswith("model.layers.0.") and k.endswith(".tau")}  # the old layout
    assert "model.layers.0.gateskip.attn_gate.proj.weight" in old and "model.layers.1.gateskip.tau" not in old
    write_safetensors(old, path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["dyndepth_method"]["calibrated_budget"] = 0.3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        loaded = dyndepth.from_pretrained(tmp_path)
    assert "shared-gate GateSkip" in caplog.text and "dyndepth calibrate" in caplog.text
    for k, v in model.state_dict().items():
        if "tau" not in k:
            assert torch.equal(loaded.state_dict()[k], v), k
    assert all(int(v) == -1 for k, v in loaded.state_dict().items() if k.endswith("tau_budget_ppm"))
    ids = torch.randint(0, 256, (2, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
