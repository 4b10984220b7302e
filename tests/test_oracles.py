"""Oracles against explicit second derivatives (torch.func.hessian / jacfwd), float64, 1e-10."""

import pytest
import torch
from helpers import built, quadratic_config
from torch.func import hessian, jacfwd, jacrev, vmap

from fedopt import oracles
from fedopt import random as rnd


def _dataset_problem(name, params):
    raw = {"seed": 1, "clients": 4, "dtype": "float64",
           "problem": {"name": name, "params": params},
           "data": {"name": "digits"}, "partition": {"name": "iid"},
           "algorithm": {"name": "fedmbo", "params": {"outer_lr": 1.0, "inner_lr": 1.0, "neumann_lr": 1.0, "clients_per_round": 2}}}
    return built(raw).problem


@pytest.fixture(scope="module")
def problems():
    """Each problem twice where it has closed-form oracles: ``name`` uses them, ``name/autodiff``
    differentiates the losses with torch.func."""
    out = {"hyper_representation": _dataset_problem("hyper_representation", {"hidden": 6})}
    for orc, suffix in (("closed_form", ""), ("autodiff", "/autodiff")):
        out["quadratic" + suffix] = built(quadratic_config(problem={"sigma": 0.3, "cos_weight": 0.5, "oracles": orc})).problem
        out["hyper_cleaning" + suffix] = _dataset_problem("hyper_cleaning", {"oracles": orc})
        out["regularization_selection" + suffix] = _dataset_problem("regularization_selection", {"oracles": orc})
    assert out["quadratic"].closed_form and not out["quadratic/autodiff"].closed_form
    return out


NAMES = ["quadratic", "quadratic/autodiff", "hyper_cleaning", "hyper_cleaning/autodiff", "regularization_selection",
         "regularization_selection/autodiff", "hyper_representation"]


def _point(problem, seed):
    g = torch.Generator().manual_seed(seed)
    x0, y0 = problem.init()
    x = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    y = y0 + 0.3 * torch.randn(y0.shape, generator=g, dtype=torch.float64)
    v = torch.randn(y0.shape, generator=g, dtype=torch.float64)
    return x, y, v


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["fwd", "rev"])
@pytest.mark.parametrize("batch_size", [8, None])
def test_second_order_products_match_explicit_derivatives(problems, name, mode, batch_size):
    """The explicit Hessian and mixed Jacobian come from torch.func.hessian / jacfwd(jacrev) of the
    loss itself, so they check the closed forms and the autodiff oracles alike."""
    p = problems[name]
    x, y, v = _point(p, 0)
    batch = p.inner_batch(p.data, torch.tensor(1), rnd.key(4), batch_size)
    g = p.inner_loss
    H = hessian(g, argnums=1)(x, y, batch)  # [q, q]
    Jxy = jacfwd(jacrev(g, argnums=0), argnums=1)(x, y, batch)  # [p, q]: d^2 g / dx dy
    assert torch.allclose(oracles.hvp_yy(g, x, y, batch, v, mode=mode), H @ v, atol=1e-10, rtol=0)
    assert torch.allclose(oracles.jvp_xy(g, x, y, batch, v, mode=mode), Jxy @ v, atol=1e-10, rtol=0)
    hv, jv = oracles.hvp_and_jvp(g, x, y, batch, v)
    assert torch.allclose(hv, H @ v, atol=1e-10, rtol=0) and torch.allclose(jv, Jxy @ v, atol=1e-10, rtol=0)
    f = p.outer_loss
    fb = p.outer_batch(p.data, torch.tensor(1), rnd.key(5), batch_size)
    assert torch.allclose(oracles.grad_x(f, x, y, fb), jacrev(f, argnums=0)(x, y, fb), atol=1e-12)
    assert torch.allclose(oracles.grad_y(f, x, y, fb), jacrev(f, argnums=1)(x, y, fb), atol=1e-12)
    assert torch.allclose(oracles.grad_y(g, x, y, batch), jacrev(g, argnums=1)(x, y, batch), atol=1e-12)
    gx, gy = oracles.grad_xy(f, x, y, fb)
    assert torch.allclose(gx, jacrev(f, argnums=0)(x, y, fb), atol=1e-12)
    assert torch.allclose(gy, jacrev(f, argnums=1)(x, y, fb), atol=1e-12)


@pytest.mark.parametrize("name", ["quadratic", "quadratic/autodiff", "hyper_cleaning", "hyper_representation"])
def test_oracles_vmap_over_a_client_axis(problems, name):
    p = problems[name]
    x, y, _ = _point(p, 1)
    clients = torch.tensor([0, 3, 1, 3])
    keys = rnd.fold_in(rnd.key(2), torch.arange(4))
    V = torch.randn(4, p.y_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def per_client(c, k, v):
        b = p.inner_batch(p.data, c, k, 5)
        return oracles.hvp_yy(p.inner_loss, x, y, b, v), oracles.jvp_xy(p.inner_loss, x, y, b, v)

    hv, jv = vmap(per_client)(clients, keys, V)
    for j in range(4):
        h1, j1 = per_client(clients[j], keys[j], V[j])
        assert torch.allclose(hv[j], h1, atol=1e-12, rtol=0) and torch.allclose(jv[j], j1, atol=1e-12, rtol=0)


@pytest.mark.parametrize("problem", ["quadratic", "hyper_cleaning", "regularization_selection"])
def test_closed_form_and_autodiff_runs_give_the_same_trajectory(problem):
    """A whole FedMBO run (float64) is the same with either oracle path, to 1e-10 on every metric."""
    import fedopt

    def run(orc):
        if problem == "quadratic":
            raw = quadratic_config(clients=6, rounds=4, problem={"sigma": 0.4, "oracles": orc},
                                   params={"clients_per_round": 3, "batch_size": 2})
        else:
            raw = {"seed": 0, "clients": 6, "rounds": 4, "dtype": "float64",
                   "problem": {"name": problem, "params": {"oracles": orc}}, "data": {"name": "digits"},
                   "partition": {"name": "dirichlet", "params": {"alpha": 0.5}},
                   "algorithm": {"name": "fedmbo", "params": {"outer_lr": 10.0, "inner_lr": 0.5, "neumann_lr": 0.5,
                                                              "neumann_terms": 3, "inner_steps": 2,
                                                              "clients_per_round": 3, "batch_size": 8}}}
        return fedopt.run(raw).pivot(index="round", columns="metric", values="value").to_numpy()

    import numpy as np

    a, b = run("closed_form"), run("autodiff")
    assert float(np.abs(a - b).max()) <= 1e-10
