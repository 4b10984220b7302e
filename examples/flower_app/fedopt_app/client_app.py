"""ClientApp: each SuperNode builds the config's problem (deterministic by seed) on its first message
and answers the strategy's tasks for its partition id."""

from fedopt.flower import client_app
from fedopt.runner import build
from fedopt_app import run_config


def _problem(context):
    cfg = run_config(context)
    return build(cfg).problem


app = client_app(_problem)
