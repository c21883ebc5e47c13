"""`dyndepth bench dnd`: what DND's nested passes cost in wall-clock next to what they cost in FLOPs, and (with
`--quality`) what a DND post-training buys over the identically configured plain fine-tune (SFT).

Throughput: one model, run with DND and without (the same weights with the method detached: the base model),
interleaved, for prefill (forward by forward) and for cached decoding (step by step, `generate`'s greedy steps
after an untimed prefill, median step) at each batch size. overhead = time(DND) /
time(base) - 1 next to the FLOP overhead = executed FLOPs(DND) / executed FLOPs(base) - 1 of the same work
(routers, nested passes and their padding included; the ideal figure counts only the selected tokens).
The target is wall-clock overhead <= 1.2x the FLOP overhead (the paper: 91.6-93.1% of base throughput).
A second base contender (`control`) times the noise in the same run: on a shared CPU two identical
contenders read a few percent apart, and a 10% overhead's ratio moves by several tenths with that.
A preset gets random weights and routers, with each layer's tau fitted so it nests `ratio` of the tokens;
a DND checkpoint keeps its trained thresholds.

Quality: from one base checkpoint (the demo's by default), DND and SFT post-train on the same data for the
same steps (equal tokens); held-out perplexity and exact match of the embedded synthetic tasks.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import dyndepth
from dyndepth.bench import timing
from dyndepth.config import SUPPORTED_MODEL_TYPES
from dyndepth.core.routing import rank_threshold
from dyndepth.devices import resolve_device
from dyndepth.methods import DNDConfig, attach_dnd
from dyndepth.methods.dnd_analysis import layer_report, trace_selection, without_method


@dataclass
class DNDBenchConfig:
    model: str = "bench-small"  # preset (random weights) or a DND checkpoint
    ratio: float = 0.2  # preset only: the share of tokens each DND layer nests
    layers: list[int] | None = None  # preset only: the band; None: the middle half of the layers
    prefill_len: int = 128
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    decode_prompt_len: int = 64
    new_tokens: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    # Decode steps compiled over a full static cache, as `generate(compile=True)` runs them (one graph: every row
    # runs the nested block, rows that selected nothing keep x^v); prefill stays eager (its packing syncs).
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend ("eager" only traces: for tests)
    out_dir: str = "runs/bench"

    def __post_init__(self) -> None:
        timing.check_bench_config(self, "bench dnd", ("prefill_len", "decode_prompt_len", "repeats"), ("batches",))
        if self.new_tokens < 2:
            raise ValueError(f"bench dnd new_tokens must be >= 2 (the decode steps after the first token), got "
                             f"{self.new_tokens}.")
        if self.model in dyndepth.PRESETS and dyndepth.PRESETS[self.model].get("model_type", "qwen3") not in \
                SUPPORTED_MODEL_TYPES:
            raise ValueError(f"bench dnd attaches DND to a decoder preset; {self.model!r} is a "
                             f"{dyndepth.PRESETS[self.model].get('model_type')} model. Use e.g. bench-small.")


def _band(num_layers: int) -> list[int]:
    quarter = num_layers // 4
    return [quarter, num_layers - 1 - quarter]


@torch.no_grad()
def fit_thresholds(model, batches, ratio: float) -> list[float]:
    """Set each DND layer's tau so it nests `ratio` of the valid tokens of `batches`, layer by layer in depth
    order: a layer's scores depend on the nesting of the layers before it, which are fitted by then. For
    random-weight benchmarks; training sets tau itself."""
    method = model.method
    for j, d in enumerate(method.layer_dnd):
        scores = torch.cat([s[j][v] for s, _, v in (trace_selection(model, ids) for ids in batches)])
        d.tau.fill_(float(rank_threshold(scores[None], None, 1.0 - ratio, scope="batch")))
    return [float(d.tau) for d in method.layer_dnd]


def _model(cfg: DNDBenchConfig, device: torch.device):
    dtype = dyndepth.interop.hf.DTYPES[cfg.dtype]
    if cfg.model not in dyndepth.PRESETS:
        model = dyndepth.from_pretrained(cfg.model)
        if getattr(model.method, "name", None) != "dnd":
            raise ValueError(f"{cfg.model} is not a DND checkpoint (config.json names no dnd method).")
        _check_positions(cfg, model.config)
        return model.to(device=device, dtype=dtype).eval()
    torch.manual_seed(0)
    model = dyndepth.build_model(dyndepth.preset(cfg.model)).to(device=device, dtype=dtype).eval()
    _check_positions(cfg, model.config)  # (before the thresholds are fitted at prefill_len)
    layers = cfg.layers or _band(model.config.num_hidden_layers)
    method = attach_dnd(model, DNDConfig(layers=tuple(layers), ratio=cfg.ratio))
    with torch.no_grad():
        for d in method.layer_dnd:
            d.router.weight.normal_(0, 4 / math.sqrt(model.config.hidden_size))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, model.config.vocab_size, (8, cfg.prefill_len), generator=g).to(device)]
    fit_thresholds(model, calib, cfg.ratio)
    return model


def _work(stats: list[dict]) -> dict:
    """Executed and ideal FLOPs summed over forwards' stats."""
    return {k: sum(float(st[f"flops/{k}"]) for st in stats) for k in ("executed", "ideal")}


def _row(phase: str, B: int, times: dict, work: dict, selected: float) -> dict:
    """One shape's row; `work` {"base" | "dnd": {"executed", "ideal"}}. flops_overhead is the executed FLOPs' (what
    ran: the wall-clock's counterpart), ideal_overhead what the selected tokens alone need."""
    wall = times["dnd"] / times["base"] - 1
    flop = work["dnd"]["executed"] / work["base"]["executed"] - 1
    ideal = work["dnd"]["ideal"] / work["base"]["ideal"] - 1
    return {"phase": phase, "B": B, "selected": selected, "base_s": times["base"], "dnd_s": times["dnd"],
            "throughput": times["base"] / times["dnd"], "flops_overhead": flop, "ideal_overhead": ideal,
            "wall_overhead": wall,
            # with nothing nested the FLOP overhead is the routers' ~0.03%: the ratio would read 100s, and say nothing;
            # compiled decode runs the nested block on every row, selected or not (executed above ideal): it divides
            "wall_over_flops": wall / flop if flop > 0 and (selected > 0 or flop > ideal) else None,
            "control": times["base"] / times[timing.CONTROL]}  # 1 +- this shape's timing noise


def _check_positions(cfg: DNDBenchConfig, config) -> None:
    timing.check_positions(config, "bench dnd", {"--prefill-len": cfg.prefill_len,
                                                 "--decode-prompt-len + --new-tokens": cfg.decode_prompt_len
                                                 + cfg.new_tokens})


@torch.no_grad()
def run_throughput(cfg: DNDBenchConfig) -> dict:
    device = resolve_device(cfg.device)
    model = _model(cfg, device)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows, report = [], None
    for B in cfg.batches:
        ids = torch.randint(0, V, (B, cfg.prefill_len), generator=g).to(device)

        def base(ids=ids):
            with without_method(model):
                return model(ids, num_logits=1)

        times = timing.interleaved_median({"base": base, "dnd": lambda ids=ids: model(ids, num_logits=1),
                                           timing.CONTROL: base}, device, cfg.repeats)
        out = model(ids, num_logits=1)
        report = report or layer_report(model, out)  # the first batch size's prefill (the table says so)
        work = {"base": _work([base().stats]), "dnd": _work([out.stats])}
        rows.append(_row("prefill", B, times, work, float(out.stats["dnd/selected"])))

        prompt = torch.randint(0, V, (B, cfg.decode_prompt_len), generator=g).to(device)
        steps, compile = cfg.new_tokens - 1, timing.decode_compile(model, cfg)
        scopes = {"base": lambda: without_method(model), "dnd": contextlib.nullcontext}
        scopes[timing.CONTROL] = scopes["base"]  # the base once more (a stepper of its own: its cache)
        steppers = {k: timing.greedy_stepper(model, prompt, steps, scope, compile) for k, scope in scopes.items()}
        with timing.compiled_decoding(cfg.compile):
            times = timing.interleaved_steps(steppers, steps, device, cfg.repeats)
            stats = {k: timing.stepper_stats(steppers[k], steps) for k in ("base", "dnd")}
        work = {k: _work(v) for k, v in stats.items()}
        selected = sum(float(st.get("dnd/selected", float("nan"))) for st in stats["dnd"]) / steps
        rows.append(_row("decode", B, times, work, selected))
    return {"config": asdict(cfg), "machine": timing.machine_description(device), "model_params": model.num_params(),
            "layers": model.method.layers, "taus": [float(d.tau) for d in model.method.layer_dnd],
            "rows": rows, "layer_report": report}


@dataclass
class DNDQualityConfig:
    base: str = "runs/demo/base_model"  # a checkpoint trained on the embedded data (make demo writes it)
    steps: int = 120  # post-training steps, the same for DND and SFT (equal tokens)
    method: dict = field(default_factory=lambda: {"name": "dnd", "ratio": 0.2})  # no layers: the base's middle half
    eval_examples: int = 40  # per task
    data: dict | None = None  # the [data] section; None: the demo's (the base model's training data)
    out_dir: str = "runs/bench"

    def __post_init__(self) -> None:  # checked with the options, not after the throughput bench has run
        from dyndepth.bench.quality import check_base

        check_base(self.base)
        if self.steps < 1:
            raise ValueError(f"bench dnd --quality steps must be >= 1, got {self.steps}.")


def run_quality(cfg: DNDQualityConfig) -> dict:
    """DND vs the plain fine-tune from one base: held-out perplexity and synthetic-task exact match, plus the
    controller plot, a selection heatmap and the selection / base-entropy correlation of the DND model."""
    from dyndepth.bench.quality import QualityBenchConfig, _data, _posttrain, _score, held_out_examples
    from dyndepth.data.build import build_loader
    from dyndepth.methods.dnd_analysis import entropy_correlation, plot_controller, selection_heatmap
    from dyndepth.tokenizer import ByteTokenizer

    qcfg = QualityBenchConfig(base=cfg.base, steps=cfg.steps, data=cfg.data, out_dir=cfg.out_dir)
    data, _ = _data(qcfg)
    tok = ByteTokenizer()
    val_kw = {"split": "val", "batch_size": qcfg.batch_size, "seq_len": qcfg.seq_len, "seed": 0, "tokenizer": tok}
    val_loader = build_loader(data, **val_kw)
    probe = build_loader(data, **val_kw).next_batch()["input_ids"]
    examples = held_out_examples(data, cfg.eval_examples)  # the tasks the base was trained on, each as often
    runs = Path(cfg.out_dir) / "dnd_quality_runs"
    layers = json.loads((Path(cfg.base) / "config.json").read_text()).get("num_hidden_layers", 4)
    dnd_method = {"layers": _band(layers), **cfg.method}  # (1, 2) of the demo's 4 layers; a 2-layer base: (0, 1)
    rows, models = [], {}
    for label, method in (("SFT", {**dnd_method, "name": "none"}), ("DND", dnd_method)):
        model = _posttrain(qcfg, method, runs / label.lower())
        models[label] = model
        rows.append(_score(model, label, examples, val_loader, probe, {}))
    for r in rows:
        r["perplexity"] = math.exp(r["val_loss"])
        r["compute"] = r["flops_per_token"] / rows[0]["flops_per_token"]
    dnd = models["DND"]
    with torch.no_grad():
        out = dnd(probe)
    plots = {"controller": str(plot_controller(runs / "dnd" / "metrics.jsonl", Path(cfg.out_dir) / "dnd_controller.png",
                                               target=cfg.method.get("ratio", 0.2))),
             "heatmap": str(selection_heatmap(dnd, tok, examples[0].text, Path(cfg.out_dir) / "dnd_heatmap.png"))}
    base = dyndepth.from_pretrained(cfg.base).eval()
    corr = entropy_correlation(dnd, [probe[:4]], base=base)
    corr = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in corr.items()}  # an empty group: none
    return {"config": {**asdict(cfg), "method": dnd_method},  # (the band it nested in)
            "rows": rows, "layer_report": layer_report(dnd, out), "entropy": corr, "plots": plots}


def render_markdown(throughput: dict | None, quality: dict | None) -> str:
    parts = []
    if throughput is not None:
        c = throughput["config"]
        rows = [r if r["wall_over_flops"] is not None else {**r, "wall_over_flops": "- (router only)"}
                for r in throughput["rows"]]
        parts.append(
            f"### bench dnd: {c['model']} ({throughput['model_params'] / 1e6:.1f}M params), DND on layers "
            f"{throughput['layers'][0]}..{throughput['layers'][-1]}, {c['dtype']}, {throughput['machine']}\n\n"
            f"prefill T={c['prefill_len']}, eager; decode {c['new_tokens']} new tokens after "
            f"{c['decode_prompt_len']}, {timing.decode_execution(c)}. selected = the share of the valid tokens "
            "nested (the DND layers' decisions together; decode: mean over the steps); throughput = base time / DND "
            "time (DND's share of the base's throughput); "
            "overhead = DND / base - 1 (same weights, method detached for base); flops_overhead: executed (what "
            "ran, wall_over_flops divides by it), ideal_overhead: what the selected tokens alone need; control = "
            "base time / the time of a second, identical base contender timed alongside (its distance from 1 is "
            "this shape's timing noise).\n\n"
            + timing.markdown_table(rows, ["phase", "B", "selected", "throughput", "flops_overhead", "ideal_overhead",
                                           "wall_overhead", "wall_over_flops", "control"]))
        parts.append(_layer_table(throughput["layer_report"],
                                  f"prefill B={c['batches'][0]}, T={c['prefill_len']}"))
    if quality is not None:
        c = quality["config"]
        rows = [dict(r, exact_match=f"{r['exact_match']:.1%}") for r in quality["rows"]]
        e = quality["entropy"]
        parts.append(
            f"### bench dnd --quality: DND vs SFT from {c['base']}, {c['steps']} post-training steps each "
            f"(equal tokens), method {c['method']}; compute = executed FLOPs per token / the SFT model's\n\n"
            + timing.markdown_table(rows, ["model", "compute", "val_loss", "perplexity", "exact_match"])
            + f"\n\nselection vs base next-token entropy: Pearson r = {_figure(e['pearson_r'])} over {e['tokens']} "
              f"tokens (mean entropy nested {_figure(e['entropy_nested'])}, others {_figure(e['entropy_other'])}; "
              "-: no token in that group, or every token nested as often)")
        parts.append(_layer_table(quality["layer_report"], "the DND model on the probe batch"))
    return "\n\n".join(parts)


def _figure(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _layer_table(report: dict, of: str) -> str:
    rows = [{"layer": layer, **r} for layer, r in report.items()]
    return f"per layer ({of}):\n\n" + timing.markdown_table(rows, ["layer", "selected", "flops_overhead_executed",
                                                           "flops_overhead_ideal"])


def main(cfg: DNDBenchConfig | None, quality: DNDQualityConfig | None = None) -> dict:
    """Throughput (cfg) and/or quality; writes runs/bench/dnd-<device>-<dtype>.{json,md}."""
    result = {"throughput": None if cfg is None else run_throughput(cfg),
              "quality": None if quality is None else run_quality(quality)}
    out_dir = (cfg or quality).out_dir
    name = "dnd" if cfg is None else f"dnd-{cfg.device.split(':')[0]}-{cfg.dtype}" + ("-compiled" if cfg.compile else "")
    return timing.publish(result, render_markdown(result["throughput"], result["quality"]), out_dir, name)
