"""Time-varying schedules: seeded by the run, cycle keeps its params, matrix refuses what it cannot
apply, edge dropout never fails mid-run, and a round is sparse O(n + m) (issue 16, items 7 and 10-13)."""

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

import fedopt
import topologies as T
from fedopt.errors import ConfigError
from fedopt.network import build_network
from helpers import dec_config


def _graph_of(w) -> set[tuple[int, int]]:
    w = sp.coo_array(w)
    return {(int(i), int(j)) for i, j in zip(w.row, w.col, strict=True) if i < j}


def _connected(w) -> bool:
    return connected_components(sp.csr_array(w), directed=False, return_labels=False) == 1


# ---- item 10: the random schedule follows the run's seed ------------------------------------------

def _random_sequence(seed: int, rounds: int = 6) -> list[frozenset]:
    net = build_network("erdos_renyi", 12, seed=seed, params={"p": 0.4}, schedule={"name": "random"})
    return [frozenset(_graph_of(net.sparse_matrix(t))) for t in range(rounds)]


def test_random_schedule_differs_between_seeds_and_repeats_for_one_seed():
    a, b = _random_sequence(0), _random_sequence(1)
    assert a == _random_sequence(0)
    assert len(set(a)) > 1  # it does change from round to round
    assert all(x != y for x, y in zip(a, b, strict=True))


# ---- item 11: cycle builds every graph with its params ---------------------------------------------

def _cycle_graphs(name, params, graphs=None, n=16):
    sched = {"name": "cycle", "params": {} if graphs is None else {"graphs": graphs}}
    net = build_network(name, n, seed=0, params=params, schedule=sched)
    period = 1 if graphs is None else len(graphs)
    return [_graph_of(net.sparse_matrix(t)) for t in range(period)]


def test_cycle_keeps_the_topology_params():
    dense = _cycle_graphs("erdos_renyi", {"p": 0.9})[0]
    assert dense == set(T.build_graph("erdos_renyi", 16, seed=0, p=0.9).edges)
    assert len(dense) > 0.8 * 120  # G(16, 0.9), not the default p = 0.3
    torus = _cycle_graphs("torus", {"rows": 2, "cols": 8})[0]
    assert torus == set(T.build_graph("torus", 16, rows=2, cols=8).edges) and len(torus) == 24  # 4 x 4 has 32


def test_cycle_of_an_edge_list_and_of_tables(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("".join(f"{i} {(i + 1) % 6}\n" for i in range(6)) + "0 3\n")
    own, ring = _cycle_graphs("edgelist", {"path": str(path)}, graphs=["edgelist", "ring"], n=6)
    assert len(own) == 7 and (0, 3) in own and len(ring) == 6
    er, torus = _cycle_graphs("ring", {}, graphs=[{"name": "erdos_renyi", "params": {"p": 0.9}},
                                                  {"name": "torus", "params": {"rows": 2, "cols": 8}}])
    assert len(er) > 96 and len(torus) == 24


# ---- item 12: matrix takes no schedule and no other mixing rule -------------------------------------

@pytest.fixture()
def ring_matrix(tmp_path):
    w = T.lazy(T.metropolis_hastings_weights(T.ring_graph(8)))
    np.savetxt(tmp_path / "W.txt", w)
    return str(tmp_path / "W.txt"), w


@pytest.mark.parametrize("extra", [{"schedule": {"name": "edge_dropout", "params": {"p": 0.2}}},
                                   {"schedule": {"name": "random"}}, {"mixing": "lazy_metropolis"},
                                   {"mixing": "max_degree"}])
def test_matrix_refuses_a_schedule_or_a_mixing_rule(ring_matrix, extra):
    with pytest.raises(ConfigError, match="topology 'matrix' takes its mixing matrix as given; remove"):
        build_network("matrix", 8, seed=0, params={"path": ring_matrix[0]}, **extra)


def test_matrix_without_extras_is_the_file(ring_matrix):
    for mixing in (None, "metropolis_hastings"):  # the default (all a parsed config can say) is accepted
        net = build_network("matrix", 8, seed=0, params={"path": ring_matrix[0]}, mixing=mixing)
        assert np.allclose(net.numpy(0), ring_matrix[1])


# ---- item 7: edge dropout is defined for every round, on every graph --------------------------------

def test_dropout_on_a_tree_is_refused_unless_disconnected_rounds_are_allowed():
    with pytest.raises(T.TopologyError, match="is a tree .* connected = false"):
        T.edge_dropout_schedule(T.star_graph(16), 0.2, seed=0)
    free = T.edge_dropout_schedule(T.star_graph(16), 0.2, seed=0, connected=False)
    mats = [free.sparse(t) for t in range(30)]
    assert not all(_connected(w) for w in mats)  # disconnected rounds happen, and are allowed
    for w in mats[:5]:
        T.check_mixing_matrix(w.toarray(), require_gap=False)  # still symmetric, doubly stochastic
    assert T.edge_dropout_schedule(T.star_graph(16), 0.0, seed=0).sparse(3).nnz == 16 + 30  # p = 0: no dropout


def test_dropout_never_fails_mid_run_and_every_round_is_connected():
    """Ring of 24 with p = 0.2: one draw is connected with probability 3 %, so now and then all 100
    redraws of a round are disconnected (the old schedule raised there: round 39 for seed 0)."""
    sched = T.edge_dropout_schedule(T.ring_graph(24), 0.2, seed=0)
    assert all(_connected(sched.sparse(t)) for t in range(200))
    again = T.edge_dropout_schedule(T.ring_graph(24), 0.2, seed=0)
    assert all((sched.sparse(t) != again.sparse(t)).nnz == 0 for t in (0, 39, 57))  # seeded


def test_a_round_without_a_connected_draw_is_reconnected_minimally():
    """With one draw per round, a disconnected draw is repaired: the draw's edges plus one restored
    edge per extra component (a spanning forest of the components), so the round is connected."""
    sched = T.edge_dropout_schedule(T.torus_graph(16), 0.3, seed=0, max_tries=1)
    free = T.edge_dropout_schedule(T.torus_graph(16), 0.3, seed=0, connected=False)  # the same first draws
    repaired = 0
    for t in range(1, 40):
        w, first = sched.sparse(t), free.sparse(t)
        parts = connected_components(first, directed=False, return_labels=False)
        assert _connected(w) and _graph_of(first) <= _graph_of(w)
        assert len(_graph_of(w)) - len(_graph_of(first)) == parts - 1
        repaired += parts > 1
    assert repaired > 0


def test_dropout_never_drops_a_bridge():
    g = nx.cycle_graph(6)
    g.add_edges_from([(0, 6), (6, 7)])  # a ring with a tail of two bridges
    sched = T.edge_dropout_schedule(g, 0.3, seed=1)
    rounds = [_graph_of(sched.sparse(t)) for t in range(40)]
    assert all({(0, 6), (6, 7)} <= r for r in rounds)
    assert any(len(r) < 8 for r in rounds)  # the ring's edges do fail


def test_hopeless_dropout_is_refused_when_built():
    with pytest.raises(ConfigError, match="disconnected the graph in all 100 draws of round 0"):
        build_network("ring", 24, seed=0, params={}, schedule={"name": "edge_dropout", "params": {"p": 0.6}})


def test_a_run_with_frequent_disconnected_draws_finishes():
    raw = dec_config("ma_dsbo", "ring", n=24, rounds=40, params={"inner_steps": 1, "z_steps": 1})
    raw["topology"]["schedule"] = {"name": "edge_dropout", "params": {"p": 0.2}}
    m = fedopt.run(raw).pivot(index="round", columns="metric", values="value")
    assert m.index.max() == 40 and np.isfinite(m.to_numpy()).all()


# ---- item 13: a round is sparse, with no eigendecomposition -----------------------------------------

@pytest.mark.parametrize("rule", ["metropolis_hastings", "max_degree", "lazy_metropolis", "laplacian"])
def test_sparse_mixing_matrix_is_the_dense_rule_bit_for_bit(rule):
    """Same numbers as the dense rule, the diagonal's rounding included (numpy's pairwise row sums
    reproduced), so a dropout run's trajectory is what the dense schedule gave."""
    graphs = [T.erdos_renyi_graph(40, 0.15, seed=3)]
    if rule != "laplacian":  # laplacian goes through the dense rule anyway
        graphs += [T.erdos_renyi_graph(300, 0.05, seed=0), T.complete_graph(140)]
    for g in graphs:
        n = g.number_of_nodes()
        w = T.sparse_mixing_matrix(n, np.array(list(g.edges)), rule)
        assert w.has_sorted_indices and np.array_equal(w.toarray(), T.mixing_matrix(g, rule))
        assert _graph_of(w) == set(g.edges)
    T.check_mixing_matrix(w.toarray(), g)


def test_dropout_rounds_are_the_dense_rule_on_the_round_graph_bit_for_bit():
    sched = T.edge_dropout_schedule(T.exponential_graph(200), 0.2, seed=4)
    for t in range(3):
        w = sched(t)
        g = nx.Graph()
        g.add_nodes_from(range(200))
        g.add_edges_from(_graph_of(w))
        assert np.array_equal(w, T.mixing_matrix(g))


def test_dropout_rounds_stay_sparse_and_skip_the_eigendecomposition(monkeypatch):
    net = build_network("exponential", 300, seed=0, params={}, schedule={"name": "edge_dropout", "params": {"p": 0.1}})

    def no_eigen(*args, **kwargs):
        raise AssertionError("an eigendecomposition on the gossip path")

    monkeypatch.setattr(np.linalg, "eigvalsh", no_eigen)
    monkeypatch.setattr(np.linalg, "eigh", no_eigen)
    for t in range(1, 6):
        w = net.torch(t, torch.float64, torch.device("cpu"))
        assert w.layout == torch.sparse_csr  # n > 256: CSR, like the static network
        ref = T.to_torch(net.numpy(t), sparse=True)
        assert torch.equal(w.crow_indices(), ref.crow_indices()) and torch.equal(w.values(), ref.values())
        assert net.directed_edges(t) == np.count_nonzero(net.numpy(t)) - 300
