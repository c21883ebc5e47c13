"""`dyndepth bench core`: our decoder against HF transformers on the same config and weights, in one run.

Reports prefill and decode tokens/s for both and their ratio, the peak memory of loading the
checkpoint (ours memory-maps safetensors; peak / weight bytes should stay near 1.0), and the KV
cache's bytes per token.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import dyndepth
from dyndepth.bench.timing import interleaved_median, machine_description, markdown_table, publish
from dyndepth.core.cache import KVCache


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
    compile: bool = False  # compile our forward and decode step (static cache; CUDA graphs on GPU); HF: static cache
    repeats: int = 5
    out_dir: str = "runs/bench"


def _load_pair(cfg: CoreBenchConfig, folder: Path):
    from transformers import AutoModelForCausalLM

    dtype = dyndepth.interop.hf.DTYPES[cfg.dtype]
    if cfg.model in dyndepth.PRESETS:
        torch.manual_seed(0)
        dyndepth.CausalLM(dyndepth.preset(cfg.model)).save_pretrained(folder, dtype=dtype)
    else:
        folder = dyndepth.interop.hf.resolve(cfg.model)
    ours = dyndepth.from_pretrained(folder, dtype=dtype, device=cfg.device).eval()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(cfg.device).eval()
    return ours, hf, folder


def _load_memory(folder: Path, which: str) -> dict:
    """Peak RSS growth while loading (and touching every weight), in a fresh Linux process.

    Memory-mapped weights count once they are touched (their pages become resident), so a loader
    that never copies shows a ratio near 1.0 and one that holds two copies near 2.0.
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
else:
    from transformers import AutoModelForCausalLM; load = AutoModelForCausalLM.from_pretrained
with torch.device("meta"):  # warm torch's meta-device machinery: a one-time cost, not weights
    dyndepth.CausalLM(dyndepth.preset("tiny-qwen3"))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter (VmHWM) after warm-up
base = status("VmRSS:")
m = load({str(folder)!r})
touched = sum(float(p.detach().float().sum()) for p in m.parameters())
weights = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps(dict(peak_bytes=status("VmHWM:") - base, weight_bytes=weights)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@torch.no_grad()
def run_core_bench(cfg: CoreBenchConfig) -> dict:
    device = torch.device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, folder = _load_pair(cfg, Path(tmp))
        V = ours.config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, V, (cfg.batch_size, cfg.prompt_len), generator=g).to(device)
        dprompt = torch.randint(0, V, (cfg.decode_batch_size, cfg.decode_prompt_len), generator=g).to(device)

        ours_fwd = torch.compile(ours) if cfg.compile else ours
        prefill = interleaved_median({
            "ours": lambda: ours_fwd(prompt, num_logits=1),
            "hf": lambda: hf(input_ids=prompt, logits_to_keep=1),
        }, device, cfg.repeats)

        hf_kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        if cfg.compile:
            hf_kw["cache_implementation"] = "static"

        def gen(n: int) -> dict[str, callable]:
            return {
                "ours": lambda: ours.generate(dprompt, n, stop_tokens=[], compile=cfg.compile),
                "hf": lambda: hf.generate(input_ids=dprompt, max_new_tokens=n, min_new_tokens=n, **hf_kw),
            }

        t_one = interleaved_median(gen(1), device, cfg.repeats)
        t_all = interleaved_median(gen(cfg.new_tokens), device, cfg.repeats, warmup=2 if cfg.compile else 1)
        decode_tokens = cfg.decode_batch_size * (cfg.new_tokens - 1)
        decode = {k: (t_all[k] - t_one[k]) for k in t_all}  # the n-1 decode steps only

        memory = {w: _load_memory(folder, w) for w in ("ours", "hf")}
        kv_bytes = KVCache.for_model(ours.config, 1, 1, dtype=next(ours.parameters()).dtype).nbytes_per_token()

    prefill_tps = {k: cfg.batch_size * cfg.prompt_len / t for k, t in prefill.items()}
    decode_tps = {k: decode_tokens / t for k, t in decode.items()}
    load_ratio = {k: m["peak_bytes"] / m["weight_bytes"] for k, m in memory.items()}
    return {
        "config": asdict(cfg),
        "machine": machine_description(device),
        "model_params": ours.num_params(),
        "prefill_tokens_per_s": prefill_tps,
        "prefill_speedup_vs_hf": prefill_tps["ours"] / prefill_tps["hf"],
        "decode_tokens_per_s": decode_tps,
        "decode_speedup_vs_hf": decode_tps["ours"] / decode_tps["hf"],
        "load_peak_over_weights": load_ratio,
        "weight_bytes": memory["ours"]["weight_bytes"],
        "kv_cache_bytes_per_token": kv_bytes,
    }


def render_markdown(r: dict) -> str:
    c = r["config"]
    rows = [
        dict(metric=f"prefill tok/s (B={c['batch_size']}, T={c['prompt_len']})", ours=r["prefill_tokens_per_s"]["ours"],
             hf=r["prefill_tokens_per_s"]["hf"], ratio=r["prefill_speedup_vs_hf"]),
        dict(metric=f"decode tok/s (B={c['decode_batch_size']}, {c['new_tokens']} new)",
             ours=r["decode_tokens_per_s"]["ours"], hf=r["decode_tokens_per_s"]["hf"], ratio=r["decode_speedup_vs_hf"]),
        dict(metric="load peak RSS / weight bytes", ours=r["load_peak_over_weights"]["ours"],
             hf=r["load_peak_over_weights"]["hf"], ratio=""),
    ]
    head = (f"### bench core: {c['model']} ({r['model_params'] / 1e6:.1f}M params), {c['dtype']}, "
            f"{r['machine']}{', compiled' if c['compile'] else ''}\n\n")
    tail = f"\n\nKV cache: {r['kv_cache_bytes_per_token']:,} bytes per token (all layers, K and V)."
    return head + markdown_table(rows, ["metric", "ours", "hf", "ratio"]) + tail


def main(cfg: CoreBenchConfig) -> dict:
    result = run_core_bench(cfg)
    return publish(result, render_markdown(result), cfg.out_dir, f"core-{cfg.device.split(':')[0]}-{cfg.dtype}")
