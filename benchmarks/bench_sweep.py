"""Wall time of one 24-run sweep per executor (serial, process, ray), measured in one run.

The sweep is ``experiments/sweeps/fedmbo_vs_fednest.toml`` (FedMBO and FedNest x 3 outer steps x 4
seeds on the noisy heterogeneous quadratic, 100 outer iterations each, one torch thread per run).
Each executor runs it into a fresh folder; the wall time includes starting the pool or the local Ray
cluster and writing every run folder and the combined table. The three tables are checked to be
identical (up to row order) before anything is reported.

Target: process and ray at least 1.6x faster than serial on 2 cores.

    python benchmarks/bench_sweep.py [--workers 2] [--executors serial process ray]

Writes benchmarks/results/sweep_executors.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from fedopt.sweep import load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "experiments" / "sweeps" / "fedmbo_vs_fednest.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--executors", nargs="+", default=["serial", "process", "ray"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sweep_executors.json"))
    args = ap.parse_args()
    sweep = load_sweep(SWEEP)
    rows, tables = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for ex in args.executors:
            t0 = time.perf_counter()
            rep = run_sweep(sweep, Path(tmp) / ex, executor=ex, workers=args.workers, progress=False)
            wall = time.perf_counter() - t0
            assert rep.finished + rep.diverged == len(sweep.points) and not rep.failed, rep
            tables[ex] = pd.read_csv(rep.table_path).sort_values(["run_id", "round", "metric"]).reset_index(drop=True)
            rows.append({"executor": ex, "runs": len(sweep.points), "wall_s": round(wall, 2)})
            print(f"{ex:8s} {wall:7.1f} s", flush=True)
    first = next(iter(tables.values()))
    for ex, t in tables.items():
        pd.testing.assert_frame_equal(first, t, check_exact=True, obj=f"{ex} table")
    serial = next((r["wall_s"] for r in rows if r["executor"] == "serial"), None)
    print(f"\n### {len(sweep.points)}-run sweep, {args.workers} workers, {os.cpu_count()} cores "
          "(tables identical across executors)\n")
    print("| executor | wall time (s) | speed-up over serial |\n|---|---:|---:|")
    for r in rows:
        r["speedup"] = round(serial / r["wall_s"], 2) if serial else None
        print(f"| {r['executor']} | {r['wall_s']:.1f} | {r['speedup']:.2f}x |" if serial else f"| {r['executor']} | {r['wall_s']:.1f} | - |")
    for r in rows:
        if r["executor"] != "serial" and serial:
            print(f"target {r['executor']} >= 1.6x serial: {'met' if r['speedup'] >= 1.6 else 'NOT met'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "sweep_executors", "sweep": str(SWEEP.relative_to(REPO)),
                                          "workers": args.workers, "cpu_count": os.cpu_count(), "rows": rows},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
