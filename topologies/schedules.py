"""Time-varying topologies: a schedule maps a gossip round ``t`` to a checked mixing matrix ``W_t``.

Every matrix a schedule returns has passed :func:`~topologies.mixing.check_mixing_matrix` against its
round's graph (including a positive spectral gap: each round's graph is connected).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import networkx as nx
import numpy as np

from topologies.graphs import TopologyError, from_networkx
from topologies.mixing import check_mixing_matrix, mixing_matrix

__all__ = ["Schedule", "cycle_schedule", "edge_dropout_schedule", "random_graph_schedule", "static_schedule"]

Schedule = Callable[[int], np.ndarray]


def static_schedule(w: np.ndarray, g: nx.Graph | None = None) -> Schedule:
    """The same checked ``W`` every round."""
    check_mixing_matrix(w, g)
    return lambda t: w


def cycle_schedule(graph_list: Sequence[nx.Graph], rule: str = "metropolis_hastings") -> Schedule:
    """Round ``t`` uses graph ``t mod len(graph_list)`` (all on the same nodes)."""
    if not graph_list:
        raise TopologyError("cycle schedule: needs at least one graph")
    ws = []
    for g in graph_list:
        g = from_networkx(g, name="cycle schedule graph")
        w = mixing_matrix(g, rule)
        check_mixing_matrix(w, g)
        ws.append(w)
    if len({len(w) for w in ws}) > 1:
        raise TopologyError("cycle schedule: the graphs have different numbers of nodes")
    return lambda t: ws[t % len(ws)]


def random_graph_schedule(builder: Callable[[int], nx.Graph], rule: str = "metropolis_hastings") -> Schedule:
    """A fresh graph every round: ``builder(seed_t)`` with a seed derived from the round."""

    @lru_cache(maxsize=64)
    def at(t: int) -> np.ndarray:
        g = from_networkx(builder(int(np.random.SeedSequence([t, 0xF00D]).generate_state(1)[0])), name="round graph")
        w = mixing_matrix(g, rule)
        check_mixing_matrix(w, g)
        return w

    return at


def edge_dropout_schedule(g: nx.Graph, p: float, *, seed: int, rule: str = "metropolis_hastings",
                          max_tries: int = 100) -> Schedule:
    """Each round, every edge of ``g`` fails independently with probability ``p``; a draw that
    disconnects the graph is redrawn (up to ``max_tries`` times), so each round's ``W_t`` has a
    positive gap."""
    if not 0 <= p < 1:
        raise TopologyError(f"edge dropout: p must be in [0, 1), got {p}")
    g = from_networkx(g, name="edge dropout base graph")
    edges = np.array(list(g.edges), dtype=np.int64).reshape(-1, 2)

    @lru_cache(maxsize=64)
    def at(t: int) -> np.ndarray:
        rng = np.random.default_rng([seed, t, 0xD1])
        for _ in range(max_tries):
            keep = edges[rng.random(len(edges)) >= p]
            h = nx.Graph()
            h.add_nodes_from(range(g.number_of_nodes()))
            h.add_edges_from(map(tuple, keep))
            if h.number_of_nodes() == 1 or nx.is_connected(h):
                w = mixing_matrix(h, rule)
                check_mixing_matrix(w, h)
                return w
        raise TopologyError(f"edge dropout: p={p} disconnected the graph in {max_tries} draws at round {t}; lower p")

    return at
