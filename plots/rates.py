"""A theoretical rate drawn dashed over a measured curve (log-log), its constant fitted on the tail."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from fedopt.rates import Rate  # noqa: E402

__all__ = ["plot_with_rate"]


def plot_with_rate(ax, T, values, rate: Rate, *, tail: float = 0.5, label: str | None = None,
                   color: str | None = None, show_data: bool = True) -> float:
    """Plot ``values`` against ``T`` on log-log axes and ``rate`` dashed over them, with its one free
    constant fitted on the last ``tail`` fraction of the curve (:meth:`Rate.fit`); the rate is drawn
    where its asymptotic form holds (``T >= rate.valid_from``). Returns the
    fitted constant. A rate whose exponents could not be verified is labelled "(unverified)".
    ``show_data=False`` draws only the rate (when the curve is already on the axes, e.g. as a band)."""
    T, values = np.asarray(T, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if show_data:
        (line,) = ax.plot(T, values, marker="o", ms=3, color=color, label=label or rate.name)
        color = line.get_color()
    C = rate.fit(T, values, tail=tail)
    grid = np.geomspace(max(T[T > 0].min(), rate.valid_from), T.max(), 100)
    note = "" if rate.exponent_verified else " (unverified)"
    ax.plot(grid, rate(grid, C), ls="--", color=color, alpha=0.8,
            label=f"{rate.name} theory {rate.label}{note}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    return C
