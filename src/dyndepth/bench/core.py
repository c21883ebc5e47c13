"""`dyndepth bench core`: our decoder against HF transformers on the same config and weights, in one run.

Reports prefill and decode tokens/s for both and their ratio, the peak memory of loading the
checkpoint (ours memory-maps safetensors; peak / weight bytes should stay near 1.0), and the KV
cache's bytes per token.

Every row compares like with like, and the result records what each side ran (`runs`):
- prefill: one forward over the prompt, logits for the last position only, no cache built (HF gets
  `use_cache=False`); with `compile`, both forwards go through the same `torch.compile` call.
- decode: `generate` with `n` new tokens minus `generate` with one (the n - 1 decode steps). Eager:
  ours reads its preallocated cache up to the filled length, HF grows a DynamicCache; both attend over
  the filled length, every prompt token valid (HF gets an all-ones attention mask: it would otherwise mask
  the prompt tokens of its pad id). With `compile`: ours compiles its decode step over a full-length static cache,
  HF uses `cache_implementation="static"` and compiles its decode forward with the same options
  (`CompileConfig`; transformers compiles on its own only on accelerators, so it is told to on CPU).
  Prefill inside `generate` stays eager on both sides.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import dyndepth
from dyndepth.bench.timing import (
    CONTROL,
    check_bench_config,
    check_positions,
    interleaved_median,
    machine_description,
    markdown_table,
    publish,
)
from dyndepth.config import SUPPORTED_MODEL_TYPES
from dyndepth.core.cache import KVCache
from dyndepth.devices import resolve_device, resolve_dtype
from dyndepth.generation import decode_compile_options

HF_FAMILIES = SUPPORTED_MODEL_TYPES  # what transformers builds of ours (the decoder family)


@dataclass
class CoreBenchConfig:
    model: str = "bench-small"  # a preset name (random weights) or a checkpoint folder / hub id
    batch_size: int = 1
    prompt_len: int = 512  # prefill length
    decode_prompt_len: int = 64
    new_tokens: int = 32
    decode_batch_size: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    compile: bool = False  # compile both sides: prefill forward, and decode over a static cache (module docstring)
    compile_backend: str = "inductor"  # torch.compile backend for both sides ("eager" only traces: for tests)
    repeats: int = 5
    load_memory: bool = True  # measure load peak RSS (two fresh Python processes)
    out_dir: str = "runs/bench"

    def __post_init__(self) -> None:
        check_bench_config(self, "bench core", ("batch_size", "prompt_len", "decode_prompt_len",
                                                       "decode_batch_size", "repeats"))
        if self.new_tokens < 2:  # decode time is generate(n) - generate(1): the n - 1 decode steps
            raise ValueError(f"bench core new_tokens must be >= 2 (decode is timed as generating n tokens minus one), "
                             f"got {self.new_tokens}.")


def _check_hf_family(kind: str | None) -> None:
    if kind not in HF_FAMILIES:
        raise ValueError(f"bench core compares against HF transformers, which has no {kind!r} model: pass a "
                         f"checkpoint of model_type {' / '.join(HF_FAMILIES)} or a preset such as bench-small.")


def _load_pair(cfg: CoreBenchConfig, folder: Path):
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype)
    if cfg.model in dyndepth.PRESETS:
        _check_hf_family(dyndepth.preset(cfg.model).model_type)
        torch.manual_seed(0)
        dyndepth.CausalLM(dyndepth.preset(cfg.model)).save_pretrained(folder, dtype=dtype)
    else:
        folder = dyndepth.interop.hf.resolve(cfg.model)
        config = folder / "config.json"
        raw = json.loads(config.read_text()) if config.is_file() else {}
        _check_hf_family(raw.get("model_type"))
        if raw.get("dyndepth_method"):  # HF would load it without the method: two different models
            raise ValueError(f"bench core compares a plain decoder with HF's; {cfg.model} carries the method "
                             f"{raw['dyndepth_method'].get('name')!r}, which HF loads without: pass its base model, "
                             "or time the method with its own bench (bench gateskip, bench dnd).")
    ours = dyndepth.from_pretrained(folder, dtype=dtype, device=cfg.device).eval()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(cfg.device).eval()
    return ours, hf, folder


def _load_memory(folder: Path, which: str) -> dict:
    """Peak RSS growth while loading (and touching every weight), in a fresh Linux process.

    Memory-mapped weights count once they are touched (their pages become resident), so a loader
    that never copies shows a ratio near 1.0 and one that holds two copies near 2.0. Each side first builds its
    model on the meta device, untimed and uncounted: one-time costs that are not weights (torch's meta machinery,
    the import of the model's code, which transformers defers to the first load: 59 MB at transformers 5.25, read as
    0.35 of bench-small's weights when only our side was warmed).
    """
    code = f"""
import json, torch
import dyndepth

def status(key):  # kB fields of /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

if {which!r} == "ours":
    from dyndepth import from_pretrained as load
    warm = lambda: None  # our model code came with `import dyndepth`
else:
    from transformers import AutoConfig, AutoModelForCausalLM; load = AutoModelForCausalLM.from_pretrained
    warm = lambda: AutoModelForCausalLM.from_config(AutoConfig.from_pretrained({str(folder)!r}))
with torch.device("meta"):  # one-time costs, not weights: torch's meta machinery, the side's model code
    dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
    warm()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter (VmHWM) after warm-up
base = status("VmRSS:")
m = load({str(folder)!r})
touched = sum(float(p.detach().sum()) for p in m.parameters())  # in its own dtype: no copy
weights = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps(dict(peak_bytes=status("VmHWM:") - base, weight_bytes=weights)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load_memories(folder: Path) -> dict | None:
    """Both sides' `_load_memory`, or None with a warning when a side cannot be measured (the timings stand)."""
    try:
        return {w: _load_memory(folder, w) for w in ("ours", "hf")}
    except (RuntimeError, ValueError, IndexError) as e:
        warnings.warn(f"bench core: load memory not measured ({e}); pass --no-load-memory to skip it.", stacklevel=2)
        return None


def _compile_options(cfg: CoreBenchConfig, device: torch.device, decode: bool) -> dict:
    """The torch.compile options both sides get: static shapes; CUDA graphs for GPU decode (as `generate`)."""
    mode = "reduce-overhead" if decode and device.type == "cuda" else "default"
    return {"backend": cfg.compile_backend, "mode": mode, "fullgraph": False, "dynamic": False}


def _execution(options: dict | None) -> str:
    if options is None:
        return "eager"
    return f"compiled ({options['backend']}, mode={options['mode']}, dynamic={options['dynamic']})"


def _hf_decode_kwargs(cfg: CoreBenchConfig, device: torch.device) -> dict:
    """HF `generate` arguments: greedy, no early stop; with `compile`, a static cache and a compiled decode."""
    from transformers import CompileConfig

    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    if cfg.compile:
        compile_config = CompileConfig(**_compile_options(cfg, device, decode=True))
        compile_config._compile_all_devices = True  # transformers' switch for compiling off accelerators
        kw.update(cache_implementation="static", compile_config=compile_config)
    return kw


def _hf_decode_cache(hf, prompt: torch.Tensor, n: int, kw: dict) -> str:
    """The cache class HF's `generate` actually uses with these arguments (one more run, same shapes)."""
    out = hf.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, return_dict_in_generate=True, **kw)
    return _cache_name(out)


def _cache_name(hf_output) -> str:
    """The class of the cache an HF output returns: `cache` in transformers >= 5.2x, `past_key_values` before
    (the GPU machine's 5.17)."""
    name = "cache" if hasattr(type(hf_output), "cache") or "cache" in vars(hf_output) else "past_key_values"
    cache = getattr(hf_output, name, None)  # (reading the other name warns of its deprecation in 5.2x)
    return "none" if cache is None else type(cache).__name__


def _run_settings(cfg: CoreBenchConfig, device: torch.device, prefill_compiled: dict[str, bool], ours,
                  ours_decode: dict | bool, hf, hf_prefill_cache: str, hf_cache: str) -> dict:
    """What each side ran, per phase: execution (eager / compiled + options), cache, attention. HF's
    compilation and caches are read back from what its runs did, ours' decode options from what `generate` does
    with its `compile` argument, not from what was asked."""
    prefill_exec = {k: _execution(_compile_options(cfg, device, decode=False) if c else None)
                    for k, c in prefill_compiled.items()}
    decode_exec = _execution(decode_compile_options(ours, ours_decode) if ours_decode else None)
    hf_compiled = getattr(hf, "_compiled_call", None) is not None  # set by HF generate when it compiled
    hf_opts = getattr(hf, "_last_compile_config", None)
    attends = "full static cache (masked)" if cfg.compile else "filled length"
    hf_attention = hf.config._attn_implementation
    ours_cache = "KVCache, full length, kept" if cfg.compile else "KVCache, read up to the filled length"
    return {
        "prefill": {
            "ours": {"execution": prefill_exec["ours"], "cache": "none", "attends_over": "prompt", "attention": "sdpa"},
            "hf": {"execution": prefill_exec["hf"], "cache": hf_prefill_cache, "attends_over": "prompt",
                   "attention": hf_attention},
        },
        "decode": {
            "ours": {"execution": decode_exec, "cache": ours_cache, "attends_over": attends, "attention": "sdpa"},
            "hf": {"execution": _execution(hf_opts.to_dict()) if hf_compiled else "eager", "cache": hf_cache,
                   "attends_over": attends, "attention": hf_attention},
        },
    }


@torch.no_grad()
def run_core_bench(cfg: CoreBenchConfig) -> dict:
    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, folder = _load_pair(cfg, Path(tmp))
        check_positions(ours.config, "bench core", {"--prompt-len": cfg.prompt_len,
                                                    "--decode-prompt-len + --new-tokens": cfg.decode_prompt_len
                                                    + cfg.new_tokens})
        V = ours.config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, V, (cfg.batch_size, cfg.prompt_len), generator=g).to(device)
        dprompt = torch.randint(0, V, (cfg.decode_batch_size, cfg.decode_prompt_len), generator=g).to(device)

        models = {"ours": ours, "hf": hf}
        fwd = {k: torch.compile(m, **_compile_options(cfg, device, decode=False)) if cfg.compile else m
               for k, m in models.items()}
        prefill_fns = {
            "ours": lambda: fwd["ours"](prompt, num_logits=1),  # no cache argument: none is built
            "hf": lambda: fwd["hf"](input_ids=prompt, use_cache=False, logits_to_keep=1),
        }
        prefill = interleaved_median({**prefill_fns, CONTROL: prefill_fns["hf"]}, device, cfg.repeats)
        hf_prefill_cache = _cache_name(prefill_fns["hf"]())

        # every prompt token is valid, as ours reads it: without a mask HF infers one from pad_token_id (0), masking
        # out any prompt token of id 0 and decoding through its explicit-mask attention path instead of the causal one
        hf_kw = {**_hf_decode_kwargs(cfg, device), "attention_mask": torch.ones_like(dprompt)}
        ours_decode = _compile_options(cfg, device, decode=True) if cfg.compile else False  # generate's compile=
        # compiled, ours keeps one static cache across generate calls, so CUDA graphs replay on its addresses; HF's
        # generate builds a new StaticCache per call at transformers 5.25 (allocated in the prefill, which the n - 1
        # difference leaves out; on a GPU its graphs then see new addresses each call: unmeasured); eager, both build
        # a cache per call
        kept = KVCache.for_model(ours.config, cfg.decode_batch_size, cfg.decode_prompt_len + cfg.new_tokens,
                                 num_slots=ours.num_slots(), dtype=next(ours.parameters()).dtype,
                                 device=device) if cfg.compile else None

        def gen(n: int) -> dict[str, callable]:
            hf_gen = lambda: hf.generate(input_ids=dprompt, max_new_tokens=n, min_new_tokens=n, **hf_kw)  # noqa: E731
            return {"ours": lambda: ours.generate(dprompt, n, stop_tokens=[], compile=ours_decode, cache=kept),
                    "hf": hf_gen,
                    CONTROL: hf_gen}

        sides = [*models, CONTROL]  # the control: HF's generate once more, how far identical contenders read apart
        gens = {f"{k} x{n}": fn for n in (1, cfg.new_tokens) for k, fn in gen(n).items()}  # all in turn
        t = interleaved_median(gens, device, cfg.repeats)
        decode_tokens = cfg.decode_batch_size * (cfg.new_tokens - 1)
        decode = {k: t[f"{k} x{cfg.new_tokens}"] - t[f"{k} x1"] for k in sides}  # the n-1 decode steps only
        lost = [k for k in sides if decode[k] <= 0]  # the noise outgrew the steps: a negative speed says nothing
        if lost:
            raise ValueError(f"bench core: generate({cfg.new_tokens}) timed no slower than generate(1) for "
                             f"{', '.join(lost)}, so the decode steps are lost in the timing noise; pass more "
                             "--new-tokens or --repeats.")
        runs = _run_settings(cfg, device, {k: fwd[k] is not models[k] for k in models}, ours, ours_decode, hf,
                             hf_prefill_cache, _hf_decode_cache(hf, dprompt, cfg.new_tokens, hf_kw))

        memory = _load_memories(folder) if cfg.load_memory else None
        kv_bytes = KVCache.for_model(ours.config, 1, 1, dtype=next(ours.parameters()).dtype).nbytes_per_token()

    prefill_tps = {k: cfg.batch_size * cfg.prompt_len / prefill[k] for k in models}
    decode_tps = {k: decode_tokens / decode[k] for k in models}
    load_ratio = {k: m["peak_bytes"] / m["weight_bytes"] for k, m in memory.items()} if memory else None
    return {
        "config": asdict(cfg),
        "machine": machine_description(device),
        "model_params": ours.num_params(),
        "runs": runs,
        "prefill_s": prefill,
        "prefill_tokens_per_s": prefill_tps,
        "prefill_speedup_vs_hf": prefill_tps["ours"] / prefill_tps["hf"],
        "prefill_control": prefill["hf"] / prefill[CONTROL],  # 1 +- the timing noise of this shape
        "decode_s": decode,
        "decode_tokens_per_s": decode_tps,
        "decode_speedup_vs_hf": decode_tps["ours"] / decode_tps["hf"],
        "decode_control": decode["hf"] / decode[CONTROL],
        "load_peak_over_weights": load_ratio,
        "weight_bytes": sum(p.numel() * p.element_size() for p in ours.parameters()),
        "kv_cache_bytes_per_token": kv_bytes,
    }


def render_markdown(r: dict) -> str:
    c = r["config"]
    rows = [
        {"metric": f"prefill tok/s (B={c['batch_size']}, T={c['prompt_len']})",
             "ours": r["prefill_tokens_per_s"]["ours"], "hf": r["prefill_tokens_per_s"]["hf"],
             "ratio": r["prefill_speedup_vs_hf"], "control": r["prefill_control"]},
        {"metric": f"decode tok/s (B={c['decode_batch_size']}, {c['new_tokens']} new)",
             "ours": r["decode_tokens_per_s"]["ours"], "hf": r["decode_tokens_per_s"]["hf"],
             "ratio": r["decode_speedup_vs_hf"], "control": r["decode_control"]},
    ]
    if r["load_peak_over_weights"] is not None:
        rows.append({"metric": "load peak RSS / weight bytes", "ours": r["load_peak_over_weights"]["ours"],
                         "hf": r["load_peak_over_weights"]["hf"], "ratio": "", "control": ""})
    head = (f"### bench core: {c['model']} ({r['model_params'] / 1e6:.1f}M params), {c['dtype']}, "
            f"{r['machine']}{', compiled' if c['compile'] else ''}\n\nratio = ours / hf; control = HF's time over "
            "that of a second, identical HF contender timed alongside (its distance from 1 is the timing noise).\n\n")
    settings = [dict(phase=phase, side=side, **s) for phase, sides in r["runs"].items() for side, s in sides.items()]
    ran = "\n\nWhat ran:\n\n" + markdown_table(settings, ["phase", "side", "execution", "cache", "attends_over",
                                                          "attention"])
    tail = f"\n\nKV cache: {r['kv_cache_bytes_per_token']:,} bytes per token (all layers, K and V)."
    return head + markdown_table(rows, ["metric", "ours", "hf", "ratio", "control"]) + ran + tail


def main(cfg: CoreBenchConfig) -> dict:
    result = run_core_bench(cfg)
    name = f"core-{cfg.device.split(':')[0]}-{cfg.dtype}" + ("-compiled" if cfg.compile else "")  # (eager kept)
    return publish(result, render_markdown(result), cfg.out_dir, name)
