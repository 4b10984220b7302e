r"""Tuning-free FedMBO and MA-DSBO over initial steps 1e-3 ... 10, against fixed and hand-tuned steps.

The TFBO step rule (``step_rule = "tuning_free"``: inverse cumulative gradient norms, started at
1/s) applied to FedMBO on the server and to MA-DSBO per node with gossiped accumulators, an
extension, not a result from the papers. Both run on the noise-free heterogeneous quadratic
(float64, x in R^4, y in R^3, eigenvalues of every client's lower Hessian in [1, 4]):

* FedMBO: 8 clients, all of them every round, 3 lower-level steps and 10 Neumann terms per outer
  iteration (14 rounds), heterogeneity delta = 0.5;
* MA-DSBO: a ring of 8 nodes (Metropolis-Hastings weights), theta = 0.8, delta = 1.0.

For every initial step s, ``tuning_free`` (accumulators 1/s) and ``fixed`` (every step s) run the
same budget; ``tuned`` is the hand-tuned fixed-step configuration of the test suite (FedMBO
outer 0.5, inner and Neumann 0.25; MA-DSBO 0.3, 0.2, 0.2). Reported: the final
``||grad Phi||^2`` after the budget, or "diverges".

Run: ``python experiments/tuning_free_range.py`` (about 4 minutes on 2 cores; ``--rounds`` sets the
budget in outer iterations, default 2,000). Results go to ``docs/figures/tuning_free_range.json``
and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedopt.config import parse_config
from fedopt.runner import build, simulate, simulate_decentralized

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "figures" / "tuning_free_range.json"
STEPS = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
QUADRATIC = {"x_dim": 4, "y_dim": 3, "mu": 1.0, "L": 4.0, "sigma": 0.0, "lam": 0.1}

# method -> (step parameter names, hand-tuned steps, fixed parameters, problem, topology)
METHODS = {
    "FedMBO": (("outer_lr", "inner_lr", "neumann_lr"), (0.5, 0.25, 0.25),
               {"neumann_terms": 10, "inner_steps": 3, "clients_per_round": 8}, {**QUADRATIC, "delta": 0.5}, None),
    "MA-DSBO": (("outer_lr", "inner_lr", "z_lr"), (0.3, 0.2, 0.2), {"theta": 0.8},
                {**QUADRATIC, "delta": 1.0}, "ring"),
}


def config(method: str, steps: tuple[float, ...], rule: str, rounds: int) -> dict:
    names, _, fixed, problem, topology = METHODS[method]
    raw = {"seed": 0, "clients": 8, "rounds": rounds, "eval_every": max(1, rounds // 20), "dtype": "float64",
           "problem": {"name": "quadratic", "params": problem},
           "algorithm": {"name": "fedmbo" if topology is None else "ma_dsbo",
                         "params": {**dict(zip(names, steps)), **fixed, "step_rule": rule}}}
    if topology is None:
        raw["engine"] = {"name": "local"}
    else:
        raw["topology"] = {"name": topology, "mixing": "metropolis_hastings"}
    return raw


def run(raw: dict) -> dict:
    b = build(parse_config(raw))
    K, every = raw["rounds"], raw["eval_every"]
    t0 = time.perf_counter()
    if b.network is None:
        result = simulate(b.problem, b.algorithm, b.engine, rounds=K, seed=raw["seed"], eval_every=every)
    else:
        result = simulate_decentralized(b.problem, b.algorithm, b.engine, b.network, rounds=K, seed=raw["seed"],
                                        eval_every=every)
    h = [(k, v) for k, _, name, v in result.records if name == "hypergrad_norm_sq"]
    return {"status": result.status, "final_hypergrad_norm_sq": h[-1][1] if result.status == "finished" else None,
            "curve": h, "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2000, help="outer iterations per run (default 2000)")
    ap.add_argument("--steps", type=float, nargs="+", default=STEPS, metavar="S",
                    help=f"initial steps s (default {' '.join(f'{s:g}' for s in STEPS)})")
    ap.add_argument("--out", type=Path, default=OUT, help=f"the JSON to write (default {OUT.relative_to(REPO)})")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if min(args.steps) <= 0:
        ap.error(f"--steps must be > 0, got {args.steps}")
    steps_s = args.steps
    rows = []
    for method, (_, tuned, _, _, _) in METHODS.items():
        runs = [("tuned", None, tuned, "fixed")]
        runs += [(rule, s, (s, s, s), rule) for rule in ("tuning_free", "fixed") for s in steps_s]
        for label, s, steps, rule in runs:
            row = {"method": method, "rule": label, "s": s, "steps": list(steps), "rounds": args.rounds,
                   **run(config(method, steps, rule, args.rounds))}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "steps": steps_s, "rows": rows}, indent=1))

    def cell(r: dict) -> str:
        return "diverges" if r["status"] != "finished" else f"{r['final_hypergrad_norm_sq']:.1e}"

    print(f"\nFinal ||grad Phi||^2 after {args.rounds:,} outer iterations")
    print("\n| method | steps | " + " | ".join(f"s = {s:g}" for s in steps_s) + " |")
    print("|---|---|" + "---:|" * len(steps_s))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        tuned = next(r for r in mine if r["rule"] == "tuned")
        for rule in ("tuning_free", "fixed"):
            cells = [cell(next(r for r in mine if r["rule"] == rule and r["s"] == s)) for s in steps_s]
            print(f"| {method} | {rule.replace('_', '-')} | " + " | ".join(cells) + " |")
        print(f"| {method} | hand-tuned {tuple(tuned['steps'])} | {cell(tuned)} (any s) |" + " |" * (len(steps_s) - 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
