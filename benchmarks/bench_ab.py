r"""A/B speed check of two fedopt checkouts, side by side (issue 15: no speed regression).

What is measured
----------------
Two source trees (``--old`` and ``--new``, e.g. two ``git worktree``\ s) each run the same small,
fixed workloads, every measurement in a fresh subprocess that imports ``fedopt`` from its own tree
(``cwd=<tree>``, ``PYTHONPATH=<tree>``; the subprocess checks ``fedopt.__file__``), with one
thread (``OMP_NUM_THREADS=MKL_NUM_THREADS=1``, ``torch.set_num_threads(1)``). The configs come from
the tree's own ``benchmarks/bench_fedmbo.py`` (``config_dict``) and ``benchmarks/bench_ma_dsbo.py``
(``config``):

* ``fedmbo_vmap_m10``, ``fedmbo_vmap_m100``, ``fedmbo_local_m10``: FedMBO on
  ``regularization_selection`` / ``synthetic`` (N = 1000 clients, b = 32, T = Q = 5, float32) with
  the ``vmap`` or ``local`` engine and m clients per round; unit: communication rounds per second
  (``counters.comm_rounds`` / wall time of ``simulate(rounds=K, seed=0, eval_every=K)``);
* ``ma_dsbo_ring_n256``, ``ma_dsbo_ring_n1024``: MA-DSBO on a ring of n nodes with the ``vmap``
  engine; unit: outer iterations per second (K / wall time of ``simulate_decentralized(rounds=K,
  eval_every=K)``).

As in the two benchmark scripts, a timed run includes ``simulate``'s two metric evaluations
(k = 0 and k = K). K is fixed per workload (``WORKLOADS``), the same for both trees. Each
subprocess builds the problem, runs one untimed warm-up (``rounds=2``), then ``--inner`` timed runs;
its sample is the best of them (interference from other processes only slows a run down); all
inner timings are kept in the JSON.

Time base: the headline numbers use the subprocess's **CPU time** (``time.process_time``, one
thread, so CPU time ~ wall time on an idle core) because on a shared, oversubscribed machine the
wall time mostly measures how long the process waited for a core (wall-time rates of the same
build swung 2x between repetitions here). Wall-time rates are reported and stored too
(``*_wall``). CPU time still moves with cache and memory-bandwidth contention, hence the
repetitions.

Order: repetitions are interleaved -- for every repetition and workload one old and one new
subprocess, the pair's order alternating between repetitions (old/new, new/old, ...) so a drift in
machine load does not favour one side. Reported per workload: median and min-max of each side, the
ratio of the medians new/old, and the median of the per-repetition paired ratios; plus the
issue's ratio vmap/local at FedMBO m = 10 for each side. Acceptance: new/old >= 0.90.

``--profile TREE WORKLOAD`` runs one cProfile'd measurement instead and prints the top entries.

Run::

    python benchmarks/bench_ab.py --old /tmp/ab_old --new /tmp/ab_new --reps 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# workload -> (kind, params, K). K gives roughly 1-2 s per timed run on one idle core.
WORKLOADS: dict[str, tuple[str, dict[str, Any], int]] = {
    "fedmbo_vmap_m10": ("fedmbo", {"m": 10, "engine": "vmap"}, 250),
    "fedmbo_vmap_m100": ("fedmbo", {"m": 100, "engine": "vmap"}, 100),
    "fedmbo_local_m10": ("fedmbo", {"m": 10, "engine": "local"}, 40),
    "ma_dsbo_ring_n256": ("ma_dsbo", {"n": 256, "graph": "ring", "engine": "vmap"}, 30),
    "ma_dsbo_ring_n1024": ("ma_dsbo", {"n": 1024, "graph": "ring", "engine": "vmap"}, 15),
}
UNITS = {"fedmbo": "rounds/s", "ma_dsbo": "iterations/s"}
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# Worker: one measurement, in its own process, fedopt from --tree
# ---------------------------------------------------------------------------------------------

def worker(tree: str, name: str, inner: int, profile: bool) -> dict[str, Any]:
    tree = str(Path(tree).resolve())
    sys.path[:0] = [tree, os.path.join(tree, "benchmarks")]
    import torch
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    import fedopt
    from fedopt.config import parse_config
    from fedopt.runner import build, simulate, simulate_decentralized

    where = str(Path(fedopt.__file__).resolve())
    if not where.startswith(tree + os.sep):
        raise SystemExit(f"fedopt imported from {where}, not from {tree}")
    kind, p, K = WORKLOADS[name]
    if kind == "fedmbo":
        import bench_fedmbo
        cfg = bench_fedmbo.config_dict(p["m"], "float32", engine=p["engine"])
    else:
        import bench_ma_dsbo
        cfg = bench_ma_dsbo.config(p["n"], p["graph"])
        cfg["engine"] = {"name": p["engine"]}
    t0 = time.perf_counter()
    b = build(parse_config(cfg))
    build_s = time.perf_counter() - t0

    def run(k: int) -> float:
        """Units done in a run of k outer iterations (rounds for FedMBO, iterations for MA-DSBO)."""
        if kind == "fedmbo":
            return simulate(b.problem, b.algorithm, b.engine, rounds=k, seed=0, eval_every=k).counters.comm_rounds
        simulate_decentralized(b.problem, b.algorithm, b.engine, b.network, rounds=k, seed=0, eval_every=k)
        return k

    run(2)  # warm-up
    if profile:
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        t = time.perf_counter()
        pr.enable()
        units = run(K)
        pr.disable()
        wall = time.perf_counter() - t
        out = io.StringIO()
        st = pstats.Stats(pr, stream=out)
        st.sort_stats("tottime").print_stats(40)
        st.sort_stats("cumulative").print_stats(40)
        return {"fedopt": where, "K": K, "units_per_s_profiled": units / wall, "profile": out.getvalue()}
    walls, cpus = [], []
    for _ in range(inner):
        t, c = time.perf_counter(), time.process_time()
        units = run(K)
        cpus.append(time.process_time() - c)
        walls.append(time.perf_counter() - t)
    return {"fedopt": where, "K": K, "units": units, "build_s": build_s, "walls_s": walls, "cpu_s": cpus,
            "value": units / min(cpus), "value_wall": units / min(walls), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def measure(tree: str, name: str, inner: int, profile: bool = False, timeout: float = 600) -> dict[str, Any]:
    env = {**os.environ, **THREAD_ENV, "PYTHONPATH": tree}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tree, name, "--inner", str(inner)]
    if profile:
        cmd.append("--worker-profile")
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} in {tree} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def git_head(tree: str) -> str:
    return subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def busy_cores(seconds: float = 1.0) -> float | None:
    """CPU cores kept busy by other processes (this one sleeps meanwhile), from /proc/stat."""
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def summarize(vals: list[float]) -> dict[str, float]:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", help="old source tree (its fedopt/ is imported)")
    ap.add_argument("--new", help="new source tree")
    ap.add_argument("--reps", type=int, default=5, help="subprocesses per workload and tree (default 5)")
    ap.add_argument("--inner", type=int, default=3, help="timed runs per subprocess; its sample is the best (default 3)")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ab_explicit_state.json"))
    ap.add_argument("--profile", nargs=2, metavar=("TREE", "WORKLOAD"), help="one cProfile'd run; print the top entries")
    ap.add_argument("--worker", nargs=2, metavar=("TREE", "WORKLOAD"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-profile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.inner, args.worker_profile)))
        return 0
    if args.profile:
        tree = str(Path(args.profile[0]).resolve())
        r = measure(tree, args.profile[1], 1, profile=True)
        print(f"{args.profile[1]} in {tree} ({git_head(tree)[:10]}): {r['units_per_s_profiled']:.1f} "
              f"{UNITS[WORKLOADS[args.profile[1]][0]]} under cProfile\n{r['profile']}")
        return 0
    if not (args.old and args.new):
        ap.error("--old and --new are required")

    trees = {"old": str(Path(args.old).resolve()), "new": str(Path(args.new).resolve())}
    commits = {side: git_head(t) for side, t in trees.items()}
    t_start = time.perf_counter()
    machine = {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": sys.version.split()[0],
               "platform": platform.platform(), "loadavg_before": list(os.getloadavg()),
               "other_busy_cores_before": busy_cores()}
    print(f"old {commits['old'][:10]} ({trees['old']}), new {commits['new'][:10]} ({trees['new']}); "
          f"nproc {machine['nproc']}, loadavg {machine['loadavg_before']}, "
          f"other busy cores {machine['other_busy_cores_before']:.2f}", flush=True)

    samples: dict[str, dict[str, list[dict[str, Any]]]] = {w: {"old": [], "new": []} for w in args.workloads}
    for rep in range(args.reps):
        order = ("old", "new") if rep % 2 == 0 else ("new", "old")
        for w in args.workloads:
            for side in order:
                r = measure(trees[side], w, args.inner)
                r.update(rep=rep, loadavg_1m=os.getloadavg()[0], t=time.perf_counter() - t_start)
                samples[w][side].append(r)
            o, n = samples[w]["old"][-1], samples[w]["new"][-1]
            print(f"rep {rep}: {w:<20s} cpu: old {fmt(o['value'])} new {fmt(n['value'])}; wall: old "
                  f"{fmt(o['value_wall'])} new {fmt(n['value_wall'])}  (load {os.getloadavg()[0]:.2f})", flush=True)

    results = {}
    for w in args.workloads:
        r: dict[str, Any] = {"unit": UNITS[WORKLOADS[w][0]] + " (per CPU second)", "K": WORKLOADS[w][2]}
        for suffix, key in (("", "value"), ("_wall", "value_wall")):
            old = [s[key] for s in samples[w]["old"]]
            new = [s[key] for s in samples[w]["new"]]
            so, sn = summarize(old), summarize(new)
            r["old" + suffix], r["new" + suffix] = so, sn
            r["new_over_old" + suffix] = sn["median"] / so["median"]
            r["paired_new_over_old" + suffix] = summarize([n / o for o, n in zip(old, new)])
        r["within_10pct"] = r["new_over_old"] >= 0.90
        results[w] = r
    issue_ratios = {}
    if "fedmbo_vmap_m10" in results and "fedmbo_local_m10" in results:
        for suffix in ("", "_wall"):
            for side in ("old", "new"):
                issue_ratios[f"vmap_over_local_m10_{side}{suffix}"] = (
                    results["fedmbo_vmap_m10"][side + suffix]["median"] / results["fedmbo_local_m10"][side + suffix]["median"])
            issue_ratios["change" + suffix] = (issue_ratios[f"vmap_over_local_m10_new{suffix}"]
                                               / issue_ratios[f"vmap_over_local_m10_old{suffix}"])
    machine.update(loadavg_after=list(os.getloadavg()), other_busy_cores_after=busy_cores())

    print(f"\n| workload | unit | old median [min-max] | new median [min-max] | new/old | paired new/old median [min-max] |")
    print("|---|---|---:|---:|---:|---:|")
    for w, r in results.items():
        o, n, p = r["old"], r["new"], r["paired_new_over_old"]
        print(f"| {w} | {r['unit']} | {fmt(o['median'])} [{fmt(o['min'])}-{fmt(o['max'])}] | "
              f"{fmt(n['median'])} [{fmt(n['min'])}-{fmt(n['max'])}] | {r['new_over_old']:.3f} | "
              f"{p['median']:.3f} [{p['min']:.3f}-{p['max']:.3f}] |")
    print("\nwall-time rates (for comparison):")
    for w, r in results.items():
        o, n = r["old_wall"], r["new_wall"]
        print(f"  {w}: old {fmt(o['median'])} [{fmt(o['min'])}-{fmt(o['max'])}], new {fmt(n['median'])} "
              f"[{fmt(n['min'])}-{fmt(n['max'])}], new/old {r['new_over_old_wall']:.3f}")
    for k, v in issue_ratios.items():
        print(f"{k}: {v:.3f}")
    print(f"loadavg before {machine['loadavg_before']}, after {machine['loadavg_after']}")

    payload = {
        "benchmark": "ab_explicit_state", "commits": commits, "trees": trees,
        "settings": {"reps": args.reps, "inner": args.inner, "threads": 1, "thread_env": THREAD_ENV,
                     "order": "interleaved per workload, pair order alternating old/new, new/old",
                     "sample": "best of `inner` timed runs in one fresh subprocess, after a rounds=2 warm-up",
                     "timing": "simulate(rounds=K, seed=0, eval_every=K) incl. its 2 metric evaluations; value = "
                               "units / process CPU seconds (headline), value_wall = units / wall seconds",
                     "workloads": {w: {"kind": WORKLOADS[w][0], **WORKLOADS[w][1], "K": WORKLOADS[w][2]}
                                   for w in args.workloads},
                     "configs": "bench_fedmbo.config_dict(m, 'float32', engine=...) / bench_ma_dsbo.config(n, 'ring') "
                                "+ engine vmap, from each tree"},
        "machine": machine, "results": results, "issue_ratios": issue_ratios, "samples": samples,
        "total_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out} ({payload['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
