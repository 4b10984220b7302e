r"""How the iterations TFBO needs to reach ||grad Phi||^2 <= 1e-8 grow as the initial step s falls.

F6 fixes the budget and reports the final error. This script measures the inverse: on F6's noise-free
quadratic (``experiments/configs/tfbo_quadratic.toml``, one client, float64; accumulators
alpha0 = beta0 = gamma0 = 1/s), the first outer iteration at which ``||grad Phi(x_k)||^2 <= 1e-8``,
measured on a grid of 1/400 of the expected count (below). Each run stops there (``simulate``'s
``stop_when``), so ``comm_rounds`` are the rounds it took; the budget, three times the expected
count, only caps a run that never gets there. It then fits the exponent p of ``iterations ~ s^-p``
over the steps below 1.

Expectation: accumulators only grow, so the x-step never exceeds its start. For D-TFBO that is s; for
S-TFBO it is 1/(alpha * max(beta, gamma)), about s^2. Phi's slowest mode (curvature >= 0.1)
contracts by at most 1 - 0.1 * (x-step) per iteration. That gives the scale estimate
ln(0.45 / 1e-8) / (0.2 * x-step), which is not a bound: only part of the initial error lies in the
slowest mode. It predicts p = 1 for D-TFBO and p = 2 for S-TFBO, which puts s = 1e-3 at about 1e5
and 1e8 iterations.

The expected count is the step-bound estimate for the default steps, s = 10 ... 0.01. Smaller steps
are measured with ``--only METHOD:S ...``, which runs only those and merges them into the JSON (a
row of the same method and step is replaced); their expected count is the power law fitted to the
steps already measured. Only runs that fit in minutes are in the default: D-TFBO's inner loops also
step at most s, so each of its iterations costs more as s falls.

Run: ``python experiments/tfbo_budget.py`` (about 12 minutes on 2 cores). Results go to
``docs/figures/F6_budget.json``, and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np

from fedopt.algorithms.centralized.quadratic_kernels import (
    d_tfbo_quadratic,
    s_tfbo_quadratic,
)
from fedopt.config import load_config, parse_config
from fedopt.runner import build, simulate

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "tfbo_quadratic.toml"
OUT = REPO / "docs" / "figures" / "F6_budget.json"
TOL = 1e-8

# method -> (algorithm, extra parameters, steps measured, exponent p of the x-step bound)
METHODS = {
    "D-TFBO": ("d_tfbo", {"tolerance": 1e-12, "max_inner": 100_000}, [10.0, 1.0, 0.3, 0.1, 0.03, 0.01], 1),
    "S-TFBO": ("s_tfbo", {}, [10.0, 1.0, 0.3, 0.1, 0.03, 0.01], 2),
}


def predicted(p: int, s: float) -> float:
    """ln(H0 / TOL) / (0.2 * x-step), H0 = 0.45: the scale of the iterations the step bound allows."""
    return math.log(0.45 / TOL) / (0.2 * min(s, 1.0) ** p)


def fitted(rows: list[dict], method: str, s: float) -> float | None:
    """The iterations the power law fitted to ``method``'s measured steps below 1 predicts at ``s``."""
    pts = [(r["s"], r["iterations_to_tol"]) for r in rows
           if r["method"] == method and r["s"] < 1 and r["iterations_to_tol"] and r["s"] != s]
    if len(pts) < 2:
        return None
    slope, icpt = np.polyfit(np.log([a for a, _ in pts]), np.log([k for _, k in pts]), 1)
    return math.exp(icpt + slope * math.log(s))


def fit_exponents(rows: list[dict]) -> dict[str, dict]:
    """Per method, the exponent p of ``iterations ~ s^-p`` fitted over the measured steps below 1."""
    fits = {}
    for method in METHODS:
        pts = [(r["s"], r["iterations_to_tol"]) for r in rows
               if r["method"] == method and r["s"] < 1 and r["iterations_to_tol"]]
        if len(pts) >= 2:
            slope = np.polyfit(np.log([s for s, _ in pts]), np.log([k for _, k in pts]), 1)[0]
            fits[method] = {"exponent_p": float(-slope), "steps": [s for s, _ in pts]}
    return fits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="METHOD:S", default=None,
                    help="measure only these runs (e.g. D-TFBO:0.001 S-TFBO:0.01) and merge them into the JSON")
    ap.add_argument("--out", type=Path, default=OUT, help=f"the JSON to write (default {OUT.relative_to(REPO)})")
    ap.add_argument("--kernel", choices=["generic", "numpy"], default="generic",
                    help="generic: the library's programs under simulate (default); numpy: the same methods "
                         "transcribed for the quadratic (fedopt.algorithms.centralized.quadratic_kernels), "
                         "25-50x faster, for the steps whose runs take 10^8 rounds")
    args = ap.parse_args(argv)
    base = load_config(CONFIG).to_dict()
    old_rows = json.loads(OUT.read_text())["rows"] if (args.only and OUT.exists()) else []
    if args.only:
        todo = []
        for item in args.only:
            method, _, step = item.partition(":")
            if method not in METHODS or not step:
                ap.error(f"--only takes METHOD:S with METHOD in {sorted(METHODS)}, got {item!r}")
            todo.append((method, float(step)))
    else:
        todo = [(method, s) for method, (_, _, steps, _) in METHODS.items() for s in steps]
    rows = []
    for method, s in todo:
        alg, extra, _, p = METHODS[method]
        expected = (fitted(old_rows, method, s) if args.only else None) or predicted(p, s)
        every = max(1, int(expected) // 400)
        budget = every * math.ceil(max(3 * expected, 2000) / every)
        raw = copy.deepcopy(base)
        raw.update(rounds=budget, eval_every=every)
        raw["algorithm"] = {"name": alg, "params": {"alpha0": 1 / s, "beta0": 1 / s, "gamma0": 1 / s, **extra}}
        t0 = time.perf_counter()
        b = build(parse_config(raw))
        capped = None
        if args.kernel == "generic":
            result = simulate(b.problem, b.algorithm, b.engine, rounds=budget, seed=raw["seed"], eval_every=every,
                              stop_when=lambda m: m["hypergrad_norm_sq"] <= TOL)
            k_last, _, _, h_last = [r for r in result.records if r[2] == "hypergrad_norm_sq"][-1]
            status, comm_rounds = result.status, result.counters.comm_rounds
        else:
            kernel = {"d_tfbo": d_tfbo_quadratic, "s_tfbo": s_tfbo_quadratic}[alg]
            run = kernel(b.problem, budget, **raw["algorithm"]["params"], eval_every=every, tol=TOL)
            k_last, _, h_last = run.records[-1]
            status, comm_rounds, capped = run.status, run.comm_rounds, run.capped_inner_loops
        wall = time.perf_counter() - t0
        reached = h_last <= TOL
        row = {"method": method, "s": s, "kernel": args.kernel, "predicted_iterations": round(predicted(p, s)),
               "expected_iterations": round(expected), "budget": budget,
               "measured_every": every, "status": status,
               "iterations_to_tol": int(k_last) if reached else None,
               "final_hypergrad_norm_sq": float(h_last),
               "comm_rounds": int(comm_rounds), "wall_s": round(wall, 1)}
        if capped is not None:
            row["capped_inner_loops"] = capped
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.only:  # merge: replace the rows measured again, keep the others, in (method, -s) order
        fresh = {(r["method"], r["s"]) for r in rows}
        rows = [r for r in old_rows if (r["method"], r["s"]) not in fresh] + rows
        rows.sort(key=lambda r: (list(METHODS).index(r["method"]), -r["s"]))
    fits = fit_exponents(rows)
    args.out.write_text(json.dumps({"tolerance": TOL, "config": str(CONFIG.relative_to(REPO)), "rows": rows,
                                    "fits": fits}, indent=1))
    print("\n| method | s | iterations to 1e-8 | step-bound estimate | oracle rounds | wall |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        got = f"{r['iterations_to_tol']:,}" if r["iterations_to_tol"] is not None else f"> {r['budget']:,}"
        print(f"| {r['method']} | {r['s']:g} | {got} | {r['predicted_iterations']:,} | {r['comm_rounds']:,} | "
              f"{r['wall_s']:.0f} s |")
    for method, f in fits.items():
        print(f"{method}: iterations ~ s^-{f['exponent_p']:.2f} over s = {f['steps']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
