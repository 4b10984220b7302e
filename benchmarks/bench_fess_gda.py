r"""Rounds per second of FESS-GDA: ``vmap`` engine vs ``local`` engine, K = 10 local steps.

What is measured
----------------
FESS-GDA (``fedopt.algorithms.federated.fess_gda``, defaults ``smoothing="server"``,
``order="simultaneous"``, local projection) with K = 10 local steps, m = 100 of N = 1000 clients
per round (without replacement), one communication round per iteration, on

* ``nc_sc`` -- the synthetic NC-SC quadratic (``dim = 10``, ``delta = 0.5``) with oracle noise
  ``sigma = 1`` and ``batch_size = 4``, so every local step draws its noise from the client's key
  (counter-based Box-Muller, :mod:`fedopt.random`); in float32 (the headline) and float64;
* ``fair_classification`` on ``fashion_mnist`` -- worst-class linear softmax classification
  (x: 10 x 785 weights, y: a distribution over the 10 classes), 60,000 training images split over
  the 1,000 clients by a Dirichlet(0.5) label partition (48 training rows per client on average
  after the 20 % validation hold-out), minibatch 32 per local step; float32. Needs the Debian
  package ``dataset-fashion-mnist``; skipped (with a note) when it is missing.

Two engines run the *same* rounds in the same process: ``local`` (a Python loop over the 100
picked clients, the reference) and ``vmap`` (all 100 in one ``torch.func.vmap`` call). A timed
run is ``run_rounds`` below: ``simulate``'s loop (the same ``Server``, ``dispatch``, server
program and engine) without its metric evaluations, which on ``fair_classification`` cost about
4 s per call, far more than a round. Rounds per second = rounds / wall time of one such run.

Protocol: for every (problem, dtype, torch threads) the two engines first run one untimed round
each (warm-up, also calibrates the rounds per timed run to about ``--target-s``), then timed runs
alternate ``local, vmap, local, vmap, ...`` (``--repeats`` pairs), so slow phases of the shared
machine hit both engines alike. The table reports the *median* rounds/s of each engine and the
ratio of the medians; the JSON also has every sample and the median of the per-pair ratios.
Every (problem, dtype) runs with ``torch.set_num_threads(1)`` and with torch's default thread
count (on a loaded 2-core machine, multi-threaded kernels on these tiny tensors stall whenever
one of their threads is descheduled).

Before timing, :func:`check_engines` runs both engines for 3 rounds of the benchmark config and
asserts that the final iterates and every final metric agree to 1e-5 relative (float32) or 1e-10
(float64), so the comparison is apples to apples; and, on ``nc_sc``, that ``run_rounds``
reproduces ``simulate``'s iterate bit for bit.

``--profile`` adds a torch.profiler / cProfile breakdown of ``vmap`` and ``local`` rounds of every
float32 problem (1 thread): the top aten ops and the share of the client task spent in
``problem.batch`` (client rows, minibatch indices, noise), the key derivation (``fold_in``), the
oracles (``grad_xy``) and the projection.

How to run
----------
.. code-block:: bash

    python benchmarks/bench_fess_gda.py            # full run (4-5 minutes on 2 busy cores)
    python benchmarks/bench_fess_gda.py --quick    # smoke run, nc_sc only (under a minute)
    python benchmarks/bench_fess_gda.py --profile  # also the breakdown of one round

Results go to ``benchmarks/results/fess_gda_rounds.json`` (``--out`` to change). Timings are CPU
wall-clock timings and move with machine load; only the side-by-side ratios of one run are
meaningful, never the absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedopt
from fedopt.algorithms.base import Round
from fedopt.config import load_config
from fedopt.registry import ENGINES
from fedopt.runner import Server, build, simulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fedmbo import busy_cores  # noqa: E402

N_CLIENTS = 1000
M = 100
K = 10
CHECK_ROUNDS = 3
TOL = {"float32": 1e-5, "float64": 1e-10}


def config_dict(problem: str, dtype: str) -> dict[str, Any]:
    """The benchmark's run config for ``problem`` in {"nc_sc", "fair_classification"}."""
    common = {"clients": N_CLIENTS, "dtype": dtype, "seed": 0, "engine": {"name": "vmap"}}
    if problem == "nc_sc":
        return common | {
            "problem": {"name": "nc_sc", "params": {"dim": 10, "delta": 0.5, "sigma": 1.0}},
            "algorithm": {"name": "fess_gda", "params": {
                "lr_x": 0.01, "lr_y": 0.01, "local_steps": K, "clients_per_round": M, "batch_size": 4}},
        }
    if problem == "fair_classification":
        return common | {
            "problem": {"name": "fair_classification", "params": {"groups": "label", "reg": 0.001}},
            "data": {"name": "fashion_mnist", "val_fraction": 0.2},
            "partition": {"name": "dirichlet", "params": {"alpha": 0.5}},
            "algorithm": {"name": "fess_gda", "params": {
                "lr_x": 0.05, "lr_y": 0.01, "p": 0.01, "beta": 0.1, "local_steps": K, "clients_per_round": M,
                "batch_size": 32}},
        }
    raise ValueError(problem)


def fashion_mnist_available() -> bool:
    try:
        done = subprocess.run(["dpkg", "-s", "dataset-fashion-mnist"], capture_output=True, text=True, check=False)
    except OSError:
        done = None
    return (done is not None and done.returncode == 0) or Path("/usr/share/datasets/fashion-mnist").is_dir()


# ---------------------------------------------------------------------------------------------
# Running rounds
# ---------------------------------------------------------------------------------------------

def run_rounds(problem, algorithm, engine, rounds: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``simulate``'s loop without its evaluations: the same ``Server`` (cohort sampling, key
    derivation, ``engine.map_clients``, counters) and the same server program. Returns the final
    iterate and the number of communication rounds."""
    server = Server(problem, engine, seed)
    x, y = problem.init()
    program = algorithm.program(problem, x, y, rounds, server.server_key)
    msg = next(program, None)
    while msg is not None:
        if isinstance(msg, Round):
            reply = server.dispatch(msg)
        else:  # Iterate
            reply = None
            x, y = msg.x, msg.y
        try:
            msg = program.send(reply)
        except StopIteration:
            msg = None
    program.close()
    return x, y, server.counters.comm_rounds


def _require(ok: bool, msg: str) -> None:
    """An assertion that ``python -O`` does not strip."""
    if not ok:
        raise AssertionError(msg)


def _rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """max |a - b| / max(|a|, |b|) (0 when both are 0)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = float(torch.maximum(a.abs().max(), b.abs().max()))
    return float((a - b).abs().max()) / scale if scale > 0 else 0.0


def check_engines(name: str, built, dtype: str) -> dict[str, Any]:
    """Both engines, ``CHECK_ROUNDS`` rounds of the benchmark config: final iterates and every
    final metric agree to ``TOL[dtype]`` (relative); on ``nc_sc`` ``run_rounds`` also equals
    ``simulate`` bit for bit. Returns the largest differences."""
    t0 = time.perf_counter()
    problem, alg, tol = built.problem, built.algorithm, TOL[dtype]
    final = {}
    for eng in ("local", "vmap"):
        x, y, rounds = run_rounds(problem, alg, ENGINES.get(eng)(problem), CHECK_ROUNDS)
        _require(rounds == CHECK_ROUNDS, f"{eng}: {rounds} communication rounds, expected {CHECK_ROUNDS}")
        final[eng] = (x, y, problem.metrics(x, y))
    (xl, yl, ml), (xv, yv, mv) = final["local"], final["vmap"]
    _require(ml.keys() == mv.keys(), "the engines report different metric names")
    diffs = {"x": _rel(xl, xv), "y": _rel(yl, yv)} | {f"metric {k}": _rel(ml[k], mv[k]) for k in ml}
    worst = max(diffs, key=diffs.get)
    _require(diffs[worst] <= tol, f"{name} {dtype}: local and vmap differ in {worst} by {diffs[worst]:.3g} "
                                  f"(relative) > {tol:g}")
    if name == "nc_sc":  # the timed loop is simulate's loop
        res = simulate(problem, alg, ENGINES.get("vmap")(problem), rounds=CHECK_ROUNDS, seed=0, eval_every=CHECK_ROUNDS)
        _require(torch.equal(res.x, xv) and torch.equal(res.y, yv), "run_rounds differs from simulate")
    print(f"check_engines {name} {dtype}: OK in {time.perf_counter() - t0:.1f}s, local vs vmap after "
          f"{CHECK_ROUNDS} rounds: largest relative difference {diffs[worst]:.1e} ({worst}) <= {tol:g}", flush=True)
    return {"rounds": CHECK_ROUNDS, "tol": tol, "max_rel_diff": diffs[worst], "argmax": worst,
            "x_rel_diff": diffs["x"], "y_rel_diff": diffs["y"],
            "final_metrics_vmap": {k: v for k, v in mv.items() if not k.startswith(("y_g", "test_acc_g"))}}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def timed_run(built, engine, rounds: int) -> float:
    t0 = time.perf_counter()
    run_rounds(built.problem, built.algorithm, engine, rounds)
    return time.perf_counter() - t0


def measure_pair(built, *, target_s: float, repeats: int, max_rounds: int) -> dict[str, Any]:
    """Warm-up (1 round each), then ``repeats`` interleaved pairs (local, vmap) of timed runs."""
    engines = {e: ENGINES.get(e)(built.problem) for e in ("local", "vmap")}
    rounds = {}
    for e, eng in engines.items():
        warm = timed_run(built, eng, 1)
        rounds[e] = max(1, min(max_rounds, round(target_s / max(warm, 1e-6))))
    samples: dict[str, list[float]] = {"local": [], "vmap": []}
    for _ in range(repeats):
        for e, eng in engines.items():  # local, then vmap
            samples[e].append(rounds[e] / timed_run(built, eng, rounds[e]))
    med = {e: statistics.median(s) for e, s in samples.items()}
    pair = [v / lo for lo, v in zip(samples["local"], samples["vmap"], strict=True)]
    return {"rounds_per_run": rounds, "samples_rounds_per_s": samples,
            "local_rounds_per_s": med["local"], "vmap_rounds_per_s": med["vmap"],
            "vmap_over_local": med["vmap"] / med["local"], "median_pair_ratio": statistics.median(pair)}


# ---------------------------------------------------------------------------------------------
# Profile of one round
# ---------------------------------------------------------------------------------------------

# client-task callees whose cumulative time is reported as a share of engine.map_clients:
# label -> (file, function, calling file or None for any caller); "problems/" matches any problem module
_PARTS = {
    "problem.batch (client rows, minibatch, noise)": ("problems/", "batch", None),
    "  of which fold_in (keys of the noise / row draws)": ("random.py", "fold_in", "problems/"),
    "  of which normal (Box-Muller, float64)": ("random.py", "normal", "problems/"),
    "  of which randint (minibatch rows)": ("random.py", "randint", "problems/"),
    "fold_in of the K step keys (task)": ("random.py", "fold_in", "_minimax_tasks.py"),
    "oracles.grad_xy (closed forms)": ("oracles.py", "grad_xy", None),
    "y-set projection": ("ysets.py", "project", None),
}


def _matches(path: str, pattern: str) -> bool:
    return pattern in path.replace(os.sep, "/") if pattern.endswith("/") else path.endswith(pattern)


def profile_round(built, name: str, engine_name: str, rounds: int) -> dict[str, Any]:
    """torch.profiler top ops and a cProfile split of ``rounds`` rounds (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    engine = ENGINES.get(engine_name)(built.problem)
    run_rounds(built.problem, built.algorithm, engine, 1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_rounds(built.problem, built.algorithm, engine, rounds)
    events = sorted(prof.key_averages(), key=lambda ev: ev.self_cpu_time_total, reverse=True)
    total_us = sum(ev.self_cpu_time_total for ev in events)
    top = [{"op": ev.key, "calls_per_round": ev.count / rounds, "self_ms_per_round": ev.self_cpu_time_total / 1e3 / rounds,
            "share": ev.self_cpu_time_total / total_us} for ev in events[:12]]
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    run_rounds(built.problem, built.algorithm, engine, rounds)
    pr.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(pr).stats  # {(file, line, fn): (cc, nc, tt, ct, callers)}

    def cum(file: str, fn: str, caller: str | None = None) -> float:
        """Cumulative seconds in ``fn`` (defined in ``file``), only calls from ``caller`` if given."""
        out = 0.0
        for (f, _, n), (_, _, _, ct, callers) in stats.items():
            if _matches(f, file) and n == fn:
                out += ct if caller is None else sum(t[3] for (cf, _, _), t in callers.items() if _matches(cf, caller))
        return out

    total = cum("engines/" + ("vmap.py" if engine_name == "vmap" else "local.py"), "map_clients")
    parts = {label: cum(*where) / total for label, where in _PARTS.items()}
    parts["(rest of the task: updates, stacking, vmap overhead)"] = 1 - sum(
        v for k, v in parts.items() if not k.startswith("  "))
    return {"problem": name, "engine": engine_name, "rounds": rounds, "ms_per_round_cprofile": 1e3 * wall / rounds, "map_clients_share_of_round": total / wall,
            "top_ops": top, "task_split": parts, "profiler_op_calls_per_round": sum(ev.count for ev in events) / rounds}


def print_profile(p: dict[str, Any]) -> None:
    print(f"\n#### one {p['engine']} round ({p['problem']}, float32, 1 thread; {p['ms_per_round_cprofile']:.1f} ms per round "
          f"under cProfile, {p['profiler_op_calls_per_round']:.0f} aten calls per round, engine.map_clients "
          f"{100 * p['map_clients_share_of_round']:.0f}% of the round)\n")
    print("| aten op | calls / round | self ms / round | share |")
    print("|---|---:|---:|---:|")
    for t in p["top_ops"]:
        print(f"| {t['op']} | {t['calls_per_round']:.0f} | {t['self_ms_per_round']:.2f} | {100 * t['share']:.0f}% |")
    print("\nshare of engine.map_clients (cProfile, cumulative):")
    for label, v in p["task_split"].items():
        print(f"    {label:<58s} {100 * v:5.1f}%")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def machine_info(default_threads: int) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
            "fedopt": fedopt.__version__, "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "default_threads": default_threads, "num_interop_threads": torch.get_num_interop_threads(),
            "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "other_busy_cores_at_start": busy_cores()}


def fmt(v: float) -> str:
    return f"{v:,.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (under a minute): nc_sc only, 1 pair of ~0.3 s runs per number")
    ap.add_argument("--problems", nargs="+", choices=("nc_sc", "fair_classification"), default=None,
                    help="default: both (quick: nc_sc)")
    ap.add_argument("--dtypes", nargs="+", choices=("float32", "float64"), default=["float32", "float64"],
                    help="dtypes of nc_sc (fair_classification runs in float32)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch thread counts to time (default: 1 and torch's default)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved (local, vmap) pairs; default 5, quick 1")
    ap.add_argument("--target-s", type=float, default=None, help="seconds per timed run; default 2, quick 0.3")
    ap.add_argument("--profile", action="store_true", help="also profile rounds of each engine (float32 problems, 1 thread)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fess_gda_rounds.json"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    default_threads = torch.get_num_threads()
    threads = args.threads or sorted({1, default_threads})
    repeats = args.repeats or (1 if args.quick else 5)
    target = args.target_s or (0.3 if args.quick else 2.0)
    problems = args.problems or (["nc_sc"] if args.quick else ["nc_sc", "fair_classification"])
    info = machine_info(default_threads)
    print(f"torch {info['torch']}, default {default_threads} threads, {info['cpu_count']} CPUs; other processes busy on "
          f"{info['other_busy_cores_at_start'] or 0:.2f} cores at start")
    print(f"FESS-GDA, K={K} local steps, m={M} of N={N_CLIENTS} clients; medians of {repeats} interleaved "
          f"(local, vmap) pairs of ~{target:g} s runs after a warm-up round\n", flush=True)

    cases = [(p, dt) for p in problems for dt in (args.dtypes if p == "nc_sc" else ["float32"])]
    rows, checks, skipped, profiles = [], {}, [], []
    for name, dtype in cases:
        if name == "fair_classification" and not fashion_mnist_available():
            skipped.append(f"{name}: the Debian package dataset-fashion-mnist is not installed")
            print(f"skipped {name}: dataset-fashion-mnist not installed", flush=True)
            continue
        torch.set_num_threads(default_threads)
        t0 = time.perf_counter()
        built = build(load_config(config_dict(name, dtype)))
        t_build = time.perf_counter() - t0
        checks[f"{name} {dtype}"] = check_engines(name, built, dtype) | {"build_s": t_build}
        for th in threads:
            torch.set_num_threads(th)
            r = measure_pair(built, target_s=target, repeats=repeats, max_rounds=10_000)
            rows.append({"problem": name, "dtype": dtype, "threads": th} | r)
            print(f"  {name:<20s} {dtype}  {th} thread(s): local {fmt(r['local_rounds_per_s'])}, vmap "
                  f"{fmt(r['vmap_rounds_per_s'])} rounds/s, vmap/local {r['vmap_over_local']:.1f}x "
                  f"(rounds per run {r['rounds_per_run']['local']} / {r['rounds_per_run']['vmap']})", flush=True)
        if args.profile and dtype == "float32":
            torch.set_num_threads(1)
            for eng, rounds in (("vmap", 20 if name == "nc_sc" else 3), ("local", 1)):
                profiles.append(profile_round(built, name, eng, rounds))
        del built
    torch.set_num_threads(default_threads)

    print(f"\n### FESS-GDA rounds/s, K = {K}, m = {M} of N = {N_CLIENTS} clients (median of {repeats} interleaved "
          "pairs; no metric evaluation in the timed runs)\n")
    print("| problem | dtype | threads | local rounds/s | vmap rounds/s | vmap / local |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['problem']} | {r['dtype']} | {r['threads']} | {fmt(r['local_rounds_per_s'])} | "
              f"{fmt(r['vmap_rounds_per_s'])} | {r['vmap_over_local']:.1f}x |")
    by_key = {(r["problem"], r["dtype"], r["threads"]): r for r in rows}
    notes = []
    for (name, dtype, th), r in by_key.items():
        if th != 1 and (name, dtype, 1) in by_key:
            one = by_key[(name, dtype, 1)]
            notes.append(f"{name} {dtype}: 1 thread vs {th}: local {one['local_rounds_per_s'] / r['local_rounds_per_s']:.2f}x, "
                         f"vmap {one['vmap_rounds_per_s'] / r['vmap_rounds_per_s']:.2f}x")
    if notes:
        print("\nspeed-up of 1 thread over the default thread count (same run):")
        for n in notes:
            print("    " + n)
    for s in skipped:
        print(f"skipped: {s}")
    for p in profiles:
        print_profile(p)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter() - t_start
    payload = {
        "benchmark": "fess_gda_rounds", "machine": info, "quick": args.quick, "repeats": repeats, "target_s": target,
        "configs": {f"{n} {dt}": config_dict(n, dt) for n, dt in cases},
        "timing_note": "run_rounds = simulate's loop without metric evaluations; per (problem, dtype, threads): one "
                       "warm-up round per engine, then `repeats` interleaved (local, vmap) timed runs; "
                       "rounds_per_s = median over the runs, vmap_over_local = ratio of the medians",
        "engine_checks": checks, "results": rows, "skipped": skipped, "profiles": profiles,
        "total_s": total, "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"\nwrote {out} ({total:.0f}s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
