"""Figures from results tables (never from live runs): convergence curves and their panels."""

from plots.convergence import plot_convergence, plot_run

__all__ = ["plot_convergence", "plot_run"]
