"""Explicit algorithm state: a run resumed from a checkpoint equals the uninterrupted run bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import built, quadratic_config

from fedopt.simulation import simulate


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
