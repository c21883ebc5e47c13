"""DND analysis: per-layer selection and compute, the controller over training, which tokens get a second
pass, and how selection relates to the base model's uncertainty (the paper: Pearson r = 0.336 between
selection frequency and the vanilla model's next-token entropy).

Shape legend: B batch, T tokens, V vocab, L DND layers.

Everything reads an ordinary forward through a `Trace` (the method's own `DNDState`: scores and selections
per layer) or the trainer's metrics.jsonl; plots draw on a matplotlib `Figure` (Agg), never pyplot state.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from dyndepth import jsonio
from dyndepth.core.batch import split_batch
from dyndepth.figures import save_figure
from dyndepth.methods.dnd import DND, DNDState
from dyndepth.models.forward import Trace


def _require_dnd(model) -> DND:
    if isinstance(model.method, DND):
        return model.method
    raise ValueError("this analysis needs a DND model: call dyndepth.methods.attach_dnd(model) first "
                     f"(model.method is {type(model.method).__name__}).")


@contextlib.contextmanager
def without_method(model):
    """The base model for the block: the method detached (its parameters stay, unused), then restored."""
    method, model.method = model.method, None
    try:
        yield model
    finally:
        model.method = method


def layer_report(model, out) -> dict[int, dict]:
    """Per DND layer, from a forward's output (`out.compute`, `out.stats`): the realized selection ratio and
    the FLOP overhead of its nested pass and router over its vanilla pass, executed and ideal."""
    method = _require_dnd(model)
    ledger, report = out.compute, {}
    for layer, nslot in method.nested_slot.items():
        row = {"selected": float(out.stats[f"dnd/selected/L{layer}"])}
        for which in ("executed", "ideal"):
            router = ledger.total(which, part="router", slot=layer)
            vanilla = ledger.total(which, slot=layer) - router
            row[f"flops_overhead_{which}"] = (ledger.total(which, slot=nslot) + router) / vanilla
        report[layer] = row
    return report


@torch.no_grad()
def trace_selection(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """(scores (L, B, T) float32, selected (L, B, T) bool, valid (B, T)) of one eval-mode forward."""
    _require_dnd(model)
    trace = Trace()
    was_training = model.training
    model.eval()
    try:
        model(input_ids, attention_mask=attention_mask, trace=trace)
    finally:
        model.train(was_training)
    st: DNDState = trace.ctx.state
    layers = sorted(st.keep)
    return (torch.stack([st.scores[i] for i in layers]), torch.stack([st.keep[i] for i in layers]),
            trace.ctx.valid_or_all)


@torch.no_grad()
def entropy_correlation(model, batches, base=None) -> dict:
    """Pearson r between each token's selection frequency (share of DND layers that nest it) and the next-token
    entropy of the base model (`base`, default: this model with DND detached), over the valid tokens of
    `batches` (any form `core.batch.split_batch` takes). Also the mean entropy of tokens nested by at least half of
    the layers and of the others."""
    freq, ent = [], []
    batches = list(batches)
    if not batches:
        raise ValueError("entropy_correlation needs at least one batch of token ids.")
    for batch in batches:
        ids, mask = split_batch(batch)
        _, selected, valid = trace_selection(model, ids, mask)
        ctx = without_method(model) if base is None else contextlib.nullcontext()
        with ctx:
            logits = (model if base is None else base)(ids, attention_mask=mask).logits  # (B, T, V)
        freq.append(selected.float().mean(0)[valid])
        ent.append(next_token_entropy(logits[valid]))
    f, e = torch.cat(freq), torch.cat(ent)
    r = torch.corrcoef(torch.stack([f, e]))[0, 1]
    hard = f >= 0.5
    return {"pearson_r": float(r), "tokens": int(f.numel()), "selection_rate": float(f.mean()),
            "entropy_nested": float(e[hard].mean()) if hard.any() else float("nan"),
            "entropy_other": float(e[~hard].mean()) if (~hard).any() else float("nan")}


# rows of logits whose float32 temporaries `next_token_entropy` holds at once: ~3 x 64 MB at a 152k vocabulary
ENTROPY_CHUNK_ELEMENTS = 1 << 24


def next_token_entropy(logits_NV: torch.Tensor) -> torch.Tensor:
    """(N,) float32 entropy of softmax(logits) per row, H = logsumexp(l) - sum(softmax(l) * l), computed over
    row chunks: a (B, T, V) float32 log-softmax and its products would hold several times the logits (gigabytes
    at Qwen3's vocabulary and a few thousand tokens)."""
    rows = max(1, ENTROPY_CHUNK_ELEMENTS // max(1, logits_NV.shape[-1]))
    out = []
    for chunk in logits_NV.split(rows):
        l_CV = chunk.float()
        out.append(torch.logsumexp(l_CV, -1) - (torch.softmax(l_CV, -1) * l_CV).sum(-1))
    return torch.cat(out) if out else logits_NV.new_zeros(0, dtype=torch.float32)


def selection_heatmap(model, tokenizer, text: str, path: str | Path, add_bos: bool = False, dpi: int = 120) -> Path:
    """PNG of one text: rows the DND layers, columns the tokens, colour the router score's margin over the
    layer's threshold, p - tau (a dot marks the tokens nested at that layer), and a bar per token of the share
    of layers nesting it."""
    from matplotlib.figure import Figure

    ids = tokenizer.encode(text, add_bos=add_bos)
    if not ids:
        raise ValueError("the text encodes to no tokens; pass a non-empty text.")
    ids_BT = torch.tensor([ids], device=model.model.embed_tokens.weight.device)
    scores, selected, _ = trace_selection(model, ids_BT)
    scores, selected = scores[:, 0].float().cpu(), selected[:, 0].cpu()  # (L, T)
    L, T = scores.shape
    method = _require_dnd(model)
    layers = method.layers
    margin = scores - torch.stack([d.tau.float().cpu() + method.tau_offset for d in method.layer_dnd])[:, None]
    span = max(float(margin.abs().max()), 1e-6)
    fig = Figure(figsize=(max(6.0, 0.28 * T + 2), 1.6 + 0.25 * L + 1.2))
    grid = fig.add_gridspec(2, 1, height_ratios=[L, max(2, L // 2)], hspace=0.08)
    ax, bar = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    im = ax.imshow(margin.numpy(), aspect="auto", cmap="coolwarm", vmin=-span, vmax=span, interpolation="nearest")
    ys, xs = selected.nonzero(as_tuple=True)
    ax.scatter(xs.numpy(), ys.numpy(), s=6, c="black", marker="o")
    fig.colorbar(im, ax=[ax, bar], label="p - tau (dot: nested)", fraction=0.03)
    ax.set_yticks(range(L), [f"L{i}" for i in layers], fontsize=6)
    ax.set_xticks([])
    ax.set_title("DND: second pass per token and layer", fontsize=9)
    bar.bar(range(T), selected.float().mean(0).numpy(), color="tab:purple", width=0.9)
    bar.set_xlim(-0.5, T - 0.5)
    bar.set_ylim(0, 1)
    bar.set_ylabel("nested", fontsize=7)
    tokens = [tokenizer.decode([t], skip_special=False) for t in ids]
    bar.set_xticks(range(T), [repr(t)[1:-1].replace(" ", "\u2423") for t in tokens], rotation=90, fontsize=7)
    return save_figure(fig, path, dpi)


def read_metrics(metrics: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl; a missing file or a line that is not JSON is a ValueError naming it."""
    path = Path(metrics)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass a run's metrics.jsonl (train.out_dir/metrics.jsonl).")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {i} is not JSON ({e.msg}); is it a run's metrics.jsonl?") from None
    return records


def controller_series(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{"dnd/selected/L": {key: [(step, ratio)]}, "dnd/tau/L": {key: [(step, tau)]}} of metrics records. The ratio
    is what the controller steers by, the logged nested / valid tokens (a ratio of the step's sums), where a record
    has them; else (runs before 2026-12-06) the logged mean of the micro-batches' fractions."""
    series = {}
    for prefix in ("dnd/selected/L", "dnd/tau/L"):
        keys = sorted({k for r in records for k in r if k.startswith(prefix)}, key=lambda k: int(k[len(prefix):]))
        series[prefix] = {k: [(r["step"], _ratio(r, k) if prefix == "dnd/selected/L" else jsonio.number(r[k]))
                              for r in records if k in r] for k in keys}  # (null: written for a NaN)
    return series


def _ratio(record: dict, key: str) -> float:
    nested = key.replace("dnd/selected/", "dnd/nested_tokens/")
    if nested in record and record.get("dnd/valid_tokens"):
        return jsonio.number(record[nested]) / record["dnd/valid_tokens"]
    return jsonio.number(record[key])


def plot_controller(metrics: str | Path, path: str | Path, target: float | None = None, dpi: int = 110) -> Path:
    """PNG of a DND training run (its metrics.jsonl): the realized selection ratio per layer (with the +-5%
    band around `target`, when given) and tau per layer, over steps."""
    from matplotlib.figure import Figure

    series = controller_series(read_metrics(metrics))
    if not series["dnd/selected/L"]:
        raise ValueError(f"{metrics} has no dnd/selected/L* metrics; is it the metrics.jsonl of a DND training run?")
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 2)
    for ax, (prefix, title) in zip(axes, (("dnd/selected/L", "selected ratio"), ("dnd/tau/L", "threshold tau"))):
        for key, points in series[prefix].items():
            steps, values = zip(*points)
            label = key[len("dnd/"):].replace("selected/", "").replace("tau/", "")
            ax.plot(steps, values, lw=1, marker="o" if len(steps) < 3 else None, ms=3, label=label)  # a 1-step run
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if target is not None:
        axes[0].axhspan(target - 0.05, target + 0.05, color="grey", alpha=0.15, label="target +-5%")
    axes[0].legend(fontsize=6, ncol=2)
    return save_figure(fig, path, dpi)
