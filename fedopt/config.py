"""One validated config schema for the CLI, sweeps, tests and the Python API.

A run config is a TOML document (or the equivalent dict):

.. code-block:: toml

    seed = 0            # everything random derives from it
    clients = 20        # M, the federation size
    rounds = 100        # K, outer iterations
    eval_every = 5      # metrics every this many outer iterations (and at the end)
    dtype = "float64"   # or "float32"
    device = "cpu"      # or "cuda", "cuda:1"
    threads = 1         # torch intra-op threads (default 0: torch's choice); 1 is fastest for tiny models
    checkpoint_every = 20  # a run folder's checkpoint every 20 outer iterations (default: about
                           # every tenth of the run; 0: never); it does not change any number

    [problem]           # a component: a registry name and keyword parameters
    name = "hyper_cleaning"
    params = { corruption = 0.4 }

    [data]              # dataset problems only
    name = "digits"
    val_fraction = 0.2  # per-client validation part
    [partition]
    name = "dirichlet"
    params = { alpha = 0.1 }

    [algorithm]
    name = "fedmbo"
    params = { outer_lr = 0.5, inner_lr = 0.1, neumann_lr = 0.1 }

    [engine]
    name = "vmap"

Component parameters are checked against the registered factory's keyword-only signature
(unknown keys, wrong types) when the config is loaded; value ranges are checked by the factories
when components are built, which also happens before any work. Every failure is one
:class:`~fedopt.errors.ConfigError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import inspect
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedopt.algorithms.parts import COUNT_MAX
from fedopt.errors import ConfigError, check
from fedopt.registry import ALGORITHMS, DATASETS, ENGINES, PARTITIONERS, PROBLEMS, Registry
from topologies.plugins import describe

__all__ = ["Component", "DataConfig", "RunConfig", "TopologyConfig", "apply_overrides", "load_config", "parse_config",
           "plugin_folders"]

_DTYPES = ("float32", "float64")
INT64_MAX = 2**63 - 1  # the largest integer a parameter can hold (torch and numpy use int64)


@dataclass(frozen=True)
class Component:
    """A registry name plus the keyword parameters of its factory."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig(Component):
    """A dataset component plus how each client's part is split into train and validation."""

    val_fraction: float = 0.2


@dataclass(frozen=True)
class TopologyConfig(Component):
    """A gossip topology: a graph (registered name, ``module:function``, ``edgelist`` with
    ``params.path``, or ``matrix`` with ``params.path`` to a mixing matrix), a mixing rule, an
    optional time-varying schedule (``{name = "edge_dropout" | "random" | "cycle", params}``) and
    whether gossip uses a sparse matrix (default: automatic)."""

    mixing: str = "metropolis_hastings"
    schedule: Mapping[str, Any] | None = None
    sparse: bool | None = None


@dataclass(frozen=True)
class RunConfig:
    """A fully validated run description (see the module docstring)."""

    problem: Component
    algorithm: Component
    data: DataConfig | None = None
    partition: Component | None = None
    engine: Component = Component("vmap")
    topology: TopologyConfig | None = None
    clients: int = 10
    rounds: int = 100
    eval_every: int = 1
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float64"
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads for the run (0: torch's default); restored afterwards
    checkpoint_every: int | None = None  # outer iterations between checkpoints (None: auto, 0: never)

    def checkpoint_interval(self) -> int:
        """Outer iterations between a run folder's checkpoints: ``checkpoint_every``, or by default
        about a tenth of the run (0: never)."""
        if self.checkpoint_every is not None:
            return self.checkpoint_every
        return max(1, -(-self.rounds // 10))

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what ``config.toml`` holds); drops empty tables."""
        d = asdict(self)
        for k in ("data", "partition", "topology", "checkpoint_every"):
            if d[k] is None:
                del d[k]
        if "topology" in d:
            for k in ("schedule", "sparse"):
                if d["topology"][k] is None:
                    del d["topology"][k]
        for comp in d.values():
            if isinstance(comp, dict):
                comp["params"] = dict(comp["params"])
        return d


# ---- parameter checking against factory signatures ----------------------------------------

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked (and int->float widened) against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str | bool | int):
            return value
    elif isinstance(tp, types.UnionType) or origin is typing.Union:
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            check(-INT64_MAX - 1 <= value <= INT64_MAX,
                  f"{where} = {value} does not fit in 64 bits; allowed: {-INT64_MAX - 1}..{INT64_MAX}")
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{where} = {value} is too large for a float; allowed: finite numbers "
                                  "up to about 1.8e308") from None
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")


def check_params(fn: Callable[..., Any], params: Mapping[str, Any], where: str, label: str) -> dict[str, Any]:
    """Validate ``params`` against ``fn``'s keyword-only parameters; return them type-coerced."""
    check(isinstance(params, Mapping), f"{where} must be a table of parameters, got {params!r}")
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except TypeError:  # a callable object without annotations of its own: values go unchecked
        hints = {}
    except Exception as e:  # noqa: BLE001 -- a plug-in's annotations may name anything
        raise ConfigError(f"{label}: cannot read the type annotations of its factory ({describe(e)})") from None
    allowed = {n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    out = {}
    for k, v in params.items():
        if k not in allowed:
            names = ", ".join(sorted(allowed)) or "(none)"
            raise ConfigError(f"unknown key {where}.{k} for {label}; allowed: {names}")
        out[k] = _coerce(v, hints.get(k, Any), f"{where}.{k}")
    missing = [n for n, p in allowed.items() if p.default is inspect.Parameter.empty and n not in out]
    check(not missing, f"{where} is missing required key(s) for {label}: {', '.join(missing)}")
    return out


def _component(raw: Any, key: str, registry: Registry[Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    if isinstance(raw, str):
        raw = {"name": raw}
    check(isinstance(raw, Mapping), f"{key} must be a table with 'name' (and 'params'), got {raw!r}")
    allowed = ("name", "params", *extra)
    for k in raw:
        check(k in allowed, f"unknown key {key}.{k}; allowed: {', '.join(allowed)}")
    if "name" not in raw:  # the names only now: listing them scans the installed entry points
        raise ConfigError(f"{key}.name is missing; available: {', '.join(registry.names())}")
    check(isinstance(raw["name"], str), f"{key}.name must be a string, got {raw['name']!r}")
    factory = registry.get(raw["name"])
    params = check_params(factory, raw.get("params", {}), f"{key}.params", f"{registry.kind} {raw['name']!r}")
    return {**{k: raw[k] for k in extra if k in raw}, "name": raw["name"], "params": params}


_TOP = {
    "problem", "algorithm", "data", "partition", "engine", "topology", "clients", "rounds", "eval_every", "seed",
    "dtype", "device", "threads", "checkpoint_every",
}


def _topology(raw: Any, clients: int | None) -> tuple[TopologyConfig, int | None]:
    """Parse ``[topology]``; graph parameters are checked when the graph is built."""
    import topologies

    if isinstance(raw, str):
        raw = {"name": raw}
    check(isinstance(raw, Mapping), f"topology must be a table with 'name', got {raw!r}")
    allowed = ("name", "params", "mixing", "schedule", "sparse", "n")
    for k in raw:
        check(k in allowed, f"unknown key topology.{k}; allowed: {', '.join(allowed)}")
    name = raw.get("name")
    if not (isinstance(name, str) and name != ""):
        raise ConfigError(f"topology.name must be a graph name; available: {', '.join(topologies.topology_names())}, "
                          "edgelist, matrix, or 'package.module:function'")
    if name != "matrix":  # resolve a plug-in graph now, so a broken one fails before any run
        try:
            topologies.get_topology(name)
        except topologies.TopologyError as e:
            raise ConfigError(str(e)) from None
    params = raw.get("params", {})
    check(isinstance(params, Mapping), f"topology.params must be a table, got {params!r}")
    mixing = raw.get("mixing", "metropolis_hastings")
    check(mixing in topologies.MIXING_RULES,
          f"topology.mixing must be one of {', '.join(sorted(topologies.MIXING_RULES))}, got {mixing!r}")
    schedule = raw.get("schedule")
    if schedule is not None:
        check(isinstance(schedule, Mapping) and set(schedule) <= {"name", "params"} and "name" in schedule,
              f"topology.schedule must be a table with name (and params), got {schedule!r}")
        sp = schedule.get("params", {})
        check(isinstance(sp, Mapping), f"topology.schedule.params must be a table, got {sp!r}")
    sparse = raw.get("sparse")
    check(sparse is None or isinstance(sparse, bool), f"topology.sparse must be true/false, got {sparse!r}")
    n = raw.get("n")
    if n is not None:
        check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"topology.n must be an integer >= 1, got {n!r}")
        check(clients is None or clients == n, f"topology.n = {n} differs from clients = {clients}; give one of them")
    return TopologyConfig(name, dict(params), mixing, dict(schedule) if schedule else None, sparse), n


def parse_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a raw (TOML-shaped) mapping into a :class:`RunConfig`."""
    check(isinstance(raw, Mapping), "a config must be a table")
    for k in raw:
        check(k in _TOP, f"unknown top-level key {k!r}; allowed: {', '.join(sorted(_TOP))}")
    for k in ("problem", "algorithm"):
        check(k in raw, f"the config has no [{k}] table")

    def integer(k: str, default: int, lo: int, hi: int = COUNT_MAX) -> int:
        v = raw.get(k, default)
        check(isinstance(v, int) and not isinstance(v, bool), f"{k} must be an integer, got {v!r}")
        check(v >= lo, f"{k} must be >= {lo}, got {v}")
        check(v <= hi, f"{k} = {v} is too large; allowed: {lo}..{hi}")
        return v

    dtype = raw.get("dtype", "float64")
    check(dtype in _DTYPES, f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    device = raw.get("device", "cpu")
    check(isinstance(device, str), f"device must be a string such as 'cpu' or 'cuda', got {device!r}")

    data = partition = None
    if "data" in raw:
        d = _component(raw["data"], "data", DATASETS, extra=("val_fraction",))
        vf = _coerce(d.pop("val_fraction", 0.2), float, "data.val_fraction")
        check(0 < vf < 1, f"data.val_fraction must be in (0, 1), got {vf}")
        data = DataConfig(d["name"], d["params"], vf)
    if "partition" in raw:
        check(data is not None, "a [partition] table needs a [data] table")
        p = _component(raw["partition"], "partition", PARTITIONERS)
        partition = Component(p["name"], p["params"])
    topology, topo_n = None, None
    if "topology" in raw:
        topology, topo_n = _topology(raw["topology"], raw.get("clients"))
    prob = _component(raw["problem"], "problem", PROBLEMS)
    alg = _component(raw["algorithm"], "algorithm", ALGORITHMS)
    eng = _component(raw.get("engine", "vmap"), "engine", ENGINES)
    return RunConfig(
        problem=Component(prob["name"], prob["params"]),
        algorithm=Component(alg["name"], alg["params"]),
        data=data,
        partition=partition,
        engine=Component(eng["name"], eng["params"]),
        topology=topology,
        clients=integer("clients", topo_n or 10, 1),
        rounds=integer("rounds", 100, 0),
        eval_every=integer("eval_every", 1, 1),
        seed=integer("seed", 0, 0, INT64_MAX),
        dtype=dtype,
        device=device,
        threads=integer("threads", 0, 0),
        checkpoint_every=integer("checkpoint_every", 0, 0) if "checkpoint_every" in raw else None,
    )


def _parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax if it parses (``0.1``, ``true``, ``[1, 2]``), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw config (a deep copy is returned)."""
    import copy

    out = copy.deepcopy(dict(raw))
    for item in overrides:
        check("=" in item, f"--set expects key=value, got {item!r}")
        path, text = item.split("=", 1)
        set_path(out, path.strip(), _parse_value(text.strip()), where="--set")
    return out


def set_path(raw: dict[str, Any], path: str, value: Any, *, where: str) -> None:
    """Set the dotted ``path`` of a raw config to ``value`` in place, creating tables on the way
    (``where`` names the source in errors: ``--set`` or a sweep axis)."""
    keys = path.split(".")
    check(all(keys), f"{where} key {path!r} is malformed; use dotted keys like algorithm.params.outer_lr")
    node = raw
    for k in keys[:-1]:
        nxt = node.get(k)
        if isinstance(nxt, str) and k in ("engine", "problem", "algorithm", "data", "partition", "topology"):
            nxt = {"name": nxt}  # allow `engine = "vmap"` shorthand to be extended
        if nxt is None:
            nxt = {}
        check(isinstance(nxt, dict), f"{where} {path}: {k!r} is not a table")
        node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def load_raw(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file is a :class:`ConfigError`."""
    p = Path(path)
    check(p.is_file(), f"config file {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_bytes().decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not a text (UTF-8) file: byte {e.start} cannot be "
                          "decoded") from None
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror or e}") from None


def load_config(source: str | Path | Mapping[str, Any] | RunConfig, overrides: list[str] | None = None) -> RunConfig:
    """A :class:`RunConfig` from a TOML path, a raw mapping or an existing config."""
    if isinstance(source, RunConfig):
        if not overrides:
            return source
        source = source.to_dict()
    raw = load_raw(source) if isinstance(source, str | Path) else dict(source)
    return parse_config(apply_overrides(raw, overrides or []))


def plugin_folders(*files: str | Path) -> list[Path]:
    """Where plug-ins (``"my_module:factory"``) named in config or sweep ``files`` are imported
    from: each file's folder (absolute, in order), then the current folder. ``fedopt run``,
    ``fedopt sweep``, :func:`fedopt.run` and :func:`fedopt.sweep.load_sweep` put these at the front
    of ``sys.path`` (:func:`topologies.plugins.plugin_path`) while they resolve and run a config."""
    return list(dict.fromkeys([*(Path(f).resolve().parent for f in files), Path.cwd()]))
