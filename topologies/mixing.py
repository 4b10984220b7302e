r"""Mixing matrices of gossip graphs and their spectral gap.

A mixing matrix :math:`W` is symmetric, doubly stochastic, nonnegative and supported on the
graph's edges and the diagonal. Its spectral gap is :math:`1 - \max(|\lambda_2|, |\lambda_n|)`;
gossip :math:`X \leftarrow W X` contracts the consensus error by that factor's complement.
"""

from __future__ import annotations

import networkx as nx
import numpy as np

__all__ = ["check_mixing_matrix", "metropolis_hastings_weights", "spectral_gap"]


def metropolis_hastings_weights(g: nx.Graph) -> np.ndarray:
    r""":math:`W_{ij} = 1/(1 + \max(d_i, d_j))` on edges, :math:`W_{ii} = 1 - \sum_{j \ne i} W_{ij}`."""
    a = nx.to_numpy_array(g, nodelist=range(g.number_of_nodes()), weight=None)
    deg = a.sum(1)
    w = a / (1.0 + np.maximum.outer(deg, deg))
    w[np.diag_indices_from(w)] = 1.0 - w.sum(1)
    return w


def spectral_gap(w: np.ndarray) -> float:
    r""":math:`1 - \max(|\lambda_2|, |\lambda_n|)` of a symmetric mixing matrix (1 for n = 1)."""
    ev = np.sort(np.linalg.eigvalsh(w))
    if len(ev) == 1:
        return 1.0
    return float(1.0 - max(abs(ev[-2]), abs(ev[0])))


def check_mixing_matrix(w: np.ndarray, g: nx.Graph | None = None, *, atol: float = 1e-10) -> None:
    """Raise :class:`ValueError` naming the first property ``w`` violates."""
    w = np.asarray(w, dtype=float)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"mixing matrix must be square, got shape {w.shape}")
    if not np.allclose(w, w.T, atol=atol):
        raise ValueError("mixing matrix is not symmetric")
    if (w < -atol).any():
        raise ValueError("mixing matrix has negative entries")
    if not np.allclose(w.sum(1), 1.0, atol=atol):
        raise ValueError("mixing matrix rows do not sum to 1 (not doubly stochastic)")
    if g is not None:
        allowed = nx.to_numpy_array(g, nodelist=range(len(w)), weight=None) + np.eye(len(w))
        if (np.abs(w[allowed == 0]) > atol).any():
            raise ValueError("mixing matrix has weight on a pair of nodes that is not an edge")
    if spectral_gap(w) <= atol:
        raise ValueError("mixing matrix has spectral gap 0 (the graph is disconnected or W is periodic)")
