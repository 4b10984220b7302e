"""A gossip network for a run: the topology's graph and its round -> mixing-matrix schedule, as
checked numpy matrices (for accounting and the reference loop) and torch matrices (for gossip).

A static network holds one matrix. A time-varying one (``topology.schedule``) draws ``W_t`` as a
sparse matrix every gossip round (:mod:`topologies.schedules`): the torch matrix gossip uses is
built from it directly (CSR above 256 nodes, as for a static network), and the dense numpy copy
only when an engine asks for it.

Schedules (``topology.schedule = {name, params}``):

* ``edge_dropout``, params ``p`` (a number in [0, 1), default 0.1) and ``connected`` (default
  true): every edge fails independently with probability ``p`` each round; with ``connected`` each
  round's graph stays connected (bridges never fail; a tree is refused), without it a round may be
  disconnected (see :func:`topologies.edge_dropout_schedule`). Seeded by the run's seed and the round.
* ``random``: a fresh graph of the topology (same params) every round, seeded by the run's seed and
  the round.
* ``cycle``, param ``graphs`` (default: the topology alone): round ``t`` uses graph ``t mod k``; an
  entry is a topology name (the run's own topology name takes the run's ``params``) or a table
  ``{name, params}``; every entry is built with the run's seed.

``name = "matrix"`` takes its mixing matrix from ``params.path``; it has no mixing rule and no
schedule: a schedule, or a rule other than the default (which a parsed config cannot tell from an
omitted one), is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch

import topologies
from fedopt.errors import ConfigError

__all__ = ["DEFAULT_MIXING", "SCHEDULES", "Network", "build_network"]

DEFAULT_MIXING = "metropolis_hastings"
SCHEDULES = {"cycle": ("graphs",), "edge_dropout": ("p", "connected"), "random": ()}


@dataclass
class Network:
    """Graph + schedule. ``static`` networks cache their one torch matrix; time-varying ones keep
    the latest round's matrices (every engine asks for round ``t`` several times, in order)."""

    name: str
    graph: nx.Graph
    schedule: Callable[[int], np.ndarray]
    static: bool
    sparse: bool | None = None
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        return self.graph.number_of_nodes()

    def _latest(self, key: Any, t: int, make: Callable[[], Any]) -> Any:
        hit = self._cache.pop(key, None)
        if hit is not None and hit[0] == t:
            self._cache[key] = hit
            return hit[1]
        del hit  # freed before the next round's matrix is made: the allocator reuses its memory
        value = make()
        self._cache[key] = (t, value)
        return value

    def numpy(self, t: int) -> np.ndarray:
        """``W_t`` as a dense numpy array."""
        if self.static:
            return self.schedule(0)
        return self._latest("dense", t, lambda: self.schedule(t))

    def sparse_matrix(self, t: int) -> sp.csr_array:
        """``W_t`` as a scipy CSR array (no dense intermediate for the built-in schedules)."""
        at = getattr(self.schedule, "sparse", None)
        if at is None:
            return sp.csr_array(self.numpy(t))
        return at(0 if self.static else t)

    def torch(self, t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.static:
            key = (0, dtype, str(device))
            w = self._cache.get(key)
            if w is None:
                w = self._cache[key] = topologies.to_torch(self.numpy(0), dtype=dtype, device=device, sparse=self.sparse)
            return w
        return self._latest(("torch", dtype, str(device)), t, lambda: topologies.to_torch(
            self.sparse_matrix(t), dtype=dtype, device=device, sparse=self.sparse))

    def directed_edges(self, t: int) -> int:
        """Messages per gossip round: nonzero off-diagonal weights (each edge carries two)."""
        if self.static and "edges" in self._cache:
            return self._cache["edges"]
        w = self.sparse_matrix(t)
        edges = int(w.nnz - np.count_nonzero(w.diagonal()))
        if self.static:
            self._cache["edges"] = edges
        return edges

    def spectral_gap(self, t: int = 0) -> float:
        return topologies.spectral_gap(self.numpy(t))


def _cycle_graphs(name: str, n: int, seed: int, params: dict[str, Any], graphs: Any) -> list[nx.Graph]:
    """The graphs of a ``cycle`` schedule: ``graphs`` entries are names or ``{name, params}`` tables."""
    what = "topology.schedule.params.graphs"
    if graphs is None:
        graphs = [name]
    if isinstance(graphs, (str, Mapping)) or not isinstance(graphs, (list, tuple)) or not graphs:
        raise ConfigError(f"{what} must be a non-empty list of topology names or {{name, params}} tables, "
                          f"got {graphs!r}")
    out = []
    for i, entry in enumerate(graphs):
        if isinstance(entry, str):
            entry_name, entry_params = entry, (params if entry == name else {})
        elif isinstance(entry, Mapping) and set(entry) <= {"name", "params"} and isinstance(entry.get("name"), str):
            entry_name, entry_params = entry["name"], entry.get("params", params if entry["name"] == name else {})
            if not isinstance(entry_params, Mapping):
                raise ConfigError(f"{what}[{i}].params must be a table, got {entry_params!r}")
        else:
            raise ConfigError(f"{what}[{i}] must be a topology name or a table with name (and params), got {entry!r}")
        if entry_name == "matrix":
            raise ConfigError(f"{what}[{i}]: 'matrix' cannot be cycled (a schedule builds each W from a graph with "
                              "the mixing rule); use an edge list of its graph instead")
        out.append(topologies.build_graph(entry_name, n, seed=seed, **dict(entry_params)))
    return out


def _dropout_p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, Real) or not (math.isfinite(p) and 0 <= p < 1):
        raise ConfigError(f"topology.schedule.params.p must be a number in [0, 1) (the chance an edge fails in a "
                          f"round), got {p!r}")
    return float(p)


def _schedule_spec(schedule: Any) -> tuple[str, dict[str, Any]]:
    """``(name, params)`` of a ``topology.schedule`` table, checked against :data:`SCHEDULES`."""
    if not isinstance(schedule, Mapping) or not set(schedule) <= {"name", "params"} or "name" not in schedule:
        raise ConfigError(f"topology.schedule must be a table with name (and params), got {schedule!r}")
    kind, sp_ = schedule["name"], schedule.get("params", {})
    if not isinstance(kind, str) or kind not in SCHEDULES:
        raise ConfigError(f"unknown topology schedule {kind!r}; available: {', '.join(sorted(SCHEDULES))}")
    if not isinstance(sp_, Mapping):
        raise ConfigError(f"topology.schedule.params must be a table, got {sp_!r}")
    unknown = sorted(set(sp_) - set(SCHEDULES[kind]))
    if unknown:
        raise ConfigError(f"topology schedule {kind!r} has no parameter(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(SCHEDULES[kind]) or '(none)'}")
    return kind, dict(sp_)


def build_network(name: str, n: int, *, seed: int, params: dict[str, Any], mixing: str | None = DEFAULT_MIXING,
                  schedule: dict[str, Any] | None = None, sparse: bool | None = None) -> Network:
    """Build and check the network of a run; every problem is a one-line :class:`ConfigError`.

    ``mixing=None`` means the default rule (``metropolis_hastings``); for ``name = "matrix"`` any
    rule other than the default, and any schedule, is refused (the file is the mixing matrix)."""
    try:
        if schedule is not None:
            kind, sp_ = _schedule_spec(schedule)
        if name == "matrix":
            if schedule is not None:
                raise ConfigError("topology 'matrix' takes its mixing matrix as given; remove topology.schedule "
                                  "(schedules rebuild W every round from a graph and a mixing rule)")
            if mixing not in (None, DEFAULT_MIXING):
                raise ConfigError(f"topology 'matrix' takes its mixing matrix as given; remove the mixing rule "
                                  f"{mixing!r} (topology.mixing, --mixing: a rule makes W from a graph)")
            if set(params) - {"path"}:
                raise ConfigError(f"topology 'matrix' takes only params.path, got {', '.join(sorted(params))}")
            graph, w = topologies.load_matrix(params.get("path"))
            if graph.number_of_nodes() != n:
                raise ConfigError(f"mixing matrix {params.get('path')!r} is {graph.number_of_nodes()}x"
                                  f"{graph.number_of_nodes()} but the run has {n} nodes (clients)")
            return Network(name, graph, topologies.static_schedule(w, graph), static=True, sparse=sparse)
        mixing = DEFAULT_MIXING if mixing is None else mixing
        if mixing not in topologies.MIXING_RULES:
            raise ConfigError(f"topology.mixing must be one of {', '.join(sorted(topologies.MIXING_RULES))}, "
                              f"got {mixing!r}")
        graph = topologies.build_graph(name, n, seed=seed, **params)
        if schedule is None:
            w = topologies.mixing_matrix(graph, mixing)
            return Network(name, graph, topologies.static_schedule(w, graph), static=True, sparse=sparse)
        if kind == "edge_dropout":
            connected = sp_.get("connected", True)
            if not isinstance(connected, bool):
                raise ConfigError(f"topology.schedule.params.connected must be true or false, got {connected!r}")
            sched = topologies.edge_dropout_schedule(graph, _dropout_p(sp_.get("p", 0.1)), seed=seed, rule=mixing,
                                                     connected=connected)
        elif kind == "random":
            sched = topologies.random_graph_schedule(
                lambda s: topologies.build_graph(name, n, seed=s, **params), rule=mixing, seed=seed)
        else:
            sched = topologies.cycle_schedule(_cycle_graphs(name, n, seed, params, sp_.get("graphs")), rule=mixing)
        sched.sparse(0)  # round 0 now, before the run
        return Network(name, graph, sched, static=False, sparse=sparse)
    except topologies.TopologyError as e:
        raise ConfigError(str(e)) from None
