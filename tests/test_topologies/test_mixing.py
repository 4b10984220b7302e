"""Every built-in graph and mixing rule gives a valid mixing matrix; gaps match closed forms."""

import math

import networkx as nx
import numpy as np
import pytest

import topologies as T

SIZES = [2, 5, 16, 64]
BUILT_INS = ["ring", "complete", "star", "exponential", "torus", "erdos_renyi", "random_regular", "small_world"]


def _params(name, n):
    return {"erdos_renyi": {"p": min(1.0, 3 * math.log(n + 1) / n)},
            "random_regular": {"d": 1 if n == 2 else (2 if n == 5 else 4)},
            "small_world": {"k": 2 if n <= 5 else 4}}.get(name, {})


# a small world needs k >= 2 lattice neighbours, which 2 nodes cannot have
CASES = [(name, n) for name in BUILT_INS for n in SIZES if (name, n) != ("small_world", 2)]


@pytest.mark.parametrize(("name", "n"), CASES)
@pytest.mark.parametrize("rule", sorted(T.MIXING_RULES))
def test_every_graph_and_rule_is_a_valid_mixing_matrix(name, n, rule):
    g = T.build_graph(name, n, seed=0, **_params(name, n))
    assert sorted(g.nodes) == list(range(n)) and nx.is_connected(g) and not g.is_directed()
    w = T.mixing_matrix(g, rule)
    T.check_mixing_matrix(w, g)
    assert 0 < T.spectral_gap(w) <= 1 + 1e-12


def _circulant_gap(n, offsets):
    """MH weights of a regular circulant graph: W = (I + A) / (d + 1), eigenvalues in closed form."""
    offs = sorted({o % n for o in offsets} | {(-o) % n for o in offsets} - {0})
    d = len(offs)
    ev = np.array([(1 + sum(math.cos(2 * math.pi * k * o / n) for o in offs)) / (d + 1) for k in range(n)])
    return 1 - np.sort(np.abs(ev[1:]))[-1]


@pytest.mark.parametrize("n", [5, 16, 64])
def test_closed_form_spectral_gaps(n):
    mh = lambda g: T.spectral_gap(T.metropolis_hastings_weights(g))  # noqa: E731
    assert abs(mh(T.ring_graph(n)) - _circulant_gap(n, [1])) < 1e-8
    assert abs(mh(T.complete_graph(n)) - 1.0) < 1e-8
    offsets = [2**k for k in range(math.ceil(math.log2(n))) if 2**k < n]
    assert abs(mh(T.exponential_graph(n)) - _circulant_gap(n, offsets)) < 1e-8
    if n == 16:
        # 4 x 4 torus with weight 1/5: eigenvalues (1 + 2cos(2 pi k/4) + 2cos(2 pi l/4)) / 5, rho = 3/5
        assert abs(mh(T.torus_graph(16)) - 0.4) < 1e-8


def test_laplacian_and_lazy_rules():
    g = T.ring_graph(6)
    a = nx.to_numpy_array(g)
    assert np.allclose(T.laplacian_weights(g, alpha=0.25), np.eye(6) - 0.25 * (np.diag(a.sum(1)) - a))
    assert np.allclose(T.laplacian_weights(g), np.eye(6) - (np.diag(a.sum(1)) - a) / 4)  # lambda_max(L) = 4
    lz = T.lazy(T.metropolis_hastings_weights(g))
    assert np.allclose(lz, (np.eye(6) + T.metropolis_hastings_weights(g)) / 2)
    with pytest.raises(T.TopologyError, match="alpha must be in"):
        T.laplacian_weights(g, alpha=0.6)


class TestRejections:
    def test_disconnected_graph(self):
        with pytest.raises(T.TopologyError, match="disconnected \\(2 components\\)"):
            T.from_networkx(nx.disjoint_union(nx.path_graph(3), nx.path_graph(2)))

    def test_non_symmetric_user_matrix(self, tmp_path):
        w = np.array([[0.5, 0.5, 0.0], [0.2, 0.5, 0.3], [0.0, 0.5, 0.5]])
        np.savetxt(tmp_path / "w.txt", w)
        with pytest.raises(T.TopologyError, match="not symmetric"):
            T.load_matrix(str(tmp_path / "w.txt"))

    def test_non_stochastic_user_matrix(self, tmp_path):
        w = np.array([[0.5, 0.4, 0.0], [0.4, 0.5, 0.1], [0.0, 0.1, 0.8]])
        np.save(tmp_path / "w.npy", w)
        with pytest.raises(T.TopologyError, match="not doubly stochastic"):
            T.load_matrix(str(tmp_path / "w.npy"))

    def test_weight_off_the_graph(self):
        with pytest.raises(T.TopologyError, match="not an edge"):
            T.check_mixing_matrix(np.full((4, 4), 0.25), T.ring_graph(4))

    def test_periodic_matrix_has_no_gap(self):
        with pytest.raises(T.TopologyError, match="spectral gap 0"):
            T.check_mixing_matrix(np.array([[0.0, 1.0], [1.0, 0.0]]))

    @pytest.mark.parametrize(("text", "message"), [
        ("", "has no edges"),
        ("# only a comment\n\n", "has no edges"),
        ("0 1\n1 2 3\n", "line 2: expected two node labels"),
        ("0 1\n2 3\n", "disconnected"),
    ])
    def test_bad_edge_lists(self, tmp_path, text, message):
        path = tmp_path / "edges.txt"
        path.write_text(text)
        with pytest.raises(T.TopologyError, match=message):
            T.from_edgelist(path)

    def test_edge_list_relabels_nodes(self, tmp_path):
        path = tmp_path / "edges.txt"
        path.write_text("10 20\n20 30  # a comment\n30 10\n")
        g = T.from_edgelist(path)
        assert sorted(g.edges) == [(0, 1), (0, 2), (1, 2)]


def test_valid_user_matrix_round_trips(tmp_path):
    w = T.metropolis_hastings_weights(T.ring_graph(5))
    np.savetxt(tmp_path / "w.csv", w, delimiter=",")
    g, w2 = T.load_matrix(str(tmp_path / "w.csv"))
    assert np.allclose(w, w2) and nx.utils.graphs_equal(g, T.ring_graph(5))


def test_sparse_torch_matrix_matches_dense():
    import torch

    w = T.metropolis_hastings_weights(T.ring_graph(300))
    sparse, dense = T.to_torch(w), T.to_torch(w, sparse=False)
    assert sparse.layout == torch.sparse_csr and dense.layout == torch.strided
    x = torch.randn(300, 7, dtype=torch.float64)
    assert torch.allclose(torch.sparse.mm(sparse, x), dense @ x, atol=1e-14)
