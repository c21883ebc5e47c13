"""`dyndepth study tokens`: the reference and its matched baselines trained on the same data and seeds, evaluated
at several token budgets; how many tokens each baseline needs for the reference's accuracy (Dreamer's headline
claim, ../shared/papers/dreamer.md §1 and §5).

1. `dyndepth match` builds the baselines (parameters, FLOPs/token and training memory within tolerance, or the
   residual mismatch reported) at the study's batch and sequence length.
2. Every model trains once per seed on the synthetic tasks (embedded data, byte tokenizer) up to the largest budget
   with a constant learning rate after warm-up, and is evaluated when it reaches each budget (a trainer hook):
   exact match on held-out prompts (greedy, KV cache), and validation loss. One run per model evaluated at its
   budgets, not one run per budget: a decaying schedule per budget would cost the sum of the budgets.
3. Tokens to accuracy: for each budget b of the reference (accuracy a), the tokens t a baseline needs to reach a on
   its own curve (running maximum over budgets, linear in log tokens between budgets); ratio = t / b. A baseline that
   never reaches a gives "> largest budget / b"; one that is already there at its first budget gives
   "<= first budget / b".
4. With `text` (a text file, e.g. a Gutenberg shard of ../shared/data/corpus, and `text_val` held out), every model
   also trains once per seed on that text (byte tokenizer, the same budgets) and is evaluated by held-out loss
   (bits per byte); tokens to the reference's loss are computed the same way on each baseline's running minimum.
5. Expert-selection diversity (`models/dreamer.expert_stats`): (a) distinct experts a token selects over depth /
   min(k x steps, E), for the reference and MoEUT; (b) the entropy of the selected top-k sets over the validation
   batches' tokens (the spec's corpus) per layer application, mean over applications, for those and the untied MoE
   decoder (`eval.dreamer.SetCounts`, `moe_expert_sets`). The
   MoE decoder's layers share no expert pool, so (a) does not transfer to it.

Profiles: "cpu" (dreamer-tiny as recipes/dreamer_tiny_cpu.toml sets it up, 8 x 128 tokens per step, budgets
0.1M..0.8M tokens, under an hour on one core for all six models), "gpu" (dreamer-small, 85.8M parameters,
32 x 1024 per step, bf16), "smoke" (tests).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dyndepth import jsonio
from dyndepth.bench.match import FAMILIES, MatchConfig, describe, load_reference, run_match
from dyndepth.bench.timing import machine_description, markdown_table
from dyndepth.data.build import HELD_OUT, build_loader, build_tokenizer, one_source, source_fingerprint, source_items
from dyndepth.data.sources import HF_PREFIX
from dyndepth.data.synthetic import exact_match, make_examples
from dyndepth.devices import resolve_device
from dyndepth.eval.dreamer import SetCounts
from dyndepth.eval.tasks import generate_answers
from dyndepth.figures import save_figure
from dyndepth.models import build_model
from dyndepth.models.moe import SparseMoE
from dyndepth.runconfig import TrainConfig
from dyndepth.train.trainer import train

PROFILES = {
    "cpu": {"reference": "recipes/dreamer_tiny_cpu.toml", "batch_size": 8, "seq_len": 128,
            "budgets": [102400, 204800, 409600, 819200], "examples_per_task": 30, "device": "cpu"},
    "gpu": {"reference": "dreamer-small", "batch_size": 32, "seq_len": 1024,
            "budgets": [50_000_000, 100_000_000, 200_000_000, 400_000_000], "examples_per_task": 300,
            "device": "cuda", "dtype": "bfloat16", "lr": 1e-3, "warmup": 200},
    "smoke": {"reference": "dreamer-tiny", "against": ["dense", "moeut"], "batch_size": 2, "seq_len": 32,
              "budgets": [128, 256], "examples_per_task": 2, "eval_batches": 1, "text_eval_batches": 2,
              "max_measured": 1, "synthetic_examples": 300},
}


@dataclass
class StudyConfig:
    reference: str = "dreamer-tiny"
    against: list[str] = field(default_factory=lambda: list(FAMILIES))
    budgets: list[int] = field(default_factory=lambda: [102400, 204800, 409600, 819200])  # training tokens
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    dtype: str = "float32"
    device: str = "cpu"
    tasks: list[str] = field(default_factory=lambda: ["add", "mul", "var"])
    difficulty: dict = field(default_factory=lambda: {"add": {"digits": 2}, "mul": {"digits": 1}, "var": {"hops": 2}})
    examples_per_task: int = 30  # held-out prompts per task for exact match
    synthetic_examples: int = 40000  # training examples generated (the recipes' default)
    eval_batches: int = 4
    text: str = ""  # a text file to train on as well (held-out loss per budget); "" skips the text study
    text_val: str = ""  # its held-out file ("" holds out part of text: HELD_OUT)
    text_split: str = "eot"  # how the text file splits into documents (data.text_split)
    text_eval_batches: int = 16
    tolerance: float = 0.05
    max_measured: int = 6
    out_dir: str = "runs/study"

    def __post_init__(self) -> None:
        MatchConfig(reference=self.reference, against=self.against)  # the family names, checked once
        if self.device == "auto":  # what trains (torch.device("auto") failed after the match)
            self.device = resolve_device(self.device).type
        if not self.budgets or min(self.budgets) < self.batch_size * self.seq_len:
            raise ValueError(f"study budgets must be at least one step ({self.batch_size * self.seq_len} tokens), "
                             f"got {self.budgets}.")
        if sorted(set(self.budgets)) != list(self.budgets):
            raise ValueError(f"study budgets must increase strictly, got {self.budgets}.")
        tokens = self.batch_size * self.seq_len
        if len(set(self.steps)) != len(self.steps):  # (two budgets of one step: one row, and a rerun refused its run)
            raise ValueError(f"study budgets {self.budgets} give training steps {self.steps} at {tokens} tokens a "
                             f"step: give budgets at least {tokens} tokens apart (multiples of {tokens} are exact).")
        if not self.seeds or self.examples_per_task < 1:
            raise ValueError("study needs at least one seed and one example per task.")
        bad = [seed for seed in self.seeds if not 0 <= seed < 2**31]
        if bad:  # (train.seed's error, naming no option, once the match had run: after every model of a seed before)
            raise ValueError(f"study seeds must lie in [0, 2**31), got {bad[0]}; pass --seeds 0,1,2.")
        for name in ("text", "text_val"):
            if getattr(self, name) and not Path(getattr(self, name)).exists():
                raise ValueError(f"study {name}={getattr(self, name)!r} does not exist; pass a text file, e.g. "
                                 "--text ../shared/data/corpus/gutenberg/gutenberg_00.txt.gz.")
        if self.text_val and not self.text:
            raise ValueError("study text_val needs text (the training file) too.")

    @property
    def steps(self) -> list[int]:
        return [b // (self.batch_size * self.seq_len) for b in self.budgets]


def study_config(profile: str, **overrides) -> StudyConfig:
    if profile not in PROFILES:
        raise ValueError(f"study profile {profile!r} is not one of {sorted(PROFILES)}.")
    return StudyConfig(**{**PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}})


class BudgetEval:
    """Trainer hook: at each budget's step, exact match on the held-out prompts (none on text: `examples` None) and
    validation loss; diversity statistics of a Dreamer-family model at the last budget."""

    name = "study_eval"

    def __init__(self, label: str, seed: int, cfg: StudyConfig, tokenizer, examples, val_batches) -> None:
        self.label, self.seed, self.cfg, self.tokenizer = label, seed, cfg, tokenizer
        self.examples, self.val_batches, self.rows = examples, val_batches, []

    @torch.no_grad()
    def after_step(self, model, step: int, stats: dict, dist) -> dict | None:
        if step not in self.cfg.steps:
            return None
        model.eval()
        nll, n, diversity, sets = 0.0, 0, [], SetCounts()
        for batch in self.val_batches:  # packed documents attend within themselves, as the trainer's evaluation
            out = model(batch["input_ids"], positions=batch.get("positions"), doc_ids=batch.get("doc_ids"))
            labels = batch["labels"]
            nll += float(F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), reduction="sum",
                                         ignore_index=-100))
            n += int((labels != -100).sum())
            if "dreamer/expert_diversity" in out.stats:
                diversity.append(float(out.stats["dreamer/expert_diversity"]))
                sets.add(out.stats["dreamer/expert_sets"])
            moe_sets = moe_expert_sets(model, batch["input_ids"])
            if moe_sets is not None:
                sets.add(moe_sets)
        row = {"model": self.label, "seed": self.seed, "step": step, "tokens": step * self.cfg.batch_size *
               self.cfg.seq_len, "val_loss": nll / max(n, 1), "val_tokens": n}  # (the split may hold fewer batches)
        if diversity:
            row["expert_diversity"] = sum(diversity) / len(diversity)
        if sets.counts:  # over the validation batches together (the spec's corpus), per step or MoE layer
            row.update(expert_set_entropy=sets.entropy(), set_entropy_over="corpus")  # (rows before: per-batch mean)
        if self.examples is not None:
            accuracy = exact_match(self.examples, generate_answers(model, self.tokenizer, self.examples))
            row.update(exact_match=accuracy["overall"], per_task=accuracy)
        model.train()
        self.rows.append(row)
        return {"val_loss": row["val_loss"], **({"exact_match": row["exact_match"]} if "exact_match" in row else {})}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@torch.no_grad()
def moe_expert_sets(model, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Diversity definition (b)'s input for a decoder with MoE layers: each token's top-k set at each MoE layer, (A, N,
    K) for `SetCounts`. None without MoE layers."""
    gates = [layer.mlp.gate for layer in model.model.layers if isinstance(getattr(layer, "mlp", None), SparseMoE)]
    if not gates:
        return None
    logits = []
    handles = [g.register_forward_hook(lambda module, args, out: logits.append(out.detach())) for g in gates]
    try:
        model(input_ids)
    finally:
        for h in handles:
            h.remove()
    k = model.config.num_experts_per_tok  # top-k of the logits = top-k of the softmax
    return torch.stack([x.reshape(-1, x.shape[-1]).topk(k, -1).indices for x in logits])  # (A, N, K)


def train_and_evaluate(label: str, config, seed: int, cfg: StudyConfig, data: dict, tokenizer, examples,
                       corpus: str = "tasks") -> list:
    """One model, one seed: trained to the largest budget, evaluated at each budget (rows of BudgetEval). The rows
    are kept in the run's folder (rows.json, with the model's config), so a rerun of the study skips the runs it
    already finished for the same model and budgets. `corpus` "text" runs in out_dir/text/."""
    run_dir = Path(cfg.out_dir) / ("" if corpus == "tasks" else corpus) / label / f"seed{seed}"
    done, key, recipe = run_dir / "rows.json", data_key(data), training_key(cfg)
    if done.exists():
        saved = json.loads(done.read_text())
        if isinstance(saved, dict) and same_config(saved.get("config"), config) and \
                [r["step"] for r in saved["rows"]] == cfg.steps and saved.get("data", key) == key and \
                saved.get("train", recipe) == recipe:
            return [jsonio.numbers(r, ROW_NUMBERS) for r in saved["rows"]]
        raise ValueError(f"{run_dir} holds a run of another model, other budgets, other data or other training "
                         f"or evaluation settings ({', '.join(recipe)}); remove it or choose another study out_dir.")
    device = torch.device(cfg.device)
    val = build_loader(data, split="val", batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=0, tokenizer=tokenizer)
    n_val = cfg.eval_batches if corpus == "tasks" else cfg.text_eval_batches
    val_batches = [{k: v.to(device) for k, v in val.next_batch().items()}  # one pass at most: more batches than the
                   for _ in range(min(n_val, val.batches_per_epoch))]  # split holds served its windows twice
    torch.manual_seed(seed)
    model = build_model(config)
    steps = max(cfg.steps)
    hook = BudgetEval(label, seed, cfg, tokenizer, examples, val_batches)
    tcfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, min_lr=cfg.lr,
                       warmup=min(cfg.warmup, steps // 4), schedule="constant", dtype=cfg.dtype, device=cfg.device,
                       seed=seed, log_every=max(1, steps // 10), out_dir=str(run_dir),
                       keep_last=1, progress=False, plot=False)
    loader = build_loader(data, split="train", batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=seed,
                          tokenizer=tokenizer)
    train(model, loader, tcfg, hooks=model.trainer_hooks(steps) + [hook])
    done.write_text(jsonio.dumps({"config": config.to_dict(), "data": key, "train": recipe, "rows": hook.rows},
                               indent=1) + "\n")
    return hook.rows


def training_key(cfg: StudyConfig) -> dict:
    """What a saved run must share with this study besides model and data to be reused: its training and evaluation
    settings."""
    return {name: getattr(cfg, name) for name in ("lr", "warmup", "batch_size", "seq_len", "dtype", "device",
                                                  "eval_batches", "text_eval_batches", "examples_per_task")}


def same_config(saved: dict | None, config) -> bool:
    """Whether a saved config dict describes `config`: read back through the config class, so fields added to it
    since (at their defaults) still match."""
    known = {f.name for f in dataclasses.fields(type(config))}
    if not isinstance(saved, dict) or not set(saved) <= known:  # a field since removed or renamed: another model
        return False
    try:
        return type(config).from_dict(json.loads(json.dumps(saved))) == config
    except (AttributeError, TypeError, ValueError):  # not a dict, or values the class rejects
        return False


def data_key(data: dict) -> dict:
    """What identifies a run's data: the data config as JSON, files by their content's fingerprint rather than their
    path, without the cache folder."""
    key = json.loads(json.dumps({k: v for k, v in data.items() if k != "cache_dir"}))
    for name in ("source", "val_source"):
        if not key.get(name):
            continue
        value = key[name] = one_source(key[name])
        local = [v for v in source_items(value) if not v.startswith(HF_PREFIX)]
        if local and all(Path(v).exists() for v in local):  # (hf: names fingerprint as their name)
            key[name] = source_fingerprint(value, data.get("cache_dir"))
    return key


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> tuple[str, float | None]:
    """Tokens at which `curve` [(tokens, accuracy)] (its running maximum) first reaches `target`, linear in log
    tokens between budgets: ("=", t), ("<=", first budget) or (">", last budget)."""
    best, prev = -math.inf, None
    for tokens, acc in curve:
        acc = max(acc, best)
        if acc >= target:
            if prev is None:
                return "<=", float(tokens)
            (t0, a0), (t1, a1) = prev, (tokens, acc)
            frac = 1.0 if a1 == a0 else (target - a0) / (a1 - a0)
            return "=", math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0)))
        best, prev = acc, (tokens, acc)
    return ">", float(curve[-1][0])


ROW_NUMBERS = ("exact_match", "val_loss", "expert_diversity", "expert_set_entropy")  # a row's (and curve's) measures


def read_study(path: str | Path) -> dict:
    """A study.json as `run_study` returned it: its measures that were not finite (written as null, see
    `dyndepth.jsonio`) read back as NaN."""
    study = json.loads(Path(path).read_text())
    for part in (study, study.get("text", {})):
        if "rows" in part:
            part["rows"] = [jsonio.numbers(r, ROW_NUMBERS) for r in part["rows"]]
        if "curves" in part:
            part["curves"] = {m: [jsonio.numbers(p, ROW_NUMBERS) for p in c] for m, c in part["curves"].items()}
    return study


def mean_curves(rows: list[dict]) -> dict[str, list[dict]]:
    """Per model, per budget: the mean over seeds of exact match, validation loss and diversity."""
    out: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        out.setdefault(r["model"], {}).setdefault(r["tokens"], []).append(r)
    return {m: [{"tokens": t, **{k: sum(r[k] for r in rs) / len(rs) for k in ROW_NUMBERS if k in rs[0]},
                 **({"set_entropy_over": rs[0]["set_entropy_over"]} if "set_entropy_over" in rs[0] else {})}
                for t, rs in sorted(by.items())] for m, by in out.items()}


def ratios(curves: dict[str, list[dict]], reference: str, key: str = "exact_match") -> dict[str, list[str]]:
    """Per baseline, per reference budget: tokens to reach the reference's accuracy (key "exact_match") or its
    validation loss (key "val_loss", lower is better) / the reference's tokens."""
    sign = -1.0 if key == "val_loss" else 1.0
    out = {}
    for name, curve in curves.items():
        if name == reference:
            continue
        pts = [(p["tokens"], sign * p[key]) for p in curve]
        cells = []
        for p in curves[reference]:
            if key == "exact_match" and p[key] <= 0:
                cells.append("-")
                continue
            kind, t = tokens_to_reach(pts, sign * p[key])
            cells.append(f"{'' if kind == '=' else kind}{t / p['tokens']:.2f}")
        out[name] = cells
    return out


def run_study(cfg: StudyConfig) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref_config = load_reference(cfg.reference)
    matched = run_match(MatchConfig(reference=cfg.reference, against=cfg.against, batch_size=cfg.batch_size,
                                    seq_len=cfg.seq_len, tolerance=cfg.tolerance, max_measured=cfg.max_measured,
                                    device=cfg.device, out_dir=str(out / "match")))
    models = {"reference": ref_config, **{b["family"]: b["config"] for b in matched["baselines"]}}
    data = {"source": "synthetic", "tasks": cfg.tasks, "difficulty": cfg.difficulty,
            "synthetic_examples": cfg.synthetic_examples}
    tokenizer = build_tokenizer(data)
    examples = make_examples(cfg.tasks, cfg.examples_per_task * len(cfg.tasks), seed=1, difficulty=cfg.difficulty,
                             split="val")
    rows = []
    for label, config in models.items():
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"study: the byte tokenizer needs vocab_size >= {tokenizer.vocab_size}; {label} has "
                             f"{config.vocab_size}.")
        for seed in cfg.seeds:
            rows += train_and_evaluate(label, config, seed, cfg, data, tokenizer, examples)
    curves = mean_curves(rows)
    result = {"config": dataclasses.asdict(cfg), "machine": machine_description(torch.device(cfg.device)),
              "match": {b["family"]: {"mismatch": b["mismatch"], "within": b["within"], "shape": describe(b["config"])}
                        for b in matched["baselines"]}, "shapes": {k: describe(v) for k, v in models.items()},
              "rows": rows, "curves": curves, "ratios": ratios(curves, "reference"),
              "experts": {k: [v.num_experts, v.num_experts_per_tok] for k, v in models.items()
                          if getattr(v, "num_experts", 0)}}  # (E, k): the bound C(E, k) of the set entropy
    if cfg.text:
        text = {"source": cfg.text, "val_source": cfg.text_val, "tokenizer": "byte", "text_split": cfg.text_split,
                "cache_dir": str(out / "data")}  # the byte-level token shards, built once per text
        text_rows = [r for label, config in models.items() for seed in cfg.seeds
                     for r in train_and_evaluate(label, config, seed, cfg, text, tokenizer, None, corpus="text")]
        text_curves = mean_curves(text_rows)
        result["text"] = {"rows": text_rows, "curves": text_curves,
                          "ratios": ratios(text_curves, "reference", key="val_loss")}
        plot_curves(text_curves, out / "text_loss_vs_tokens.png", f"held-out bits per byte vs training tokens "
                    f"({Path(cfg.text).name})", key="val_loss")
    (out / "study.json").write_text(jsonio.dumps(result, indent=2, default=str) + "\n")
    plot_curves(curves, out / "accuracy_vs_tokens.png", f"exact match vs training tokens ({cfg.reference})")
    (out / "study.md").write_text(render(result) + "\n")
    return result


def render(result: dict) -> str:
    cfg, curves = result["config"], result["curves"]
    budgets = [p["tokens"] for p in curves["reference"]]
    rows = []
    for name, curve in curves.items():
        row = {"model": name, "shape": result["shapes"][name]}
        m = result["match"].get(name)
        row["matched"] = "-" if m is None else ("yes" if m["within"] else "NO: " + ", ".join(
            f"{k} {v:+.0%}" for k, v in m["mismatch"].items() if abs(v) > cfg["tolerance"]))
        for p in curve:
            row[f"EM@{_tokens(p['tokens'])}"] = f"{p['exact_match']:.1%}"
        row["val loss (last)"] = f"{curve[-1]['val_loss']:.3f}"
        ratio = result["ratios"].get(name)
        row["tokens to ref. accuracy / ref. tokens"] = "-" if ratio is None else " / ".join(ratio)
        if "expert_set_entropy" in curve[-1]:
            a = curve[-1].get("expert_diversity")
            row["expert diversity (a) / set entropy (b, nats)"] = \
                f"{'-' if a is None else f'{a:.3f}'} / {curve[-1]['expert_set_entropy']:.2f}"
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = (f"### study tokens: {cfg['reference']}, budgets {', '.join(_tokens(b) for b in budgets)} tokens "
            f"({cfg['batch_size']} x {cfg['seq_len']} per step), seeds {cfg['seeds']}, tasks {cfg['tasks']}; "
            f"{result['machine']}\n\n")
    table = head + markdown_table([{c: r.get(c, "") for c in cols} for r in rows], cols)
    return table if "text" not in result else table + "\n\n" + render_text(result)


def render_text(result: dict) -> str:
    """The text study's table: held-out bits per byte at each budget and tokens to the reference's loss."""
    cfg, text = result["config"], result["text"]
    rows = []
    for name, curve in text["curves"].items():
        row = {"model": name}
        for p in curve:
            row[f"bits/byte@{_tokens(p['tokens'])}"] = f"{p['val_loss'] / math.log(2):.3f}"
        ratio = text["ratios"].get(name)
        row["tokens to ref. loss / ref. tokens"] = "-" if ratio is None else " / ".join(ratio)
        rows.append(row)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    held_out = Path(cfg["text_val"]).name if cfg["text_val"] else HELD_OUT
    scored = {r.get("val_tokens") for r in text["rows"]}  # what each evaluation scored: text_eval_batches windows,
    # or fewer when the held-out split holds fewer (studies before 2026-12-06 did not record it)
    tokens = f"{scored.pop():,}" if len(scored) == 1 and None not in scored else \
        f"up to {cfg['text_eval_batches']} x {cfg['batch_size']} x {cfg['seq_len']}"
    head = (f"### study tokens, text: {Path(cfg['text']).name} (held out: {held_out}), byte tokenizer, "
            f"{tokens} held-out tokens\n\n")
    return head + markdown_table(rows, cols)


def _tokens(n: float) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" if n >= 1e3 else f"{n:g}"


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str, key: str = "exact_match") -> Path:
    """One line per model against training tokens: exact match (%), or with key "val_loss" bits per byte."""
    from matplotlib.figure import Figure

    scale, label = (100, "exact match (%)") if key == "exact_match" else (1 / math.log(2), "held-out bits per byte")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot([p["tokens"] for p in curve], [scale * p[key] for p in curve], "o-", label=name)
    ax.set(xscale="log", xlabel="training tokens", ylabel=label, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(cfg: StudyConfig) -> dict:
    result = run_study(cfg)
    print(render(result))
    return result
