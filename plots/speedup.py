"""Mean ± std bands over seeds, and iterations-to-epsilon against the number of clients."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

__all__ = ["plot_band", "plot_speedup"]


def plot_band(ax, x, runs, *, label: str | None = None, color=None):
    """The mean of ``runs`` ([seeds, len(x)]) as a line and mean ± std as a shaded band."""
    runs = np.asarray(runs, dtype=np.float64)
    mean, std = runs.mean(0), runs.std(0)
    (line,) = ax.plot(x, mean, label=label, color=color)
    ax.fill_between(x, np.maximum(mean - std, mean * 1e-3), mean + std, color=line.get_color(), alpha=0.2, lw=0)
    return line


def plot_speedup(ax, n, k_eps, *, slope: float | None = None) -> float:
    """Iterations to epsilon against the number of clients (log-log), with the ideal slope -1 drawn
    through the first point and the least-squares fit; returns the fitted slope."""
    n, k = np.asarray(n, dtype=np.float64), np.asarray(k_eps, dtype=np.float64)
    fit = np.polyfit(np.log(n), np.log(k), 1)
    slope = float(fit[0]) if slope is None else slope
    ax.plot(n, k, "o", ms=7, label=r"measured $K_\varepsilon$")
    ax.plot(n, np.exp(np.polyval(fit, np.log(n))), "-", label=f"fit: slope {fit[0]:.2f}")
    ax.plot(n, k[0] * n[0] / n, "k--", lw=1, label="ideal linear speedup: slope -1")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("clients sampled per round n")
    ax.set_ylabel(r"iterations $K_\varepsilon$")
    return slope
