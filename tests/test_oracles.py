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
    quad = built(quadratic_config(problem={"sigma": 0.3, "cos_weight": 0.5})).problem
    return {
        "quadratic": quad,
        "hyper_cleaning": _dataset_problem("hyper_cleaning", {}),
        "regularization_selection": _dataset_problem("regularization_selection", {}),
        "hyper_representation": _dataset_problem("hyper_representation", {"hidden": 6}),
    }


def _point(problem, seed):
    g = torch.Generator().manual_seed(seed)
    x0, y0 = problem.init()
    x = x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    y = y0 + 0.3 * torch.randn(y0.shape, generator=g, dtype=torch.float64)
    v = torch.randn(y0.shape, generator=g, dtype=torch.float64)
    return x, y, v


@pytest.mark.parametrize("name", ["quadratic", "hyper_cleaning", "regularization_selection", "hyper_representation"])
@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_second_order_products_match_explicit_derivatives(problems, name, mode):
    p = problems[name]
    x, y, v = _point(p, 0)
    batch = p.inner_batch(p.data, torch.tensor(1), rnd.key(4), 8)
    g = p.inner_loss
    H = hessian(g, argnums=1)(x, y, batch)  # [q, q]
    Jxy = jacfwd(jacrev(g, argnums=0), argnums=1)(x, y, batch)  # [p, q]: d^2 g / dx dy
    assert torch.allclose(oracles.hvp_yy(g, x, y, batch, v, mode=mode), H @ v, atol=1e-10, rtol=0)
    assert torch.allclose(oracles.jvp_xy(g, x, y, batch, v, mode=mode), Jxy @ v, atol=1e-10, rtol=0)
    hv, jv = oracles.hvp_and_jvp(g, x, y, batch, v)
    assert torch.allclose(hv, H @ v, atol=1e-10, rtol=0) and torch.allclose(jv, Jxy @ v, atol=1e-10, rtol=0)
    f = p.outer_loss
    fb = p.outer_batch(p.data, torch.tensor(1), rnd.key(5), 8)
    assert torch.allclose(oracles.grad_x(f, x, y, fb), jacrev(f, argnums=0)(x, y, fb), atol=1e-12)
    assert torch.allclose(oracles.grad_y(f, x, y, fb), jacrev(f, argnums=1)(x, y, fb), atol=1e-12)


@pytest.mark.parametrize("name", ["quadratic", "hyper_representation"])
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
