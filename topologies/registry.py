"""The topology registry: built-in graph families, user functions, files, and entry points.

A topology is a function ``(n, *, seed, **params) -> networkx.Graph``. It is found, in order, as

1. a name registered with :func:`register_topology` (the built-ins below, or a user's own
   ``@register_topology("ladder")`` in code that has been imported);
2. a dotted path ``"package.module:function"`` (imported on demand; no edits to this package);
3. an entry point in the group ``fedopt.topologies`` of any installed distribution.

The lookup is :class:`topologies.plugins.PluginRegistry`, the resolver every ``fedopt`` registry
uses too: a broken plug-in is one :class:`TopologyError` line naming it and the problem.

:func:`build_graph` calls the function and checks what comes back: a connected, undirected graph on
exactly ``n`` nodes, relabelled ``0..n-1``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import networkx as nx

from topologies import graphs
from topologies.graphs import TopologyError
from topologies.plugins import PluginRegistry, describe

__all__ = ["ENTRY_POINT_GROUP", "REGISTRY", "TOPOLOGIES", "build_graph", "get_topology", "register_topology",
           "topology_names"]

ENTRY_POINT_GROUP = "fedopt.topologies"
REGISTRY: PluginRegistry[Callable[..., nx.Graph]] = PluginRegistry(
    "topology", group=ENTRY_POINT_GROUP, error=TopologyError, positional=("n",))
TOPOLOGIES: dict[str, Callable[..., nx.Graph]] = REGISTRY.registered  # the registered names (no plug-ins)


def register_topology(name: str) -> Callable[[Callable[..., nx.Graph]], Callable[..., nx.Graph]]:
    """Decorator: make ``fn(n, *, seed, **params) -> nx.Graph`` available as topology ``name``."""
    return REGISTRY.register(name)


register_topology("ring")(lambda n, *, seed=0: graphs.ring_graph(n))
register_topology("complete")(lambda n, *, seed=0: graphs.complete_graph(n))
register_topology("star")(lambda n, *, seed=0: graphs.star_graph(n))
register_topology("exponential")(lambda n, *, seed=0: graphs.exponential_graph(n))


@register_topology("torus")
def _torus(n: int, *, seed: int = 0, rows: int = 0, cols: int = 0) -> nx.Graph:
    del seed
    if rows or cols:
        return graphs.torus_graph(n, rows=rows or n // max(cols, 1), cols=cols or n // max(rows, 1))
    return graphs.torus_graph(n)


@register_topology("erdos_renyi")
def _erdos_renyi(n: int, *, seed: int = 0, p: float = 0.3) -> nx.Graph:
    return graphs.erdos_renyi_graph(n, p, seed=seed)


@register_topology("random_regular")
def _random_regular(n: int, *, seed: int = 0, d: int = 4) -> nx.Graph:
    return graphs.random_regular_graph(n, d, seed=seed)


@register_topology("small_world")
def _small_world(n: int, *, seed: int = 0, k: int = 4, p: float = 0.1) -> nx.Graph:
    return graphs.small_world_graph(n, k, p, seed=seed)


def _required_path(name: str, path: object, what: str) -> str:
    if path is None or path == "":
        raise TopologyError(f"topology {name!r} needs params.path ({what})")
    if not isinstance(path, str):
        raise TopologyError(f"topology {name!r}: params.path must be a string (a file path), got {path!r}")
    return path


@register_topology("edgelist")
def _edgelist(n: int, *, seed: int = 0, path: str | None = None) -> nx.Graph:
    """The graph of an edge-list file (``params.path``: one ``u v`` per line)."""
    del n, seed
    return graphs.from_edgelist(_required_path("edgelist", path, "a text file with one edge 'u v' per line"))


@register_topology("matrix")
def _matrix(n: int, *, seed: int = 0, path: str | None = None) -> nx.Graph:
    """The support graph of a user's mixing matrix (``params.path``). As a run's topology the
    matrix itself is the mixing (see :func:`fedopt.network.build_network`)."""
    del n, seed
    from topologies import load_matrix

    return load_matrix(path)[0]


def topology_names() -> list[str]:
    """Registered names plus installed entry points."""
    return REGISTRY.names()


def get_topology(name: str) -> Callable[..., nx.Graph]:
    """The graph function called ``name`` (registered, ``module:function``, or entry point); a
    broken or unknown one is a one-line :class:`TopologyError` (see :mod:`topologies.plugins`)."""
    return REGISTRY.get(name)


def build_graph(name: str, n: int, *, seed: int = 0, **params: Any) -> nx.Graph:
    """Call topology ``name`` and check the result: connected, undirected, exactly ``n`` nodes."""
    fn = get_topology(name)
    sig = inspect.signature(fn)
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    allowed = {k for k, p in sig.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"n"}
    unknown = sorted(set(params) - allowed) if not accepts_var_kw else []
    if unknown:
        raise TopologyError(f"topology {name!r} has no parameter(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(sorted(allowed - {'seed'})) or '(none)'}")
    kwargs = dict(params)
    if "seed" in sig.parameters or accepts_var_kw:
        kwargs["seed"] = seed
    try:
        g = fn(n, **kwargs)
    except TopologyError:
        raise
    except (TypeError, ValueError, nx.NetworkXException) as e:
        raise TopologyError(f"topology {name!r} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except Exception as e:
        if not REGISTRY.is_plugin(name):
            raise
        raise TopologyError(f"topology {name!r} raised {describe(e)}") from None
    g = graphs.from_networkx(g, name=f"topology {name!r}")
    if g.number_of_nodes() != n:
        raise TopologyError(f"topology {name!r} has {g.number_of_nodes()} nodes, but the run has {n} (clients)")
    return g
