"""ServerApp: build the config's problem and algorithm, and let its Flower strategy drive the rounds.

The run folder is written as ``fedopt run`` writes one: ``config.toml`` (with ``engine = "flower"``,
the engine whose simulation gives the same numbers), ``metrics.csv``, ``meta.json`` (status,
wall time, communication rounds, the Flower run id) and ``convergence.png``. A failed run writes
``meta.json`` with ``status = "failed"`` and a one-line ``error``, and the ServerApp raises, so
Flower marks the run failed (``flwr ls``). ``flwr run`` itself exits 0 either way: it submits the
run and streams its logs, and does not report the run's outcome.
"""

import dataclasses
import json
import time
from logging import INFO

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedopt import results
from fedopt.config import Component
from fedopt.flower import FedoptStrategy
from fedopt.runner import build, records_frame
from fedopt_app import app_path, run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(context)
    cfg = dataclasses.replace(cfg, engine=Component("flower"))  # what ran: Flower, not the config's default
    out = app_path(str(context.run_config["out"]))
    results.check_free(out)
    built = build(cfg)
    strategy = FedoptStrategy.for_algorithm(built.problem, built.algorithm, seed=cfg.seed, eval_every=cfg.eval_every,
                                            timeout=float(context.run_config["timeout"]))
    results.claim_folder(out)
    results.write_config(out, cfg)
    runtime = {"runtime": "flwr run", "flwr_run_id": context.run_id}
    t0 = time.perf_counter()
    try:
        result = strategy.start(grid, num_rounds=cfg.rounds)
    except BaseException as e:
        error = f"{type(e).__name__}: {e}".splitlines()[0]
        results.write_meta(out, cfg, status="failed", error=error, **runtime)
        log(40, "fedopt: the run failed: %s (see %s/meta.json)", error, out)
        raise
    run = strategy.run_result
    df = records_frame(run.records)
    results.atomic_write(out / "metrics.csv", df.to_csv(index=False))
    from plots import plot_run

    plot_run(df, out / "convergence.png", title=f"{cfg.algorithm.name} on {cfg.problem.name} (flwr run)")
    last = result.evaluate_metrics_serverapp[max(result.evaluate_metrics_serverapp)]
    results.atomic_write(out / "summary.json", json.dumps(dict(last), indent=1))
    results.write_meta(out, cfg, status=run.status, diverged_round=run.diverged_round,
                       wall_time_s=round(time.perf_counter() - t0, 3), comm_rounds=run.counters.comm_rounds, **runtime)
    log(INFO, "fedopt: %d outer iterations, %s, written to %s", cfg.rounds, run.status, out)
    if run.status != "finished":
        raise RuntimeError(f"fedopt: the run {run.status} at round {run.diverged_round} (see {out}/meta.json)")
