r"""Mixing matrices of gossip graphs, their spectral gap, and a checker.

A mixing matrix :math:`W` for a graph :math:`G` is symmetric, doubly stochastic, nonnegative and
supported on :math:`G`'s edges and the diagonal. Its spectral gap is
:math:`1 - \rho`, :math:`\rho = \max(|\lambda_2|, |\lambda_n|) = \|W - \tfrac1n 11^\top\|_2`;
one gossip step :math:`X \leftarrow WX` shrinks the disagreement :math:`X - \bar X` by :math:`\rho`.

============================  ===========================================================
rule                          weights
============================  ===========================================================
``metropolis_hastings``       :math:`w_{ij} = 1/(1 + \max(d_i, d_j))` on edges
``max_degree``                :math:`w_{ij} = 1/(1 + d_{\max})` on edges
``laplacian``                 :math:`W = I - \alpha L`, default :math:`\alpha = 1/\lambda_{\max}(L)`
``lazy_metropolis``           :math:`(I + W_{MH})/2`
============================  ===========================================================

(diagonals make each row sum to one). Each is symmetric and doubly stochastic by construction,
nonnegative, and has a positive gap on every connected graph (``max_degree`` uses
:math:`d_{\max} + 1` rather than :math:`d_{\max}` so that bipartite regular graphs, e.g. even rings,
do not get the eigenvalue :math:`-1`). :func:`mixing_matrix` is dense numpy;
:func:`sparse_mixing_matrix` builds the same matrix (bit for bit) from an edge array as a scipy
CSR array without a dense intermediate (what a time-varying schedule does every round); :func:`to_torch` gives a dense
or sparse torch matrix for gossip from either.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import breadth_first_order

from topologies.graphs import TopologyError

__all__ = [
    "MIXING_RULES",
    "SubgraphMixing",
    "check_mixing_matrix",
    "lazy",
    "laplacian_weights",
    "max_degree_weights",
    "metropolis_hastings_weights",
    "mixing_matrix",
    "sparse_mixing_matrix",
    "spectral_gap",
    "to_torch",
]


def _adjacency(g: nx.Graph) -> np.ndarray:
    return nx.to_numpy_array(g, nodelist=range(g.number_of_nodes()), weight=None)


def _with_diagonal(w: np.ndarray) -> np.ndarray:
    w[np.diag_indices_from(w)] = 0.0
    w[np.diag_indices_from(w)] = 1.0 - w.sum(1)
    return w


def metropolis_hastings_weights(g: nx.Graph) -> np.ndarray:
    r""":math:`w_{ij} = 1/(1 + \max(d_i, d_j))` on edges (Xiao, Boyd and Kim, 2007)."""
    a = _adjacency(g)
    deg = a.sum(1)
    return _with_diagonal(a / (1.0 + np.maximum.outer(deg, deg)))


def max_degree_weights(g: nx.Graph) -> np.ndarray:
    r""":math:`w_{ij} = 1/(1 + d_{\max})` on every edge."""
    a = _adjacency(g)
    return _with_diagonal(a / (1.0 + a.sum(1).max(initial=0.0)))


def laplacian_weights(g: nx.Graph, alpha: float | None = None) -> np.ndarray:
    r""":math:`W = I - \alpha L`; ``alpha`` in :math:`(0, 1/d_{\max}]` keeps :math:`W` nonnegative.

    The default :math:`\alpha = 1/\lambda_{\max}(L)` (:math:`\le 1/(d_{\max}+1)` on any graph with an
    edge) puts the spectrum in :math:`[0, 1]`."""
    a = _adjacency(g)
    lap = np.diag(a.sum(1)) - a
    if alpha is None:
        lmax = float(np.linalg.eigvalsh(lap)[-1]) if len(a) > 1 else 0.0
        alpha = 1.0 / lmax if lmax > 0 else 0.0
    else:
        dmax = a.sum(1).max(initial=0.0)
        if not (0 < alpha <= (1.0 / dmax if dmax else np.inf)):
            raise TopologyError(f"laplacian: alpha must be in (0, 1/d_max = {1 / dmax if dmax else np.inf:.4g}], got {alpha}")
    return np.eye(len(a)) - alpha * lap


def lazy(w: np.ndarray, beta: float = 0.5) -> np.ndarray:
    r""":math:`\beta I + (1 - \beta) W` (``beta = 1/2``: the lazy walk :math:`(I + W)/2`)."""
    if not 0 <= beta < 1:
        raise TopologyError(f"lazy: beta must be in [0, 1), got {beta}")
    return beta * np.eye(len(w)) + (1.0 - beta) * w


MIXING_RULES: dict[str, Callable[[nx.Graph], np.ndarray]] = {
    "metropolis_hastings": metropolis_hastings_weights,
    "max_degree": max_degree_weights,
    "laplacian": laplacian_weights,
    "lazy_metropolis": lambda g: lazy(metropolis_hastings_weights(g)),
}


def mixing_matrix(g: nx.Graph, rule: str = "metropolis_hastings") -> np.ndarray:
    """The mixing matrix of ``g`` under ``rule`` (a key of :data:`MIXING_RULES`)."""
    if rule not in MIXING_RULES:
        raise TopologyError(f"unknown mixing rule {rule!r}; available: {', '.join(sorted(MIXING_RULES))}")
    return MIXING_RULES[rule](g)


def sparse_mixing_matrix(n: int, edges: np.ndarray, rule: str = "metropolis_hastings") -> sp.csr_array:
    r"""The mixing matrix of the graph on nodes ``0..n-1`` with undirected ``edges`` (an ``[m, 2]``
    integer array, no self-loops, no repeated edge) as a scipy CSR array with sorted indices.

    ``metropolis_hastings``, ``lazy_metropolis`` and ``max_degree`` take :math:`O(n + m)`
    (:class:`SubgraphMixing`; :math:`O(n^2 / 128)` for the diagonal's row sums up to n = 2,896,
    which reproduce the dense rule's rounding, so the matrix equals :func:`mixing_matrix` bit for
    bit; above that the row sums go in column order and the diagonal may differ in the last bit). Any other rule (``laplacian``, whose
    default :math:`\alpha` needs :math:`\lambda_{\max}(L)`) goes through the dense
    :func:`mixing_matrix`. The graph may be disconnected: the matrix is still symmetric and doubly
    stochastic."""
    if rule not in MIXING_RULES:
        raise TopologyError(f"unknown mixing rule {rule!r}; available: {', '.join(sorted(MIXING_RULES))}")
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if rule not in SubgraphMixing.FAST_RULES:
        return _via_dense(n, edges, rule)
    sub = SubgraphMixing(n, edges)
    keep = np.ones(len(edges), dtype=bool)
    return sub.matrix(keep, sub.pattern(keep), rule)


def _via_dense(n: int, edges: np.ndarray, rule: str) -> sp.csr_array:
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(map(tuple, edges.tolist()))
    w = sp.csr_array(mixing_matrix(g, rule))
    w.sort_indices()
    return w


# ---- row sums in the dense rules' rounding -------------------------------------------------------
# The dense rules set each diagonal entry to one minus ``w.sum(1)`` over the dense row, which numpy
# adds pairwise: blocks of at most 128 entries (halves rounded down to a multiple of 8), each
# block in 8 interleaved partial sums combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)) plus its
# last len % 8 entries one by one (fewer than 8 entries: one by one), the blocks added back up the
# halving tree. Zeros change none of these partial sums, so the same additions over a row's
# nonzeros give the dense row sum bit for bit, and a sparse W_t equals the dense rule's exactly
# (tests/test_topologies/test_schedules_hardening.py checks this against numpy).

_PAIRWISE_MAX_CELLS = 2**20  # rows x blocks held at once; larger graphs sum each row in column order


@functools.lru_cache(maxsize=16)
def _pairwise_plan(n: int) -> tuple[object, np.ndarray, np.ndarray, int]:
    """numpy's pairwise layout of a length-``n`` row: the halving tree over block ids, and per
    column its block and lane (0-7 interleaved partial sums, 8 added one by one after them)."""
    leaves: list[tuple[int, int]] = []

    def split(lo: int, hi: int) -> object:
        if hi - lo <= 128:
            leaves.append((lo, hi))
            return len(leaves) - 1
        half = (hi - lo) // 2
        half -= half % 8
        return split(lo, lo + half), split(lo + half, hi)

    tree = split(0, n)
    block, lane = np.empty(n, dtype=np.int64), np.full(n, 8, dtype=np.int64)
    for b, (lo, hi) in enumerate(leaves):
        block[lo:hi] = b
        if hi - lo >= 8:
            end = hi - (hi - lo) % 8
            lane[lo:end] = np.arange(end - lo) % 8
    return tree, block, lane, len(leaves)


def _dense_row_sums(n: int, indptr: np.ndarray, cols: np.ndarray, data: np.ndarray) -> np.ndarray:
    """``A.sum(1)`` of the dense ``n x n`` matrix with these CSR entries (zeros allowed), added in
    numpy's pairwise order (see above); column order above :data:`_PAIRWISE_MAX_CELLS`."""
    tree, block, lane, blocks = _pairwise_plan(n)
    if n * blocks > _PAIRWISE_MAX_CELLS:
        return np.add.reduceat(data, indptr[:-1]) if len(data) else np.zeros(n)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    cell = rows * blocks + block[cols]  # (row, block), non-decreasing in CSR order
    j = lane[cols]
    # np.bincount adds its weights one by one in input order: each partial sum in column order
    r = np.bincount(cell * 9 + j, weights=data, minlength=n * blocks * 9).reshape(n * blocks, 9)
    sums = ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))
    tail = np.flatnonzero(j == 8)  # a block's last (at most 7) entries, one by one after its partial sums
    if len(tail):
        t_cell = cell[tail]
        first = np.r_[True, t_cell[1:] != t_cell[:-1]]
        rank = np.arange(len(tail)) - np.maximum.accumulate(np.where(first, np.arange(len(tail)), 0))
        for k in range(int(rank.max()) + 1):
            at = rank == k
            sums[t_cell[at]] += data[tail[at]]
    sums = sums.reshape(n, blocks)

    def up(node: object) -> np.ndarray:
        return sums[:, node] if isinstance(node, int) else up(node[0]) + up(node[1])

    return up(tree)


class SubgraphMixing:
    """The subgraphs of one base graph (the edges that survive a round) and their mixing matrices,
    in :math:`O(n + m)` numpy work on a CSR layout fixed once: edge ``e = (u, v)`` owns the slots
    ``(u, v)`` and ``(v, u)``, every node its diagonal slot. A subgraph's pattern is its surviving
    slots; connectivity is one breadth-first search on it (the pattern is symmetric, so a directed
    search from node 0 reaches exactly node 0's component). Rules ``metropolis_hastings``,
    ``lazy_metropolis`` and ``max_degree`` are computed here, equal bit for bit to
    :func:`mixing_matrix` (the diagonal's row sums in numpy's order, :func:`_dense_row_sums`);
    any other rule goes through the dense :func:`mixing_matrix`. Indices are int32 (scipy's own choice below
    2**31 entries, and what its graph search takes without a copy)."""

    FAST_RULES = ("metropolis_hastings", "lazy_metropolis", "max_degree")

    def __init__(self, n: int, edges: np.ndarray) -> None:
        self.n, self.edges = n, edges
        self.u, self.v = edges[:, 0].copy(), edges[:, 1].copy()
        m, nodes = len(edges), np.arange(n)
        rows = np.concatenate([self.u, self.v, nodes])
        cols = np.concatenate([self.v, self.u, nodes])
        order = np.lexsort((cols, rows))  # CSR order: by row, then column
        self.rows, self.cols = rows[order], cols[order].astype(np.int32)
        self.edge_of_slot = np.concatenate([np.arange(m), np.arange(m), np.full(n, m)])[order]  # m: the diagonal
        self.is_diagonal = self.edge_of_slot == m
        self.ones = np.ones(len(order))

    def pattern(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(present, cols, indptr)`` when edges ``keep`` survive: which slots survive, and the
        CSR column indices and row pointer of the surviving pattern."""
        present = np.append(keep, True)[self.edge_of_slot]
        indptr = np.zeros(self.n + 1, dtype=np.int32)
        np.cumsum(np.bincount(self.rows[present], minlength=self.n), out=indptr[1:])
        return present, self.cols[present], indptr

    def connected(self, pattern: tuple[np.ndarray, np.ndarray, np.ndarray]) -> bool:
        """Whether the subgraph of ``pattern`` is connected."""
        _, cols, indptr = pattern
        n = self.n
        if n <= 1:
            return True
        if (np.diff(indptr) == 1).any():  # a node left with its diagonal only
            return False
        g = sp.csr_matrix((self.ones[:len(cols)], cols, indptr), shape=(n, n))
        return len(breadth_first_order(g, 0, directed=True, return_predecessors=False)) == n

    def matrix(self, keep: np.ndarray, pattern: tuple[np.ndarray, np.ndarray, np.ndarray], rule: str) -> sp.csr_array:
        """The mixing matrix of the subgraph with edges ``edges[keep]`` (``pattern`` from :meth:`pattern`)."""
        present, cols, indptr = pattern
        n = self.n
        if rule not in self.FAST_RULES:
            return _via_dense(n, self.edges[keep], rule)
        deg = (np.diff(indptr) - 1).astype(float)
        if rule == "max_degree":
            w_e = np.full(len(keep), 1.0 / (1.0 + deg.max(initial=0.0)))
        else:
            w_e = 1.0 / (1.0 + np.maximum(deg[self.u], deg[self.v]))
        slot_edge = self.edge_of_slot[present]
        data = np.append(w_e, 0.0)[slot_edge]
        diagonal = np.flatnonzero(slot_edge == len(keep))
        diag = 1.0 - _dense_row_sums(n, indptr, cols, data)  # the diagonal slots hold 0 here
        if rule == "lazy_metropolis":  # lazy(W, 1/2) = I/2 + W/2, term by term as lazy() computes it
            data *= 0.5
            diag = 0.5 + 0.5 * diag
        data[diagonal] = diag
        w = sp.csr_array((data, cols, indptr), shape=(n, n))
        if not diag.all():  # a zero diagonal entry: drop its slot, as a dense matrix's conversion does
            w.eliminate_zeros()
        w.has_sorted_indices = True
        return w


def spectral_gap(w: np.ndarray) -> float:
    r""":math:`1 - \max(|\lambda_2|, |\lambda_n|)` of a symmetric mixing matrix (1 for a single node)."""
    ev = np.linalg.eigvalsh(np.asarray(w, dtype=float))
    if len(ev) == 1:
        return 1.0
    return float(1.0 - max(abs(ev[-2]), abs(ev[0])))


def check_mixing_matrix(w: np.ndarray, g: nx.Graph | None = None, *, atol: float = 1e-10,
                        require_gap: bool = True) -> None:
    """Raise :class:`TopologyError` naming the first property ``w`` violates.

    Symmetric, rows (hence columns) summing to one, nonnegative, supported on ``g``'s edges and the
    diagonal (when ``g`` is given) and, unless ``require_gap=False``, a positive spectral gap."""
    w = np.asarray(w, dtype=float)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
        raise TopologyError(f"mixing matrix must be square and non-empty, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise TopologyError("mixing matrix has non-finite entries")
    asym = float(np.abs(w - w.T).max())
    if asym > atol:
        raise TopologyError(f"mixing matrix is not symmetric (max |W - W^T| = {asym:.3g})")
    if float(w.min()) < -atol:
        raise TopologyError(f"mixing matrix has a negative entry ({float(w.min()):.3g})")
    rows = float(np.abs(w.sum(1) - 1.0).max())
    if rows > atol:
        raise TopologyError(f"mixing matrix is not doubly stochastic (a row sums to 1 {'+' if w.sum(1).max() > 1 else '-'} {rows:.3g})")
    if g is not None:
        if g.number_of_nodes() != len(w):
            raise TopologyError(f"mixing matrix is {len(w)}x{len(w)} but the graph has {g.number_of_nodes()} nodes")
        allowed = _adjacency(g) + np.eye(len(w))
        bad = np.argwhere((allowed == 0) & (np.abs(w) > atol))
        if len(bad):
            i, j = bad[0]
            raise TopologyError(f"mixing matrix puts weight on ({i}, {j}), which is not an edge of the graph")
    if require_gap and spectral_gap(w) <= atol:
        raise TopologyError("mixing matrix has spectral gap 0: its graph is disconnected (or W is periodic)")


def to_torch(w: np.ndarray | sp.sparray, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
             sparse: bool | None = None) -> torch.Tensor:
    """``w`` (dense numpy or a scipy sparse array) as a torch matrix for gossip; sparse CSR when
    ``sparse`` (default: n > 256 and at most 10 % nonzeros), dense otherwise. CSR, not COO:
    ``torch.sparse.mm`` measured 0.22 ms (CSR) vs 2.6 ms (COO) vs 1.0 ms (dense) for a 1,024-node
    graph with 57k nonzeros and 51 columns. A scipy input becomes a torch CSR matrix without a
    dense intermediate (the same entries, in the same order, as from the dense matrix)."""
    n = w.shape[0] if sp.issparse(w) else len(w)
    if sp.issparse(w):
        csr = w if isinstance(w, sp.csr_array) else sp.csr_array(w)
        if not csr.has_canonical_format or not csr.data.all():  # sorted, no duplicates, no stored zeros
            csr = csr.copy()
            csr.sum_duplicates()
            csr.eliminate_zeros()
        if sparse is None:
            sparse = n > 256 and csr.nnz <= 0.1 * n * n
        if not sparse:
            return torch.as_tensor(csr.toarray(), dtype=dtype, device=device)
        with warnings.catch_warnings():  # torch notes once that CSR support is "beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(torch.as_tensor(csr.indptr, dtype=torch.int64),
                                           torch.as_tensor(csr.indices, dtype=torch.int64),
                                           torch.as_tensor(csr.data, dtype=dtype), size=(n, n), device=device)
    if sparse is None:
        sparse = n > 256 and np.count_nonzero(w) <= 0.1 * n * n
    t = torch.as_tensor(np.asarray(w), dtype=dtype, device=device)
    if not sparse:
        return t
    with warnings.catch_warnings():  # torch notes once that CSR support is "beta"; mm on CSR is stable
        warnings.simplefilter("ignore", UserWarning)
        return t.to_sparse_csr()
