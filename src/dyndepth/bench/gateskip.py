"""`dyndepth bench gateskip`: realized speedup of GateSkip's physical skipping next to the FLOP ratios.

For each skip budget q, the same gated model runs (a) prefill at each sequence length and (b) cached
batched decoding (the n - 1 greedy steps after the prompt, as `generate` runs them; the prefill before them
is not timed). Every budget of a case is timed interleaved in one run, so drift in machine load hits all
equally: prefills in turn (q0, q1, q2, then q2, q1, q0, ...), decode steps in turn (step 1 of every budget,
then step 2 in reverse order, ...; `seconds` is the median step times n - 1), and a second baseline contender
(`control`) measures the noise. The realized speedup is time(q = 0) / time(q). Next to it, two
ratios from the forward's compute ledger: `executed` (the FLOPs the kernels ran: gates for every token,
skipped tokens' K/V projections, padding, dense fallbacks, masked attention pairs) and `ideal` (what the
budget allows). realized / executed near 1 means time follows the work that ran; executed / ideal says
how much work the execution paths added. Decoding uses per-branch thresholds calibrated at q (batch-1
quantiles are meaningless); `packed` is the fraction of the branch calls run packed or masked that ran packed
(the rest ran densely with a masked output, see GateSkip's cost rule).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import dyndepth
from dyndepth.bench import timing
from dyndepth.devices import DTYPES, resolve_device
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
    path: str = "auto"  # GateSkip's execution path for partially kept branches: auto | packed | dense
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 3
    # Decode steps compiled over a full static cache, as `generate(compile=True)` runs them (one graph a budget:
    # partially kept branches run dense-masked); prefill stays eager (its top-k packing syncs).
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend ("eager" only traces: for tests)
    # Decoding's thresholds are calibrated at each budget on this text (with the checkpoint's tokenizer), and its
    # prompts are taken from it, or, when empty, both are random token ids: right for a preset's random weights, not
    # for a trained checkpoint, whose gates score real text otherwise (`skipped` shows what each row skipped).
    calibration_text: str = ""
    out_dir: str = "runs/bench"

    def __post_init__(self) -> None:
        timing.check_bench_config(self, "bench gateskip", ("prefill_batch", "decode_prompt_len", "repeats"),
                                  ("prefill_lens", "decode_batches"))
        if not self.budgets or self.budgets[0] != 0.0:
            raise ValueError("bench gateskip budgets must start with 0 (the baseline every ratio is against).")
        if len(set(self.budgets)) != len(self.budgets):  # one contender per budget: a repeat printed a second row
            raise ValueError(f"bench gateskip budgets {self.budgets} repeat a value; give each budget once.")
        if self.new_tokens < 2:
            raise ValueError("bench gateskip needs new_tokens >= 2 (decode time is n tokens minus 1 token).")
        if self.calibration_text and not Path(self.calibration_text).is_file():  # (a folder: IsADirectoryError's
            # traceback, and a missing file a bare "[Errno 2]", once the model was built)
            raise ValueError(f"bench gateskip calibration_text {self.calibration_text}: no such file; give a UTF-8 text "
                             "file (or none: random token ids, for a preset).")


def _model(cfg: GateSkipBenchConfig):
    dtype = DTYPES[cfg.dtype]
    if cfg.model in dyndepth.PRESETS:
        torch.manual_seed(0)
        model = dyndepth.build_model(dyndepth.preset(cfg.model))
        attach_gateskip(model, GateSkipConfig(gate=cfg.gate, path=cfg.path))
        with torch.no_grad():  # untrained gates are all ~0.993; spread them so rankings differ by token
            for layer in model.model.layers:
                for gate in (layer.gateskip.attn_gate, layer.gateskip.mlp_gate):
                    gate.proj.weight.normal_(0, 0.05)
    else:
        model = dyndepth.from_pretrained(cfg.model)
        if getattr(model.method, "name", None) != "gateskip":
            found = getattr(model.method, "name", None)
            raise ValueError(f"{cfg.model} is not a GateSkip checkpoint (its config.json names "
                             f"{'no method' if found is None else f'the method {found!r}'}); pass one post-trained "
                             "with --method gateskip, or a preset name.")
        model.method.path = cfg.path
    return model.to(device=cfg.device, dtype=dtype).eval()


def _work(stats_list: list[dict]) -> dict:
    """Executed and ideal FLOPs summed over forwards, the packed fraction of partial branch calls, and the
    fraction of (pool token, branch) pairs that skipped (mean over forwards and the two branch types)."""
    packed = [float(s["gateskip/packed"]) for s in stats_list if "gateskip/packed" in s]
    skipped = [float(s[f"gateskip/{b}_skipped"]) for s in stats_list for b in ("attn", "mlp")]
    return {"executed": sum(float(s["flops/executed"]) for s in stats_list),
            "ideal": sum(float(s["flops/ideal"]) for s in stats_list),
            "packed": sum(packed) / len(packed) if packed else None, "skipped": sum(skipped) / len(skipped)}


def _calibration_len(config) -> int:
    """Tokens per calibration window: 256, or the model's context when shorter (a checkpoint of 128 positions failed
    here, after its prefill rows were timed, on 256-token windows no option had asked for)."""
    return min(256, config.max_position_embeddings)


def _text_ids(cfg: GateSkipBenchConfig, window: int) -> torch.Tensor | None:
    """The calibration text's ids (the checkpoint's tokenizer), or None without a text."""
    if not cfg.calibration_text:
        return None
    from dyndepth.data.sources import read_utf8
    from dyndepth.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("byte" if cfg.model in dyndepth.PRESETS else cfg.model)
    text = read_utf8(cfg.calibration_text, "bench gateskip calibration_text")  # (its name when it is not UTF-8)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if len(ids) < window:
        raise ValueError(f"bench gateskip calibration_text {cfg.calibration_text} has {len(ids)} tokens; it needs "
                         f"at least {window} (a window of calibration).")
    return ids


def _windows(text_ids: torch.Tensor | None, B: int, T: int, V: int, g: torch.Generator, device) -> torch.Tensor:
    """B windows of T ids: random ones without a text, else windows of the text at random offsets."""
    if text_ids is None:
        return torch.randint(0, V, (B, T), generator=g).to(device)
    starts = torch.randint(0, max(1, len(text_ids) - T + 1), (B,), generator=g)
    return torch.stack([text_ids[s:s + T] for s in starts.tolist()]).to(device)


@torch.no_grad()
def run_gateskip_bench(cfg: GateSkipBenchConfig) -> dict:
    device = resolve_device(cfg.device)
    model = _model(cfg)
    timing.check_positions(model.config, "bench gateskip", {"--prefill-lens": max(cfg.prefill_lens),
                                                           "--decode-prompt-len + --new-tokens":
                                                           cfg.decode_prompt_len + cfg.new_tokens})
    method = model.method
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    window = _calibration_len(model.config)
    text_ids = _text_ids(cfg, window)  # decoding's thresholds and prompts from a text, when given (read before timing)
    rows = []
    for T in cfg.prefill_lens:
        ids = torch.randint(0, V, (cfg.prefill_batch, T), generator=g).to(device)

        def prefill(q: float, ids=ids):
            with method.override(budget=q, mode="quantile"):
                return model(ids, num_logits=1)

        fns = {q: (lambda q=q: prefill(q)) for q in cfg.budgets}
        fns[timing.CONTROL] = fns[cfg.budgets[0]]  # the baseline once more: how far two identical contenders read apart
        times = timing.interleaved_median(fns, device, cfg.repeats)
        work = {q: _work([prefill(q).stats]) for q in cfg.budgets}
        rows += _rows("prefill", f"B={cfg.prefill_batch}, T={T}", cfg.budgets, times, work)

    calib = [_windows(text_ids, 8, window, V, g, device) for _ in range(2)]
    thresholds = {}
    for q in cfg.budgets[1:]:  # calibrate once per budget; swap the tables in while timing
        calibrate(model, calib, budget=q)
        thresholds[q] = [(gates.tau.clone(), gates.tau_budget_ppm.clone()) for gates in method.layer_gates]

    @contextlib.contextmanager
    def decoding(q: float):  # the budget's thresholds and what generate(skip_budget=q) enters
        for gates, (tau, ppm) in zip(method.layer_gates, thresholds.get(q, [])):
            gates.tau.copy_(tau)
            gates.tau_budget_ppm.copy_(ppm)
        with method.decoding(budget=q):
            yield

    steps, compile = cfg.new_tokens - 1, timing.decode_compile(model, cfg)
    for B in cfg.decode_batches:
        prompt = _windows(text_ids, B, cfg.decode_prompt_len, V, g, device)
        scopes = {q: functools.partial(decoding, q) for q in cfg.budgets}
        scopes[timing.CONTROL] = scopes[cfg.budgets[0]]  # the baseline once more (a stepper of its own: its cache)
        steppers = {k: timing.greedy_stepper(model, prompt, steps, scope, compile) for k, scope in scopes.items()}
        with timing.compiled_decoding(cfg.compile):
            times = {q: t * steps for q, t in timing.interleaved_steps(steppers, steps, device, cfg.repeats).items()}
            work = {q: _work(timing.stepper_stats(steppers[q], steps)) for q in cfg.budgets}
        rows += _rows("decode", f"B={B}, {cfg.new_tokens} new", cfg.budgets, times, work)
    return {"config": asdict(cfg), "machine": timing.machine_description(device), "model_params": model.num_params(),
            "gate": method.config.gate, "rows": rows}  # the gates that ran (a checkpoint's own, not --gate)


def _rows(phase: str, shape: str, budgets, times: dict, work: dict) -> list[dict]:
    out = []
    base_t, base_w = times[budgets[0]], work[budgets[0]]
    control = f"{base_t / times[timing.CONTROL]:.3f}"  # 1 +- the timing noise of this shape
    for q in budgets:
        realized = base_t / times[q]
        executed = base_w["executed"] / work[q]["executed"]
        ideal = base_w["ideal"] / work[q]["ideal"]
        out.append(dict(phase=phase, shape=shape, budget=q, seconds=times[q], realized_speedup=realized,
                        executed_speedup=executed, ideal_speedup=ideal, realized_over_executed=realized / executed,
                        realized_over_ideal=realized / ideal,
                        skipped=work[q]["skipped"],
                        packed="-" if work[q]["packed"] is None else f"{work[q]['packed']:.0%}",
                        control=control if q == budgets[0] else "-"))
    return out


def render_markdown(r: dict) -> str:
    c = r["config"]
    head = (f"### bench gateskip: {c['model']} ({r['model_params'] / 1e6:.1f}M params incl. {r['gate']} gates), "
            f"{c['dtype']}, {r['machine']}, path={c['path']}, decode "
            f"{timing.decode_execution(c)}\n\nrealized = time at budget 0 / time at budget q, "
            "same gated model, budgets timed interleaved; executed / ideal = the FLOP ratio of what ran / of "
            "what the budget allows (gates and skipped tokens' K/V included in both); skipped = the share of "
            "(pool token, branch) pairs that did skip (decoding: by thresholds calibrated on "
            f"{c.get('calibration_text') or 'random token ids'}); packed = share of "
            "branch calls run packed or masked that ran packed; control = budget-0 time / the time of a second, "
            "identical budget-0 contender timed alongside (its distance from 1 is this shape's timing noise).\n\n")
    cols = ["phase", "shape", "budget", "skipped", "seconds", "realized_speedup", "executed_speedup", "ideal_speedup",
            "realized_over_executed", "realized_over_ideal", "packed", "control"]
    return head + timing.markdown_table(r["rows"], cols)


def main(cfg: GateSkipBenchConfig) -> dict:
    result = run_gateskip_bench(cfg)
    name = f"gateskip-{cfg.device.split(':')[0]}-{cfg.dtype}" + ("" if cfg.path == "auto" else f"-{cfg.path}") + \
        ("-compiled" if cfg.compile else "")
    return timing.publish(result, render_markdown(result), cfg.out_dir, name)
