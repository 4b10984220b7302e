"""Topology figures: a drawn graph, and final error against spectral gap."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["draw_graph", "plot_error_vs_gap"]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def draw_graph(g: nx.Graph, path: str | Path, *, title: str = "") -> Path:
    """Circular layout for rings and small graphs, spring layout otherwise."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    pos = nx.circular_layout(g) if g.number_of_nodes() <= 32 else nx.spring_layout(g, seed=0)
    nx.draw_networkx(g, pos, ax=ax, node_size=120, font_size=7, width=0.8, with_labels=g.number_of_nodes() <= 64)
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    return _save(fig, path)


def plot_error_vs_gap(gaps: dict[str, float], errors: dict[str, list[float]], path: str | Path, *,
                      extra: dict[str, tuple[float, list[float]]] | None = None,
                      ylabel: str = r"final $\|\nabla\Phi(\bar x)\|^2$", title: str = "") -> Path:
    """Final error of each topology against its spectral gap, log-log: the geometric mean over
    seeds with a min-max bar. ``extra`` adds labelled points (e.g. a tracking variant) as crosses."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    floor = 1e-300

    def point(gap: float, errs: list[float], label: str, marker: str) -> None:
        e = np.maximum(np.asarray(errs, dtype=float), floor)
        mid = float(np.exp(np.log(e).mean()))
        ax.errorbar(gap, mid, yerr=[[max(mid - e.min(), 0.0)], [max(e.max() - mid, 0.0)]], fmt=marker, capsize=3, ms=7)
        ax.annotate(label, (gap, mid), textcoords="offset points", xytext=(6, 4), fontsize=8)

    for name in sorted(gaps, key=gaps.get):
        point(gaps[name], errors[name], name, "o")
    for label, (gap, errs) in (extra or {}).items():
        point(gap, errs, label, "x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"spectral gap $1 - \rho$")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
