"""Dreamer evaluation: quality against depth, expert-selection statistics and the per-step expert usage.

Depth knobs (ours, not the paper's): `steps` runs more or fewer recurrences than training did, `exit_kl` stops a
token once its next-token distribution moves less than the threshold between successive steps. Each setting
reports validation loss, exact match on the synthetic tasks (greedy generation with the same knobs, so the
cached decode path exits too), the average depth per token and the FLOPs per token that ran (executed) and that
the exits require (ideal).

    python -m dyndepth.eval.dreamer runs/dreamer_tiny_cpu        # a `dyndepth train` run folder

reads the run's config.yaml (its data section) and the exported model/ with the tokenizer saved beside it (the ids
the run trained on), and writes dreamer_study.json, quality_vs_depth.png and expert_usage.png to the run folder (or
--out).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dyndepth import jsonio
from dyndepth.bench.timing import markdown_table
from dyndepth.data.build import build_loader, build_tokenizer, holds_out, resolve_data_config
from dyndepth.data.synthetic import TASKS, exact_match, make_examples
from dyndepth.eval.tasks import generate_answers
from dyndepth.interop.hf import from_pretrained
from dyndepth.plots import plot_expert_usage, plot_quality_vs_depth
from dyndepth.runconfig import load_run_config
from dyndepth.tokenizer import ByteTokenizer, for_vocab, load_tokenizer
from dyndepth.train.run import check_out_dir

SYNTHETIC_SOURCES = ("synthetic", "embedded")


class SetCounts:
    """Diversity definition (b) over a corpus, as the spec defines it: per application (step, or MoE layer), the
    entropy (nats) of the distribution of selected top-k sets over every token of every batch added; mean over the
    applications that ran a token. (A forward's `dreamer/expert_set_entropy` is the same over its own batch.)"""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()  # (application, set) -> tokens

    def add(self, sets_ANK: torch.Tensor) -> None:
        """Sorted sets (A, N, K) of N tokens at A applications; rows of -1 (tokens that did not run) are skipped."""
        A, N, K = sets_ANK.shape
        app = torch.arange(A, device=sets_ANK.device)[:, None, None].expand(A, N, 1)
        rows = torch.cat([app, sets_ANK.sort(-1).values], -1)[sets_ANK[..., 0] >= 0]  # (M, 1 + K)
        unique, counts = torch.unique(rows, dim=0, return_counts=True)
        self.counts.update({tuple(r): c for r, c in zip(unique.tolist(), counts.tolist())})

    def entropy(self) -> float | None:
        per_app: dict = collections.defaultdict(list)
        for (a, *_), c in self.counts.items():
            per_app[a].append(c)
        if not per_app:
            return None
        entropies = []
        for counts in per_app.values():
            total = sum(counts)
            entropies.append(-sum(c / total * math.log(c / total) for c in counts))
        return sum(entropies) / len(entropies)


@torch.no_grad()
def forward_report(model, batches: list[dict]) -> dict:
    """Token-weighted validation loss, average depth, FLOPs per valid token and expert statistics over `batches`
    (dicts with input_ids and labels), at the model's current knobs, as evaluation forwards (eval mode)."""
    was_training = model.training
    model.eval()  # training forwards skip the state-change statistic
    try:
        return _forward_report(model, batches)
    finally:
        model.train(was_training)


def _forward_report(model, batches: list[dict]) -> dict:
    sums = {"nll": 0.0, "labels": 0, "tokens": 0.0, "depth": 0.0, "executed": 0.0, "ideal": 0.0, "diversity": 0.0}
    usage, sets, change = 0, SetCounts(), 0
    for batch in batches:  # as the trainer's eval: packed documents (data.intra_doc_mask) attend within themselves,
        # and the padding after whole documents (data.packing="documents") is no token of the report
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), positions=batch.get("positions"),
                    doc_ids=batch.get("doc_ids"))
        labels = batch["labels"]
        sums["nll"] += float(F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), reduction="sum",
                                             ignore_index=-100))
        sums["labels"] += int((labels != -100).sum())
        st, n = out.stats, float(out.stats["tokens/valid"])
        sums["tokens"] += n
        sums["depth"] += float(st["dreamer/avg_depth"]) * n
        sums["executed"] += float(st["flops/executed"])
        sums["ideal"] += float(st["flops/ideal"])
        change = change + st["dreamer/state_change"] / len(batches)
        if "dreamer/expert_usage" in st:
            usage = usage + st["dreamer/expert_usage"]
            sums["diversity"] += float(st["dreamer/expert_diversity"]) * n
            sets.add(st["dreamer/expert_sets"])
    n = max(sums["tokens"], 1.0)
    report = {"val_loss": sums["nll"] / max(sums["labels"], 1), "avg_depth": sums["depth"] / n,
              "flops_executed": sums["executed"] / n, "flops_ideal": sums["ideal"] / n,
              "state_change": [round(float(c), 4) for c in change]}
    if torch.is_tensor(usage):  # a model with experts
        report.update(expert_diversity=sums["diversity"] / n, expert_set_entropy=sets.entropy(),
                      expert_usage=usage)
    return report


def depth_sweep(model, tokenizer, examples, batches: list[dict], settings: list[tuple[str, int | None, float | None]],
                ) -> list[dict]:
    """One row per (label, steps, exit_kl) setting: `forward_report` plus exact match on `examples` (if any)."""
    rows = []
    for label, steps, exit_kl in settings:
        with model.override(steps=steps, exit_kl=exit_kl):
            row = {"label": label, "steps": model.num_steps, "exit_kl": exit_kl, **forward_report(model, batches)}
            if examples:
                accuracy = exact_match(examples, generate_answers(model, tokenizer, examples))
                row.update(exact_match=accuracy["overall"], per_task=accuracy)
        row.pop("expert_usage", None)
        rows.append(row)
    return rows


def run_study(run_dir: str | Path, out_dir: str | Path | None = None, examples_per_task: int = 40,
              num_batches: int = 8, exit_kls: tuple[float, ...] = (0.1, 0.03, 0.01, 0.003)) -> dict:
    if num_batches < 1:  # (a mean over no batch)
        raise ValueError(f"--batches must be >= 1 (validation batches), got {num_batches}.")
    if examples_per_task < 0:
        raise ValueError(f"--examples must be >= 0 (0: no exact match), got {examples_per_task}.")
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "model").is_dir():
        hint = f"; {run_dir} is an exported model: pass its run folder" if (run_dir / "config.json").is_file() else ""
        raise FileNotFoundError(f"{run_dir} is not a finished `dyndepth train` run folder (config.yaml and model/)"
                                f"{hint}.")
    out = Path(out_dir) if out_dir is not None else run_dir
    check_out_dir(out, "--out", "the study's results")  # (a file there stopped it with a FileExistsError traceback)
    rc = load_run_config(run_dir / "config.yaml")
    model = from_pretrained(run_dir / "model").eval()
    if model.config.model_type != "dreamer":
        raise ValueError(f"{run_dir} trained a {model.config.model_type!r} model; the Dreamer study needs a Dreamer "
                         "run (a recipe with [model] type = \"dreamer\", e.g. recipes/dreamer_tiny_cpu.toml).")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = for_vocab(run_tokenizer(run_dir, rc.data), model.config.vocab_size)  # (generation may sample a
    # padded vocabulary's ids)
    if not rc.eval.get("enabled", True) and holds_out(rc.data):
        raise ValueError(f"{run_dir} trained with eval.enabled=false on all of {rc.data.get('source')!r}: it has no "
                         "held-out text to score; train with evaluation on, or set data.val_source.")
    data_tokenizer = ByteTokenizer() if isinstance(tokenizer, ByteTokenizer) else tokenizer  # (the same ids, the
    # training's shard cache: the export widens a byte tokenizer to the model's padded vocabulary)
    val = build_loader(rc.data, split="val", batch_size=rc.train.batch_size, seq_len=rc.train.seq_len,
                       seed=rc.train.seed, tokenizer=data_tokenizer)
    batches = [val.next_batch() for _ in range(min(num_batches, val.batches_per_epoch))]  # one pass at most (as the
    # trainer's evaluation): more batches than the split holds served its windows twice, weighting them double
    examples = []
    if rc.data.get("source", "embedded") in SYNTHETIC_SOURCES:
        tasks = list(resolve_data_config(rc.data)["tasks"] or TASKS)  # (a --set data.tasks=add,mul: a string)
        examples = make_examples(tasks, examples_per_task * len(tasks), seed=1, difficulty=rc.data.get("difficulty"),
                                 split="val")
    R = model.config.num_recurrences
    steps = sorted({max(1, R // 2), max(1, R - 1), R, R + 2, 2 * R})
    settings = [(f"R={s}" + (" (trained)" if s == R else ""), s, None) for s in steps]
    settings += [(f"exit KL<{kl:g}", None, kl) for kl in exit_kls]
    rows = depth_sweep(model, tokenizer, examples, batches, settings)
    trained = forward_report(model, batches)
    result = {"run": str(run_dir), "model_params": model.num_params(), "num_recurrences": R,
              "layers_per_group": model.config.layers_per_group, "rows": rows,
              "expert_diversity": trained.get("expert_diversity"),
              "expert_set_entropy": trained.get("expert_set_entropy"), "state_change": trained["state_change"]}
    if "expert_usage" in trained:
        plot_expert_usage(trained["expert_usage"], out / "expert_usage.png",
                          layers_per_group=model.config.layers_per_group)
        result["expert_usage"] = trained["expert_usage"].tolist()
    plot_quality_vs_depth(rows, out / "quality_vs_depth.png")
    (out / "dreamer_study.json").write_text(jsonio.dumps(result, indent=2) + "\n")
    return result


def run_tokenizer(run_dir: Path, data: dict):
    """The tokenizer a run trained with: the one exported beside its model (run_dir/model), else the one its data
    section names, unless that is a "bpe:N" (which would train a BPE on the source as it is now, maybe another)."""
    try:
        return load_tokenizer(run_dir / "model")
    except FileNotFoundError:  # (an export that found no tokenizer warned so)
        name = str(data.get("tokenizer", "byte"))
        if name.startswith("bpe:"):
            raise ValueError(f"{run_dir / 'model'} has no tokenizer (tokenizer.json), and the run's data.tokenizer="
                             f"{name!r} cannot be rebuilt to the same ids: save the run's BPE there (the run's "
                             "data cache_dir/tokenizers/ holds it) and rerun.") from None
        return build_tokenizer(data)


def render(result: dict) -> str:
    cols = ["label", "avg_depth", "val_loss", "exact_match", "flops_ideal", "flops_executed"]
    rows = [{**r, "exact_match": "-" if r.get("exact_match") is None else f"{r['exact_match']:.1%}",
             "flops_ideal": f"{r['flops_ideal'] / 1e6:.2f}M", "flops_executed": f"{r['flops_executed'] / 1e6:.2f}M"}
            for r in result["rows"]]
    tasks = [t for t in TASKS if any(t in r.get("per_task", {}) for r in result["rows"])]
    for row, r in zip(rows, result["rows"]):
        row.update({t: f"{r['per_task'][t]:.0%}" for t in tasks})
    G = result.get("layers_per_group", 1)  # a group of G layers: one change per layer application, R * G of them
    per = "step" if G == 1 else f"layer application (step r, layer g at r * {G} + g)"
    tail = (f"\n\nexpert diversity (distinct experts per token / min(k R, E)): {result['expert_diversity']}; "
            f"expert-set entropy per step (nats): {result['expert_set_entropy']}; relative state change per {per}: "
            f"{result['state_change']}")
    return markdown_table(rows, cols + tasks) + tail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a `dyndepth train` output folder (config.yaml and model/)")
    parser.add_argument("--out", default=None, help="output folder (default: the run folder)")
    parser.add_argument("--examples", type=int, default=40, help="evaluation examples per task")
    parser.add_argument("--batches", type=int, default=8, help="validation batches for the loss")
    args = parser.parse_args(argv)
    try:
        result = run_study(args.run_dir, args.out, args.examples, args.batches)
    except (ValueError, FileNotFoundError) as e:  # one line, as the dyndepth CLI prints (DYNDEPTH_DEBUG=1: trace)
        if os.environ.get("DYNDEPTH_DEBUG", "") not in ("", "0"):
            raise
        sys.exit(f"error: {e}")
    print(render(result))


if __name__ == "__main__":
    main()
