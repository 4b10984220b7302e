r"""Communication rounds per second of FedMBO on every engine: ``vmap``, ``local``, ``ray``, ``flower``.

What is measured
----------------
FedMBO (defaults ``truncation="full"``, ``chains="single"``; ``batch_size=32, inner_steps=5,
neumann_terms=5``, all steps 0.1; 11 communication rounds per outer iteration) on the
logistic-regression bilevel problem of ``bench_fedmbo.py`` (``regularization_selection`` over
``synthetic`` data: 60,000 samples, 50 features, 2 classes), float32, split i.i.d. over N clients,
for N in {100, 1000} and m in {10, 100} clients per round. One torch thread everywhere (the
driver, every Ray actor, every Flower client actor), so the engines are compared at equal compute.

* ``vmap``, ``local``: fedopt's in-process engines.
* ``ray``: :class:`fedopt.engines.ray_engine.RayEngine`, 2 actors x 1 CPU, clients batched with
  ``vmap`` inside each actor.
* ``flower``: :class:`fedopt.engines.flower_engine.FlowerEngine`: the FedMBO strategy under
  Flower 1.42's simulation runtime (Ray backend, 2 client actors x 1 CPU, one message per client
  per round, server poll interval 5 ms).

Timing: start-up (Ray, actors, Flower's node registration) is excluded. A run of K outer
iterations (metrics only at k = 0 and k = K) timestamps the ends of iterations 1 and K - 1; rounds
per second = 11 (K - 2) / (t_{K-1} - t_1).

Per-client-update overhead = (seconds per round of the engine - seconds per round of the
in-process engine doing the same client computation) / m: ``ray`` against ``vmap`` (its actors
run the clients batched), ``flower`` against ``local`` (its clients run one by one). On 2 cores
the ray actors also compute in parallel, which this difference credits to the engine.

Targets (issue "scale-out engines"): ``ray`` overhead <= 1 ms per client update at m = 100
(Flower measured 7-29 ms per message on this machine); ``vmap`` >= 100x ``flower`` rounds/s at
N = 1000, m = 100. The script prints whether each is met; it does not fail on a miss.

Run: ``python benchmarks/bench_engines.py`` (about 4 minutes on 2 cores; ``--quick``: N = 100
only). Results go to ``benchmarks/results/engines.json``. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fedmbo import ROUNDS_PER_ITER, config_dict, machine_info  # noqa: E402

from fedopt.config import parse_config  # noqa: E402
from fedopt.engines.flower_engine import FlowerEngine  # noqa: E402
from fedopt.engines.local import LocalEngine  # noqa: E402
from fedopt.engines.ray_engine import RayEngine  # noqa: E402
from fedopt.engines.vmap import VmapEngine  # noqa: E402
from fedopt.runner import build, simulate  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "engines.json"
ITERS = {  # outer iterations per timed run (window = K - 2 iterations), by engine and m
    ("vmap", 10): 40, ("vmap", 100): 20, ("local", 10): 12, ("local", 100): 4,
    ("ray", 10): 30, ("ray", 100): 12, ("flower", 10): 5, ("flower", 100): 3,
}


def built_for(n: int, m: int):
    raw = config_dict(m, "float32")
    raw["clients"] = n
    return build(parse_config(raw))


def rounds_per_s(run, K: int) -> float:
    """``run(K, on_iterate)`` runs K outer iterations; rounds/s between the ends of iterations 1 and K-1."""
    stamps: dict[int, float] = {}

    def tick(k: int) -> None:
        stamps[k] = time.perf_counter()

    run(K, tick)
    return ROUNDS_PER_ITER * (K - 2) / (stamps[K - 1] - stamps[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 100 only")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ns = [100] if args.quick else [100, 1000]
    ms = [10, 100]
    rows: list[dict[str, Any]] = []
    info = None
    for n in ns:
        speeds: dict[tuple[str, int], float] = {}
        for m in ms:
            b = built_for(n, m)
            info = info or machine_info(argparse.Namespace(threads=1, dtype="float32"), b.problem)
            for name, engine in (("vmap", VmapEngine(b.problem)), ("local", LocalEngine(b.problem))):
                speeds[name, m] = rounds_per_s(lambda K, cb, e=engine, b=b: simulate(
                    b.problem, b.algorithm, e, rounds=K, seed=0, eval_every=K, on_iterate=cb), ITERS[name, m])
                print(f"N={n} m={m} {name}: {speeds[name, m]:.1f} rounds/s", flush=True)
        ray_engine = RayEngine(built_for(n, ms[0]).problem, actors=2, num_cpus=1, threads=1)
        try:
            for m in ms:
                b = built_for(n, m)
                speeds["ray", m] = rounds_per_s(lambda K, cb, b=b, e=ray_engine: simulate(
                    b.problem, b.algorithm, e, rounds=K, seed=0, eval_every=K, on_iterate=cb), ITERS["ray", m])
                print(f"N={n} m={m} ray: {speeds['ray', m]:.1f} rounds/s", flush=True)
        finally:
            ray_engine.close()
        for m in ms:
            b = built_for(n, m)
            fl = FlowerEngine(b.problem, actors=2, num_cpus=1, timeout=120)
            speeds["flower", m] = rounds_per_s(lambda K, cb, b=b, fl=fl: fl.run(
                b.algorithm, rounds=K, seed=0, eval_every=K, on_iterate=cb), ITERS["flower", m])
            print(f"N={n} m={m} flower: {speeds['flower', m]:.2f} rounds/s", flush=True)
        for m in ms:
            s = {e: 1.0 / speeds[e, m] for e in ("vmap", "local", "ray", "flower")}
            rows.append({
                "N": n, "m": m, **{f"{e}_rounds_per_s": speeds[e, m] for e in s},
                "ray_overhead_ms_per_client": 1e3 * (s["ray"] - s["vmap"]) / m,
                "flower_overhead_ms_per_client": 1e3 * (s["flower"] - s["local"]) / m,
                "vmap_over_flower": speeds["vmap", m] / speeds["flower", m],
            })
    print()
    print("| N | m | vmap | local | ray (2 actors) | flower | ray overhead / client | flower overhead / client | vmap / flower |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['N']} | {r['m']} | {r['vmap_rounds_per_s']:.0f} | {r['local_rounds_per_s']:.1f} | "
              f"{r['ray_rounds_per_s']:.1f} | {r['flower_rounds_per_s']:.2f} | {r['ray_overhead_ms_per_client']:.3f} ms | "
              f"{r['flower_overhead_ms_per_client']:.1f} ms | {r['vmap_over_flower']:.0f}x |")
    targets = {}
    for r in rows:
        if r["m"] == 100:
            targets[f"ray_overhead_le_1ms_N{r['N']}"] = r["ray_overhead_ms_per_client"] <= 1.0
        if r["N"] == 1000 and r["m"] == 100:
            targets["vmap_ge_100x_flower"] = r["vmap_over_flower"] >= 100
    for k, ok in targets.items():
        print(f"target {k}: {'met' if ok else 'MISSED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "targets": targets, "machine": info, "iterations": {
        f"{e}_m{m}": k for (e, m), k in ITERS.items()}}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
