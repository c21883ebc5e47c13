"""`make demo` / `dyndepth demo`: train a tiny model until it solves easy synthetic tasks, post-train every
adaptive-depth method from it, and print one table of quality against compute. Offline, on 2 CPU cores,
in under 10 minutes.

1. Base model: a 4-layer Qwen3-shaped model (byte tokenizer, 0.8M parameters) on three easy tasks: 1-hop
   variable binding with one-digit arithmetic (`q=3;k=q*2;k?6`, half the examples), sorting 4 digits and
   copying 5 letters. The loss is on the answers and their terminator only (the prompts are read, not
   trained): every gradient goes to what is scored, and the model learns to stop. 2-digit addition is
   left out: at this budget it stayed at 2-29% exact match in our runs (700 steps, 4 and 6 layers).
2. From that base, the same steps on the same data for each contender (`bench/compare.py`): the plain
   fine-tune (SFT, the reference for equal tokens), GateSkip (gates on every branch, skip ramp 0 -> 20%,
   gate penalty 0.01: the paper's 1.0 weighs 50x the ~0.02-nat answer loss here and collapsed the gates),
   Mixture-of-Depths (capacity 50% on every other block) and DND (layers 1-2 nest 20% of the tokens).
3. Every row is scored causally, as generation runs: greedy exact match on held-out prompts (disjoint from
   training), loss on the answer characters, executed FLOPs per token relative to the base (gates, routers
   and nested passes included) and measured time (generating the answers; a forward of 8 x 128 held-out tokens).
Dreamer is a separate model family trained from scratch (`recipes/dreamer_tiny_cpu.toml`, 1500 steps): it
does not fit this budget, so the demo leaves it out.

Writes results.json, the table (results.md), quality_vs_compute.png, token_compute.png (which tokens skip
which GateSkip branches at a 30% budget), dnd_selection.png and each run's loss curve to the output folder.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dyndepth import jsonio
from dyndepth.bench.compare import DEMO_DATA as DATA
from dyndepth.bench.compare import Contender, causal, compare, slug
from dyndepth.bench.timing import machine_description, markdown_table
from dyndepth.config import preset
from dyndepth.data.build import build_loader, task_mix
from dyndepth.data.synthetic import exact_match, make_examples
from dyndepth.eval.tasks import generate_answers, loss_by_difficulty
from dyndepth.models.qwen3 import CausalLM
from dyndepth.plots import compute_heatmap, plot_methods
from dyndepth.runconfig import RunConfig, TrainConfig
from dyndepth.tokenizer import ByteTokenizer, encode_batch
from dyndepth.train.trainer import train

PLOTS = ("quality_vs_compute.png", "token_compute.png", "dnd_selection.png")  # written into out_dir


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    model: str = "demo-tiny"
    steps: int = 600  # base training
    post_steps: int = 120  # each contender, from the base
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 4e-3
    post_lr: float = 1e-3
    eval_examples: int = 100  # per task
    budgets: list[float] = field(default_factory=lambda: [0.0, 0.15, 0.3, 0.5])
    gate_penalty: float = 0.01  # the paper's 1.0 is against an LM loss of ~2 nats; the answers here cost ~0.02
    mod_capacity: float = 0.5
    dnd_ratio: float = 0.2
    data: dict = field(default_factory=lambda: dict(DATA))

    def __post_init__(self) -> None:  # before the base trains (eval_examples=0 failed after every run)
        for name in ("steps", "post_steps", "eval_examples", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo {name} must be >= 1, got {getattr(self, name)}.")
        out = Path(self.out_dir)  # the demo replaces its own folders there: another `base/` or `sft/` was deleted
        ours = {"base", "base_model", "results.json", "results.md", *PLOTS, *(slug(c.label) for c in contenders(self))}
        others = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else []
        if others:
            raise ValueError(f"demo out_dir {out} holds {others[:3]}, which no demo wrote; the demo replaces its own "
                             f"folders there ({', '.join(sorted(ours - {'results.json', 'results.md', *PLOTS}))}): "
                             "give a new or empty folder, or an earlier demo's.")


def contenders(cfg: DemoConfig) -> list[Contender]:
    n = preset(cfg.model).num_hidden_layers
    band = [1, n - 2] if n > 2 else [0, n - 1]  # DND: leave the first and the last layer alone
    return [
        Contender("SFT", {"name": "none"}),
        Contender("GateSkip", {"name": "gateskip", "penalty": cfg.gate_penalty, "ramp_end": 0.2},
                  [{"budget": q} for q in cfg.budgets]),
        Contender(f"MoD c={cfg.mod_capacity:.0%}", {"name": "mod", "capacity": cfg.mod_capacity}),
        Contender(f"DND {cfg.dnd_ratio:.0%}", {"name": "dnd", "layers": band, "ratio": cfg.dnd_ratio}),
    ]


def _train_config(cfg: DemoConfig, out: Path, steps: int, lr: float) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=lr, min_lr=lr / 10,
                       warmup=max(1, steps // 20), weight_decay=0.1, log_every=25, out_dir=str(out), device="cpu",
                       save_every=0, keep_last=1)


def run_demo(cfg: DemoConfig | None = None) -> dict:
    cfg = cfg or DemoConfig()
    out = Path(cfg.out_dir)
    t0, cpu0 = time.perf_counter(), time.process_time()
    tok = ByteTokenizer()
    loader = build_loader(cfg.data, split="train", batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=0,
                          tokenizer=tok)
    stages = 2 + sum(1 + len(c.settings) for c in contenders(cfg))
    step = iter(range(1, stages + 1))

    def progress(text: str) -> None:
        print(f"[{next(step)}/{stages}] {text}  ({time.perf_counter() - t0:.0f}s)", flush=True)

    progress(f"training the base model: {cfg.steps} steps")
    base_dir = _train_base(cfg, loader, out, tok)
    balanced = dataclasses.replace(task_mix(cfg.data), weights=None)  # round-robin: eval_examples per task
    examples = make_examples(balanced, cfg.eval_examples * len(balanced.tasks), seed=1, split="val")
    calib_texts = [e.text for e in make_examples(task_mix(cfg.data), 256, seed=2, split="train")]
    calibration = [encode_batch(tok, calib_texts[i:i + 64]) for i in range(0, len(calib_texts), 64)]
    probe = _probe(tok, examples)
    rows, models = compare(str(base_dir), contenders(cfg), loader,
                           lambda label: _train_config(cfg, out / slug(label), cfg.post_steps, cfg.post_lr),
                           _scorer(tok, examples), probe, calibration, progress)
    summary = {"config": asdict(cfg), "machine": machine_description(torch.device("cpu")),
               "params": rows[0]["params"], "seconds": round(time.perf_counter() - t0, 1),
               "eval_examples": len(examples), "probe": list(probe[0].shape), "rows": rows}  # (B, T) timed
    summary["plots"] = _plots(cfg, models, tok, examples, calibration, rows, out)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["cpu_seconds"] = round(time.process_time() - cpu0, 1)  # all threads: on a shared machine, the work
    (out / "results.json").write_text(jsonio.dumps(summary, indent=2) + "\n")
    table = render(summary)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return summary


def _train_base(cfg: DemoConfig, loader, out: Path, tok) -> Path:
    torch.manual_seed(0)
    model = CausalLM(preset(cfg.model))
    model.generation_config = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}  # as a run's
    # export names its tokenizer's stops (the preset names none): GateSkip never skips the EOS after each example
    tcfg = _train_config(cfg, out / "base", cfg.steps, cfg.lr)
    shutil.rmtree(tcfg.out_dir, ignore_errors=True)  # the demo's own previous run: start fresh every time
    train(model, loader, tcfg, run_config=RunConfig(model={"preset": cfg.model}, data=cfg.data, train=tcfg))
    return model.save_pretrained(out / "base_model")  # `dyndepth bench quality` post-trains from it too


def _probe(tok, examples, rows: int = 8, length: int = 128) -> tuple:
    """(ids, mask) of the held-out texts packed back to back into full rows: no padding, whose FLOPs some
    execution paths skip and others do not, enters the compute ratios."""
    stream = [i for e in examples for i in tok.encode(e.text)]
    length = min(length, len(stream) // rows)  # a few examples (tests): shorter rows
    ids = torch.tensor(stream[:rows * length]).view(rows, length)  # (B, T)
    return ids, torch.ones_like(ids)


def _scorer(tok, examples):
    """Greedy exact match per task, its generation time, and the loss on the answer characters."""
    def scorer(model) -> dict:
        t0 = time.perf_counter()
        answers = generate_answers(model, tok, examples, batch_size=64)
        seconds = time.perf_counter() - t0
        accuracy = exact_match(examples, answers)
        return {"exact_match": accuracy["overall"], "per_task": accuracy, "generate_s": seconds,
                "answer_loss": loss_by_difficulty(model, tok, examples, batch_size=64)["answer"]}
    return scorer


def _plots(cfg: DemoConfig, models: dict, tok, examples, calibration, rows, out: Path) -> dict:
    sample = "".join(e.text for e in examples[::cfg.eval_examples][:4])
    series = [dict(r, method=r["label"].split(" q=")[0]) for r in rows]  # one line through GateSkip's budgets
    plots = {"quality_vs_compute": str(plot_methods(series, out / "quality_vs_compute.png",
                                                    title="dyndepth demo: exact match vs executed FLOPs"))}
    gated = models.get("GateSkip")
    if gated is not None:
        with causal(gated, {"budget": 0.3}, calibration):
            plots["token_compute"] = str(compute_heatmap(gated, tok, sample, out / "token_compute.png", add_bos=False))
    dnd = next((m for label, m in models.items() if label.startswith("DND")), None)
    if dnd is not None:
        from dyndepth.methods.dnd_analysis import selection_heatmap

        plots["dnd_selection"] = str(selection_heatmap(dnd, tok, sample, out / "dnd_selection.png"))
    return plots


def render(s: dict) -> str:
    c = s["config"]
    tasks = c["data"]["tasks"]
    B, T = s.get("probe", (8, 128))  # the forward timed: a few examples fill shorter rows (older results: 8 x 128)
    rows = [dict(model=r["label"], exact_match=f"{r['exact_match']:.1%}", answer_loss=r["answer_loss"],
                 compute=f"{r['compute']:.0%}", ideal_compute=f"{r['ideal_compute']:.0%}",
                 generate_s=r["generate_s"], prefill=f"{r['latency']:.2f}x",
                 **{t: f"{r['per_task'][t]:.0%}" for t in tasks}) for r in s["rows"]]
    head = (f"## dyndepth demo: {s['params'] / 1e6:.2f}M-parameter Qwen3-shaped model, {c['steps']} base steps, "
            f"then {c['post_steps']} steps per contender; {s['seconds']:.0f}s wall, {s.get('cpu_seconds', 0):.0f}s CPU "
            f"on {s['machine']}\n\n"
            f"exact match: greedy, {s['eval_examples']} held-out prompts ({c['eval_examples']} per task); "
            "answer_loss: nats per answer character; compute: executed FLOPs per token / the base model's "
            "(gates, routers, nested passes included), ideal: what the routing needs; generate_s: seconds to "
            f"generate every answer; prefill: a forward of {B} x {T} held-out tokens, median time over the base "
            "model's, the two timed in turn (the base's row: itself, a control). All decisions causal "
            "(GateSkip: thresholds calibrated at the budget, MoD: its predictor).\n\n")
    cols = ["model", "exact_match", "answer_loss", "compute", "ideal_compute", "generate_s", "prefill"]
    return head + markdown_table(rows, cols + tasks)
