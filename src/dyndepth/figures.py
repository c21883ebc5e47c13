"""Writing matplotlib figures: one place that makes the folder and says where the PNG went."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: str | Path, dpi: int = 110, tight: bool = True) -> Path:
    """Save `fig` as `path` (its folder created: a plot into a new folder raised FileNotFoundError); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    return path
