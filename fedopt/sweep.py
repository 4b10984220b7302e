"""Sweeps: a base config plus axes, run by an executor into one long-format results table.

A sweep file (TOML)::

    base = "fedmbo_quadratic.toml"      # a config file, relative to the sweep file; or a [base] table
    threads = 1                          # torch threads per run (default 1: identical numbers on
                                         # every executor, and parallel runs do not oversubscribe)

    [grid]                               # the cartesian product of these keys' values
    "algorithm.params.outer_lr" = [0.1, 0.3, 1.0]
    seed = [0, 1, 2, 3]

    [[zip]]                              # keys that vary together (equal lengths): one more axis
    "algorithm.name" = ["fedmbo", "fednest"]
    "algorithm.params.inner_steps" = [3, 5]

Any config key can be an axis (a dotted path; a table value replaces the whole table). Every point
is resolved and validated before any run starts, values included (a negative step on one point,
more sampled clients than clients), so a bad axis is one error line naming the point and nothing
runs or is written. Validation builds one point of each group of points that differ only in the
algorithm's parameters, the seed or the budget (so a dataset loads once per group), and checks the
algorithm of every point.

A run's identity is a hash of its *resolved* config (:func:`run_id`), so the same run reached by two
points is run once, and re-running a sweep skips every run that already finished or diverged,
continues every half-finished run from its checkpoint (``checkpoints/<run_id>.pt``, written every
``checkpoint_every`` outer iterations and deleted when the run is over; bit-identical results), and
re-runs failed ones. The output folder holds ``sweep.toml`` (the spec), ``runs/<run_id>/``
(``config.toml``, ``metrics.csv``, ``meta.json``; each folder appears only once its run is over,
by an atomic rename, so a killed sweep leaves no half-written run) and ``results.csv``: one row per
(run, round, metric) with ``run_id``, ``status``, ``diverged_round`` and the flattened config
columns (``algorithm.params.outer_lr``, ``seed``, ...), readable with one ``pandas.read_csv``.

Executors: ``serial`` (in this process), ``process`` (a local pool of spawned processes) and ``ray``
(Ray tasks with one CPU each, on a local Ray started with ``workers`` CPUs and shut down at the
end, or on an existing cluster with ``address``; needs ``fedopt[ray]``). Runs return their records
to this process, which writes every file, so a cluster needs no shared filesystem.

One sweep at a time: :func:`run_sweep` holds an exclusive lock on ``out/.lock`` (``flock``; the
file holds the holder's pid and host) while it runs, and a second sweep on the same folder is a
:class:`~fedopt.errors.ConfigError` naming the holder. The OS releases the lock when the process
ends, however it ends, so a killed sweep never blocks its resume. Under the lock the temporary
files of a killed sweep (hidden run folders, checkpoint temporaries) are removed.

Stopping: an exception in this process (``KeyboardInterrupt``; SIGTERM under the CLI) ends the
executor's workers before it propagates (the process pool's workers are terminated, Ray is shut
down). Pool workers also end by themselves when the sweep process dies without cleaning up
(SIGKILL): on Linux the kernel sends them SIGKILL (``PR_SET_PDEATHSIG``), elsewhere a thread in each
worker notices that its parent changed; multiprocessing's resource tracker exits when they are gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedopt import results
from fedopt.config import Component, RunConfig, load_raw, parse_config, plugin_folders, set_path
from fedopt.errors import ConfigError, check
from topologies.plugins import active_paths, plugin_path

__all__ = ["EXECUTORS", "Point", "Sweep", "check_workers", "load_sweep", "run_id", "run_sweep", "validate_points"]

EXECUTORS = ("serial", "process", "ray")
_SPEC_KEYS = {"base", "grid", "zip", "threads", "tune"}


@dataclass(frozen=True)
class Point:
    """One run of a sweep: the axis values that made it and its resolved config."""

    index: int
    assignments: dict[str, Any]
    config: RunConfig
    run_id: str


@dataclass
class Sweep:
    spec: dict[str, Any]
    points: list[Point]
    threads: int = 1
    duplicates: int = 0  # points whose resolved config another point already has
    plugin_paths: tuple[str, ...] = ()  # folders plug-ins are imported from (see load_sweep)
    tune: Any = None  # a fedopt.tuning.TunedSweep when the spec has a [tune] table


def run_id(cfg: RunConfig) -> str:
    """The run's identity: the first 16 hex digits of the SHA-256 of its resolved config (less
    ``checkpoint_every``, which changes no number)."""
    d = cfg.to_dict()
    d.pop("checkpoint_every", None)
    canon = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _axes(spec: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
    """Each axis as its list of assignments {key: value}; a [[zip]] group is one axis."""
    axes: list[list[dict[str, Any]]] = []
    grid = spec.get("grid", {})
    check(isinstance(grid, Mapping), "sweep [grid] must be a table of key = [values]")
    for key, values in grid.items():
        check(isinstance(values, list), f"sweep axis {key!r} must be a list of values, got {values!r}")
        check(len(values) > 0, f"sweep axis {key!r} is empty; give at least one value")
        axes.append([{key: v} for v in values])
    zips = spec.get("zip", [])
    check(isinstance(zips, list), "sweep [[zip]] must be an array of tables")
    for i, group in enumerate(zips):
        check(isinstance(group, Mapping) and len(group) > 0, f"sweep [[zip]] group {i + 1} is empty")
        lengths = {}
        for key, values in group.items():
            check(isinstance(values, list), f"sweep zip axis {key!r} must be a list of values, got {values!r}")
            lengths[key] = len(values)
        check(len(set(lengths.values())) == 1,
              "sweep [[zip]] group {} has axes of unequal length: {}".format(
                  i + 1, ", ".join(f"{k} ({n})" for k, n in lengths.items())))
        n = next(iter(lengths.values()))
        check(n > 0, f"sweep [[zip]] group {i + 1} is empty")
        axes.append([{k: group[k][j] for k in group} for j in range(n)])
    for a, b in itertools.combinations([set().union(*ax) for ax in axes if ax], 2):
        if a & b:
            raise ConfigError(f"sweep key {sorted(a & b)[0]!r} appears on two axes")
    return axes


def load_sweep(source: str | Path | Mapping[str, Any], *, base_dir: Path | None = None) -> Sweep:
    """Parse and expand a sweep (a TOML path or a mapping); every point is validated here.

    Plug-ins: dotted component names (``"my_module:factory"``) are imported from the sweep file's
    folder and its base config's folder (for a sweep file), then the current folder, as ``fedopt
    run`` does for a config; :func:`run_sweep` puts the same folders on ``sys.path`` of its workers
    (spawned processes inherit it; Ray workers get them as ``PYTHONPATH``). A sweep file is code:
    trusted input; a sweep file from someone else runs their code (see :mod:`fedopt.registry`)."""
    files: list[Path] = []
    if isinstance(source, str | Path):
        p = Path(source)
        check(p.is_file(), f"sweep file {str(p)!r} does not exist")
        try:
            spec = tomllib.loads(p.read_bytes().decode("utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"sweep file {str(p)!r} is not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"sweep file {str(p)!r} is not a text (UTF-8) file: byte {e.start} cannot be "
                              "decoded") from None
        except OSError as e:
            raise ConfigError(f"sweep file {str(p)!r} cannot be read: {e.strerror or e}") from None
        base_dir = p.parent
        files.append(p)
    else:
        spec = dict(source)
    for k in spec:
        check(k in _SPEC_KEYS, f"unknown sweep key {k!r}; allowed: {', '.join(sorted(_SPEC_KEYS))}")
    check("base" in spec, "the sweep has no base config: give base = \"config.toml\" or a [base] table")
    base = spec["base"]
    if isinstance(base, str):
        path = Path(base) if Path(base).is_absolute() else (base_dir or Path.cwd()) / base
        base = load_raw(path)
        if files:
            files.append(path)
    check(isinstance(base, Mapping), "sweep base must be a config path or a [base] table")
    folders = tuple(str(f) for f in plugin_folders(*files))
    with plugin_path(*folders):
        if "tune" in spec:  # every method over its own grid (fedopt.tuning); validated point by point
            from fedopt.tuning import expand_tuned

            tuned = expand_tuned({**spec, "base": dict(base)}, base_dir=base_dir)
            tuned.sweep = replace(tuned.sweep, plugin_paths=folders, tune=tuned)
            return tuned.sweep
        sweep = _expand(spec, base, folders)
        validate_points(sweep.points)
    return sweep


def _expand(spec: dict[str, Any], base: Mapping[str, Any], folders: tuple[str, ...]) -> Sweep:
    threads = spec.get("threads", 1)
    check(isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1,
          f"sweep threads must be an integer >= 1, got {threads!r}")
    points: list[Point] = []
    seen: set[str] = set()
    duplicates = 0
    for combo in itertools.product(*_axes(spec)):
        assignments = {k: v for part in combo for k, v in part.items()}
        raw = json.loads(json.dumps(base))
        # shallower keys first, so an axis over a whole table ("algorithm") never clobbers an axis
        # inside it ("algorithm.params.outer_lr")
        for key, value in sorted(assignments.items(), key=lambda kv: kv[0].count(".")):
            set_path(raw, key, json.loads(json.dumps(value)), where="sweep axis")
        try:
            cfg = parse_config(raw)
        except ConfigError as e:
            raise ConfigError(f"sweep point ({_where(assignments)}): {e}") from None
        rid = run_id(cfg)
        if rid in seen:
            duplicates += 1
            continue
        seen.add(rid)
        points.append(Point(len(points), assignments, cfg, rid))
    return Sweep({**spec, "base": dict(base)}, points, threads, duplicates, folders)


def _where(assignments: Mapping[str, Any]) -> str:
    """A point named by its axis values, for error lines."""
    return ", ".join(f"{k}={v!r}" for k, v in assignments.items()) or "the base config"


def validate_points(points: list[Point]) -> None:
    """Check every point's values as a run's :func:`fedopt.runner.build` would, before any run.

    Points that differ only in the algorithm's parameters, the seed or the budget (``rounds``,
    ``eval_every``, ``checkpoint_every``, ``threads``) form a group: the first point of a group is
    built in full (data, problem, algorithm, network, engine; a ``ray`` engine is stood in for by
    ``local``, so no Ray starts here), every other point builds its algorithm (the parameter ranges),
    its network on its seed, and the checks between algorithm and federation size. A failure is one
    :class:`ConfigError` naming the point."""
    from fedopt.algorithms.base import DecentralizedAlgorithm
    from fedopt.network import build_network
    from fedopt.registry import ALGORITHMS
    from fedopt.runner import build

    groups: set[str] = set()
    networks: set[str] = set()
    for p in points:
        cfg = p.config
        d = cfg.to_dict()
        del d["algorithm"]["params"]
        for k in ("seed", "rounds", "eval_every", "checkpoint_every", "threads"):
            d.pop(k, None)
        group = json.dumps(d, sort_keys=True, default=str)
        try:
            if group not in groups:
                probe = replace(cfg, engine=Component("local")) if cfg.engine.name == "ray" else cfg
                build(probe).engine.close()
                groups.add(group)
                continue
            algorithm = ALGORITHMS.get(cfg.algorithm.name)(**cfg.algorithm.params)
            if isinstance(algorithm, DecentralizedAlgorithm):
                assert cfg.topology is not None  # the group's build checked it
                net = json.dumps([cfg.topology.name, cfg.topology.params, cfg.topology.mixing, cfg.topology.schedule,
                                  cfg.clients, cfg.seed], sort_keys=True, default=str)
                if net not in networks:
                    build_network(cfg.topology.name, cfg.clients, seed=cfg.seed, params=dict(cfg.topology.params),
                                  mixing=cfg.topology.mixing, schedule=cfg.topology.schedule,
                                  sparse=cfg.topology.sparse)
                    networks.add(net)
            else:
                cpr = getattr(algorithm, "clients_per_round", None)
                check(getattr(algorithm, "replace", False) or cpr is None or cpr <= cfg.clients,
                      f"algorithm.params.clients_per_round = {cpr} exceeds clients = {cfg.clients}; "
                      f"allowed: 1..{cfg.clients} (or replace = true)")
        except ConfigError as e:
            raise ConfigError(f"sweep point ({_where(p.assignments)}): {e}") from None


# ---- executing one run (in this process, a pool process or a Ray worker) ----------------------

def execute_point(config: dict[str, Any], threads: int, checkpoint: str | None = None) -> dict[str, Any]:
    """Run one resolved config with ``threads`` torch threads; never raises (a failure is data).

    With a ``checkpoint`` path the run checkpoints there every ``checkpoint_every`` outer
    iterations, and a run that finds a checkpoint there (a killed sweep's half-finished run)
    continues from it instead of starting over, to the same numbers."""
    import traceback

    import torch

    from fedopt.runner import execute

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        cfg = parse_config(config)
        path = Path(checkpoint) if checkpoint else None
        resume = None
        if path is not None and path.is_file():
            try:
                resume = results.read_checkpoint(path)
            except ConfigError:  # a damaged checkpoint: start over
                resume = None
        every = cfg.checkpoint_interval() if path is not None else 0

        def on_checkpoint(ck: Any) -> None:
            assert path is not None
            results.write_checkpoint(path, ck)

        result, wall = execute(cfg, checkpoint_every=every, on_checkpoint=on_checkpoint if every else None,
                               resume=resume)
        return {"status": result.status, "diverged_round": result.diverged_round, "records": result.records,
                "wall_time_s": wall, "comm_rounds": result.counters.comm_rounds,
                "resumed_from": resume.k if resume is not None else 0}
    except Exception as e:  # noqa: BLE001 -- recorded in meta.json and reported, the sweep goes on
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                "records": [], "wall_time_s": time.perf_counter() - t0}
    finally:
        torch.set_num_threads(before)


def _serial(todo: list[Point], threads: int, workers: int, address: str | None,
            checkpoints: dict[str, str]) -> Iterator[tuple[Point, dict]]:
    del workers, address
    for p in todo:
        yield p, execute_point(p.config.to_dict(), threads, checkpoints.get(p.run_id))


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.5)


def _worker_init(parent: int) -> None:
    """Initializer of a pool worker: end with the sweep process, however it ends. On Linux the
    kernel sends this worker SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``); everywhere
    a daemon thread checks twice a second that the parent is still ``parent`` (an orphan is
    re-parented)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="fedopt-parent-watch", daemon=True).start()


def _stop_workers(pool: Any) -> None:
    """Terminate a process pool's workers now (SIGTERM, then SIGKILL after 5 s) and reap them."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate()
    deadline = time.monotonic() + 5
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _process(todo: list[Point], threads: int, workers: int, address: str | None,
             checkpoints: dict[str, str]) -> Iterator[tuple[Point, dict]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    del address
    # spawn, not fork: a forked child of a process that already ran torch threads can deadlock
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))
    completed = False
    try:
        futures = {pool.submit(execute_point, p.config.to_dict(), threads, checkpoints.get(p.run_id)): p
                   for p in todo}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
        completed = True
    finally:
        if not completed:  # interrupted, closed early or failed: the running runs are abandoned
            _stop_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)


RUN_TIMEOUT_ENV = "FEDOPT_RAY_RUN_TIMEOUT_S"
_WAIT_SLICE_S = 1.0


def _ray_run_timeout() -> float | None:
    """The ray executor's per-run limit in seconds (``FEDOPT_RAY_RUN_TIMEOUT_S``; unset: none)."""
    raw = os.environ.get(RUN_TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    check(value > 0 and value != float("inf"), f"{RUN_TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def _ray(todo: list[Point], threads: int, workers: int, address: str | None,
         checkpoints: dict[str, str]) -> Iterator[tuple[Point, dict]]:
    """Runs as Ray tasks of one CPU on a local Ray (``workers`` CPUs, 127.0.0.1 only) or the cluster
    at ``address``. At most as many tasks as there are CPUs are in flight, so a task starts when it
    is submitted. Every wait is bounded: results are awaited in 1 s slices (an interrupt is seen
    within a second), a run whose worker or node died is a failed run carrying Ray's error, and with
    ``FEDOPT_RAY_RUN_TIMEOUT_S`` set a run that takes longer is cancelled (its worker killed) and
    recorded as failed."""
    from fedopt.engines import ray_runtime

    ray = ray_runtime.import_ray("the ray executor")
    limit = _ray_run_timeout()
    if address:
        ray_runtime.join(address, where="--address")
    else:  # "local": never attach to a cluster some other session left running
        ray_runtime.start_local(workers)
    try:
        # Ray workers do not inherit this process's sys.path (only its working folder): hand them
        # the plug-in folders as PYTHONPATH, ahead of whatever PYTHONPATH this process has
        options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0}
        if extra := active_paths():
            inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(extra + inherited))}}
        task = ray.remote(**options)(execute_point)
        isolated = ray.remote(**options)(execute_point_isolated)  # engines that start a Ray of their own
        window = workers if not address else max(workers, int(ray.cluster_resources().get("CPU", workers)))
        queue = list(reversed(todo))
        pending: dict[Any, tuple[Point, float]] = {}
        while queue or pending:
            while queue and len(pending) < window:
                p = queue.pop()
                fn = isolated if p.config.engine.name in OWN_RAY_ENGINES else task
                pending[fn.remote(p.config.to_dict(), threads, checkpoints.get(p.run_id))] = (p, time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=_WAIT_SLICE_S)
            for ref in done:
                p, started = pending.pop(ref)
                try:
                    outcome = ray.get(ref, timeout=60)
                except ray.exceptions.RayError as e:  # the worker or its node died, the result was lost
                    outcome = _ray_failure(f"{type(e).__name__}: {_first_line(e)}", started)
                yield p, outcome
            if limit is not None:
                for ref, (p, started) in list(pending.items()):
                    if time.monotonic() - started > limit:
                        ray.cancel(ref, force=True)
                        del pending[ref]
                        yield p, _ray_failure(f"TimeoutError: the run took longer than {limit:g} s "
                                              f"({RUN_TIMEOUT_ENV}); its worker was stopped", started)
    finally:
        ray.shutdown()


OWN_RAY_ENGINES = ("flower",)  # their runs start a private Ray: not possible inside a Ray worker


def execute_point_isolated(config: dict[str, Any], threads: int, checkpoint: str | None = None) -> dict[str, Any]:
    """:func:`execute_point` in a fresh spawned process, for a run whose engine starts a Ray of its
    own (``flower``) from a Ray task of the ray executor: a Ray worker cannot start or join another
    Ray, a plain child process can (a private one on 127.0.0.1, as in a serial sweep). The child
    dies with the task's worker (``PR_SET_PDEATHSIG``, as the process executor's workers)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    try:
        return pool.submit(execute_point, config, threads, checkpoint).result()
    except BrokenProcessPool as e:
        return {"status": "failed", "error": f"the run's process died: {e}", "records": [],
                "wall_time_s": time.perf_counter() - t0}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ray_failure(error: str, started: float) -> dict[str, Any]:
    return {"status": "failed", "error": error, "records": [], "wall_time_s": time.monotonic() - started}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


_EXECUTOR_FNS: dict[str, Callable[..., Iterator[tuple[Point, dict]]]] = {
    "serial": _serial, "process": _process, "ray": _ray}


def check_workers(workers: int | None) -> None:
    """``workers`` is ``None`` (the CPU count) or an integer >= 1."""
    check(workers is None or (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1),
          f"--workers must be an integer >= 1 (or omitted: the CPU count, {os.cpu_count() or 1}), got {workers!r}")


def check_executor(name: str, address: str | None, points: list[Point] | None = None) -> None:
    """Bad executor choices fail here, before any run and before anything is written: an unknown
    executor, ``--address`` without ``ray``, Ray not installed, an ``address`` where no Ray answers
    (probed, a few seconds at most) and a bad ``FEDOPT_RAY_RUN_TIMEOUT_S``. (``points``: kept for
    callers; every engine runs on every executor.)"""
    check(name in EXECUTORS, f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")
    check(address is None or name == "ray", f"--address is for the ray executor, not {name!r}")
    if name != "ray":
        return
    from fedopt.engines import ray_runtime

    ray_runtime.import_ray("the ray executor")
    _ray_run_timeout()
    del points  # every engine runs on every executor (flower: in a process of its own, see _ray)
    if address:
        ray_runtime.probe(address, where="--address")


# ---- the output folder -----------------------------------------------------------------------

def _finished(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("status") in ("finished", "diverged")


def _write_run(runs: Path, point: Point, out: dict[str, Any]) -> None:
    """Write the run folder under a temporary name, then rename it into place (atomic)."""
    from fedopt.runner import records_frame

    tmp = Path(tempfile.mkdtemp(dir=runs, prefix=f".{point.run_id}."))
    try:
        tmp.chmod(results.default_mode(folder=True))  # mkdtemp makes 0o700
        results.write_config(tmp, point.config)
        results.atomic_write(tmp / "metrics.csv", records_frame(out["records"]).to_csv(index=False))
        fields = {k: v for k, v in out.items() if k != "records"}
        fields["wall_time_s"] = round(fields.get("wall_time_s", 0.0), 3)
        results.write_meta(tmp, point.config, run_id=point.run_id, axes=point.assignments, **fields)
        final = runs / point.run_id
        if final.exists():  # a failed run's old folder
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list | tuple | Mapping):
            out[key] = json.dumps(v, sort_keys=True)
        else:
            out[key] = v
    return out


def combined_table(sweep: Sweep, out: Path):
    """The long-format table of every run of ``sweep`` found in ``out/runs`` (sweep order)."""
    import pandas as pd

    frames = []
    for p in sweep.points:
        folder = out / "runs" / p.run_id
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        df = pd.read_csv(folder / "metrics.csv")
        cols = {"run_id": p.run_id, "status": meta["status"], "diverged_round": meta.get("diverged_round"),
                **_flatten(p.config.to_dict())}
        frames.append(df.assign(**{k: [v] * len(df) for k, v in cols.items()}) if len(df) else
                      pd.DataFrame([{**cols, "round": None, "comm_round": None, "metric": None, "value": None}]))
    if not frames:
        return pd.DataFrame(columns=["run_id", "status", "diverged_round", "round", "comm_round", "metric", "value"])
    table = pd.concat(frames, ignore_index=True)
    first = ["run_id", "status", "diverged_round"]
    metric_cols = ["round", "comm_round", "metric", "value"]
    config_cols = [c for c in table.columns if c not in first + metric_cols]
    return table[first + config_cols + metric_cols]


LOCK = ".lock"


def _lock(out: Path) -> int:
    """Hold ``out/.lock`` exclusively (``flock``, not waiting); returns its descriptor. A lock
    another process holds is a :class:`ConfigError` naming that process. Where ``fcntl`` does not
    exist (Windows) the folder is not locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, results.default_mode())
    except OSError as e:
        raise ConfigError(results.cannot_create(out, e)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
        raise ConfigError(f"output folder {str(out)!r} is in use by another fedopt sweep ({who}); wait for it "
                          "to end or choose another --out (nothing was written)") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass  # the lock holds; only the holder's name for a refused sweep is missing
    return fd


def _unlock(fd: int) -> None:
    if fd >= 0:
        os.close(fd)  # releases the flock (the file stays: removing it would race a new holder)


def _claim_out(out: Path, sweep: Sweep) -> int:
    """``out`` is new, or holds this very sweep (then it is resumed); anything else is an error.
    Returns the descriptor of the held lock (:func:`_lock`), taken before anything is written.

    ``sweep.toml`` is the spec with its base config inlined (it reruns anywhere); ``manifest.json``
    lists the run ids in sweep order. A folder with a lock file but no manifest is one a sweep was
    killed while creating: it is completed."""
    manifest = out / "manifest.json"
    ids = [p.run_id for p in sweep.points]
    if out.exists() or out.is_symlink():
        check(out.is_dir() and (manifest.is_file() or (out / LOCK).is_file()),
              f"output folder {str(out)!r} exists and is not a sweep folder; choose another --out (nothing was written)")
        if manifest.is_file():
            _check_manifest(out, manifest, ids)
    else:
        try:
            out.mkdir(parents=True)
        except FileExistsError:  # another sweep created it just now: its lock decides
            pass
        except OSError as e:
            raise ConfigError(results.cannot_create(out, e)) from None
    fd = _lock(out)
    try:
        if manifest.is_file():
            _check_manifest(out, manifest, ids)
            return fd
        import tomli_w

        try:
            (out / "runs").mkdir(exist_ok=True)
            results.atomic_write(out / "sweep.toml", tomli_w.dumps(sweep.spec))
            results.atomic_write(manifest, json.dumps({"run_ids": ids, "axes": [p.assignments for p in sweep.points]},
                                                      indent=1) + "\n")
        except OSError as e:
            raise ConfigError(results.cannot_create(out, e)) from None
        return fd
    except BaseException:
        _unlock(fd)
        raise


def _check_manifest(out: Path, manifest: Path, ids: list[str]) -> None:
    try:
        old = json.loads(manifest.read_text()).get("run_ids")
    except (OSError, ValueError, AttributeError):
        old = None
    check(old == ids, f"output folder {str(out)!r} holds a different sweep; choose another --out (nothing was written)")


def _remove_leftovers(out: Path) -> None:
    """Temporary files of a sweep that was killed (called with the folder's lock held, so no live
    sweep owns them): hidden run folders being written and checkpoint temporaries."""
    for leftover in (out / "runs").glob(".*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in (out / "checkpoints").glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


@dataclass
class SweepReport:
    total: int
    skipped: int
    finished: int
    diverged: int
    failed: list[str]
    wall_s: float
    table_path: Path
    tuning: dict[str, Any] | None = None  # the tuning summary (fedopt.tuning) of a sweep with [tune]


def run_sweep(sweep: Sweep, out: str | Path, *, executor: str = "serial", workers: int | None = None,
              address: str | None = None, progress: bool = True,
              on_start: Callable[[int], None] | None = None) -> SweepReport:
    """Run every point of ``sweep`` not already finished in ``out``, then write ``results.csv``.

    Every check (executor, ``workers``, the folder, its lock) happens before anything is written;
    ``on_start(pending)`` is called after them with the number of runs to do. The folder is locked
    while this runs (module docstring)."""
    check_executor(executor, address, sweep.points)
    check_workers(workers)
    out = Path(out)
    fd = _claim_out(out, sweep)
    try:
        return _run_locked(sweep, out, executor, workers or os.cpu_count() or 1, address, progress, on_start)
    finally:
        _unlock(fd)


def _run_locked(sweep: Sweep, out: Path, executor: str, workers: int, address: str | None, progress: bool,
                on_start: Callable[[int], None] | None) -> SweepReport:
    from tqdm.auto import tqdm

    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    _remove_leftovers(out)
    todo = [p for p in sweep.points if not _finished(runs / p.run_id)]
    if on_start is not None:
        on_start(len(todo))
    # half-finished runs resume from out/checkpoints/<run_id>.pt (on a remote Ray cluster the
    # workers have no access to this folder: no checkpoints there)
    checkpoints: dict[str, str] = {}
    if not (executor == "ray" and address):
        (out / "checkpoints").mkdir(exist_ok=True)
        checkpoints = {p.run_id: str((out / "checkpoints" / f"{p.run_id}.pt").resolve()) for p in todo}
    skipped = len(sweep.points) - len(todo)
    counts = {"finished": 0, "diverged": 0}
    failed: list[str] = []
    t0 = time.perf_counter()
    with plugin_path(*sweep.plugin_paths), tqdm(total=len(sweep.points), initial=skipped, disable=not progress,
                                                unit="run", desc=f"sweep ({executor})") as bar:
        bar.set_postfix(done=skipped, failed=0, remaining=len(todo))
        run_all = _EXECUTOR_FNS[executor] if todo else _serial  # nothing to do: no pool, no Ray
        # closing: an exception here (an interrupt while a run folder is written) still ends the
        # executor's workers at once, not when the generator is collected
        with contextlib.closing(run_all(todo, sweep.threads, workers, address, checkpoints)) as outcomes:
            for point, result in outcomes:
                _write_run(runs, point, result)
                if result["status"] != "failed":  # the run is over; a failed one keeps its checkpoint
                    Path(checkpoints.get(point.run_id, out / "none")).unlink(missing_ok=True)
                if result["status"] == "failed":
                    failed.append(f"{point.run_id} ({result.get('error', '')})")
                else:
                    counts[result["status"]] += 1
                done = skipped + counts["finished"] + counts["diverged"]
                bar.set_postfix(done=done, failed=len(failed), remaining=len(sweep.points) - done - len(failed),
                                refresh=False)
                bar.update(1)
    table = combined_table(sweep, out)
    table_path = out / "results.csv"
    results.atomic_write(table_path, table.to_csv(index=False))
    tuning = None
    if sweep.tune is not None:
        from fedopt.tuning import write_tuning

        tuning = write_tuning(out, sweep.tune, table_path)
    return SweepReport(len(sweep.points), skipped, counts["finished"], counts["diverged"], failed,
                       time.perf_counter() - t0, table_path, tuning)
