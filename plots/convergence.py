"""Convergence plots from the long-format metrics table (``round, comm_round, metric, value``)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["plot_convergence", "plot_run"]

# metric -> (label, log scale, x axis)
_PANELS = {
    "hypergrad_norm_sq": (r"$\|\nabla\Phi(x_k)\|^2$", True, "round"),
    "inner_error": (r"$\|y_k - y^*(x_k)\|^2$", True, "round"),
    "test_acc": ("test accuracy", False, "comm_round"),
    "outer_loss": ("validation loss $f(x, y)$", True, "comm_round"),
    "weight_auc": ("AUC of sample weights (clean vs corrupted)", False, "comm_round"),
    "inner_grad_norm_sq": (r"$\|\nabla_y g(x, y)\|^2$", True, "round"),
    # minimax problems: the class's stationarity measure, worst-group accuracy, GAN quality
    "stationarity": ("stationarity measure of the problem class", True, "comm_round"),
    "worst_group_test_acc": ("worst-group test accuracy", False, "comm_round"),
    "sliced_wasserstein": ("sliced Wasserstein distance to the data", True, "comm_round"),
    "modes_covered": ("modes covered", False, "comm_round"),
}
_XLABEL = {"round": "outer iteration k", "comm_round": "communication rounds"}


def plot_convergence(df: pd.DataFrame, metric: str, *, x: str = "round", ax=None, label: str | None = None,
                     log: bool = True):
    """One metric of one run against ``x`` (``round`` or ``comm_round``)."""
    ax = ax or plt.gca()
    d = df[df.metric == metric].sort_values(x)
    ax.plot(d[x], d.value, label=label)
    if log and (d.value > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel(_XLABEL.get(x, x))
    return ax


def plot_run(df: pd.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """The standard panels of one run (those of ``_PANELS`` it has), written to ``path``."""
    with np.errstate(over="ignore", invalid="ignore"):  # log axes of a diverged run overflow exp()
        return _plot_run(df, Path(path), title)


def _plot_run(df: pd.DataFrame, path: Path, title: str) -> Path:
    metrics = [m for m in _PANELS if m in set(df.metric)]
    if not metrics:
        metrics = sorted(set(df.metric) - {"comm_rounds", "floats_up", "floats_down"})[:1]
    n = len(metrics)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        label, log, xcol = _PANELS.get(m, (m, False, "round"))
        plot_convergence(df, m, x=xcol, ax=ax, log=log)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")  # atomic: never a half-written figure
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
