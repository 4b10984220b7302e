"""Mixing matrices of the built-in graphs: valid, with the closed-form spectral gaps."""

import math

import networkx as nx
import numpy as np
import pytest

import topologies as T

BUILDERS = {
    "ring": T.ring_graph,
    "complete": T.complete_graph,
    "star": T.star_graph,
    "exponential": T.exponential_graph,
    "torus": lambda n: T.torus_graph(*{2: (1, 2), 5: (1, 5), 16: (4, 4), 64: (8, 8)}[n]),
    "erdos_renyi": lambda n: T.erdos_renyi_graph(n, min(1.0, 3 * math.log(n + 1) / n), seed=0),
}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("n", [2, 5, 16, 64])
def test_metropolis_hastings_is_a_valid_mixing_matrix(name, n):
    g = BUILDERS[name](n)
    assert sorted(g.nodes) == list(range(n)) and nx.is_connected(g)
    w = T.metropolis_hastings_weights(g)
    T.check_mixing_matrix(w, g)
    assert 0 < T.spectral_gap(w) <= 1


@pytest.mark.parametrize("n", [5, 16, 64])
def test_closed_form_gaps(n):
    # ring: every degree is 2, W = I/3 + (shift + shift^T)/3, eigenvalues (1 + 2cos(2 pi k / n)) / 3
    ev = np.array([(1 + 2 * math.cos(2 * math.pi * k / n)) / 3 for k in range(n)])
    ring_gap = 1 - np.sort(np.abs(ev))[-2]
    assert abs(T.spectral_gap(T.metropolis_hastings_weights(T.ring_graph(n))) - ring_gap) < 1e-8
    # complete: W = 11^T / n, gap 1
    assert abs(T.spectral_gap(T.metropolis_hastings_weights(T.complete_graph(n))) - 1.0) < 1e-8


def test_invalid_matrices_and_graphs_are_rejected():
    g = T.ring_graph(4)
    w = T.metropolis_hastings_weights(g)
    with pytest.raises(ValueError, match="not symmetric"):
        T.check_mixing_matrix(w + np.triu(np.full((4, 4), 0.01), 1))
    with pytest.raises(ValueError, match="do not sum to 1"):
        T.check_mixing_matrix(w * 0.9)
    with pytest.raises(ValueError, match="not an edge"):
        T.check_mixing_matrix(np.full((4, 4), 0.25), g)
    with pytest.raises(ValueError, match="disconnected"):
        T.graphs._checked(nx.empty_graph(3))
