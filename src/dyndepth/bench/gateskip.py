"""`dyndepth bench gateskip`: realized speedup of GateSkip's physical skipping next to the ideal one.

For each skip budget q, the same gated model runs (a) prefill at each sequence length and (b) cached
batched decoding; the realized speedup is time(q = 0) / time(q), measured interleaved in one run, and
the ideal speedup is FLOPs(q = 0) / FLOPs(q) from what actually ran (the FLOP counter includes the
gates, which run for every token, and the K/V projections that skipped tokens still compute).
Decoding uses per-branch thresholds calibrated at q (batch-1 quantiles are meaningless).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

import dyndepth
from dyndepth.bench.timing import interleaved_median, machine_description, markdown_table, publish
from dyndepth.core import flops
from dyndepth.core.cache import KVCache
from dyndepth.methods import GateSkipConfig, attach_gateskip, calibrate


@dataclass
class GateSkipBenchConfig:
    model: str = "bench-small"  # preset (random weights, gates spread at random) or a GateSkip checkpoint
    budgets: list[float] = field(default_factory=lambda: [0.0, 0.15, 0.3, 0.5])
    prefill_lens: list[int] = field(default_factory=lambda: [512, 2048])
    prefill_batch: int = 1
    decode_batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    decode_prompt_len: int = 64
    new_tokens: int = 16
    gate: str = "vector"
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    out_dir: str = "runs/bench"


def _model(cfg: GateSkipBenchConfig):
    dtype = dyndepth.interop.hf.DTYPES[cfg.dtype]
    if cfg.model in dyndepth.PRESETS:
        torch.manual_seed(0)
        model = dyndepth.CausalLM(dyndepth.preset(cfg.model))
        attach_gateskip(model, GateSkipConfig(gate=cfg.gate))
        with torch.no_grad():  # untrained gates are all ~0.993; spread them so rankings are not ties
            for layer in model.model.layers:
                for gate in (layer.gateskip.attn_gate, layer.gateskip.mlp_gate):
                    gate.proj.weight.normal_(0, 0.05)
    else:
        model = dyndepth.from_pretrained(cfg.model)
        if getattr(model.method, "name", None) != "gateskip":
            raise ValueError(f"{cfg.model} is not a GateSkip checkpoint (config.json has no dyndepth_method).")
    return model.to(device=cfg.device, dtype=dtype).eval()


def _prefill_flops(model, ids) -> float:
    out = model(ids, num_logits=1)
    return float(out.stats["gateskip/flops"]) + ids.shape[0] * flops.lm_head_flops(model.config)


def _decode_flops(model, prompt, n: int) -> float:
    """FLOPs of n-1 greedy decode steps (after the prompt), from the same decisions generate makes."""
    B, T = prompt.shape
    cache = KVCache.for_model(model.config, B, T + n)
    pos = torch.arange(T, device=prompt.device).expand(B, T)
    out = model(prompt, positions=pos, cache=cache, num_logits=1)
    total = 0.0
    for i in range(n - 1):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(nxt, positions=torch.full((B, 1), T + i, device=prompt.device), cache=cache)
        total += float(out.stats["gateskip/flops"]) + B * flops.lm_head_flops(model.config)
    return total


@torch.no_grad()
def run_gateskip_bench(cfg: GateSkipBenchConfig) -> dict:
    device = torch.device(cfg.device)
    model = _model(cfg)
    method = model.method
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for T in cfg.prefill_lens:
        ids = torch.randint(0, V, (cfg.prefill_batch, T), generator=g).to(device)

        def run(q: float, ids=ids):
            with method.override(budget=q, mode="quantile"):
                return model(ids, num_logits=1)

        times = interleaved_median({q: (lambda q=q: run(q)) for q in cfg.budgets}, device, cfg.repeats)
        work = {}
        for q in cfg.budgets:
            with method.override(budget=q, mode="quantile"):
                work[q] = _prefill_flops(model, ids)
        rows += _rows("prefill", f"B={cfg.prefill_batch}, T={T}", cfg.budgets, times, work)

    calib = [torch.randint(0, V, (8, 256), generator=g).to(device) for _ in range(2)]
    for B in cfg.decode_batches:
        prompt = torch.randint(0, V, (B, cfg.decode_prompt_len), generator=g).to(device)
        work, times = {}, {}
        for q in cfg.budgets:
            if q > 0:
                calibrate(model, calib, budget=q)
            with method.decoding(q):
                work[q] = _decode_flops(model, prompt, cfg.new_tokens)
            t = interleaved_median({n: (lambda n=n: model.generate(prompt, n, stop_tokens=[], skip_budget=q))
                                    for n in (1, cfg.new_tokens)}, device, cfg.repeats)
            times[q] = t[cfg.new_tokens] - t[1]
        rows += _rows("decode", f"B={B}, {cfg.new_tokens} new", cfg.budgets, times, work)
    return {"config": asdict(cfg), "machine": machine_description(device), "model_params": model.num_params(),
            "rows": rows}


def _rows(phase: str, shape: str, budgets, times: dict, work: dict) -> list[dict]:
    out = []
    for q in budgets:
        realized = times[budgets[0]] / times[q]
        ideal = work[budgets[0]] / work[q]
        out.append(dict(phase=phase, shape=shape, budget=q, seconds=times[q], realized_speedup=realized,
                        ideal_speedup=ideal, realized_over_ideal=realized / ideal))
    return out


def render_markdown(r: dict) -> str:
    c = r["config"]
    head = (f"### bench gateskip: {c['model']} ({r['model_params'] / 1e6:.1f}M params incl. {c['gate']} gates), "
            f"{c['dtype']}, {r['machine']}\n\nspeedup = time at budget 0 / time at budget q, same gated model; "
            "ideal = FLOPs ratio of what actually ran (gates and skipped tokens' K/V included).\n\n")
    cols = ["phase", "shape", "budget", "seconds", "realized_speedup", "ideal_speedup", "realized_over_ideal"]
    return head + markdown_table(r["rows"], cols)


def main(cfg: GateSkipBenchConfig) -> dict:
    result = run_gateskip_bench(cfg)
    return publish(result, render_markdown(result), cfg.out_dir, f"gateskip-{cfg.device.split(':')[0]}-{cfg.dtype}")
