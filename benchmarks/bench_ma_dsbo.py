r"""Iterations per second of MA-DSBO: ``vmap`` engine (sparse gossip) vs ``local`` engine.

What is measured: MA-DSBO (``fedopt.algorithms.decentralized.ma_dsbo``, defaults: ATC gossip, no
tracking, T = N = 5, so 11 node steps and 11 gossip rounds per iteration) on the logistic-regression
bilevel problem ``regularization_selection`` (d = 50 features, 2 classes) over ``synthetic`` data
split i.i.d. over n nodes, minibatch 16, for n in {64, 256, 1024} nodes on ring, 2-D torus and
Erdos-Renyi graphs (p = 4 ln(n)/n, Metropolis-Hastings weights). ``vmap`` gossips with a sparse CSR
matrix for n > 256 (one ``torch.sparse.mm`` per round) and a dense one below; ``local`` loops over
nodes for both the node steps and the gossip (the reference). Both engines run in the same process,
one after the other; the time of ``simulate_decentralized(rounds=K, eval_every=K)`` includes its two
metric evaluations (their share is a column); ``vmap`` is the best of 3 runs of 20 iterations,
``local`` one iteration.

Target: >= 15 iterations/s at n = 1024 with ``vmap`` on 2 cores.

Run: ``python benchmarks/bench_ma_dsbo.py [--quick]``; results also go to
``benchmarks/results/ma_dsbo_iterations.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import fedopt
from fedopt.config import parse_config
from fedopt.registry import ENGINES
from fedopt.runner import build, simulate_decentralized


def config(n: int, graph: str) -> dict:
    params = {"p": min(1.0, 4 * math.log(n) / n)} if graph == "erdos_renyi" else {}
    return {
        "seed": 0, "clients": n, "dtype": "float32",
        "problem": {"name": "regularization_selection"},
        "data": {"name": "synthetic", "params": {"samples": max(20 * n, 5000), "features": 50, "classes": 2}},
        "partition": {"name": "iid"},
        "algorithm": {"name": "ma_dsbo", "params": {"outer_lr": 0.1, "inner_lr": 0.1, "z_lr": 0.1,
                                                    "inner_steps": 5, "z_steps": 5, "batch_size": 16}},
        "topology": {"name": graph, "params": params},
    }


def its_per_s(b, engine, K: int, repeats: int = 1) -> tuple[float, float]:
    """Best of ``repeats`` timed runs of K iterations (after a warm-up) and the evaluation share."""
    simulate_decentralized(b.problem, b.algorithm, engine, b.network, rounds=1, seed=0, eval_every=1)  # warm-up
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        simulate_decentralized(b.problem, b.algorithm, engine, b.network, rounds=K, seed=0, eval_every=K)
        walls.append(time.perf_counter() - t)
    wall = min(walls)
    t = time.perf_counter()
    b.problem.metrics(*b.problem.init())
    return K / wall, 2 * (time.perf_counter() - t) / wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    ap.add_argument("--ns", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--graphs", nargs="+", default=["ring", "torus", "erdos_renyi"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ma_dsbo_iterations.json"))
    args = ap.parse_args(argv)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32\n")
    print("| graph | n | gap | vmap it/s | local it/s | vmap / local | eval share (vmap) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for graph in args.graphs:
        for n in args.ns:
            b = build(parse_config(config(n, graph)))
            k_vmap = 3 if args.quick else 20
            v, share = its_per_s(b, b.engine, k_vmap, repeats=1 if args.quick else 3)
            loc, _ = its_per_s(b, ENGINES.get("local")(b.problem), 1)
            gap = b.network.spectral_gap()
            rows.append({"graph": graph, "n": n, "gap": gap, "vmap_its": v, "local_its": loc, "eval_share": share,
                         "sparse_gossip": b.network.torch(0, torch.float32, b.problem.device).layout != torch.strided})
            print(f"| {graph} | {n} | {gap:.3g} | {v:.1f} | {loc:.3f} | {v / loc:.0f}x | {share:.1%} |", flush=True)
    at_1024 = [r["vmap_its"] for r in rows if r["n"] == 1024]
    if at_1024:
        print(f"\ntarget >= 15 it/s at n = 1024 (vmap): {'met' if min(at_1024) >= 15 else 'NOT met'} "
              f"(min {min(at_1024):.1f} it/s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                          "platform": platform.platform(), "fedopt": fedopt.__version__,
                                          "quick": args.quick, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
