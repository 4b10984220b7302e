"""Gossip topologies: networkx graphs, their mixing matrices and spectral gaps.

This package imports nothing from :mod:`fedopt`.
"""

from topologies.graphs import (
    complete_graph,
    erdos_renyi_graph,
    exponential_graph,
    ring_graph,
    star_graph,
    torus_graph,
)
from topologies.mixing import check_mixing_matrix, metropolis_hastings_weights, spectral_gap

__all__ = [
    "check_mixing_matrix",
    "complete_graph",
    "erdos_renyi_graph",
    "exponential_graph",
    "metropolis_hastings_weights",
    "ring_graph",
    "spectral_gap",
    "star_graph",
    "torus_graph",
]
