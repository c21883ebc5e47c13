"""`dyndepth repro BASE --data-dir DIR --train-data FILE`: every method's quality against its compute, from one
pretrained base, in one report (REPORT.md + PNG plots in the output folder).

From the base (`recipes/base_cpu.toml`'s exported model), each contender post-trains the same steps on the
same batches of the training text (`bench/compare.py`): the plain fine-tune (SFT), GateSkip with vector
gates and with low-rank gates, Mixture-of-Depths at two capacities, and DND. Every setting is scored with
causal decisions on (a) the offline lm-eval tasks in DIR (accuracy, with chance level) and (b) the loss on
held-out text, and measured by the one compute report: executed FLOPs per token relative to the base
(gates, routers and nested passes included), and a forward's latency. The report then checks each paper's
headline claim against the numbers:

- GateSkip: >90% of the baseline's accuracy at 15% compute saved, counting the gates' own work;
- vector against low-rank gates, and GateSkip against MoD, at equal total compute (interpolated along
  the GateSkip curve);
- DND: better than the identically configured SFT at equal tokens, at a small overhead;
- Dreamer (with `study`: a `dyndepth study tokens` output folder): 2-8x fewer training tokens than its matched
  baselines for the same accuracy, and 2-11x larger expert-selection diversity than the MoE baselines.

Profiles: `cpu` (under an hour on 2 cores for the ~7M base) and `quick` (a smoke run, minutes, for tests).
"""

from __future__ import annotations

import datetime
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dyndepth import jsonio
from dyndepth.bench.compare import Contender, causal, compare, latency_ratio, slug
from dyndepth.bench.timing import machine_description, markdown_table
from dyndepth.data.build import HELD_OUT, build_loader
from dyndepth.eval.run import score_tasks
from dyndepth.runconfig import TrainConfig
from dyndepth.tokenizer import load_tokenizer
from dyndepth.train.parallel import DistInfo
from dyndepth.train.trainer import evaluate

PROFILES = {
    "cpu": dict(post_steps=150, batch_size=16, seq_len=256, limit=200, val_batches=16,
                tasks=["piqa", "arc_easy", "hellaswag", "winogrande", "copa"]),
    "quick": dict(post_steps=2, batch_size=2, seq_len=32, limit=4, val_batches=1, tasks=["copa"],
                  budgets=[0.0, 0.15], mod_capacities=[0.5]),
}


ACCURACY_TASKS = {"arc_challenge", "arc_easy", "boolq", "commonsense_qa", "copa", "hellaswag", "lambada",
                  "openbookqa", "piqa", "siqa", "winogrande", "wsc273"}  # the offline tasks with acc / acc_norm


@dataclass
class ReproConfig:
    base: str  # a checkpoint folder with its tokenizer.json (the base recipe's out_dir/model)
    data_dir: str  # the offline lm-eval task files (../shared/data)
    train_data: str  # post-training text, e.g. ../shared/data/corpus/gutenberg/gutenberg_00.txt.gz
    val_data: str = ""  # held-out text for the loss (e.g. gutenberg_03); empty: 1% of train_data's documents (of one
    # document: the last tenth of its text)
    text_split: str = "eot"  # how train_data / val_data split into documents (see data/build.py)
    cache_dir: str = "runs/data"  # token shards (shared with the base run, which tokenized the same text)
    out_dir: str = "runs/repro"
    profile: str = "cpu"
    post_steps: int = 150
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-4
    tasks: list[str] = field(default_factory=lambda: ["piqa", "arc_easy"])
    limit: int | None = 200  # examples per task
    val_batches: int = 16
    budgets: list[float] = field(default_factory=lambda: [0.0, 0.15, 0.3, 0.5])
    lowrank: int = 16  # the low-rank gate's rank
    mod_capacities: list[float] = field(default_factory=lambda: [0.5, 0.125])
    dnd_ratio: float = 0.2
    study: str = ""  # a `dyndepth study tokens` output folder (study.json): Dreamer against its matched baselines

    def __post_init__(self) -> None:  # before any shard is written or the base is scored
        for name in ("post_steps", "batch_size", "seq_len", "val_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"repro {name} must be >= 1, got {getattr(self, name)}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"repro limit must be >= 1 example per task (or None: every example), got {self.limit}.")
        scored = [t for t in self.tasks if t not in ACCURACY_TASKS]
        if not self.tasks or scored:
            raise ValueError(f"repro scores accuracy (acc / acc_norm) on {scored or 'no task'}: give tasks among "
                             f"{sorted(ACCURACY_TASKS)} (gsm8k's exact match goes through `dyndepth eval`).")
        if not (Path(self.base) / "config.json").is_file():  # (it was named as a missing tokenizer path)
            raise ValueError(f"repro BASE {self.base!r} is not a model folder (no config.json): give the base run's "
                             "exported model, its train.out_dir/model.")
        if not Path(self.data_dir).is_dir():  # (checked when the base was scored, after the text was tokenized)
            raise ValueError(f"repro --data-dir {self.data_dir!r} is not a folder: give the folder of the offline "
                             "task files (../shared/data).")
        from dyndepth.train.run import check_out_dir  # (a file there: a FileExistsError traceback when tokenizing)

        check_out_dir(self.cache_dir, "repro --cache-dir", "the token shards", read_only_ok=True)  # (the base run's
        # shards may be only read)
        check_out_dir(self.out_dir, "repro --out", "the report")
        if self.study and not (Path(self.study) / "study.json").is_file():  # (read only as the report was written,
            # after every contender had trained and been scored: the error came instead of results.json)
            raise ValueError(f"repro --study {self.study!r} has no study.json; run `dyndepth study tokens --out "
                             f"{self.study}` first, or leave --study out.")

    @classmethod
    def from_profile(cls, profile: str, **kw) -> ReproConfig:
        if profile not in PROFILES:
            raise ValueError(f"repro profile {profile!r} is not one of {sorted(PROFILES)}.")
        return cls(profile=profile, **{**PROFILES[profile], **{k: v for k, v in kw.items() if v is not None}})


def contenders(cfg: ReproConfig, num_layers: int) -> list[Contender]:
    quarter = num_layers // 4  # DND's band: the middle half of the layers
    gates = {"name": "gateskip", "penalty": 1.0, "ramp_end": 0.2}
    return [
        Contender("SFT", {"name": "none"}),
        Contender("GateSkip vector", gates, [{"budget": q} for q in cfg.budgets]),
        Contender("GateSkip low-rank", {**gates, "gate": "lowrank", "rank": cfg.lowrank},
                  [{"budget": q} for q in cfg.budgets]),
        *[Contender(f"MoD c={c:.1%}", {"name": "mod", "capacity": c}) for c in cfg.mod_capacities],
        Contender(f"DND {cfg.dnd_ratio:.0%}", {"name": "dnd", "layers": [quarter, num_layers - 1 - quarter],
                                                 "ratio": cfg.dnd_ratio}),
    ]


def run_repro(cfg: ReproConfig) -> dict:
    import dyndepth

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()
    tok = load_tokenizer(cfg.base)
    data = {"source": cfg.train_data, "val_source": cfg.val_data, "tokenizer": cfg.base, "text_split": cfg.text_split,
            "cache_dir": cfg.cache_dir}
    kw = dict(batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=0, tokenizer=tok)
    loader, val_loader = build_loader(data, split="train", **kw), build_loader(data, split="val", **kw)
    probe_ids = build_loader(data, split="val", **kw).next_batch()["input_ids"]  # (B, T)
    probe = (probe_ids, torch.ones_like(probe_ids))
    calibration = calibration_batches(data, kw)
    base = dyndepth.from_pretrained(cfg.base)
    steps = iter(range(1, 10_000))

    def progress(text: str) -> None:
        print(f"[repro {next(steps)}] {text}  ({time.perf_counter() - t0:.0f}s)", flush=True)

    scorer = _scorer(cfg, tok, val_loader)
    rows, models = compare(cfg.base, contenders(cfg, base.config.num_hidden_layers), loader,
                           lambda label: _train_config(cfg, out / "runs" / slug(label)), scorer, probe,
                           calibration, progress)
    _time_dnd_against_sft(rows, models, probe, calibration)
    plots = _plots(cfg, rows, models, tok, calibration, out)
    result = {"config": asdict(cfg), "machine": machine_description(torch.device("cpu")),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "base_params": base.num_params(), "rows": rows, "plots": plots,
              "val_batches_scored": min(cfg.val_batches, val_loader.batches_per_epoch),  # (evaluate: one pass at most)
              "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1)}
    return write_report(result, out, cfg.study)


def calibration_batches(data: dict, kw: dict, n: int = 2) -> list[torch.Tensor]:
    """`n` training batches (B, T) of another shuffle than the training run's, for GateSkip's thresholds: from one
    loader (a loader per batch gave its first batch n times)."""
    draws = build_loader(data, split="train", **{**kw, "seed": 1})
    return [draws.next_batch()["input_ids"] for _ in range(n)]


def write_report(result: dict, out: Path, study: str = "") -> dict:
    """The claims (and with `study`, Dreamer's section) from a run's rows, then results.json and REPORT.md."""
    result["claims"] = claims(result["rows"])
    if study:
        result["study"] = dreamer_study(Path(study), out)
        result["claims"] += result["study"]["claims"]
        result["plots"].update(result["study"]["plots"])
    (out / "results.json").write_text(jsonio.dumps(result, indent=2, default=str) + "\n")  # strict: NaN as null
    report = render(result)
    (out / "REPORT.md").write_text(report + "\n")
    print(report)
    return result


def rerender(out_dir: str, study: str = "") -> dict:
    """REPORT.md of a finished run again from its results.json, with this version's claims and report (no
    training, no scoring)."""
    out = Path(out_dir)
    path = out / "results.json"
    if not path.exists():
        raise ValueError(f"repro --render-only: {out} has no results.json; run `dyndepth repro` into it first.")
    result = json.loads(path.read_text())
    result["rows"] = [jsonio.numbers(r, ROW_NUMBERS) for r in result["rows"]]  # (null: a NaN loss, as written)
    result.pop("study", None)
    result["plots"] = {k: v for k, v in result.get("plots", {}).items() if not k.startswith("study ")}
    return write_report(result, out, study or result.get("config", {}).get("study", ""))  # the run's study by default


def _train_config(cfg: ReproConfig, out: Path) -> TrainConfig:
    return TrainConfig(steps=cfg.post_steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
                       min_lr=cfg.lr / 10, warmup=max(1, cfg.post_steps // 10), log_every=10, out_dir=str(out),
                       device="cpu", keep_last=1)


def _scorer(cfg: ReproConfig, tok, val_loader):
    """Accuracy per offline task (lm-eval) with chance, their mean, and the held-out loss."""
    tcfg = TrainConfig(eval_batches=cfg.val_batches, device="cpu")

    def scorer(model) -> dict:
        tasks = {}
        for r in score_tasks(model, tok, cfg.tasks, cfg.data_dir, cfg.limit, batch_size=cfg.batch_size):
            if r.metric in ("acc", "acc_norm"):
                tasks.setdefault(r.task, {})[r.metric] = {"value": r.value, "stderr": r.stderr, "chance": r.chance,
                                                          "n": r.n}
        accs = [t[_headline(t)]["value"] for t in tasks.values()]
        chance = [t[_headline(t)]["chance"] or 0.0 for t in tasks.values()]
        val_loss = evaluate(model, val_loader, cfg.val_batches, tcfg, DistInfo())
        return {"tasks": tasks, "accuracy": sum(accs) / len(accs), "chance": sum(chance) / len(chance),
                "val_loss": val_loss, "perplexity": math.exp(val_loss)}
    return scorer


def _headline(task: dict) -> str:
    return "acc_norm" if "acc_norm" in task else "acc"


# ------------------------------------------------------------------------------------------- claims

def _series(rows: list[dict], method: str, gate: str | None = None) -> list[dict]:
    pts = [r for r in rows if r["method"] == method and (gate is None or r["label"].split(" q=")[0].endswith(gate))]
    return sorted(pts, key=lambda r: r["compute"])


def interpolate(pts: list[dict], compute: float, key: str) -> float | None:
    """`key` along a curve of rows sorted by compute, linearly at `compute`; None outside its range."""
    for a, b in zip(pts, pts[1:]):
        if a["compute"] <= compute <= b["compute"]:
            w = 0.0 if b["compute"] == a["compute"] else (compute - a["compute"]) / (b["compute"] - a["compute"])
            return a[key] + w * (b[key] - a[key])
    return None


ROW_NUMBERS = ("accuracy", "chance", "val_loss", "perplexity", "compute", "ideal_compute", "latency", "latency_vs_sft")
MARGIN = 0.01  # nats of held-out loss: a smaller difference is a tie, and a tie beats nothing
DND_SMALL_OVERHEAD = 0.15  # "a small overhead": the paper's +6.3% FLOPs, the spec's 7-12% for attention-heavy shapes


def claims(rows: list[dict]) -> list[dict]:
    """Each paper's headline claim, measured: {"claim", "measured", "holds": True | False | None (untestable)}.
    "A beats B" needs A's held-out loss lower by more than MARGIN."""
    base, vector = rows[0], _series(rows, "gateskip", "vector")
    lowrank = _series(rows, "gateskip", "low-rank")
    found = [_gateskip_claim(base, vector), _gate_kind_claim(vector, lowrank)]
    found += [_mod_claim({"vector": vector, "low-rank": lowrank}, mod) for mod in rows if mod["method"] == "mod"]
    found.append(_dnd_claim(next((r for r in rows if r["method"] == "none"), None),
                            next((r for r in rows if r["method"] == "dnd"), None)))
    return [c for c in found if c is not None]


def _gateskip_claim(base: dict, vector: list[dict]) -> dict | None:
    at15 = next((r for r in vector if r["knobs"].get("budget") == 0.15), None)
    if at15 is None:
        return None
    kept = at15["accuracy"] / base["accuracy"] if base["accuracy"] else float("nan")
    testable = base["accuracy"] - base["chance"] > 0.02
    measured = (f"q=15%: accuracy {at15['accuracy']:.1%} vs base {base['accuracy']:.1%} ({kept:.0%} kept; chance "
                f"{base['chance']:.1%}) at {at15['compute']:.0%} of the base's FLOPs (gates included), so "
                f"{1 - at15['compute']:.0%} saved; held-out loss {at15['val_loss']:.3f} vs {base['val_loss']:.3f}")
    return {"claim": "GateSkip keeps >90% of the baseline's accuracy at 15% compute saved", "measured": measured,
            "holds": (kept > 0.9 and at15["compute"] <= 0.85) if testable else None}


def _gate_kind_claim(vector: list[dict], lowrank: list[dict]) -> dict | None:
    if not vector or not lowrank:
        return None
    claim = "ours: low-rank gates beat vector gates at equal total compute (held-out loss)"
    pairs = [(r["compute"], r["val_loss"], interpolate(vector, r["compute"], "val_loss")) for r in lowrank]
    pairs = [p for p in pairs if p[2] is not None]
    if not pairs:  # untestable here, said so (the row was dropped)
        span = lambda rows: f"{min(r['compute'] for r in rows):.0%}-{max(r['compute'] for r in rows):.0%}"  # noqa: E731
        return {"claim": claim, "holds": None, "measured": f"the curves do not overlap in compute (low-rank "
                f"{span(lowrank)}, vector {span(vector)} of the base's FLOPs): untestable here"}
    measured = "; ".join(f"at {c:.0%}: low-rank {lo:.3f} vs vector {vec:.3f}" for c, lo, vec in pairs)
    return {"claim": claim, "measured": measured,
            "holds": sum(vec - lo > MARGIN for _, lo, vec in pairs) > len(pairs) / 2}


def _mod_claim(gateskip: dict[str, list[dict]], mod: dict) -> dict:
    """GateSkip's held-out loss at MoD's compute: the best gate kind among those whose measured range covers it."""
    at = {kind: interpolate(series, mod["compute"], "val_loss") for kind, series in gateskip.items()}
    kind, gs = min(((k, v) for k, v in at.items() if v is not None), key=lambda kv: kv[1], default=(None, None))
    where = "GateSkip outside its measured range" if gs is None else f"GateSkip ({kind} gates) {gs:.3f}"
    measured = f"at {mod['compute']:.0%} of the base's FLOPs: MoD held-out loss {mod['val_loss']:.3f}, {where}"
    return {"claim": f"GateSkip beats MoD at equal compute ({mod['label']})", "measured": measured,
            "holds": None if gs is None else mod["val_loss"] - gs > MARGIN}


def _time_dnd_against_sft(rows: list[dict], models: dict, probe: tuple, calibration: list) -> None:
    """The DND row's `latency_vs_sft`: its probe forward's time over the SFT model's, the two interleaved in one loop
    (each row's `latency` is timed against the base at its own moment: a ratio of those two moved with the machine)."""
    sft = next((r for r in rows if r["method"] == "none" and r["label"] in models), None)
    dnd = next((r for r in rows if r["method"] == "dnd" and r["label"] in models), None)
    if sft is None or dnd is None:
        return
    with causal(models[dnd["label"]], dnd["knobs"], calibration):
        dnd["latency_vs_sft"] = latency_ratio(models[dnd["label"]], models[sft["label"]], probe)


def _dnd_claim(sft: dict | None, dnd: dict | None) -> dict | None:
    if sft is None or dnd is None:
        return None
    overhead = dnd["compute"] / sft["compute"] - 1
    # timed side by side; (a report written before: each row's ratio to the base, timed in turn with it)
    slower = dnd.get("latency_vs_sft", dnd["latency"] / sft["latency"]) - 1
    at_chance = sft["accuracy"] - sft["chance"] <= 0.02  # accuracy says nothing there (as for GateSkip's claim)
    measured = (f"accuracy {dnd['accuracy']:.1%} vs {sft['accuracy']:.1%}{' (at chance: not judged)' * at_chance}, "
                f"held-out loss {dnd['val_loss']:.3f} vs {sft['val_loss']:.3f}; FLOP overhead {overhead:+.1%} "
                f"(small: <= {DND_SMALL_OVERHEAD:.0%}), latency {slower:+.0%}")
    better = sft["val_loss"] - dnd["val_loss"] > MARGIN and (at_chance or dnd["accuracy"] >= sft["accuracy"])
    return {"claim": "DND beats the identically configured SFT at equal tokens, at a small overhead",
            "measured": measured, "holds": better and overhead <= DND_SMALL_OVERHEAD}


def dreamer_study(folder: Path, out: Path) -> dict:
    """Dreamer against its matched baselines, from a `dyndepth study tokens` folder: its tables (rendered by
    bench/study.py), its plots (copied into `out`) and the paper's two claims checked against its numbers."""
    import shutil

    from dyndepth.bench.study import read_study
    from dyndepth.bench.study import render as render_study

    path = folder / "study.json"
    if not path.exists():
        raise ValueError(f"repro study={str(folder)!r} has no study.json; run `dyndepth study tokens --out "
                         f"{folder}` first, or leave --study out.")
    study = read_study(path)
    plots = {}
    for name in ("accuracy_vs_tokens.png", "text_loss_vs_tokens.png"):
        if (folder / name).exists():
            plots[f"study {name[:-4].replace('_', ' ')}"] = str(shutil.copy(folder / name, out / f"study_{name}"))
    return {"table": render_study(study), "claims": _study_claims(study), "plots": plots}


def _study_claims(study: dict) -> list[dict]:
    """The paper's two Dreamer claims against the study's numbers.

    Tokens: at every reference budget b up to half the largest (where a 2x ratio fits inside the baselines'
    curves), the tokens a baseline needs for the reference's exact match / b must be >= 2 ("=x" with x >= 2, or
    "> x" with x >= 2); "<= x" or a ratio under 2 refutes; "> x" with x < 2 is inconclusive. Diversity: the
    effective number of selected expert sets, exp(entropy) (definition b), of the reference over each MoE-family
    baseline's, >= 2."""
    budgets = [p["tokens"] for p in study["curves"]["reference"]]
    verdicts, cells = {}, {}
    for name, row in study["ratios"].items():
        seen = [(b, c) for b, c in zip(budgets, row) if 2 * b <= budgets[-1] and c != "-"]
        cells[name] = ", ".join(f"{c} at {b:g}" for b, c in seen) or "nothing measurable"
        kinds = [_ratio_verdict(c) for _, c in seen]
        verdicts[name] = None if not kinds or None in kinds and False not in kinds else False not in kinds
    matched = study.get("match", {})
    measured = "; ".join(f"{name} ({'matched' if matched.get(name, {}).get('within') else 'not matched'}): "
                         f"{cells[name]}" for name in cells)
    values = list(verdicts.values())
    holds = False if False in values else (None if None in values or not values else True)
    found = [{"claim": "Dreamer needs 2-8x fewer training tokens than matched baselines for the same accuracy",
              "measured": "tokens a baseline needs for the reference's exact match / the reference's tokens, at "
                          f"budgets up to half the largest: {measured}", "holds": holds}]
    curves = study["curves"]
    ref = curves["reference"][-1].get("expert_set_entropy")
    moes = {k: c[-1]["expert_set_entropy"] for k, c in curves.items() if k in ("moe", "moeut")
            and c[-1].get("expert_set_entropy") is not None}
    if ref is not None and moes:
        ratio = {k: math.exp(ref) / math.exp(v) for k, v in moes.items()}
        experts = study.get("experts", {})
        same = all(experts.get(k) is not None and experts.get(k) == experts.get("reference") for k in moes)
        bounds = ", ".join(f"{k} C({e}, {n}) = {math.comb(e, n)}" for k, (e, n) in experts.items())
        pooled = curves["reference"][-1].get("set_entropy_over") == "corpus"  # studies before 2026-12-05: batches
        found.append({"claim": "Dreamer's expert-selection diversity is 2-11x the MoE baselines'",
                      "measured": f"effective number of selected expert sets exp(H) (definition b, "
                                  f"{'over the validation set' if pooled else 'a mean of per-batch figures'}): "
                                  f"reference "
                                  f"{math.exp(ref):.1f} vs " + ", ".join(f"{k} {math.exp(moes[k]):.1f} "
                                                                          f"({ratio[k]:.2f}x)" for k in moes)
                                  + f"; each is bounded by its number of possible sets ({bounds or 'unknown'})",
                      # a ratio says something only between models with as many possible sets
                      "holds": all(r >= 2 for r in ratio.values()) if same else None})
    return found


def _ratio_verdict(cell: str) -> bool | None:
    """One tokens-to-accuracy cell: True (>= 2x), False (< 2x, or already there at the first budget), None
    (the baseline never got there within its largest budget, which is under 2x)."""
    if cell.startswith("<="):
        return False
    if cell.startswith(">"):
        return True if float(cell[1:]) >= 2 else None
    return float(cell) >= 2


# -------------------------------------------------------------------------------------------- plots

def _plots(cfg: ReproConfig, rows: list[dict], models: dict, tok, calibration, out: Path) -> dict:
    from dyndepth.methods.dnd_analysis import selection_heatmap
    from dyndepth.plots import compute_heatmap, mod_heatmap, plot_methods

    series = [dict(r, method=_series_name(r)) for r in rows]
    chance = rows[0]["chance"]
    plots = {"accuracy": plot_methods(series, out / "accuracy_vs_compute.png", chance=chance,
                                      title="mean accuracy of the offline tasks vs compute", ylabel="accuracy (%)",
                                      metric="accuracy"),
             "loss": plot_methods(series, out / "loss_vs_compute.png", title="held-out loss vs compute",
                                  metric="val_loss", ylabel="held-out loss (nats/token)", scale=1.0)}
    text = tok.decode(calibration[0][0, :48].tolist())
    for label, model in models.items():
        if model.method is None:
            continue
        path = out / f"depth_{slug(label)}.png"
        if model.method.name == "gateskip":
            with causal(model, {"budget": max(cfg.budgets)}, calibration):
                plots[f"depth {label}"] = compute_heatmap(model, tok, text, path, add_bos=False)
        elif model.method.name == "dnd":
            plots[f"depth {label}"] = selection_heatmap(model, tok, text, path)
        elif model.method.name == "mod":
            with causal(model, {}, calibration):  # its predictor decides, as in generation
                plots[f"depth {label}"] = mod_heatmap(model, tok, text, path)
    return {k: str(v) for k, v in plots.items()}


SERIES = {"none": "SFT", "mod": "MoD", "dnd": "DND"}  # a plot legend's names, as the report's labels


def _series_name(row: dict) -> str:
    """A row's plot series: GateSkip's gate kind (its budgets joined by a line), else the method as labelled."""
    return row["label"].split(" q=")[0] if row["method"] == "gateskip" else SERIES.get(row["method"], row["method"])


# ------------------------------------------------------------------------------------------- report

def render(r: dict) -> str:
    c = r["config"]
    val = f"`{c['val_data']}`" if c["val_data"] else f"the training text's held-out part ({HELD_OUT})"
    scored = {t: m[_headline(m)]["n"] for t, m in r["rows"][0]["tasks"].items()}  # what each task had (COPA: 100)
    scored_tasks = ", ".join(f"{t} ({scored[t]})" if t in scored else t for t in c["tasks"])
    limit = f"at most {c['limit']} each" if c["limit"] else "every example"
    head = (f"# dyndepth repro: adaptive-depth methods from one base\n\n{r['date']}, {r['machine']}, "
            f"{r['seconds'] / 60:.0f} min end to end, {r['cpu_seconds'] / 60:.0f} min CPU (profile `{c['profile']}`; "
            "latencies are only comparable when the machine was not shared). Base: "
            f"`{c['base']}` "
            f"({r['base_params'] / 1e6:.1f}M parameters). Each contender post-trained {c['post_steps']} steps of "
            f"{c['batch_size']} x {c['seq_len']} tokens on `{c['train_data']}` (lr {c['lr']:g}); held-out loss on "
            f"{r.get('val_batches_scored', c['val_batches'])} batches of {val}; "
            f"accuracy on the offline lm-eval tasks {scored_tasks} (examples scored: {limit}; acc_norm "
            "where the task has it). compute = executed FLOPs per token / the base model's (gates, routers, nested "
            "passes included); ideal = what the routing needs; latency = the median time of a forward of one "
            f"held-out batch ({c['batch_size']} x {c['seq_len']} tokens) over the base model's, the two timed in "
            "turn (the base's row: itself, a control: its distance from 1 is the timing noise). Every decision is "
            "causal (GateSkip: thresholds calibrated at the budget; MoD: its predictor).\n\n")
    cols = ["model", "accuracy", "chance", "val_loss", "perplexity", "compute", "ideal_compute", "latency"]
    rows = [dict(r, model=r["label"], accuracy=f"{r['accuracy']:.1%}", chance=f"{r['chance']:.1%}",
                 compute=f"{r['compute']:.0%}", ideal_compute=f"{r['ideal_compute']:.0%}",
                 latency=f"{r['latency']:.2f}x") for r in r["rows"]]
    tasks = sorted({t for row in r["rows"] for t in row["tasks"]})
    per_task = [dict(model=row["label"], **{t: _task_cell(row["tasks"].get(t)) for t in tasks}) for row in r["rows"]]
    claims = [dict(claim=x["claim"], measured=x["measured"],
                   verdict={True: "reproduces", False: "**does not reproduce**", None: "untestable here"}[x["holds"]])
              for x in r["claims"]]
    plots = "\n".join(f"![{name}]({Path(p).name})" for name, p in r["plots"].items())
    return (head + "## Quality against compute\n\n" + markdown_table(rows, cols)
            + "\n\n## Accuracy per task (value ± stderr; chance)\n\n" + markdown_table(per_task, ["model", *tasks])
            + "\n\n## The papers' claims at this scale\n\n" + markdown_table(claims, ["claim", "measured", "verdict"])
            + "\n\nA claim is untestable here when the base model is within 2 points of chance on the tasks: "
              "retention of an accuracy at chance measures noise.\n\n"
            + ("" if "study" not in r else "## Dreamer against its matched baselines (`dyndepth study tokens`)\n\n"
               + r["study"]["table"] + "\n\n")
            + "## Plots\n\n" + plots)


def _task_cell(t: dict | None) -> str:
    if not t:
        return "-"
    m = t[_headline(t)]
    err = f" ± {m['stderr']:.1%}" if m["stderr"] is not None else ""
    return f"{m['value']:.1%}{err} ({m['chance']:.0%})" if m["chance"] is not None else f"{m['value']:.1%}{err}"
