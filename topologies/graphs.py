"""Gossip graphs as plain ``networkx.Graph`` objects on nodes ``0..n-1``.

Every builder returns a connected, undirected, simple graph (no self-loops, no multi-edges) whose
nodes are the integers ``0..n-1``; anything else raises :class:`TopologyError` with one line
naming the problem. User graphs enter through :func:`from_networkx`, :func:`from_edgelist` and
:func:`from_adjacency`, which relabel their nodes to ``0..n-1`` in sorted order.
"""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import numpy as np

__all__ = [
    "TopologyError",
    "complete_graph",
    "erdos_renyi_graph",
    "exponential_graph",
    "from_adjacency",
    "from_edgelist",
    "from_networkx",
    "random_regular_graph",
    "ring_graph",
    "small_world_graph",
    "star_graph",
    "torus_graph",
]


class TopologyError(ValueError):
    """A graph or mixing matrix that cannot be used for gossip; the message is one line."""


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise TopologyError(message)


def from_networkx(g: nx.Graph, *, name: str = "graph") -> nx.Graph:
    """A checked copy of ``g``: undirected, simple, connected, nodes relabelled ``0..n-1``.

    Only a plain undirected ``networkx.Graph`` is accepted. A ``MultiGraph`` is refused rather
    than merged: whether parallel edges mean one link or a heavier one changes the degrees, hence
    the mixing weights, and only the user knows (``networkx.Graph(g)`` merges them). A directed
    graph is refused too (gossip here is symmetric). Self-loops are dropped (the mixing rule sets
    the diagonal)."""
    allowed = "gossip needs an undirected simple networkx.Graph"
    _need(isinstance(g, nx.Graph), f"{name}: expected a networkx.Graph, got {type(g).__name__}")
    _need(not g.is_multigraph(), f"{name}: got a networkx.{type(g).__name__} (parallel edges); {allowed} "
                                 "(networkx.Graph(g) merges parallel edges into one)")
    _need(not g.is_directed(), f"{name}: the graph is directed (networkx.{type(g).__name__}); {allowed}")
    _need(g.number_of_nodes() > 0, f"{name}: the graph has no nodes")
    h = nx.Graph()
    try:
        order = sorted(g.nodes)
    except TypeError:  # mixed node types: keep insertion order
        order = list(g.nodes)
    index = {v: i for i, v in enumerate(order)}
    h.add_nodes_from(range(len(order)))
    h.add_edges_from((index[u], index[v]) for u, v in g.edges if u != v)
    if h.number_of_nodes() > 1:
        parts = nx.number_connected_components(h)
        _need(parts == 1, f"{name}: the graph is disconnected ({parts} components); gossip cannot reach consensus")
    return h


def ring_graph(n: int) -> nx.Graph:
    """The cycle on ``n`` nodes (a single edge for n = 2)."""
    _need(n >= 1, f"ring: n must be >= 1, got {n}")
    return from_networkx(nx.cycle_graph(n) if n > 2 else nx.path_graph(n), name="ring")


def complete_graph(n: int) -> nx.Graph:
    """Every pair of nodes connected."""
    _need(n >= 1, f"complete: n must be >= 1, got {n}")
    return from_networkx(nx.complete_graph(n), name="complete")


def star_graph(n: int) -> nx.Graph:
    """Node 0 connected to all others."""
    _need(n >= 1, f"star: n must be >= 1, got {n}")
    return from_networkx(nx.star_graph(n - 1) if n > 1 else nx.empty_graph(1), name="star")


def _factor(n: int) -> tuple[int, int]:
    r = int(math.isqrt(n))
    while n % r:
        r -= 1
    return r, n // r


def torus_graph(n: int | None = None, *, rows: int | None = None, cols: int | None = None) -> nx.Graph:
    """The 2-D torus ``rows x cols`` (periodic grid), node ``r * cols + c``.

    Give ``rows`` and ``cols``, or ``n`` alone (factored as close to square as possible).
    """
    if rows is None and cols is None:
        _need(n is not None and n >= 1, f"torus: give n or rows and cols, got n={n}")
        rows, cols = _factor(int(n))  # type: ignore[arg-type]
    _need(rows is not None and cols is not None and rows >= 1 and cols >= 1,
          f"torus: rows and cols must both be >= 1, got rows={rows}, cols={cols}")
    assert rows is not None and cols is not None
    _need(n is None or n == rows * cols, f"torus: n={n} does not equal rows*cols={rows * cols}")
    g = nx.Graph()
    g.add_nodes_from(range(rows * cols))
    for r in range(rows):
        for c in range(cols):
            g.add_edge(r * cols + c, r * cols + (c + 1) % cols)
            g.add_edge(r * cols + c, ((r + 1) % rows) * cols + c)
    return from_networkx(g, name="torus")


def exponential_graph(n: int) -> nx.Graph:
    """Undirected exponential graph: node i linked to i ± 2^k (mod n) for 2^k < n (Ying et al., 2021,
    symmetrised): the circulant graph with offsets 1, 2, 4, ..."""
    _need(n >= 1, f"exponential: n must be >= 1, got {n}")
    offsets = [2**k for k in range(max(1, math.ceil(math.log2(max(n, 2))))) if 2**k < n]
    return from_networkx(nx.circulant_graph(n, offsets) if n > 1 else nx.empty_graph(1), name="exponential")


def erdos_renyi_graph(n: int, p: float, *, seed: int, max_tries: int = 100) -> nx.Graph:
    """G(n, p), redrawn with seeds ``seed, seed + 1, ...`` until connected."""
    _need(n >= 1, f"erdos_renyi: n must be >= 1, got {n}")
    _need(0 < p <= 1, f"erdos_renyi: p must be in (0, 1], got {p}")
    for t in range(max_tries):
        g = nx.gnp_random_graph(n, p, seed=seed + t)
        if n == 1 or nx.is_connected(g):
            return from_networkx(g, name="erdos_renyi")
    raise TopologyError(f"erdos_renyi: G(n={n}, p={p}) was disconnected in {max_tries} draws; raise p (ln(n)/n = {math.log(n) / n:.3g})")


def random_regular_graph(n: int, d: int, *, seed: int, max_tries: int = 100) -> nx.Graph:
    """A uniformly random connected ``d``-regular graph (``n * d`` must be even, ``d < n``)."""
    _need(1 <= d < n, f"random_regular: need 1 <= d < n, got d={d}, n={n}")
    _need(n * d % 2 == 0, f"random_regular: n * d must be even, got n={n}, d={d}")
    for t in range(max_tries):
        g = nx.random_regular_graph(d, n, seed=seed + t)
        if nx.is_connected(g):
            return from_networkx(g, name="random_regular")
    raise TopologyError(f"random_regular: no connected {d}-regular graph on {n} nodes in {max_tries} draws; raise d")


def small_world_graph(n: int, k: int = 4, p: float = 0.1, *, seed: int) -> nx.Graph:
    """Connected Watts-Strogatz small world: a ring lattice with ``k`` neighbours, edges rewired w.p. ``p``."""
    _need(2 <= k < n, f"small_world: need 2 <= k < n, got k={k}, n={n}")
    _need(0 <= p <= 1, f"small_world: p must be in [0, 1], got {p}")
    return from_networkx(nx.connected_watts_strogatz_graph(n, k, p, tries=100, seed=seed), name="small_world")


def from_edgelist(path: str | Path) -> nx.Graph:
    """A graph from a text file with one edge ``u v`` per line (``#`` comments, blank lines ignored).

    Node labels may be any tokens; they are relabelled ``0..n-1`` in sorted order (as integers when
    all labels are integers)."""
    _need(isinstance(path, (str, Path)) and str(path) != "", f"edge list: a path to a file is required, got {path!r}")
    p = Path(path)
    _need(p.is_file(), f"edge list {str(p)!r} does not exist")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TopologyError(f"edge list {p.name} cannot be read as text: {str(e).splitlines()[0]}") from None
    edges: list[tuple[str, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        _need(len(parts) == 2, f"edge list {p.name}, line {lineno}: expected two node labels 'u v', got {raw.strip()!r}")
        edges.append((parts[0], parts[1]))
    _need(bool(edges), f"edge list {str(p)!r} has no edges")
    g = nx.Graph()
    if all(u.lstrip("-").isdigit() and v.lstrip("-").isdigit() for u, v in edges):
        g.add_edges_from((int(u), int(v)) for u, v in edges)
    else:
        g.add_edges_from(edges)
    return from_networkx(g, name=f"edge list {p.name}")


def from_adjacency(a: np.ndarray) -> nx.Graph:
    """A graph from a square, symmetric 0/1 (or weighted, nonzero = edge) adjacency matrix."""
    a = np.asarray(a)
    _need(a.ndim == 2 and a.shape[0] == a.shape[1], f"adjacency: expected a square matrix, got shape {a.shape}")
    _need(np.allclose(a, a.T), "adjacency: the matrix is not symmetric (gossip needs an undirected graph)")
    return from_networkx(nx.from_numpy_array((a != 0).astype(float) - np.diag(np.diag(a != 0))), name="adjacency")
