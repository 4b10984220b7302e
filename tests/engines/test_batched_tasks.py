"""Batch-polymorphic tasks: one plain call on the whole cohort gives what ``vmap`` of the task gives.

The ``vmap`` engine calls a task flagged ``Task.batched`` once on the cohort instead of through
``torch.func.vmap``. These tests hold the two to 1e-12 (float64) task by task, and the engines to
1e-10 over whole runs.
"""

import copy

import numpy as np
import pytest
import torch
from helpers import built, dec_config, quadratic_config
from torch.func import vmap

import fedopt
from fedopt import oracles
from fedopt import random as rnd
from fedopt.algorithms.federated._tasks import bilevel_tasks


def _raw(problem, orc="closed_form", **alg):
    params = {"outer_lr": 10.0, "inner_lr": 0.5, "neumann_lr": 0.5, "neumann_terms": 3, "inner_steps": 2,
              "clients_per_round": 4, "batch_size": 8} | alg
    params = {k: v for k, v in params.items() if v is not None}  # no batch_size: full local data
    if problem == "quadratic":  # noisy, with the nonconvex cos term
        raw = quadratic_config(clients=7, rounds=3, params=params,
                               problem={"sigma": 0.3, "cos_weight": 0.5, "oracles": orc})
        raw["algorithm"]["params"]["outer_lr"] = 0.3
        return raw
    return {"seed": 3, "clients": 7, "rounds": 3, "dtype": "float64",
            "problem": {"name": problem, "params": {"oracles": orc}}, "data": {"name": "digits"},
            "partition": {"name": "dirichlet", "params": {"alpha": 0.5}},
            "algorithm": {"name": "fedmbo", "params": params}}


PROBLEMS = ["hyper_cleaning", "regularization_selection", "quadratic"]


@pytest.fixture(scope="module")
def problems():
    return {name: built(_raw(name)).problem for name in PROBLEMS}


def _point(p, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, y0 = p.init()
    x = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    y = 0.3 * torch.randn(y0.shape, generator=g, dtype=torch.float64)
    v = torch.randn(y0.shape, generator=g, dtype=torch.float64)
    return x, y, v


def _close(a, b, tol=1e-12):
    if isinstance(a, tuple):
        return all(_close(s, t, tol) for s, t in zip(a, b, strict=True))
    return a.shape == b.shape and float((a - b).abs().max()) <= tol


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("batch_size", [8, None])
def test_every_bilevel_task_on_the_cohort_equals_vmap_of_the_task(problems, name, batch_size):
    p = problems[name]
    tasks = bilevel_tasks(p, batch_size=batch_size, neumann_lr=0.3, hvp_mode="rev")
    x, y, v = _point(p)
    clients = torch.tensor([5, 0, 3, 6, 3])  # a repeated client: its two keys differ
    keys = rnd.fold_in(rnd.key(11), torch.arange(5))
    V = torch.randn(5, p.y_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    payloads = {"lower_grad": (x, y), "outer_grad": (x, y), "neumann": (x, y, v), "cross": (x, y, v), "hvp": (x, y, v)}
    for task in (tasks.grad_y_inner, tasks.outer_grads, tasks.neumann_step, tasks.cross, tasks.hvp):
        assert task.batched, task.name
        payload = payloads[task.name]
        whole = task.fn(payload, None, p.data, clients, keys)
        traced = vmap(lambda c, k, task=task, payload=payload: task.fn(payload, None, p.data, c, k))(clients, keys)
        assert _close(whole, traced), task.name
        assert not _close(whole if not isinstance(whole, tuple) else whole[0], torch.zeros_like(traced[0] if isinstance(traced, tuple) else traced))
    # a per-client payload (parallel Neumann chains): its rows are the clients'
    fn = tasks.neumann_step.fn
    whole = fn((x, y), V, p.data, clients, keys)
    traced = vmap(lambda cp, c, k: fn((x, y), cp, p.data, c, k))(V, clients, keys)
    assert _close(whole, traced)


@pytest.mark.parametrize("name", PROBLEMS)
def test_closed_forms_broadcast_over_per_client_variables(problems, name):
    """Decentralized nodes hold their own x, y: the closed forms take them stacked, as vmap would."""
    p = problems[name]
    x, y, v = _point(p, 1)
    g = torch.Generator().manual_seed(5)
    X = x + 0.1 * torch.randn(4, *x.shape, generator=g, dtype=torch.float64)
    Y = y + 0.1 * torch.randn(4, *y.shape, generator=g, dtype=torch.float64)
    Vs = torch.randn(4, *v.shape, generator=g, dtype=torch.float64)
    clients, keys = torch.tensor([1, 2, 2, 6]), rnd.fold_in(rnd.key(3), torch.arange(4))
    batch = p.inner_batch(p.data, clients, keys, 6)
    fb = p.outer_batch(p.data, clients, keys, 6)
    g_, f_ = p.inner_loss, p.outer_loss
    calls = {
        "grad_y g": lambda X, Y, b, V: oracles.grad_y(g_, X, Y, b),
        "grad_y f": lambda X, Y, b, V: oracles.grad_y(f_, X, Y, fb if b is batch else b),
        "grad_x f": lambda X, Y, b, V: oracles.grad_x(f_, X, Y, fb if b is batch else b),
        "hvp_yy": lambda X, Y, b, V: oracles.hvp_yy(g_, X, Y, b, V),
        "jvp_xy": lambda X, Y, b, V: oracles.jvp_xy(g_, X, Y, b, V),
    }
    per = [{k: t[j] for k, t in batch.items()} for j in range(4)]
    per_f = [{k: t[j] for k, t in fb.items()} for j in range(4)]
    for what, call in calls.items():
        whole = call(X, Y, batch, Vs)
        rows = [call(X[j], Y[j], per_f[j] if what.endswith(" f") else per[j], Vs[j]) for j in range(4)]
        assert _close(whole, torch.stack(rows)), what


def test_tasks_are_batch_polymorphic_only_with_closed_forms():
    auto = built(_raw("hyper_cleaning", "autodiff")).problem
    rep = built({**_raw("hyper_representation"), "problem": {"name": "hyper_representation", "params": {"hidden": 4}}}).problem
    for p in (auto, rep):
        tasks = bilevel_tasks(p, batch_size=4, neumann_lr=0.3, hvp_mode="rev")
        assert not any(t.batched for t in (tasks.grad_y_inner, tasks.outer_grads, tasks.neumann_step, tasks.cross))


def _run(raw, engine):
    raw = copy.deepcopy(raw)
    raw["engine"] = engine
    return fedopt.run(raw).pivot(index="round", columns="metric", values="value").to_numpy()


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("alg", [{}, {"chains": "parallel", "truncation": "random"}, {"batch_size": None}])
def test_vmap_with_and_without_batched_tasks_and_local_give_the_same_trajectory(name, alg):
    raw = _raw(name, **alg)
    ref = _run(raw, {"name": "local"})
    for engine in ({"name": "vmap"}, {"name": "vmap", "params": {"batched_tasks": False}},
                   {"name": "vmap", "params": {"chunk_size": 3}}):
        assert float(np.abs(_run(raw, engine) - ref).max()) <= 1e-10, engine
    assert np.isfinite(ref).all() and float(np.abs(ref[-1] - ref[0]).max()) > 0


NODE_CASES = [
    ("ma_dsbo", {"outer_lr": 5.0, "inner_lr": 0.5, "z_lr": 0.5, "batch_size": 8}),
    ("ma_dsbo_gt", {"outer_lr": 1.0, "inner_lr": 0.1, "z_lr": 0.1, "gossip_order": "cta"}),
    ("dbo_stochastic", {"outer_lr": 5.0, "inner_lr": 0.5, "z_lr": 0.5, "batch_size": 8}),  # JHIP tasks: traced
    ("s_tfbo", {"batch_size": 8}),
    ("soba", {"outer_lr": 1.0, "inner_lr": 0.1, "v_lr": 0.1, "batch_size": 8}),
]


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize(("algorithm", "params"), NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_node_tasks_with_and_without_batching_give_the_same_trajectory(name, algorithm, params):
    """Decentralized nodes (per-node x, y, z as the stacked state) and centralized programs (one
    point broadcast to every client): local, vmap and vmap traced agree to 1e-10."""
    raw = {"seed": 1, "clients": 6, "rounds": 3, "eval_every": 1, "dtype": "float64",
           "problem": {"name": name}, "data": {"name": "digits"},
           "partition": {"name": "dirichlet", "params": {"alpha": 0.5}},
           "algorithm": {"name": algorithm, "params": params}}
    if name == "quadratic":
        raw = dec_config(algorithm, n=6, rounds=3, eval_every=1, problem={"sigma": 0.3, "cos_weight": 0.5})
        raw["algorithm"]["params"] = params
    if algorithm.startswith(("ma_dsbo", "dbo")):
        raw["topology"] = {"name": "ring", "mixing": "metropolis_hastings"}
    else:
        raw.pop("topology", None)
    ref = _run(raw, {"name": "local"})
    for engine in ({"name": "vmap"}, {"name": "vmap", "params": {"batched_tasks": False}}):
        assert float(np.abs(_run(raw, engine) - ref).max()) <= 1e-10, engine
    assert np.isfinite(ref).all() and float(np.abs(ref[-1] - ref[0]).max()) > 0
