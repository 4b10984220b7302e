"""The ``flower`` engine: fedopt's strategies on Flower's Message API reproduce the ``local`` engine
bitwise (same per-client computation, replies summed in cohort order). Small runs only: every
Flower simulation pays ~7-16 s of start-up (Ray, actors, node registration)."""

import copy
import sys

import numpy as np
import pytest
import tomli_w
import torch
from helpers import dec_config, quadratic_config
from helpers import engine_metrics as metrics

from fedopt.algorithms.base import Task
from fedopt.config import load_config
from fedopt.engines.local import LocalEngine
from fedopt.errors import ConfigError
from fedopt.runner import build, simulate

pytest.importorskip("flwr")
pytestmark = pytest.mark.timeout(240)

FEDERATED = {
    "fedmbo": quadratic_config(algorithm="fedmbo", clients=5, rounds=3, problem={"sigma": 0.5},
                               params={"clients_per_round": 3, "batch_size": 2, "neumann_terms": 4}),
    "fednest": quadratic_config(algorithm="fednest", clients=5, rounds=2, problem={"sigma": 0.5},
                                params={"clients_per_round": 3, "batch_size": 2, "inner_local_steps": 2,
                                        "outer_local_steps": 2, "outer_lr": 0.1, "neumann_terms": 3}),
    "fess_gda": {"seed": 1, "clients": 5, "rounds": 3, "dtype": "float64",
                 "problem": {"name": "nc_sc", "params": {"dim": 4, "sigma": 0.3}},
                 "algorithm": {"name": "fess_gda", "params": {"lr_x": 0.05, "lr_y": 0.05, "local_steps": 3,
                                                              "clients_per_round": 3}}},
}


@pytest.mark.parametrize("case", list(FEDERATED))
def test_flower_reproduces_local_bitwise(case):
    raw = FEDERATED[case]
    local, flower = metrics(raw, "local"), metrics(raw, "flower")
    assert local.shape == flower.shape and local.shape[0] == raw["rounds"] + 1
    assert np.array_equal(local.to_numpy(), flower.to_numpy())
    assert local.iloc[-1].to_dict() != local.iloc[0].to_dict()  # the run moved


class _TaskSpy(LocalEngine):
    def __init__(self, problem):
        super().__init__(problem)
        self.names = set()

    def map_clients(self, task: Task, *args):
        self.names.add(task.name)
        return super().map_clients(task, *args)


@pytest.mark.parametrize("algorithm", ["fedmbo", "fednest", "lfednest", "fess_gda", "local_sgda", "local_sgda_plus",
                                       "sagda", "fed_norm_sgda"])
def test_every_task_of_every_strategy_has_a_client_handler(algorithm):
    from fedopt.flower import STRATEGIES, TASK_NAMES, client_app

    if algorithm in FEDERATED:
        raw = copy.deepcopy(FEDERATED[algorithm])
    elif algorithm == "lfednest":
        raw = copy.deepcopy(FEDERATED["fednest"])
        raw["algorithm"]["name"] = "lfednest"
    else:
        raw = copy.deepcopy(FEDERATED["fess_gda"])
        raw["algorithm"] = {"name": algorithm, "params": {"clients_per_round": 3, "lr_x": 0.05, "lr_y": 0.05}}
    raw["rounds"] = 1
    built = build(load_config(raw))
    spy = _TaskSpy(built.problem)
    simulate(built.problem, built.algorithm, spy, rounds=1, seed=0)
    assert spy.names and spy.names <= set(TASK_NAMES)
    assert algorithm in STRATEGIES
    app = client_app(built.problem)
    assert {f"train.{n}" for n in spy.names} <= set(app._registered_funcs)


def test_named_strategies_build_their_algorithm_from_parameters():
    from flwr.serverapp.strategy import Strategy

    from fedopt.flower import FedMBOStrategy, FedoptStrategy, FESSGDAStrategy

    built = build(load_config(FEDERATED["fedmbo"]))
    s = FedMBOStrategy(built.problem, clients_per_round=2, neumann_terms=3, outer_lr=0.1, inner_lr=0.1,
                       neumann_lr=0.1)
    assert isinstance(s, Strategy) and isinstance(s, FedoptStrategy)
    assert s.algorithm.name == "fedmbo" and s.algorithm.clients_per_round == 2
    assert FESSGDAStrategy.algorithm_name == "fess_gda"
    with pytest.raises(ConfigError, match="missing required key"):
        FedMBOStrategy(built.problem, clients_per_round=2)
    with pytest.raises(TypeError, match="unexpected parameters"):
        FedoptStrategy(built.problem, built.algorithm, clients_per_round=2)


def _cli(tmp_path, raw):
    from fedopt.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(tomli_w.dumps(raw))
    return main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"])


def test_bad_flower_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    raw = quadratic_config(clients=4, rounds=2)
    if not torch.cuda.is_available():
        raw["engine"] = {"name": "flower", "params": {"num_gpus": 0.25}}
        assert _cli(tmp_path, raw) == 2
        assert "num_gpus = 0.25 but CUDA is not available on this machine; allowed: 0" in capsys.readouterr().err
    raw["engine"] = {"name": "flower", "params": {"num_cpus": 0}}
    assert _cli(tmp_path, raw) == 2
    assert "engine.params.num_cpus must be an integer >= 1" in capsys.readouterr().err
    dec = dec_config("ma_dsbo", "ring", n=4, rounds=2)
    dec["engine"] = {"name": "flower"}
    assert _cli(tmp_path, dec) == 2
    assert "engine 'flower' cannot run algorithm 'ma_dsbo': it runs federated algorithms" in capsys.readouterr().err
    raw["engine"] = {"name": "flower"}
    monkeypatch.setitem(sys.modules, "flwr.simulation", None)  # as if the extra were not installed
    assert _cli(tmp_path, raw) == 2
    assert "engine 'flower' needs Flower: pip install 'fedopt[flower]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
