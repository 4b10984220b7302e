"""Bad topology inputs, from the command line and from configs: each is exit code 2, one line that
names the problem, no traceback, nothing written (``helpers.refused``). Issue 16, items 5, 7, 8,
9, 11 and 12."""

import textwrap

import numpy as np
import pytest
import tomli_w

import topologies as T
from helpers import refused


@pytest.fixture()
def work(tmp_path):
    """An empty working folder (what ``refused`` snapshots), beside a folder of plug-in code."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.fixture()
def plugins(tmp_path, monkeypatch):
    """A folder on ``sys.path`` with user graph functions and two installed distributions that
    declare ``fedopt.topologies`` entry points: one whose module raises on import, one whose
    ``entry_points.txt`` cannot be parsed. Outside the working folder, so imports write nothing there."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "odd_graphs.py").write_text(textwrap.dedent("""
        import networkx as nx

        def multi(n, *, seed=0):
            g = nx.MultiGraph(nx.cycle_graph(n))
            g.add_edge(0, 1)
            return g

        def directed(n, *, seed=0):
            return nx.DiGraph(nx.cycle_graph(n))
    """))
    (folder / "explodes_on_import.py").write_text("raise RuntimeError('no licence server')\n")
    for dist, entry_points in (("good_but_broken", "[fedopt.topologies]\nexploding = explodes_on_import:graph\n"),
                               ("unreadable", "[fedopt.topologies]\nthis line has no equals sign\n")):
        info = folder / f"{dist}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(entry_points)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr("sys.dont_write_bytecode", True)
    return folder


def _show(*argv, cwd, contains):
    return refused("topology", "show", *argv, cwd=cwd, contains=contains)


# ---- fedopt topology show ------------------------------------------------------------------------

def test_draw_into_a_missing_folder(work):
    _show("ring", "--n", "8", "--draw", "nope/ring.png", cwd=work, contains=("--draw", "'nope' does not exist"))


def test_draw_with_an_unknown_file_type(work):
    _show("ring", "--n", "8", "--draw", "ring.xyz", cwd=work, contains=("unknown file type '.xyz'", ".png"))


def test_draw_over_an_existing_file_needs_force(work):
    (work / "ring.png").write_bytes(b"mine")
    _show("ring", "--n", "8", "--draw", "ring.png", cwd=work, contains=("exists", "--force"))


def test_draw_onto_a_folder(work):
    (work / "out.png").mkdir()
    _show("ring", "--n", "8", "--draw", "out.png", "--force", cwd=work, contains="is a folder")


def test_user_multigraph(work, plugins):
    _show("odd_graphs:multi", "--n", "6", cwd=work, contains=("MultiGraph", "undirected simple networkx.Graph"))


def test_user_directed_graph(work, plugins):
    _show("odd_graphs:directed", "--n", "6", cwd=work, contains=("directed", "networkx.DiGraph"))


def test_entry_point_that_fails_to_load(work, plugins):
    _show("exploding", "--n", "6", cwd=work,
          contains=("entry point exploding = explodes_on_import:graph", "fedopt.topologies", "RuntimeError"))


def test_unknown_topology_names_matrix_and_an_unreadable_distribution(work, plugins):
    _show("moebius", "--n", "6", cwd=work, contains=("unknown topology 'moebius'", "matrix", "edgelist",
                                                     "cannot read the entry points of unreadable 0.1 (TypeError"))


def test_edgelist_without_a_path(work):
    _show("edgelist", "--n", "6", cwd=work, contains="topology 'edgelist' needs params.path")


def test_matrix_without_a_path(work):
    _show("matrix", "--n", "6", cwd=work, contains="topology 'matrix' needs params.path")


def test_empty_matrix_file_is_one_line_without_a_numpy_warning(work):
    (work / "W.txt").write_text("")
    _show("matrix", "--n", "4", "--set", "path=W.txt", cwd=work, contains="W.txt is empty or malformed")


def test_matrix_with_a_mixing_rule(work):
    np.savetxt(work / "W.txt", T.lazy(T.metropolis_hastings_weights(T.ring_graph(4))))
    _show("matrix", "--n", "4", "--set", "path=W.txt", "--mixing", "max_degree", cwd=work,
          contains="remove the mixing rule 'max_degree'")


def test_negative_seed(work):
    _show("erdos_renyi", "--n", "8", "--seed", "-1", cwd=work, contains="--seed must be >= 0")


# ---- configs: topology, schedule and mixing ------------------------------------------------------

def _run_refused(work, topology, contains, clients=8):
    raw = {"seed": 0, "clients": clients, "rounds": 3, "dtype": "float64",
           "problem": {"name": "quadratic", "params": {"x_dim": 2, "y_dim": 2}},
           "algorithm": {"name": "ma_dsbo", "params": {"outer_lr": 0.1, "inner_lr": 0.1, "z_lr": 0.1}},
           "topology": topology}
    (work / "bad.toml").write_text(tomli_w.dumps(raw))
    return refused("run", "bad.toml", "--quiet", cwd=work, contains=contains)


DROPOUT = "edge_dropout"
BAD_CONFIGS = {
    "dropout p not a number": ({"name": "ring", "schedule": {"name": DROPOUT, "params": {"p": "abc"}}},
                               ("topology.schedule.params.p", "'abc'")),
    "dropout p out of range": ({"name": "ring", "schedule": {"name": DROPOUT, "params": {"p": 1.0}}},
                               ("topology.schedule.params.p", "[0, 1)")),
    "dropout connected not a bool": ({"name": "ring", "schedule": {"name": DROPOUT, "params": {"connected": "yes"}}},
                                     "topology.schedule.params.connected must be true or false"),
    "dropout on a tree": ({"name": "star", "schedule": {"name": DROPOUT, "params": {"p": 0.2}}},
                          ("is a tree", "connected = false")),
    "dropout that is never connected": ({"name": "ring", "schedule": {"name": DROPOUT, "params": {"p": 0.7}}},
                                        "disconnected the graph in all 100 draws of round 0"),
    "unknown schedule": ({"name": "ring", "schedule": {"name": "markov"}},
                         ("unknown topology schedule 'markov'", "cycle, edge_dropout, random")),
    "unknown schedule param": ({"name": "ring", "schedule": {"name": "random", "params": {"p": 0.1}}},
                               ("schedule 'random' has no parameter(s) p", "allowed: (none)")),
    "cycle graphs not a list": ({"name": "ring", "schedule": {"name": "cycle", "params": {"graphs": "ring"}}},
                                "topology.schedule.params.graphs must be a non-empty list"),
    "cycle entry unknown": ({"name": "ring", "schedule": {"name": "cycle", "params": {"graphs": ["ring", "moebius"]}}},
                            "unknown topology 'moebius'"),
    "cycle entry bad params": ({"name": "ring", "schedule": {"name": "cycle",
                                                             "params": {"graphs": [{"name": "torus", "params": {"p": 1}}]}}},
                               "topology 'torus' has no parameter(s) p"),
    "edgelist without path": ({"name": "edgelist"}, "topology 'edgelist' needs params.path"),
    "matrix without path": ({"name": "matrix"}, "topology 'matrix' needs params.path"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_topology_config(case, work):
    topology, contains = BAD_CONFIGS[case]
    _run_refused(work, topology, contains)


@pytest.mark.parametrize("extra", [{"schedule": {"name": DROPOUT, "params": {"p": 0.2}}}, {"mixing": "laplacian"}])
def test_matrix_config_with_a_schedule_or_a_mixing_rule(work, extra):
    np.savetxt(work / "W.txt", T.lazy(T.metropolis_hastings_weights(T.ring_graph(8))))
    _run_refused(work, {"name": "matrix", "params": {"path": "W.txt"}, **extra},
                 "topology 'matrix' takes its mixing matrix as given")
