"""Figures as PNG files (matplotlib with the Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["line_plot"]


def line_plot(
    path: Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    annotations: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """One line per series (``name -> (xs, ys)``), points labelled from ``annotations[name]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, text in zip(xs, ys, (annotations or {}).get(name, ()), strict=False):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
