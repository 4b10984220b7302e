"""Explicit algorithm state: a run resumed from a checkpoint equals the uninterrupted run bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import built, dec_config, quadratic_config

from fedopt.simulation import simulate, simulate_decentralized


def _resume_matches(raw: dict) -> None:
    """Run ``raw`` with checkpoints every 2 outer iterations, then resume from the first checkpoint,
    as the state object and as a plain mapping of its fields (the path of a checkpoint read back from
    disk); the records and the final ``x``, ``y`` must equal the uninterrupted run's exactly."""
    b = built(raw)
    rounds, seed = raw["rounds"], raw["seed"]
    checkpoints: list = []
    full = simulate(b.problem, b.algorithm, b.engine, rounds=rounds, seed=seed, checkpoint_every=2,
                    on_checkpoint=checkpoints.append)
    assert full.status == "finished" and full.k == rounds
    assert [c.k for c in checkpoints] == list(range(2, rounds, 2))
    ckpt = checkpoints[0]
    as_fields = type(ckpt)(ckpt.k, ckpt.state._asdict(), ckpt.counters, ckpt.records)
    for resume in (ckpt, as_fields):
        b = built(raw)
        part = simulate(b.problem, b.algorithm, b.engine, rounds=rounds, seed=seed, resume=resume)
        assert part.records == full.records
        assert torch.equal(part.x, full.x) and torch.equal(part.y, full.y)
        assert type(part.state) is type(full.state)
        for a, c in zip(part.state, full.state, strict=True):
            assert (a is None and c is None) or torch.equal(a, c)


# --- federated bilevel and minimax (FedNest, LFedNest, FESS-GDA, Local SGDA(+), SAGDA, Fed-Norm-SGDA(+)) ---

def _minimax(algorithm: str, params: dict, problem: str = "nc_sc", problem_params: dict | None = None,
             engine: str = "vmap") -> dict:
    alg = {"lr_x": 0.05, "lr_y": 0.05, "local_steps": 3, "clients_per_round": 3, "batch_size": 2, **params}
    return {"seed": 1, "clients": 7, "rounds": 5, "eval_every": 1, "dtype": "float64",
            "problem": {"name": problem, "params": {"dim": 4, "sigma": 0.5, **(problem_params or {})}},
            "algorithm": {"name": algorithm, "params": alg}, "engine": {"name": engine}}


def _nested(algorithm: str) -> dict:
    return quadratic_config(algorithm=algorithm, clients=10, rounds=5, problem={"sigma": 0.5},
                            params={"clients_per_round": 4, "batch_size": 2, "inner_local_steps": 2,
                                    "outer_local_steps": 2, "outer_lr": 0.1})


FEDERATED_CASES = {
    "fednest": _nested("fednest"),  # random truncations from fold_in(key, k)
    "lfednest": _nested("lfednest"),
    "fess_gda": _minimax("fess_gda", {"p": 2.0}),  # the anchor z carried across rounds
    "fess_gda_client_alt": _minimax("fess_gda", {"smoothing": "client", "order": "alternating",
                                                 "lr_x_global": 2.0, "lr_y_global": 0.5, "replace": True},
                                    engine="local"),
    "fess_gda_simplex": _minimax("fess_gda", {"batch_size": 1, "p": 1.0}, "simplex_minimax", {"groups": 3}),
    "local_sgda": _minimax("local_sgda", {}),
    "local_sgda_plus": _minimax("local_sgda_plus", {"snapshot_every": 3}),  # resumed at 2: snapshot x_0
    "sagda": _minimax("sagda", {"lr_x_global": 1.5}),
    "fed_norm_sgda": _minimax("fed_norm_sgda", {"min_local_steps": 1}),
    "fed_norm_sgda_plus": _minimax("fed_norm_sgda", {"min_local_steps": 1, "snapshot_every": 3}),
}


@pytest.mark.parametrize("case", sorted(FEDERATED_CASES))
def test_federated_resume_is_bit_identical(case: str) -> None:
    _resume_matches(FEDERATED_CASES[case])


# --- decentralized DBO and the centralized solvers (DBO, DBO-stochastic; AID, D-TFBO, S-TFBO, SOBA) ---

def _resume_matches_decentralized(raw: dict) -> None:
    """``_resume_matches`` for ``simulate_decentralized``: the records, the final network averages
    ``x``, ``y``, every stacked node variable and every state field equal the uninterrupted run's."""
    b = built(raw)
    rounds, seed = raw["rounds"], raw["seed"]
    checkpoints: list = []
    full = simulate_decentralized(b.problem, b.algorithm, b.engine, b.network, rounds=rounds, seed=seed,
                                  checkpoint_every=2, on_checkpoint=checkpoints.append)
    assert full.status == "finished" and full.k == rounds
    assert [c.k for c in checkpoints] == list(range(2, rounds, 2))
    ckpt = checkpoints[0]
    as_fields = type(ckpt)(ckpt.k, ckpt.state._asdict(), ckpt.counters, ckpt.records)
    for resume in (ckpt, as_fields):
        b = built(raw)
        part = simulate_decentralized(b.problem, b.algorithm, b.engine, b.network, rounds=rounds, seed=seed,
                                      resume=resume)
        assert part.records == full.records
        assert torch.equal(part.x, full.x) and torch.equal(part.y, full.y)
        assert part.variables.keys() == full.variables.keys()
        assert all(torch.equal(part.variables[name], full.variables[name]) for name in full.variables)
        assert type(part.state) is type(full.state)
        for a, c in zip(part.state, full.state, strict=True):
            assert torch.equal(a, c)


def _dec(algorithm: str, params: dict, topology: str = "ring", sigma: float = 0.0) -> dict:
    return dec_config(algorithm, topology, n=6, rounds=5, eval_every=1, problem={"sigma": sigma}, params=params)


def _central(algorithm: str, params: dict) -> dict:
    raw = quadratic_config(clients=3, rounds=5, algorithm=algorithm, problem={"sigma": 0.3}, eval_every=1)
    raw["algorithm"]["params"] = params
    return raw


_LR = {"outer_lr": 0.3, "inner_lr": 0.2, "v_lr": 0.2}
_S0 = {"alpha0": 3.0, "beta0": 3.0, "gamma0": 3.0}

DECENTRALIZED_CASES = {
    "dbo": _dec("dbo", {}),
    "dbo_tracking_cta": _dec("dbo", {"tracking": "x", "gossip_order": "cta"}),  # tracker and last u_i
    "dbo_stochastic": _dec("dbo_stochastic", {"batch_size": 2}, "exponential", sigma=0.3),
    "dbo_stochastic_tracking": _dec("dbo_stochastic", {"batch_size": 2, "tracking": "x"}, sigma=0.3),
}

CENTRALIZED_CASES = {
    "aid": _central("aid", {**_LR, "theta": 0.5}),  # v warm-started, momentum r, no accumulators (None)
    "aid_tuning_free": _central("aid", {**_LR, "step_rule": "tuning_free", "batch_size": 2}),
    "aid_tuning_free_cold": _central("aid", {**_LR, "step_rule": "tuning_free", "v_accumulator": "cold",
                                             "warm_start_v": False}),
    "d_tfbo": _central("d_tfbo", _S0),  # tolerance 1/K: needs K from setup
    "d_tfbo_fixed_warm": _central("d_tfbo", {**_S0, "inner": "fixed", "accumulators": "warm"}),
    "s_tfbo": _central("s_tfbo", {**_S0, "batch_size": 2}),
    "soba": _central("soba", {**_LR, "batch_size": 2}),
}


@pytest.mark.parametrize("case", sorted(DECENTRALIZED_CASES))
def test_dbo_resume_is_bit_identical(case: str) -> None:
    _resume_matches_decentralized(DECENTRALIZED_CASES[case])


@pytest.mark.parametrize("case", sorted(CENTRALIZED_CASES))
def test_centralized_resume_is_bit_identical(case: str) -> None:
    _resume_matches(CENTRALIZED_CASES[case])


# --- internal variables as metrics ----------------------------------------------------------------


def test_state_metrics_report_internal_variables_at_every_evaluation():
    """A tuning-free FedMBO's accumulators are part of its state and can be measured like any
    metric; they only grow (c^2 += ||d||^2)."""
    raw = quadratic_config(clients=6, rounds=5, params={"step_rule": "tuning_free", "clients_per_round": 3})
    b = built(raw)
    res = simulate(b.problem, b.algorithm, b.engine, rounds=5, seed=0,
                   state_metrics=lambda s: {"acc_x": float(s.acc_x), "acc_y": float(s.acc_y)})
    acc_x = [v for k, _, name, v in res.records if name == "acc_x"]
    assert len(acc_x) == 6 and acc_x[0] == 1 / 0.5**2
    assert all(b > a for a, b in zip(acc_x, acc_x[1:]))
    assert acc_x[-1] == float(res.state.acc_x)
