"""`make demo` / `dyndepth demo`: train a tiny model on the embedded data and report what it learned.

Runs offline on a laptop CPU in a few minutes: synthetic reasoning tasks plus the Python standard
library's own source as text, a byte-level tokenizer, a 4-layer Qwen3-shaped model. Prints a results
table (loss, perplexity, exact match per task, loss on answer vs prompt tokens), writes the loss curve,
sample generations and `results.json` to the output folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from dyndepth.bench.timing import markdown_table
from dyndepth.config import preset
from dyndepth.data.build import build_loader
from dyndepth.data.synthetic import TASKS, make_examples
from dyndepth.eval.tasks import generate_answers, loss_by_difficulty
from dyndepth.data.synthetic import exact_match
from dyndepth.models.qwen3 import CausalLM
from dyndepth.runconfig import RunConfig, TrainConfig
from dyndepth.tokenizer import ByteTokenizer
from dyndepth.train.metrics import perplexity
from dyndepth.train.trainer import train

log = logging.getLogger(__name__)

# Easy enough to learn in a few CPU minutes, hard enough that answer tokens stand out.
DIFFICULTY = {"add": {"digits": 2}, "mul": {"digits": 1}, "var": {"hops": 1}, "sort": {"length": 4},
              "parity": {"length": 6}, "copy": {"length": 6}}


def demo_run_config(out_dir: str, steps: int) -> RunConfig:
    data = {"source": "embedded", "tokenizer": "byte", "difficulty": DIFFICULTY, "synthetic_examples": 40_000,
            "stdlib_bytes": 1_000_000}
    train_cfg = TrainConfig(steps=steps, batch_size=16, seq_len=256, lr=3e-3, min_lr=3e-4, warmup=30,
                            weight_decay=0.1, eval_every=max(steps // 4, 1), eval_batches=8, log_every=10,
                            out_dir=out_dir, device="cpu")
    return RunConfig(model={"preset": "demo-tiny"}, data=data, train=train_cfg)


def run_demo(out_dir: str | Path = "runs/demo", steps: int = 600, eval_examples: int = 40) -> dict:
    out = Path(out_dir)
    t0 = time.perf_counter()
    rc = demo_run_config(str(out), steps)
    tok = ByteTokenizer()
    torch.manual_seed(rc.train.seed)
    model = CausalLM(preset(rc.model["preset"]))
    kw = dict(batch_size=rc.train.batch_size, seq_len=rc.train.seq_len, seed=rc.train.seed, tokenizer=tok)
    loader = build_loader(rc.data, split="train", **kw)
    val_loader = build_loader(rc.data, split="val", **kw)
    result = train(model, loader, rc.train, eval_loader=val_loader, run_config=rc)
    train_s = time.perf_counter() - t0

    model.eval()
    examples = make_examples(list(TASKS), eval_examples * len(TASKS), seed=1, difficulty=DIFFICULTY, split="val")
    predictions = generate_answers(model, tok, examples)
    accuracy = exact_match(examples, predictions)
    difficulty = loss_by_difficulty(model, tok, examples)
    samples = [dict(task=e.task, prompt=e.prompt, answer=e.answer, generated=p.split("\n")[0])
               for e, p in zip(examples[::eval_examples // 2 or 1], predictions[::eval_examples // 2 or 1])]
    final_loss = result.losses[-1][1]
    val_loss = result.evals[-1][1]
    summary = {
        "model_params": model.num_params(), "steps": result.steps, "train_seconds": round(train_s, 1),
        "train_loss": final_loss, "val_loss": val_loss, "val_ppl": perplexity(val_loss),
        "exact_match": accuracy, "answer_token_loss": difficulty["answer"],
        "prompt_token_loss": difficulty["prompt"], "samples": samples,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "samples.txt").write_text("".join(
        f"[{s['task']}] {s['prompt']}{s['generated']}   (expected {s['answer']})\n" for s in samples))
    print(render(summary, out))
    return summary


def render(s: dict, out: Path) -> str:
    rows = [dict(metric="train loss (last step, nats/byte)", value=s["train_loss"]),
            dict(metric="val loss / perplexity", value=f"{s['val_loss']:.3f} / {s['val_ppl']:.2f}"),
            dict(metric="loss on answer tokens (hard)", value=s["answer_token_loss"]),
            dict(metric="loss on prompt tokens (easy)", value=s["prompt_token_loss"])]
    rows += [dict(metric=f"exact match: {task}", value=f"{acc:.0%}") for task, acc in s["exact_match"].items()]
    head = (f"\n## dyndepth demo: {s['model_params'] / 1e6:.2f}M-parameter Qwen3-shaped model, "
            f"{s['steps']} steps in {s['train_seconds']:.0f}s on CPU\n\n")
    samples = "\n".join(f"  [{x['task']}] {x['prompt']}{x['generated']}   (expected {x['answer']})"
                        for x in s["samples"][:8])
    files = f"\n\nwrote {out / 'results.json'}, {out / 'loss.png'}, {out / 'samples.txt'}"
    return head + markdown_table(rows, ["metric", "value"]) + "\n\nsample generations:\n" + samples + files
