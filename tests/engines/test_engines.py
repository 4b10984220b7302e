"""Same config and seed, same trajectory on every engine (float64, <= 1e-10 on all metrics)."""

import copy

import numpy as np
import pytest
from helpers import quadratic_config

import fedopt

CASES = {
    "fedmbo": ("fedmbo", {"clients_per_round": 4, "batch_size": 2}),
    "fedmbo_random_parallel_replace": ("fedmbo", {"clients_per_round": 5, "batch_size": 1, "truncation": "random",
                                                  "chains": "parallel", "replace": True, "hvp_mode": "fwd"}),
    "fednest": ("fednest", {"clients_per_round": 4, "batch_size": 2, "inner_local_steps": 2, "outer_local_steps": 2,
                            "outer_lr": 0.1}),
    "lfednest": ("lfednest", {"clients_per_round": 4, "batch_size": 2, "inner_local_steps": 2,
                              "outer_local_steps": 2, "outer_lr": 0.1}),
}


def _metrics(raw, engine):
    raw = copy.deepcopy(raw)
    raw["engine"] = {"name": engine}
    df = fedopt.run(raw)
    return df.pivot(index="round", columns="metric", values="value")


@pytest.mark.parametrize("case", list(CASES))
def test_local_and_vmap_agree_on_the_noisy_quadratic(case):
    alg, params = CASES[case]
    raw = quadratic_config(algorithm=alg, clients=10, rounds=6, problem={"sigma": 0.5}, params=params)
    a, b = _metrics(raw, "local"), _metrics(raw, "vmap")
    assert list(a.columns) == list(b.columns) and a.shape == b.shape
    assert float(np.abs(a.to_numpy() - b.to_numpy()).max()) <= 1e-10
    assert a.hypergrad_norm_sq.iloc[-1] != a.hypergrad_norm_sq.iloc[0]  # something happened


def test_local_and_vmap_agree_on_hyper_cleaning():
    raw = {"seed": 2, "clients": 6, "rounds": 3, "dtype": "float64",
           "problem": {"name": "hyper_cleaning"}, "data": {"name": "digits"},
           "partition": {"name": "dirichlet", "params": {"alpha": 0.3}},
           "algorithm": {"name": "fedmbo", "params": {"outer_lr": 100.0, "inner_lr": 1.0, "neumann_lr": 1.0,
                                                      "neumann_terms": 3, "inner_steps": 2,
                                                      "clients_per_round": 3, "batch_size": 8}}}
    a, b = _metrics(raw, "local"), _metrics(raw, "vmap")
    assert float(np.abs(a.to_numpy() - b.to_numpy()).max()) <= 1e-10
    assert a.weight_auc.iloc[-1] != 0.5
