r"""How the iterations TFBO needs to reach ||grad Phi||^2 <= 1e-8 grow as the initial step s falls.

F6 fixes the budget and reports the final error. This script measures the inverse: on F6's noise-free
quadratic (``experiments/configs/tfbo_quadratic.toml``, one client, float64; accumulators
alpha0 = beta0 = gamma0 = 1/s), the first outer iteration at which ``||grad Phi(x_k)||^2 <= 1e-8``,
measured on a grid of budget/400 iterations. It then fits the exponent p of ``iterations ~ s^-p`` over
the steps below 1.

Expectation: accumulators only grow, so the x-step never exceeds its start. For D-TFBO that is s; for
S-TFBO it is 1/(alpha * max(beta, gamma)), about s^2. Phi's slowest mode (curvature >= 0.1)
contracts by at most 1 - 0.1 * (x-step) per iteration. That gives the scale estimate
ln(0.45 / 1e-8) / (0.2 * x-step), which is not a bound: only part of the initial error lies in the
slowest mode. It predicts p = 1 for D-TFBO and p = 2 for S-TFBO, which puts s = 1e-3 at about 1e5
and 1e8 iterations.

Only steps whose runs fit in minutes are measured by default: D-TFBO's inner loops also step at most
s, so each of its iterations costs more as s falls. ``--only METHOD:S ...`` measures the listed runs
and merges them into the JSON (a row of the same method and step is replaced), which is how the
long runs (D-TFBO down to s = 1e-3, S-TFBO at s = 0.01) were added. Their budgets come from the
measured law: 1.5 times the iterations that the fit over the measured steps below 1 predicts
(the step-bound estimate overshoots, and three times it would be days at s = 1e-3).

Run: ``python experiments/tfbo_budget.py`` (about 6 minutes on 2 cores). Results go to
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

import fedopt
from fedopt.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "tfbo_quadratic.toml"
OUT = REPO / "docs" / "figures" / "F6_budget.json"
TOL = 1e-8

# method -> (algorithm, extra parameters, steps measured, exponent p of the x-step bound)
METHODS = {
    "D-TFBO": ("d_tfbo", {"tolerance": 1e-12, "max_inner": 2000}, [10.0, 1.0, 0.3, 0.1], 1),
    "S-TFBO": ("s_tfbo", {}, [10.0, 1.0, 0.3, 0.1, 0.03], 2),
}


def predicted(p: int, s: float) -> float:
    """ln(H0 / TOL) / (0.2 * x-step), H0 = 0.45: the scale of the iterations the step bound allows."""
    return math.log(0.45 / TOL) / (0.2 * min(s, 1.0) ** p)


def fitted_budget(rows: list[dict], method: str, s: float) -> int | None:
    """1.5 x the iterations the power law fitted to ``method``'s measured steps below 1 predicts."""
    pts = [(r["s"], r["iterations_to_tol"]) for r in rows
           if r["method"] == method and r["s"] < 1 and r["iterations_to_tol"] and r["s"] != s]
    if len(pts) < 2:
        return None
    slope, icpt = np.polyfit(np.log([a for a, _ in pts]), np.log([k for _, k in pts]), 1)
    return int(1.5 * math.exp(icpt + slope * math.log(s)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="METHOD:S", default=None,
                    help="measure only these runs (e.g. D-TFBO:0.001 S-TFBO:0.01) and merge them into the JSON")
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
        budget = fitted_budget(old_rows, method, s) if args.only else None
        budget = int(max(3 * predicted(p, s), 2000)) if budget is None else max(budget, 2000)
        every = max(1, budget // 400)
        budget = every * math.ceil(budget / every)
        raw = copy.deepcopy(base)
        raw.update(rounds=budget, eval_every=every)
        raw["algorithm"] = {"name": alg, "params": {"alpha0": 1 / s, "beta0": 1 / s, "gamma0": 1 / s, **extra}}
        t0 = time.perf_counter()
        df = fedopt.run(raw)
        wall = time.perf_counter() - t0
        h = df[df.metric == "hypergrad_norm_sq"].sort_values("round")
        hit = h[h.value <= TOL]
        row = {"method": method, "s": s, "predicted_iterations": round(predicted(p, s)), "budget": budget,
               "measured_every": every, "status": df.attrs["status"],
               "iterations_to_tol": int(hit["round"].iloc[0]) if len(hit) else None,
               "final_hypergrad_norm_sq": float(h.value.iloc[-1]),
               "comm_rounds": int(df[df.metric == "comm_rounds"].value.max()), "wall_s": round(wall, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.only:  # merge: replace the rows measured again, keep the others, in (method, -s) order
        fresh = {(r["method"], r["s"]) for r in rows}
        rows = [r for r in old_rows if (r["method"], r["s"]) not in fresh] + rows
        rows.sort(key=lambda r: (list(METHODS).index(r["method"]), -r["s"]))
    fits = {}
    for method in METHODS:
        pts = [(r["s"], r["iterations_to_tol"]) for r in rows
               if r["method"] == method and r["s"] < 1 and r["iterations_to_tol"]]
        if len(pts) >= 2:
            slope = np.polyfit(np.log([s for s, _ in pts]), np.log([k for _, k in pts]), 1)[0]
            fits[method] = {"exponent_p": float(-slope), "steps": [s for s, _ in pts]}
    OUT.write_text(json.dumps({"tolerance": TOL, "config": str(CONFIG.relative_to(REPO)), "rows": rows,
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
