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
is resolved and validated before any run starts, so a bad axis is one error line and nothing runs.

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
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedopt import results
from fedopt.config import RunConfig, load_raw, parse_config, plugin_folders, set_path
from fedopt.errors import ConfigError, check
from topologies.plugins import active_paths, plugin_path

__all__ = ["EXECUTORS", "Point", "Sweep", "load_sweep", "run_id", "run_sweep"]

EXECUTORS = ("serial", "process", "ray")
_SPEC_KEYS = {"base", "grid", "zip", "threads"}


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

    Plug-ins: for a sweep file, dotted component names (``"my_module:factory"``) are imported from
    the sweep file's folder, its base config's folder and the current folder (as ``fedopt run``
    does for a config); :func:`run_sweep` puts the same folders on ``sys.path`` of its workers
    (spawned processes inherit it; Ray workers get them as ``PYTHONPATH``). A sweep file is code:
    trusted input (see :mod:`fedopt.registry`)."""
    files: list[Path] = []
    if isinstance(source, str | Path):
        p = Path(source)
        check(p.is_file(), f"sweep file {str(p)!r} does not exist")
        try:
            spec = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"sweep file {str(p)!r} is not valid TOML: {e}") from None
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
    folders = tuple(str(f) for f in plugin_folders(*files)) if files else ()
    with plugin_path(*folders):
        return _expand(spec, base, folders)


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
            where = ", ".join(f"{k}={v!r}" for k, v in assignments.items()) or "the base config"
            raise ConfigError(f"sweep point ({where}): {e}") from None
        rid = run_id(cfg)
        if rid in seen:
            duplicates += 1
            continue
        seen.add(rid)
        points.append(Point(len(points), assignments, cfg, rid))
    return Sweep({**spec, "base": dict(base)}, points, threads, duplicates, folders)


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


def _process(todo: list[Point], threads: int, workers: int, address: str | None,
             checkpoints: dict[str, str]) -> Iterator[tuple[Point, dict]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    del address
    # spawn, not fork: a forked child of a process that already ran torch threads can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(execute_point, p.config.to_dict(), threads, checkpoints.get(p.run_id)): p
                   for p in todo}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            for fut in futures:
                fut.cancel()


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
        window = workers if not address else max(workers, int(ray.cluster_resources().get("CPU", workers)))
        queue = list(reversed(todo))
        pending: dict[Any, tuple[Point, float]] = {}
        while queue or pending:
            while queue and len(pending) < window:
                p = queue.pop()
                pending[task.remote(p.config.to_dict(), threads, checkpoints.get(p.run_id))] = (p, time.monotonic())
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


def _ray_failure(error: str, started: float) -> dict[str, Any]:
    return {"status": "failed", "error": error, "records": [], "wall_time_s": time.monotonic() - started}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


_EXECUTOR_FNS: dict[str, Callable[..., Iterator[tuple[Point, dict]]]] = {
    "serial": _serial, "process": _process, "ray": _ray}


def check_executor(name: str, address: str | None, points: list[Point] | None = None) -> None:
    """Bad executor choices fail here, before any run and before anything is written: an unknown
    executor, ``--address`` without ``ray``, Ray not installed, an ``address`` where no Ray answers
    (probed, a few seconds at most), a bad ``FEDOPT_RAY_RUN_TIMEOUT_S``, and ``points`` whose
    engine cannot run inside a Ray task (``flower``: its simulation needs a Ray of its own)."""
    check(name in EXECUTORS, f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")
    check(address is None or name == "ray", f"--address is for the ray executor, not {name!r}")
    if name != "ray":
        return
    from fedopt.engines import ray_runtime

    ray_runtime.import_ray("the ray executor")
    _ray_run_timeout()
    for p in points or ():
        where = ", ".join(f"{k}={v!r}" for k, v in p.assignments.items()) or "the base config"
        check(p.config.engine.name != "flower",
              f"engine 'flower' cannot run inside executor ray (sweep point ({where})): Flower's simulation "
              "needs a Ray of its own; use --executor process")
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


def _claim_out(out: Path, sweep: Sweep) -> None:
    """``out`` is new, or holds this very sweep (then it is resumed); anything else is an error.

    ``sweep.toml`` is the spec with its base config inlined (it reruns anywhere); ``manifest.json``
    lists the run ids in sweep order."""
    manifest = out / "manifest.json"
    ids = [p.run_id for p in sweep.points]
    if out.exists():
        check(manifest.is_file(), f"output folder {str(out)!r} exists and is not a sweep folder; "
                                  "choose another --out (nothing was written)")
        try:
            old = json.loads(manifest.read_text()).get("run_ids")
        except ValueError:
            old = None
        check(old == ids, f"output folder {str(out)!r} holds a different sweep; choose another --out "
                          "(nothing was written)")
        return
    import tomli_w

    out.mkdir(parents=True)
    (out / "runs").mkdir()
    results.atomic_write(out / "sweep.toml", tomli_w.dumps(sweep.spec))
    results.atomic_write(manifest, json.dumps({"run_ids": ids, "axes": [p.assignments for p in sweep.points]},
                                              indent=1) + "\n")


@dataclass
class SweepReport:
    total: int
    skipped: int
    finished: int
    diverged: int
    failed: list[str]
    wall_s: float
    table_path: Path


def run_sweep(sweep: Sweep, out: str | Path, *, executor: str = "serial", workers: int | None = None,
              address: str | None = None, progress: bool = True) -> SweepReport:
    """Run every point of ``sweep`` not already finished in ``out``, then write ``results.csv``."""
    from tqdm.auto import tqdm

    check_executor(executor, address, sweep.points)
    workers = workers or os.cpu_count() or 1
    check(workers >= 1, f"--workers must be >= 1, got {workers}")
    out = Path(out)
    _claim_out(out, sweep)
    runs = out / "runs"
    runs.mkdir(exist_ok=True)
    for leftover in runs.glob(".*"):  # temporary folders of runs a killed sweep did not finish
        shutil.rmtree(leftover, ignore_errors=True)
    todo = [p for p in sweep.points if not _finished(runs / p.run_id)]
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
        for point, result in (_EXECUTOR_FNS[executor](todo, sweep.threads, workers, address, checkpoints)
                              if todo else ()):
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
    return SweepReport(len(sweep.points), skipped, counts["finished"], counts["diverged"], failed,
                       time.perf_counter() - t0, table_path)

