"""Figures from results tables (never from live runs): convergence curves and their panels, rates
drawn over measured curves, error against spectral gap."""

from plots.convergence import plot_convergence, plot_run
from plots.rates import plot_with_rate
from plots.topology import draw_graph, plot_error_vs_gap

__all__ = ["draw_graph", "plot_convergence", "plot_error_vs_gap", "plot_run", "plot_with_rate"]
