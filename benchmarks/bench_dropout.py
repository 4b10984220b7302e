r"""Cost of a time-varying topology: MA-DSBO per iteration on a static graph vs the same graph with
edge dropout (issue 16, item 13: at most 2x at n = 1,024).

What is measured
----------------
MA-DSBO with the ``vmap`` engine on ``regularization_selection`` / ``synthetic`` data, the config of
``benchmarks/bench_ma_dsbo.py`` (d = 50 features, minibatch 16, T = N = 5: 11 gossip rounds per
outer iteration), float32, on the undirected exponential graph of n nodes (n = 1,024: degree 20,
10,240 edges, Metropolis-Hastings weights). Two contenders share one built problem and algorithm:

* ``static``: the graph's one mixing matrix (a torch CSR matrix, built once);
* ``dropout``: ``schedule = {name = "edge_dropout", params = {p}}`` -- every gossip round draws
  which edges fail, checks connectivity by a graph search and builds ``W_t`` sparsely
  (:mod:`topologies.schedules`).

A timed run is ``simulate_decentralized(rounds=K, seed=0, eval_every=K)`` (its two metric
evaluations included, the same for both), after one untimed warm-up run per contender. Each dropout
run gets a freshly built network, so no round's matrix comes from a cache of an earlier run. Unit:
seconds per outer iteration. Headline time base: process CPU time (one thread: CPU time ~ wall time
on an idle core, and a shared machine's waits for a core do not count); wall time is stored too.

Order: repetitions interleaved, the pair's order alternating (static/dropout, dropout/static, ...).
Reported: median and min-max of each side, the ratio of the medians dropout/static and the median
(min-max) of the per-repetition paired ratios. Acceptance: dropout/static <= 2.

Run::

    python benchmarks/bench_dropout.py [--n 1024] [--p 0.1] [--reps 7] [--K 5]
        [--out benchmarks/results/dropout.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fedopt  # noqa: E402
from bench_ma_dsbo import config  # noqa: E402
from fedopt.config import parse_config  # noqa: E402
from fedopt.network import build_network  # noqa: E402
from fedopt.runner import build, simulate_decentralized  # noqa: E402

GRAPH = "exponential"


def timed(b, network, K: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per outer iteration of one run of K iterations."""
    t, c = time.perf_counter(), time.process_time()
    simulate_decentralized(b.problem, b.algorithm, b.engine, network, rounds=K, seed=0, eval_every=K)
    return (time.process_time() - c) / K, (time.perf_counter() - t) / K


def summary(vals: list[float]) -> dict[str, float]:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="nodes (default 1024)")
    ap.add_argument("--p", type=float, default=0.1, help="edge failure probability per round (default 0.1)")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions (default 7)")
    ap.add_argument("--K", type=int, default=5, help="outer iterations per timed run (default 5)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dropout.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    b = build(parse_config(config(args.n, GRAPH)))
    schedule = {"name": "edge_dropout", "params": {"p": args.p}}

    def dropout_network():
        return build_network(GRAPH, args.n, seed=0, params={}, schedule=schedule)

    static = b.network
    simulate_decentralized(b.problem, b.algorithm, b.engine, static, rounds=1, seed=0, eval_every=1)  # warm-up
    simulate_decentralized(b.problem, b.algorithm, b.engine, dropout_network(), rounds=1, seed=0, eval_every=1)
    cpu: dict[str, list[float]] = {"static": [], "dropout": []}
    wall: dict[str, list[float]] = {"static": [], "dropout": []}
    for rep in range(args.reps):
        for side in (("static", "dropout") if rep % 2 == 0 else ("dropout", "static")):
            network = static if side == "static" else dropout_network()
            c, w = timed(b, network, args.K)
            cpu[side].append(c)
            wall[side].append(w)
        print(f"rep {rep + 1}/{args.reps}: static {cpu['static'][-1]:.4f} s/it, dropout {cpu['dropout'][-1]:.4f} s/it "
              f"(CPU)", flush=True)

    paired = [d / s for d, s in zip(cpu["dropout"], cpu["static"], strict=True)]
    paired_wall = [d / s for d, s in zip(wall["dropout"], wall["static"], strict=True)]
    ratio = statistics.median(cpu["dropout"]) / statistics.median(cpu["static"])
    edges = b.network.directed_edges(0) // 2
    commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    payload = {
        "benchmark": "dropout",
        "commit": commit,
        "settings": {"graph": GRAPH, "n": args.n, "edges": edges, "p": args.p, "reps": args.reps, "K": args.K,
                     "algorithm": "ma_dsbo (bench_ma_dsbo.config: T = N = 5, 11 gossip rounds per iteration)",
                     "engine": type(b.engine).__name__, "dtype": "float32", "threads": torch.get_num_threads(),
                     "gossip_layout": {"static": str(static.torch(0, torch.float32, b.problem.device).layout),
                                       "dropout": str(dropout_network().torch(1, torch.float32,
                                                                               b.problem.device).layout)},
                     "order": "interleaved, pair order alternating static/dropout, dropout/static",
                     "timing": "simulate_decentralized(rounds=K, seed=0, eval_every=K) incl. its 2 metric "
                               "evaluations; seconds per outer iteration, process CPU time (headline) and wall"},
        "torch": torch.__version__, "fedopt": fedopt.__version__, "platform": platform.platform(),
        "seconds_per_iteration": {side: summary(cpu[side]) for side in cpu},
        "seconds_per_iteration_wall": {side: summary(wall[side]) for side in wall},
        "dropout_over_static": ratio,
        "paired_dropout_over_static": summary(paired),
        "paired_dropout_over_static_wall": summary(paired_wall),
        "acceptance": {"max_ratio": 2.0, "met": ratio <= 2.0},
        "samples": {"cpu": cpu, "wall": wall},
    }
    s, d, p_ = payload["seconds_per_iteration"]["static"], payload["seconds_per_iteration"]["dropout"], summary(paired)
    print(f"\n| n | p | static s/it median [min-max] | dropout s/it median [min-max] | dropout/static | paired [min-max] |")
    print("|---:|---:|---|---|---:|---|")
    print(f"| {args.n} | {args.p} | {s['median']:.4f} [{s['min']:.4f}-{s['max']:.4f}] | {d['median']:.4f} "
          f"[{d['min']:.4f}-{d['max']:.4f}] | {ratio:.3f} | {p_['median']:.3f} [{p_['min']:.3f}-{p_['max']:.3f}] |")
    print(f"acceptance dropout/static <= 2: {'met' if ratio <= 2 else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
