"""Topologies through the command line: user graphs end to end, and bad graphs rejected (exit 2)."""

import textwrap

import numpy as np
import pandas as pd
import pytest
import tomli_w

import topologies
from fedopt.cli import main


def _ma_dsbo_config(tmp_path, topology: dict, clients: int = 8):
    raw = {"seed": 0, "clients": clients, "rounds": 20, "eval_every": 10, "dtype": "float64",
           "problem": {"name": "quadratic", "params": {"x_dim": 3, "y_dim": 3, "delta": 0.5}},
           "algorithm": {"name": "ma_dsbo", "params": {"outer_lr": 0.3, "inner_lr": 0.2, "z_lr": 0.2}},
           "topology": topology}
    path = tmp_path / "dec.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _converged(out):
    df = pd.read_csv(out / "metrics.csv")
    g = df[df.metric == "hypergrad_norm_sq"].sort_values("round").value.to_numpy()
    return g[-1] < 0.1 * g[0]


def test_user_graph_module_runs_end_to_end(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_graphs.py").write_text(textwrap.dedent("""
        import networkx as nx

        def ladder(n, *, seed=0):
            return nx.ladder_graph(n // 2)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _ma_dsbo_config(tmp_path, {"name": "my_graphs:ladder", "n": 8})
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert _converged(out)
    assert 'name = "my_graphs:ladder"' in (out / "config.toml").read_text()


def test_user_edge_list_runs_end_to_end(tmp_path, capsys):
    edges = tmp_path / "graph.txt"
    edges.write_text("# a ring of 6 with one chord\n" + "".join(f"{i} {(i + 1) % 6}\n" for i in range(6)) + "0 3\n")
    cfg = _ma_dsbo_config(tmp_path, {"name": "edgelist", "params": {"path": str(edges)}}, clients=6)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert _converged(out)


def test_user_mixing_matrix_runs_end_to_end(tmp_path, capsys):
    w = topologies.lazy(topologies.metropolis_hastings_weights(topologies.ring_graph(8)))
    np.savetxt(tmp_path / "W.txt", w)
    cfg = _ma_dsbo_config(tmp_path, {"name": "matrix", "params": {"path": str(tmp_path / "W.txt")}})
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert _converged(out)


def _bad_matrix(tmp_path, w):
    np.savetxt(tmp_path / "W.txt", w)
    return {"name": "matrix", "params": {"path": str(tmp_path / "W.txt")}}


BAD = {
    "disconnected user graph": (lambda p: {"name": "edgelist", "params": {"path": _edges(p, "0 1\n1 2\n3 4\n4 5\n5 6\n6 7\n")}},
                                "disconnected \\(2 components\\)"),
    "empty edge list": (lambda p: {"name": "edgelist", "params": {"path": _edges(p, "")}}, "has no edges"),
    "malformed edge list": (lambda p: {"name": "edgelist", "params": {"path": _edges(p, "0 1\n1 x 2\n")}},
                            "line 2: expected two node labels"),
    "missing edge list": (lambda p: {"name": "edgelist", "params": {"path": str(p / "nope.txt")}}, "does not exist"),
    "non-symmetric W": (lambda p: _bad_matrix(p, np.roll(np.eye(8), 1, axis=1) * 0.5 + np.eye(8) * 0.5), "not symmetric"),
    "non-stochastic W": (lambda p: _bad_matrix(p, 0.9 * topologies.metropolis_hastings_weights(topologies.ring_graph(8))),
                         "not doubly stochastic"),
    "unknown graph": (lambda p: {"name": "hypercube_xyz"}, "unknown topology 'hypercube_xyz'"),
    "wrong node count": (lambda p: {"name": "edgelist", "params": {"path": _edges(p, "0 1\n1 2\n2 0\n")}},
                         "has 3 nodes, but the run has 8"),
    "unknown mixing rule": (lambda p: {"name": "ring", "mixing": "uniform"}, "topology.mixing must be one of"),
}


def _edges(tmp_path, text):
    path = tmp_path / "edges.txt"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_topologies_exit_2_with_one_line(case, tmp_path, capsys):
    make, pattern = BAD[case]
    cfg = _ma_dsbo_config(tmp_path, make(tmp_path))
    out = tmp_path / "never"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedopt: error: ") and err.count("\n") == 1
    import re

    assert re.search(pattern, err), err
    assert not out.exists()


def test_topology_and_algorithm_kinds_must_match(tmp_path, capsys):
    cfg = _ma_dsbo_config(tmp_path, {"name": "ring"})
    assert main(["run", str(cfg), "--quiet", "--set", "algorithm.name=fedmbo",
                 "--set", "algorithm.params={outer_lr=0.1, inner_lr=0.1, neumann_lr=0.1}"]) == 2
    assert "is federated; remove the [topology] table" in capsys.readouterr().err
    raw_path = tmp_path / "nt.toml"
    raw = {"problem": {"name": "quadratic"}, "clients": 4,
           "algorithm": {"name": "ma_dsbo", "params": {"outer_lr": 0.1, "inner_lr": 0.1, "z_lr": 0.1}}}
    raw_path.write_text(tomli_w.dumps(raw))
    assert main(["run", str(raw_path), "--quiet"]) == 2
    assert "is decentralized and needs a [topology] table" in capsys.readouterr().err


def test_topology_show(tmp_path, capsys):
    assert main(["topology", "show", "ring", "--n", "16", "--draw", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "nodes 16  edges 16  degree 2..2" in out and "spectral gap 0.0507" in out
    assert (tmp_path / "g.png").stat().st_size > 1000
    assert main(["topology", "show", "erdos_renyi", "--n", "40", "--set", "p=0.01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedopt: error: erdos_renyi: G(n=40, p=0.01) was disconnected") and err.count("\n") == 1
