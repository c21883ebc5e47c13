"""`make demo` / `dyndepth demo`: train a tiny model on embedded data, post-train it with GateSkip, and
measure quality against compute. Offline, on a laptop CPU, in a few minutes.

1. Base model: a 4-layer Qwen3-shaped model (byte tokenizer) on synthetic reasoning tasks plus the
   Python standard library's source.
2. GateSkip: gates on every attention and MLP branch, fine-tuned with the gate penalty and a skip
   ramp (0 -> 20%), as the paper's recipe does.
3. Evaluation at skip budgets 0 / 15 / 30 / 50%: validation loss, exact match per task (generation
   decodes with per-branch thresholds calibrated at the budget) and the FLOPs that actually ran.
Writes results.json, quality_vs_compute.png, token_compute.png (which tokens skip which branches at a
30% budget), loss curves and sample generations to the output folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from dyndepth.bench.timing import markdown_table
from dyndepth.config import preset
from dyndepth.data.build import build_loader
from dyndepth.data.synthetic import TASKS, TERMINATOR, exact_match, make_examples
from dyndepth.eval.tasks import generate_answers, loss_by_difficulty
from dyndepth.methods import calibrate
from dyndepth.models.qwen3 import CausalLM
from dyndepth.plots import compute_heatmap, plot_quality_vs_compute
from dyndepth.runconfig import RunConfig, TrainConfig
from dyndepth.tokenizer import ByteTokenizer, encode_batch
from dyndepth.train.parallel import DistInfo
from dyndepth.train.run import build_hooks
from dyndepth.train.trainer import evaluate, train

# Easy enough to learn in a few CPU minutes, hard enough that answer tokens stand out.
DIFFICULTY = {"add": {"digits": 2}, "mul": {"digits": 1}, "var": {"hops": 1}, "sort": {"length": 4},
              "parity": {"length": 6}, "copy": {"length": 6}}
BUDGETS = (0.0, 0.15, 0.3, 0.5)
DATA = {"source": "embedded", "tokenizer": "byte", "difficulty": DIFFICULTY, "synthetic_examples": 40_000,
        "stdlib_bytes": 1_000_000}


def _train_config(out_dir: Path, steps: int, lr: float, warmup: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=16, seq_len=256, lr=lr, min_lr=lr / 10, warmup=warmup,
                       weight_decay=0.1, eval_every=0, eval_batches=8, log_every=10, out_dir=str(out_dir),
                       device="cpu")


def run_demo(out_dir: str | Path = "runs/demo", steps: int = 320, gate_steps: int = 100,
             eval_examples: int = 40) -> dict:
    out = Path(out_dir)
    for old in ("base", "gateskip"):  # the demo's own previous runs: start fresh every time
        shutil.rmtree(out / old, ignore_errors=True)
    t0 = time.perf_counter()
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = CausalLM(preset("demo-tiny"))
    kw = dict(batch_size=16, seq_len=256, seed=0, tokenizer=tok)
    loader, val_loader = build_loader(DATA, split="train", **kw), build_loader(DATA, split="val", **kw)

    base_cfg = _train_config(out / "base", steps, 3e-3, 30)
    base = train(model, loader, base_cfg, eval_loader=val_loader,
                 run_config=RunConfig(model={"preset": "demo-tiny"}, data=DATA, train=base_cfg))
    examples = make_examples(list(TASKS), eval_examples * len(TASKS), seed=1, difficulty=DIFFICULTY, split="val")
    model.eval()
    probe = val_loader.next_batch()["input_ids"]
    base_row = _evaluate(model, tok, examples, val_loader, base_cfg, budget=None, probe=probe)
    model.save_pretrained(out / "base_model")  # `dyndepth bench quality` post-trains methods from it

    gate_cfg = _train_config(out / "gateskip", gate_steps, 1e-3, 10)
    method_cfg = {"name": "gateskip", "penalty": 1.0, "ramp_end": 0.2, "scope": "batch"}
    hooks = build_hooks(method_cfg, model, gate_steps)
    train(model, loader, gate_cfg, hooks=hooks, eval_loader=val_loader,
          run_config=RunConfig(model={"preset": "demo-tiny"}, method=method_cfg, data=DATA, train=gate_cfg))
    model.method.budget = 0.0  # the ramp left it at 20%; inference budgets are set per evaluation
    model.eval()
    # Decoding thresholds are calibrated on in-distribution text: held-out task examples (train split).
    calib_texts = [e.text for e in make_examples(list(TASKS), 256, seed=2, difficulty=DIFFICULTY)]
    calib = [encode_batch(tok, calib_texts[i:i + 64]) for i in range(0, 256, 64)]
    rows = [base_row]
    for q in BUDGETS:
        if q > 0:
            calibrate(model, calib, budget=q)
        rows.append(_evaluate(model, tok, examples, val_loader, gate_cfg, budget=q, probe=probe))
    for r in rows:
        r["compute"] = r["flops"] / rows[1]["flops"]
        r["gen_compute"] = None if r["gen_flops"] is None else r["gen_flops"] / rows[1]["gen_flops"]
    model.save_pretrained(out / "gateskip_model")

    summary = {"model_params": base_row["params"], "base_steps": base.steps, "gateskip_steps": gate_steps,
               "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
               "loss_by_difficulty": _difficulty(model, tok, examples[:120])}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_quality_vs_compute([r for r in rows if r["label"] != "base"], out / "quality_vs_compute.png")
    sample = "".join(e.text for e in examples[::eval_examples][:4])
    compute_heatmap(model, tok, sample, out / "token_compute.png", add_bos=False, budget=0.3)
    _write_samples(model, tok, examples, out / "samples.txt")
    print(render(summary, out))
    return summary


def _evaluate(model, tok, examples, val_loader, cfg: TrainConfig, budget: float | None, probe) -> dict:
    """Validation loss, exact match and FLOPs per token at a skip budget (None: the model before gates).

    Prefill compute is measured on a validation batch (quantile rule: exactly the budget); generation
    compute by re-running the generated texts in threshold mode, which makes the same per-token
    decisions as cached decoding.
    """
    row = {"label": "base" if budget is None else f"q={budget:.0%}", "budget": budget,
           "params": model.num_params()}
    if budget is None:
        row["val_loss"] = evaluate(model, val_loader, cfg.eval_batches, cfg, DistInfo())
        with torch.no_grad():
            row["flops"] = _flops_per_token(model(probe).stats)
        row["gen_flops"] = None  # generation compute is reported relative to the gated model; shown as "-"
        answers = generate_answers(model, tok, examples)
        row["gen_skipped"] = 0.0
    else:
        with model.method.override(budget=budget, mode="quantile"), torch.no_grad():
            row["val_loss"] = evaluate(model, val_loader, cfg.eval_batches, cfg, DistInfo())
            row["flops"] = _flops_per_token(model(probe).stats)
        answers = generate_answers(model, tok, examples, skip_budget=budget)
        ids, mask = encode_batch(tok, [e.prompt + a.split(TERMINATOR)[0] for e, a in zip(examples, answers)])
        with model.method.decoding(budget), torch.no_grad():
            stats = model(ids, attention_mask=mask).stats
        row["gen_flops"] = _flops_per_token(stats)
        row["gen_skipped"] = (float(stats["gateskip/attn_skipped"]) + float(stats["gateskip/mlp_skipped"])) / 2
    accuracy = exact_match(examples, answers)
    return {**row, "exact_match": accuracy["overall"], "per_task": accuracy}


def _flops_per_token(stats: dict) -> float:
    """FLOPs that ran (the ledger's executed figure, lm_head included) per valid token: PAD and EOS tokens
    that ran count in the work, and only real tokens in the denominator."""
    return float(stats["flops/executed"]) / float(stats["tokens/valid"])


def _difficulty(model, tok, examples) -> dict:
    with model.method.override(budget=0.0, mode="quantile"):
        return loss_by_difficulty(model, tok, examples)


def _write_samples(model, tok, examples, path: Path) -> None:
    picks = examples[::20]
    lines = []
    for q in (0.0, int(model.method.layer_gates[0].tau_budget_ppm) / 1e6):
        for e, p in zip(picks, generate_answers(model, tok, picks, skip_budget=q)):
            lines.append(f"[q={q:.0%}] [{e.task}] {e.prompt}{p.split(chr(10))[0]}   (expected {e.answer})")
    path.write_text("\n".join(lines) + "\n")


def render(s: dict, out: Path) -> str:
    rows = [dict(model=r["label"], prefill_compute=f"{r['compute']:.0%}", val_loss=r["val_loss"],
                 generation_compute="-" if r["gen_compute"] is None else f"{r['gen_compute']:.0%}",
                 skipped_in_generation=f"{r['gen_skipped']:.0%}",
                 exact_match=f"{r['exact_match']:.0%}",
                 **{t: f"{r['per_task'][t]:.0%}" for t in TASKS}) for r in s["rows"]]
    head = (f"\n## dyndepth demo: {s['model_params'] / 1e6:.2f}M-parameter Qwen3-shaped model, "
            f"{s['base_steps']} base steps + {s['gateskip_steps']} GateSkip steps, {s['seconds']:.0f}s on CPU\n\n"
            "compute = FLOPs per token that actually ran, relative to the gated model at budget 0 (gates "
            "included; 'base' is the model before gates were added). Prefill uses the paper's quantile rule "
            "(exactly the budget); generation uses per-branch thresholds calibrated on held-out task text, so "
            "the fraction it skips can differ from the budget.\n\n")
    d = s["loss_by_difficulty"]
    tail = (f"\n\nloss on answer tokens {d['answer']:.3f} vs prompt tokens {d['prompt']:.3f} nats "
            f"(GateSkip model, budget 0)\nwrote {out / 'results.json'}, {out / 'quality_vs_compute.png'}, "
            f"{out / 'token_compute.png'}, {out / 'base' / 'loss.png'}, {out / 'samples.txt'}")
    cols = ["model", "prefill_compute", "val_loss", "generation_compute", "skipped_in_generation", "exact_match"]
    return head + markdown_table(rows, cols + list(TASKS)) + tail
