r"""Time-varying topologies: a schedule maps a gossip round ``t`` to a mixing matrix ``W_t``.

A schedule is a :class:`Schedule`: ``schedule(t)`` is ``W_t`` as a dense numpy array (for
inspection and the reference engines) and ``schedule.sparse(t)`` the same matrix as a scipy CSR
array, which is what gossip uses. A round of a random schedule on ``n`` nodes and ``m`` edges costs
:math:`O(n + m)` (a draw, a graph search, :func:`~topologies.mixing.sparse_mixing_matrix`): no
dense ``n x n`` matrix and no eigendecomposition. Every ``W_t`` is symmetric, doubly stochastic,
nonnegative and supported on round ``t``'s graph and the diagonal by construction of the mixing
rule (tested, not re-checked every round).

Randomness: round ``t`` of a schedule with seed ``s`` draws from ``numpy.random`` streams seeded by
``[s, t, tag]`` (``tag`` 0xD1 for edge dropout, 0xF00D for fresh random graphs): a pure function
of the run's seed and the round, so two seeds of a sweep get different graph sequences and a
resumed run gets the same ones.

===================  ============================================================================
schedule             round ``t``
===================  ============================================================================
static               the same checked ``W`` every round
cycle                graph ``t mod k`` of a list of ``k`` connected graphs
random               a fresh connected graph from a builder, seeded by ``(seed, t)``
edge dropout         every edge of a base graph fails independently with probability ``p``;
                     ``connected=True`` keeps each round connected (see
                     :func:`edge_dropout_schedule`), ``connected=False`` allows disconnected rounds
===================  ============================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from numbers import Real

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from topologies.graphs import TopologyError, from_networkx
from topologies.mixing import SubgraphMixing, check_mixing_matrix, mixing_matrix, sparse_mixing_matrix

__all__ = ["Schedule", "cycle_schedule", "edge_dropout_schedule", "random_graph_schedule", "static_schedule"]

_DROPOUT_TAG, _RANDOM_TAG = 0xD1, 0xF00D


class Schedule:
    """Round ``t`` -> ``W_t``. ``schedule(t)``: dense numpy; ``schedule.sparse(t)``: scipy CSR
    with sorted indices (the same numbers). ``static``: every round has the same matrix."""

    def __init__(self, sparse_at: Callable[[int], sp.csr_array], *, static: bool = False,
                 dense_at: Callable[[int], np.ndarray] | None = None) -> None:
        self._sparse_at = lru_cache(maxsize=64)(sparse_at)
        self._dense_at = dense_at
        self.static = static

    def sparse(self, t: int) -> sp.csr_array:
        """``W_t`` as a scipy CSR array."""
        return self._sparse_at(int(t))

    def __call__(self, t: int) -> np.ndarray:
        """``W_t`` as a dense numpy array."""
        if self._dense_at is not None:
            return self._dense_at(int(t))
        return self.sparse(t).toarray()


def _csr(w: np.ndarray) -> sp.csr_array:
    out = sp.csr_array(np.asarray(w, dtype=float))
    out.sort_indices()
    return out


def _edge_array(g: nx.Graph) -> np.ndarray:
    return np.array(list(g.edges), dtype=np.int64).reshape(-1, 2)


def static_schedule(w: np.ndarray, g: nx.Graph | None = None) -> Schedule:
    """The same checked ``W`` every round."""
    check_mixing_matrix(w, g)
    w_sparse = _csr(w)
    return Schedule(lambda t: w_sparse, static=True, dense_at=lambda t: w)


def cycle_schedule(graph_list: Sequence[nx.Graph], rule: str = "metropolis_hastings") -> Schedule:
    """Round ``t`` uses graph ``t mod len(graph_list)`` (all connected, on the same nodes)."""
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
    sparse = [_csr(w) for w in ws]
    return Schedule(lambda t: sparse[t % len(ws)], static=len(ws) == 1, dense_at=lambda t: ws[t % len(ws)])


def random_graph_schedule(builder: Callable[[int], nx.Graph], rule: str = "metropolis_hastings", *,
                          seed: int = 0) -> Schedule:
    """A fresh graph every round: ``builder(seed_t)``, ``seed_t`` derived from ``(seed, t)``.

    ``builder`` must return a connected graph on the same nodes every round (a disconnected one is
    a :class:`TopologyError`); ``seed`` is the run's seed, so different seeds give different
    graph sequences."""
    first: dict[str, int] = {}

    def at(t: int) -> sp.csr_array:
        seed_t = int(np.random.SeedSequence([seed, t, _RANDOM_TAG]).generate_state(1)[0])
        g = from_networkx(builder(seed_t), name=f"round {t} graph")
        n = first.setdefault("n", g.number_of_nodes())
        if g.number_of_nodes() != n:
            raise TopologyError(f"random schedule: round {t}'s graph has {g.number_of_nodes()} nodes, an earlier one {n}")
        return sparse_mixing_matrix(g.number_of_nodes(), _edge_array(g), rule)

    return Schedule(at)


def _check_probability(p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, Real) or not (math.isfinite(p) and 0 <= p < 1):
        raise TopologyError(f"edge dropout: p must be a number in [0, 1), got {p!r}")
    return float(p)


def edge_dropout_schedule(g: nx.Graph, p: float, *, seed: int, rule: str = "metropolis_hastings",
                          connected: bool = True, max_tries: int = 100) -> Schedule:
    r"""Random link failures: each round, every edge of the connected graph ``g`` fails
    independently with probability ``p``, and ``W_t`` is ``rule``'s matrix on the surviving edges.

    ``connected=True`` (default): every round's graph is connected, so every ``W_t`` has a positive
    spectral gap. The draw is conditioned on connectivity: a disconnected draw is redrawn (from the
    same seeded stream of round ``t``), up to ``max_tries`` times. Consequences:

    * a bridge (an edge whose failure always disconnects ``g``) never fails; on a tree every edge is
      a bridge, nothing could ever fail, and a ``p > 0`` is refused (:class:`TopologyError`);
    * round 0 is drawn when the schedule is built: if none of its ``max_tries`` draws is connected,
      a connected draw is too rare to condition on and the schedule is refused;
    * if in a later round all ``max_tries`` draws are disconnected (probability
      :math:`(1 - q)^{\text{max\_tries}}`, ``q`` the chance that one draw is connected), the last
      draw is reconnected: dropped edges, in a seeded random order, are restored when they join two
      components, until one is left. A round therefore never fails mid-run.

    ``connected=False``: every draw is used as it is. A round's graph may be disconnected (a node
    that lost all its edges keeps its value that round); ``W_t`` is still symmetric and doubly
    stochastic, so gossip preserves the average, and consensus rests on the base graph being
    connected, not on each round (random link failures: Kar and Moura, 2009).

    Round ``t`` draws from ``numpy.random.default_rng([seed, t, 0xD1])``.
    """
    p = _check_probability(p)
    if not isinstance(connected, bool):
        raise TopologyError(f"edge dropout: connected must be true or false, got {connected!r}")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise TopologyError(f"edge dropout: max_tries must be an integer >= 1, got {max_tries!r}")
    g = from_networkx(g, name="edge dropout base graph")
    n = g.number_of_nodes()
    edges = _edge_array(g)
    m = len(edges)
    if connected and p > 0 and m and m == n - 1:
        raise TopologyError(f"edge dropout: the graph is a tree (all {m} edges are bridges), so a dropout that keeps "
                            "every round connected can never drop an edge; use a graph with a cycle, or "
                            "connected = false to allow disconnected rounds")

    def reconnect(keep: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``keep`` plus dropped edges (seeded random order) that join two components."""
        a = sp.coo_array((np.ones(int(keep.sum())), (edges[keep, 0], edges[keep, 1])), shape=(n, n))
        parts, label = connected_components(a, directed=False)
        parent = list(range(parts))

        def root(c: int) -> int:
            while parent[c] != c:
                parent[c] = parent[parent[c]]
                c = parent[c]
            return c

        keep = keep.copy()
        for e in rng.permutation(np.flatnonzero(~keep)):
            a_, b_ = root(int(label[edges[e, 0]])), root(int(label[edges[e, 1]]))
            if a_ != b_:
                parent[a_] = b_
                keep[e] = True
                parts -= 1
                if parts == 1:
                    break
        return keep

    subgraphs = SubgraphMixing(n, edges)

    def at(t: int) -> sp.csr_array:
        rng = np.random.default_rng([seed, t, _DROPOUT_TAG])
        keep = rng.random(m) >= p
        pattern = subgraphs.pattern(keep)
        if connected and not subgraphs.connected(pattern):
            for _ in range(max_tries - 1):
                keep = rng.random(m) >= p
                pattern = subgraphs.pattern(keep)
                if subgraphs.connected(pattern):
                    break
            else:
                if t == 0:
                    raise TopologyError(f"edge dropout: p={p} disconnected the graph in all {max_tries} draws of "
                                        "round 0, so a connected round is too rare to condition on; lower p, or "
                                        "set connected = false")
                keep = reconnect(keep, rng)
                pattern = subgraphs.pattern(keep)
        return subgraphs.matrix(keep, pattern, rule)

    schedule = Schedule(at)
    schedule.sparse(0)  # round 0 now: a hopeless p fails when the schedule is built, not mid-run
    return schedule
