"""Plots shared by the demo and the benchmarks (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from dyndepth.figures import save_figure
from dyndepth.methods.gateskip import BRANCHES
from dyndepth.methods.gateskip_analysis import GateStats, token_trace


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality_vs_compute(rows: list[dict], path: str | Path, title: str = "GateSkip: quality vs compute") -> Path:
    """rows: dicts with `compute` (fraction of dense FLOPs), `val_loss` and `exact_match` (0..1), `label`."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["compute"] for r in rows]
    ax1.plot(xs, [r["val_loss"] for r in rows], "o-")
    ax2.plot(xs, [100 * r["exact_match"] for r in rows], "o-", color="tab:green")
    for r in rows:
        ax1.annotate(r["label"], (r["compute"], r["val_loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax2.annotate(r["label"], (r["compute"], 100 * r["exact_match"]), textcoords="offset points",
                     xytext=(4, 4), fontsize=8)
    ax1.set(xlabel="compute (fraction of dense FLOPs, gates included)", ylabel="validation loss (nats/token)")
    ax2.set(xlabel="compute (fraction of dense FLOPs, gates included)", ylabel="exact match, synthetic tasks (%)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.invert_xaxis()
    fig.suptitle(title)
    fig.tight_layout()
    path = save_figure(fig, path, tight=False)
    plt.close(fig)
    return path


def compute_heatmap(model, tokenizer, text: str, path: str | Path, value: str = "executed",
                    add_bos: bool = True, budget: float | None = None, dpi: int = 120) -> Path:
    """PNG of per-token compute: rows (layer, branch), columns tokens; colour = executed/skipped
    (`value="executed"`) or gate importance (`value="importance"`, skipped cells hatched out in grey),
    with a bar per token of the fraction of branches it executed."""
    if value not in ("executed", "importance"):
        raise ValueError(f"value={value!r}: use 'executed' or 'importance'.")
    tokens, skipped, importance = token_trace(model, tokenizer, text, add_bos, budget)
    knobs = model.method.knobs()  # the setting drawn (the repro and demo heatmaps ran at a budget no label named)
    q = knobs["budget"] if budget is None else budget
    T, L = skipped.shape[0], skipped.shape[1]
    executed_RT = (~skipped).reshape(T, 2 * L).T.float()  # (2L, T), row 2l + b
    fig, ax, bar = _token_grid(2 * L, T)
    if value == "executed":
        im = ax.imshow(executed_RT.numpy(), aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    else:
        shown = importance.reshape(T, 2 * L).T.clone()
        shown[executed_RT == 0] = float("nan")  # skipped cells left blank
        im = ax.imshow(shown.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        fig.colorbar(im, ax=[ax, bar], label="importance (blank: skipped)", fraction=0.03)
    ax.set_yticks(range(2 * L), [f"L{i} {b}" for i in range(L) for b in BRANCHES], fontsize=6)
    ax.set_title(f"GateSkip compute per token ({value}; budget {q:.0%}, {knobs['mode']} mode)", fontsize=9)
    return _save_token_grid(fig, bar, executed_RT.mean(0), tokens, "executed", "tab:green", path, dpi)


def mod_heatmap(model, tokenizer, text: str, path: str | Path, add_bos: bool = False, dpi: int = 120) -> Path:
    """PNG of one text through a Mixture-of-Depths model in its current mode: rows the layers, columns the tokens,
    green where the token ran the layer (unrouted layers run every token), and a bar per token of the share of
    layers it ran."""
    import torch

    from dyndepth.models.forward import Trace

    if model.method is None or model.method.name != "mod":
        raise ValueError("mod_heatmap needs a model with Mixture-of-Depths attached (attach_mod).")
    ids = tokenizer.encode(text, add_bos=add_bos)
    if not ids:
        raise ValueError("the text encodes to no tokens; pass a non-empty text.")
    trace = Trace()
    with torch.no_grad():
        model(torch.tensor([ids], device=model.model.embed_tokens.weight.device), trace=trace)
    L, T = model.config.num_hidden_layers, len(ids)
    ran_LT = torch.ones(L, T)
    for slot, keep_BT in trace.ctx.state.routed.items():
        ran_LT[slot] = keep_BT[0].float().cpu()
    fig, ax, bar = _token_grid(L, T)
    ax.imshow(ran_LT.numpy(), aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(L), [f"L{i}{' (routed)' if i in model.method.routed else ''}" for i in range(L)], fontsize=6)
    ax.set_title(f"MoD: layers each token ran ({model.method.mode})", fontsize=9)
    return _save_token_grid(fig, bar, ran_LT.mean(0), [tokenizer.decode([i]) for i in ids], "ran", "tab:green",
                            path, dpi)


def _token_grid(rows: int, T: int):
    """A figure for a (rows, T) per-token grid over a per-token bar: (fig, grid axes, bar axes)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.28 * T + 2), 1.5 + 0.22 * rows + 1.2))
    grid = fig.add_gridspec(2, 1, height_ratios=[rows, max(2, rows // 4)], hspace=0.08)
    ax, bar = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    ax.set_xticks([])
    return fig, ax, bar


def _save_token_grid(fig, bar, share_T, tokens: list[str], label: str, color: str, path, dpi: int) -> Path:
    """The per-token bar (share_T in 0..1) with the tokens as tick labels, then the PNG."""
    T = len(tokens)
    bar.bar(range(T), share_T.numpy(), color=color, width=0.9)
    bar.set_xlim(-0.5, T - 0.5)
    bar.set_ylim(0, 1)
    bar.set_ylabel(label, fontsize=7)
    bar.set_xticks(range(T), [repr(t)[1:-1].replace(" ", "\u2423") for t in tokens], rotation=90, fontsize=7)
    return save_figure(fig, path, dpi)


def plot_gate_stats(stats: GateStats, path: str | Path, max_positions: int = 64, dpi: int = 110) -> Path:
    """PNG with three panels: per-layer mean importance (+/- std), per-layer skip fraction (attn vs MLP),
    and mean importance by position (averaged over layers), which shows a position-0 anchor if any."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    layers = range(stats.mean.shape[0])
    P = min(max_positions, stats.position_count.shape[0])
    for b, branch in enumerate(BRANCHES):
        mean, std = stats.mean[:, b].numpy(), stats.std[:, b].numpy()
        axes[0].plot(layers, mean, marker="o", label=branch)
        axes[0].fill_between(layers, mean - std, mean + std, alpha=0.2)
        axes[1].plot(layers, stats.skipped[:, b].numpy(), marker="o", label=branch)
        axes[2].plot(range(P), stats.position_mean[:, b, :P].mean(0).numpy(), marker=".", label=branch)
    for ax, title, xlabel in zip(axes, ("mean importance", f"skipped (budget {stats.budget:g})",
                                        "importance by position"), ("layer", "layer", "position")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_ylim(0, 1)
    return save_figure(fig, path, dpi)


def plot_expert_usage(usage_AE, path: str | Path, title: str = "Dreamer: expert usage per step",
                      dpi: int = 110, layers_per_group: int = 1) -> Path:
    """PNG heatmap of expert usage: rows = layer applications (recurrence steps; with a group of G layers, row
    r * G + g is step r of layer g, labelled "r.g"), columns = experts, colour = share of that application's
    selections going to the expert (uniform = 1 / E)."""
    from matplotlib.figure import Figure

    share = usage_AE.float() / usage_AE.float().sum(-1, keepdim=True).clamp(min=1)  # (A, E)
    A, E = share.shape
    fig = Figure(figsize=(max(5.0, 0.12 * E + 2), 1.2 + 0.3 * A))
    ax = fig.add_subplot()
    im = ax.imshow(share.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="share of the step's selections", fraction=0.04)
    G = layers_per_group
    ax.set(xlabel="expert", ylabel="step" if G == 1 else "step.layer", title=title)
    ax.set_yticks(range(A), [str(a) if G == 1 else f"{a // G}.{a % G}" for a in range(A)])
    return save_figure(fig, path, dpi)


def plot_quality_vs_depth(rows: list[dict], path: str | Path, title: str = "Dreamer: quality vs average depth",
                          dpi: int = 110) -> Path:
    """rows: dicts with `avg_depth`, `val_loss`, optional `exact_match` (0..1), `exit_kl` (None: a fixed number of
    steps) and `label`. Two panels; fixed-step and per-token-exit settings are drawn as two series."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for ax, key, scale, ylabel in ((ax1, "val_loss", 1, "validation loss (nats/token)"),
                                   (ax2, "exact_match", 100, "exact match, synthetic tasks (%)")):
        for name, exits, marker in (("fixed steps", False, "o-"), ("per-token exit (KL threshold)", True, "s--")):
            pts = sorted((r for r in rows if r.get(key) is not None and (r.get("exit_kl") is not None) == exits),
                         key=lambda r: r["avg_depth"])
            if not pts:
                continue
            ax.plot([r["avg_depth"] for r in pts], [scale * r[key] for r in pts], marker, label=name)
            for r in pts:
                text = f"{r['exit_kl']:g}" if exits else f"R={r['steps']}"
                ax.annotate(text, (r["avg_depth"], scale * r[key]), textcoords="offset points",
                            xytext=(3, -10 if exits else 4), fontsize=7)
        ax.set(xlabel="average recurrence steps per token", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:  # (user text: no synthetic tasks to score exactly)
            ax.text(0.5, 0.5, "no exact-match tasks in this data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return save_figure(fig, path, dpi)


def method_series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by `method` (else label), each group in the order of its knobs (e.g. GateSkip's budgets), else
    of compute: the order `plot_methods` joins them in."""
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(r.get("method", r["label"]), []).append(r)
    return {name: sorted(pts, key=lambda r: (sorted((r.get("knobs") or {}).items()), r["compute"]))
            for name, pts in series.items()}


def plot_methods(rows: list[dict], path: str | Path, title: str = "quality vs compute", metric: str = "exact_match",
                 ylabel: str = "exact match (%)", scale: float = 100.0, chance: float | None = None,
                 dpi: int = 110) -> Path:
    """One panel: `metric` x `scale` against `compute` (executed FLOPs / the base's), one series per `method`
    (settings of one method joined by a line in the order of their knobs, e.g. GateSkip budgets, else of compute:
    two budgets at one compute were joined in whichever order the FLOPs' last digits said), each point labelled; a
    dashed line at `chance` (x `scale`) when given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name, pts in method_series(rows).items():
        ax.plot([r["compute"] for r in pts], [scale * r[metric] for r in pts], "o-" if len(pts) > 1 else "o",
                label=name)
        for r in pts:
            ax.annotate(r["label"], (r["compute"], scale * r[metric]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    if chance is not None:
        ax.axhline(scale * chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set(xlabel="compute: executed FLOPs per token / base model's", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi)
