"""Gossip topologies: networkx graphs, mixing matrices, spectral gaps, time-varying schedules and
a plug-in registry for user graphs. This package imports nothing from :mod:`fedopt`."""

from topologies.graphs import (
    TopologyError,
    complete_graph,
    erdos_renyi_graph,
    exponential_graph,
    from_adjacency,
    from_edgelist,
    from_networkx,
    random_regular_graph,
    ring_graph,
    small_world_graph,
    star_graph,
    torus_graph,
)
from topologies.mixing import (
    MIXING_RULES,
    check_mixing_matrix,
    laplacian_weights,
    lazy,
    max_degree_weights,
    metropolis_hastings_weights,
    mixing_matrix,
    sparse_mixing_matrix,
    spectral_gap,
    to_torch,
)
from topologies.registry import ENTRY_POINT_GROUP, build_graph, get_topology, register_topology, topology_names
from topologies.schedules import (
    Schedule,
    cycle_schedule,
    edge_dropout_schedule,
    random_graph_schedule,
    static_schedule,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "MIXING_RULES",
    "Schedule",
    "TopologyError",
    "build_graph",
    "check_mixing_matrix",
    "complete_graph",
    "cycle_schedule",
    "edge_dropout_schedule",
    "erdos_renyi_graph",
    "exponential_graph",
    "from_adjacency",
    "from_edgelist",
    "from_networkx",
    "get_topology",
    "laplacian_weights",
    "lazy",
    "load_matrix",
    "max_degree_weights",
    "metropolis_hastings_weights",
    "mixing_matrix",
    "random_graph_schedule",
    "random_regular_graph",
    "register_topology",
    "ring_graph",
    "small_world_graph",
    "sparse_mixing_matrix",
    "spectral_gap",
    "star_graph",
    "static_schedule",
    "to_torch",
    "topology_names",
    "torus_graph",
]


def load_matrix(path: str):
    """A user's mixing matrix from ``.npy`` or a whitespace/comma-separated text file; the graph is
    its off-diagonal support. Returns ``(graph, W)`` after :func:`check_mixing_matrix`."""
    import warnings
    from pathlib import Path

    import numpy as np

    from topologies.registry import _required_path

    p = Path(_required_path("matrix", path, "a .npy or text file holding the mixing matrix"))
    if not p.is_file():
        raise TopologyError(f"mixing matrix file {str(p)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (e.g. "input contained no data") instead of failing
            w = np.load(p) if p.suffix == ".npy" else np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=2)
            w = np.asarray(w, dtype=float)
    except (ValueError, TypeError, OSError, EOFError, Warning) as e:
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"mixing matrix file {p.name} is empty or malformed: {reason}") from None
    check_mixing_matrix(w, require_gap=False)
    g = from_networkx(from_adjacency((np.abs(w) > 1e-12).astype(float) * (1 - np.eye(len(w)))), name=f"mixing matrix {p.name}")
    check_mixing_matrix(w, g)
    return g, w
