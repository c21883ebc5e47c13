"""`dyndepth bench quality`: GateSkip against the Mixture-of-Depths baseline at equal compute.

Both methods post-train the same base checkpoint (the demo's `runs/demo/base_model` by default) for the
same steps on the same embedded data, then are scored on held-out data: validation loss and exact
match, each next to the FLOPs per token relative to the base model, both figures of the ledger: what ran
(executed: gates, routers, padding and masked attention pairs included) and what the routing allows
(ideal). MoD at capacity c on every other block costs about 1 - (1 - c) / 2 of the base, so c = 0.5 and
c = 0.125 sit near GateSkip at q = 0.3 and q = 0.5. Every score is causal (each token's decision reads
no later token): MoD is scored with its predictor (top-k over a sequence would look ahead), GateSkip with
per-branch thresholds calibrated at the budget (the batch quantile rule would rank against later tokens).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import dyndepth
from dyndepth.bench.compare import DEMO_DATA
from dyndepth.bench.timing import markdown_table, publish
from dyndepth.config import SUPPORTED_MODEL_TYPES
from dyndepth.data.build import build_loader, task_mix
from dyndepth.data.synthetic import exact_match, make_examples
from dyndepth.eval.tasks import generate_answers
from dyndepth.methods import calibrate
from dyndepth.runconfig import TrainConfig
from dyndepth.tokenizer import ByteTokenizer, encode_batch, load_tokenizer
from dyndepth.train.parallel import DistInfo
from dyndepth.train.run import build_hooks
from dyndepth.train.trainer import evaluate, train


@dataclass
class QualityBenchConfig:
    base: str = "runs/demo/base_model"  # a checkpoint trained on the embedded data (make demo writes it)
    steps: int = 120
    gateskip_budgets: list[float] = field(default_factory=lambda: [0.3, 0.5])
    mod_capacities: list[float] = field(default_factory=lambda: [0.5, 0.125])
    eval_examples: int = 40  # per task
    data: dict | None = None  # the [data] section; None: the demo's (the base model's training data)
    batch_size: int = 32  # post-training and validation windows: the demo base's training shape (positions and
    seq_len: int = 128  # packing the base never saw would inflate its validation loss, not the methods')
    out_dir: str = "runs/bench"

    def __post_init__(self) -> None:  # checked with the options, not after the base has been scored
        if self.steps < 1:
            raise ValueError(f"bench quality steps must be >= 1, got {self.steps}.")


def check_base(base: str) -> None:
    """The base is post-trained and scored on the embedded tasks read as bytes: a folder that is no checkpoint, or
    one whose own tokenizer is another (a GPT-2 BPE model), is refused (the latter trained and scored on byte ids
    its embeddings never saw, and printed a table of meaningless losses)."""
    if not (Path(base) / "config.json").exists():
        raise ValueError(f"{base} is not a checkpoint folder; run `make demo` first (it writes "
                         "runs/demo/base_model) or pass --base.")
    model_type = json.loads((Path(base) / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:  # (a Dreamer base trained the first contender, then failed to attach)
        raise ValueError(f"{base} is a {model_type!r} model; the methods attach to decoders "
                         f"({', '.join(SUPPORTED_MODEL_TYPES)}): pass --base a decoder trained on the embedded data.")
    try:
        tok = load_tokenizer(base)
    except FileNotFoundError:  # no tokenizer saved (make demo's base_model): bytes, as the demo trained it
        return
    if isinstance(tok, ByteTokenizer):
        return
    raise ValueError(f"{base} carries its own {type(tok).__name__} ({tok.vocab_size} ids), but the bench trains and "
                     "scores on the embedded tasks as bytes; pass --base a model trained on the embedded data with "
                     "the byte tokenizer (`make demo` writes runs/demo/base_model; or `dyndepth train "
                     "recipes/tiny_cpu.toml`, then its out_dir/model).")


def _data(cfg: QualityBenchConfig):
    data = cfg.data or DEMO_DATA  # the demo's data, so the base model's training set
    return data, data.get("difficulty") or None


def _posttrain(cfg: QualityBenchConfig, method: dict, out: Path):
    data, _ = _data(cfg)
    model = dyndepth.from_pretrained(cfg.base)
    tok = ByteTokenizer()
    loader = build_loader(data, split="train", batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=1, tokenizer=tok)
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=1e-3, min_lr=1e-4,
                       warmup=10, log_every=10, out_dir=str(out), device="cpu", progress=False, plot=False)
    torch.manual_seed(tcfg.seed)  # the method's new parameters: the same whatever ran before (as `run_training`)
    hooks = build_hooks(method, model, cfg.steps)
    shutil.rmtree(out, ignore_errors=True)  # this bench's own previous run
    train(model, loader, tcfg, hooks=hooks)
    return model.eval()


EVAL = TrainConfig(eval_batches=8, device="cpu")  # every row: the same 8 validation batches


def _score(model, label: str, examples, val_loader, probe, gen_kw: dict) -> dict:
    with torch.no_grad():
        val_loss = evaluate(model, val_loader, EVAL.eval_batches, EVAL, DistInfo())
        stats = model(probe).stats
    answers = generate_answers(model, ByteTokenizer(), examples, **gen_kw)
    per_token = {k: float(stats[f"flops/{k}"]) / float(stats["tokens/valid"]) for k in ("executed", "ideal")}
    return {"model": label, "flops_per_token": per_token["executed"], "ideal_flops_per_token": per_token["ideal"],
            "val_loss": val_loss, "exact_match": exact_match(examples, answers)["overall"]}


def held_out_examples(data: dict, per_task: int) -> list:
    """`per_task` held-out prompts of each task the base trained on, in turn: the training mix's weights (the
    demo's 2:1:1) drew 68 / 29 / 23 of 120, and the overall exact match leaned to the first task."""
    mix = dataclasses.replace(task_mix(data), weights=None)  # round-robin, as the demo's
    return make_examples(mix, per_task * len(mix.tasks), seed=1, split="val")


def base_val_loss(model, data: dict, cfg: QualityBenchConfig | None = None) -> float:
    """The validation loss every row is scored with: the first `EVAL.eval_batches` batches of the val split."""
    cfg = cfg or QualityBenchConfig()
    loader = build_loader(data, split="val", batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=0,
                          tokenizer=ByteTokenizer())
    return evaluate(model, loader, EVAL.eval_batches, EVAL, DistInfo())


def run_quality_bench(cfg: QualityBenchConfig) -> dict:
    check_base(cfg.base)
    data, _ = _data(cfg)
    tok = ByteTokenizer()
    val_kw = dict(split="val", batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=0, tokenizer=tok)
    val_loader = build_loader(data, **val_kw)
    probe = build_loader(data, **val_kw).next_batch()["input_ids"]  # a loader of its own: val_loader starts fresh
    mix = task_mix(data)  # the tasks the base was trained on, as weighted in training (for calibration)
    examples = held_out_examples(data, cfg.eval_examples)
    calib_texts = [e.text for e in make_examples(mix, 256, seed=2)]
    calib = [encode_batch(tok, calib_texts[i:i + 64]) for i in range(0, 256, 64)]
    out = Path(cfg.out_dir) / "quality_runs"

    base = dyndepth.from_pretrained(cfg.base).eval()
    rows = [_score(base, "base", examples, val_loader, probe, {})]

    gated = _posttrain(cfg, {"name": "gateskip", "ramp_end": 0.2}, out / "gateskip")
    for q in cfg.gateskip_budgets:
        calibrate(gated, calib, budget=q)
        with gated.method.decoding(budget=q):  # causal: per-token thresholds, no ranking against later tokens
            rows.append(_score(gated, f"GateSkip q={q:.0%}", examples, val_loader, probe, {"skip_budget": q}))
    for c in cfg.mod_capacities:
        mod = _posttrain(cfg, {"name": "mod", "capacity": c}, out / f"mod_{c}")
        with mod.method.override(mode="predictor"):
            rows.append(_score(mod, f"MoD c={c:.1%}", examples, val_loader, probe, {}))
    for r in rows:
        r["compute"] = r["flops_per_token"] / rows[0]["flops_per_token"]
        r["ideal_compute"] = r["ideal_flops_per_token"] / rows[0]["ideal_flops_per_token"]
    return {"config": asdict(cfg), "rows": rows}


def render_markdown(r: dict) -> str:
    c = r["config"]
    head = (f"### bench quality: GateSkip vs Mixture-of-Depths from {c['base']}, {c['steps']} post-training "
            "steps each\n\ncompute = FLOPs per token / the base model's: executed (what ran) and ideal (what the "
            "routing allows); causal scoring for both methods.\n\n")
    rows = [dict(r, compute=f"{r['compute']:.0%}", ideal_compute=f"{r['ideal_compute']:.0%}",
                 exact_match=f"{r['exact_match']:.1%}") for r in r["rows"]]
    return head + markdown_table(rows, ["model", "compute", "ideal_compute", "val_loss", "exact_match"])


def main(cfg: QualityBenchConfig) -> dict:
    result = run_quality_bench(cfg)
    return publish(result, render_markdown(result), cfg.out_dir, "quality-cpu")
