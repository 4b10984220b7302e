"""Gossip graphs as plain ``networkx.Graph`` objects on nodes ``0..n-1``.

Every builder returns a connected, undirected graph without self-loops; a disconnected result
raises :class:`ValueError` (gossip cannot reach consensus on it).
"""

from __future__ import annotations

import math

import networkx as nx

__all__ = ["complete_graph", "erdos_renyi_graph", "exponential_graph", "ring_graph", "star_graph", "torus_graph"]


def _checked(g: nx.Graph) -> nx.Graph:
    if g.number_of_nodes() == 0:
        raise ValueError("a gossip graph needs at least one node")
    if g.number_of_nodes() > 1 and not nx.is_connected(g):
        raise ValueError(f"graph with {g.number_of_nodes()} nodes is disconnected; gossip cannot reach consensus")
    g.remove_edges_from(list(nx.selfloop_edges(g)))
    return nx.convert_node_labels_to_integers(g, ordering="sorted")


def ring_graph(n: int) -> nx.Graph:
    """The cycle on ``n`` nodes (a path for n = 2)."""
    return _checked(nx.cycle_graph(n) if n > 2 else nx.path_graph(n))


def complete_graph(n: int) -> nx.Graph:
    """Every pair of nodes connected."""
    return _checked(nx.complete_graph(n))


def star_graph(n: int) -> nx.Graph:
    """Node 0 connected to all others."""
    return _checked(nx.star_graph(n - 1))


def torus_graph(rows: int, cols: int) -> nx.Graph:
    """The 2-D torus (periodic grid) ``rows x cols``, relabelled row-major."""
    g = nx.grid_2d_graph(rows, cols, periodic=rows > 2 and cols > 2)
    return _checked(nx.relabel_nodes(g, {(r, c): r * cols + c for r, c in g.nodes}))


def exponential_graph(n: int) -> nx.Graph:
    """Undirected exponential graph: node i linked to i ± 2^k (mod n) for 2^k < n."""
    offsets = [2**k for k in range(max(1, math.ceil(math.log2(n)))) if 2**k < n]
    return _checked(nx.circulant_graph(n, offsets))


def erdos_renyi_graph(n: int, p: float, *, seed: int, max_tries: int = 100) -> nx.Graph:
    """G(n, p), resampled (seeds ``seed, seed+1, ...``) until connected."""
    for t in range(max_tries):
        g = nx.gnp_random_graph(n, p, seed=seed + t)
        if n == 1 or nx.is_connected(g):
            return _checked(g)
    raise ValueError(f"G(n={n}, p={p}) was disconnected in {max_tries} draws; raise p")
