"""ServerApp: build the config's problem and algorithm, and let its Flower strategy drive the rounds."""

import json
from logging import INFO

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedopt import results
from fedopt.flower import FedoptStrategy
from fedopt.runner import build, records_frame
from fedopt_app import app_path, run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(context)
    out = app_path(str(context.run_config["out"]))
    results.check_free(out)
    built = build(cfg)
    strategy = FedoptStrategy.for_algorithm(built.problem, built.algorithm, seed=cfg.seed, eval_every=cfg.eval_every,
                                            timeout=float(context.run_config["timeout"]))
    result = strategy.start(grid, num_rounds=cfg.rounds)
    results.claim_folder(out)
    results.write_config(out, cfg)
    results.atomic_write(out / "metrics.csv", records_frame(strategy.run_result.records).to_csv(index=False))
    last = result.evaluate_metrics_serverapp[max(result.evaluate_metrics_serverapp)]
    (out / "summary.json").write_text(json.dumps(dict(last), indent=1))
    log(INFO, "fedopt: %d outer iterations, metrics written to %s", cfg.rounds, out)
