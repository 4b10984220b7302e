"""User topologies (decorator, module:function, entry point) and time-varying schedules."""

import textwrap

import networkx as nx
import numpy as np
import pytest

import topologies as T


def test_register_topology_decorator():
    @T.register_topology("test_path_plus_chord")
    def path_plus_chord(n, *, seed=0):
        g = nx.path_graph(n)
        g.add_edge(0, n - 1)
        return g

    g = T.build_graph("test_path_plus_chord", 6)
    assert g.number_of_edges() == 6 and "test_path_plus_chord" in T.topology_names()


def _write_user_module(tmp_path):
    (tmp_path / "user_graphs.py").write_text(textwrap.dedent("""
        import networkx as nx

        def ladder(n, *, rungs_every=1, seed=0):
            g = nx.ladder_graph(n // 2)
            return g

        def broken(n, *, seed=0):
            return nx.empty_graph(n)

        def fixed8(n, *, seed=0):
            return nx.cycle_graph(8)
    """))


def test_dotted_path_user_graph(tmp_path, monkeypatch):
    _write_user_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    g = T.build_graph("user_graphs:ladder", 8)
    assert g.number_of_nodes() == 8 and g.number_of_edges() == 10
    with pytest.raises(T.TopologyError, match="disconnected"):
        T.build_graph("user_graphs:broken", 4)
    with pytest.raises(T.TopologyError, match="no attribute 'nope'"):
        T.build_graph("user_graphs:nope", 4)
    with pytest.raises(T.TopologyError, match="cannot import module"):
        T.build_graph("no_such_module_xyz:f", 4)
    with pytest.raises(T.TopologyError, match="has 8 nodes, but the run has 6"):
        T.build_graph("user_graphs:fixed8", 6)


def test_entry_point_user_graph(tmp_path, monkeypatch):
    """A distribution that declares [fedopt.topologies] ladder = user_graphs:ladder is found by name."""
    _write_user_module(tmp_path)
    dist = tmp_path / "user_graphs-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: user-graphs\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedopt.topologies]\nladder_ep = user_graphs:ladder\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ladder_ep" in T.topology_names()
    assert T.build_graph("ladder_ep", 10).number_of_edges() == 13


def test_unknown_topology_lists_the_available_ones():
    with pytest.raises(T.TopologyError, match="unknown topology 'moebius'; available: .*ring"):
        T.build_graph("moebius", 5)


def test_unknown_graph_parameter():
    with pytest.raises(T.TopologyError, match="has no parameter\\(s\\) p; allowed: rows, cols|allowed: cols, rows"):
        T.build_graph("torus", 16, p=0.3)


@pytest.mark.parametrize("make", [
    lambda: T.cycle_schedule([T.ring_graph(8), T.star_graph(8), T.complete_graph(8)]),
    lambda: T.random_graph_schedule(lambda s: T.erdos_renyi_graph(8, 0.4, seed=s)),
    lambda: T.edge_dropout_schedule(T.torus_graph(16), 0.3, seed=1),
])
def test_schedules_give_checked_and_changing_matrices(make):
    sched = make()
    mats = [sched(t) for t in range(6)]
    for w in mats:
        T.check_mixing_matrix(w)
    assert any(not np.allclose(mats[0], m) for m in mats[1:])
    again = make()
    assert all(np.allclose(sched(t), again(t)) for t in range(6))  # deterministic


def test_edge_dropout_that_always_disconnects_is_an_error():
    with pytest.raises(T.TopologyError, match="disconnected the graph"):
        T.edge_dropout_schedule(T.ring_graph(8), 0.9, seed=0, max_tries=5)(0)
