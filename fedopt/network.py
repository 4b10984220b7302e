"""A gossip network for a run: the topology's graph and its round -> mixing-matrix schedule, as
checked numpy matrices (for accounting and the reference loop) and torch matrices (for gossip)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch

import topologies
from fedopt.errors import ConfigError

__all__ = ["Network", "build_network"]


@dataclass
class Network:
    """Graph + schedule. ``static`` networks cache their one torch matrix."""

    name: str
    graph: nx.Graph
    schedule: Callable[[int], np.ndarray]
    static: bool
    sparse: bool | None = None
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return self.graph.number_of_nodes()

    def numpy(self, t: int) -> np.ndarray:
        return self.schedule(0 if self.static else t)

    def torch(self, t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (0 if self.static else t, dtype, str(device))
        w = self._cache.get(key)
        if w is None:
            w = topologies.to_torch(self.numpy(t), dtype=dtype, device=device, sparse=self.sparse)
            if self.static:
                self._cache[key] = w
        return w

    def directed_edges(self, t: int) -> int:
        """Messages per gossip round: nonzero off-diagonal weights (each edge carries two)."""
        if self.static and "edges" in self._cache:
            return self._cache["edges"]
        w = self.numpy(t)
        edges = int(np.count_nonzero(w) - np.count_nonzero(np.diag(w)))
        if self.static:
            self._cache["edges"] = edges
        return edges

    def spectral_gap(self, t: int = 0) -> float:
        return topologies.spectral_gap(self.numpy(t))


def build_network(name: str, n: int, *, seed: int, params: dict[str, Any], mixing: str = "metropolis_hastings",
                  schedule: dict[str, Any] | None = None, sparse: bool | None = None) -> Network:
    """Build and check the network of a run; every problem is a one-line :class:`ConfigError`."""
    try:
        if name == "matrix":
            path = params.get("path", "")
            if set(params) - {"path"}:
                raise topologies.TopologyError(f"topology 'matrix' takes only params.path, got {sorted(params)}")
            graph, w = topologies.load_matrix(path)
            if graph.number_of_nodes() != n:
                raise topologies.TopologyError(f"mixing matrix {path!r} is {graph.number_of_nodes()}x"
                                               f"{graph.number_of_nodes()} but the run has {n} nodes (clients)")
            return Network(name, graph, topologies.static_schedule(w, graph), static=True, sparse=sparse)
        graph = topologies.build_graph(name, n, seed=seed, **params)
        if not schedule:
            w = topologies.mixing_matrix(graph, mixing)
            return Network(name, graph, topologies.static_schedule(w, graph), static=True, sparse=sparse)
        kind, sp = schedule.get("name"), dict(schedule.get("params", {}))
        if kind == "edge_dropout":
            sched = topologies.edge_dropout_schedule(graph, float(sp.pop("p", 0.1)), seed=seed, rule=mixing)
        elif kind == "random":
            sched = topologies.random_graph_schedule(
                lambda s: topologies.build_graph(name, n, seed=s, **params), rule=mixing)
        elif kind == "cycle":
            names = sp.pop("graphs", [name])
            sched = topologies.cycle_schedule([topologies.build_graph(g, n, seed=seed) for g in names], rule=mixing)
        else:
            raise topologies.TopologyError(f"unknown topology schedule {kind!r}; available: cycle, edge_dropout, random")
        if sp:
            raise topologies.TopologyError(f"topology schedule {kind!r} has no parameter(s) {', '.join(sorted(sp))}")
        sched(0)  # check round 0 now, before the run
        return Network(name, graph, sched, static=False, sparse=sparse)
    except topologies.TopologyError as e:
        raise ConfigError(str(e)) from None
