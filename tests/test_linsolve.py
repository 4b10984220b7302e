import pytest
import torch
from torch.func import vmap

from fedopt import linsolve
from fedopt.errors import ConfigError


def _spd(n, seed, lo=1.0, hi=4.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(lo, hi, n, dtype=torch.float64)) @ q.T


def test_neumann_equals_its_closed_form_with_exact_truncation_bias():
    A = _spd(6, 0)
    b = torch.randn(6, dtype=torch.float64)
    eta, Q = 0.2, 7
    u = linsolve.neumann(Q, eta)(lambda v: A @ v, b)
    eye = torch.eye(6, dtype=torch.float64)
    expected = torch.linalg.solve(A, (eye - torch.linalg.matrix_power(eye - eta * A, Q)) @ b)
    assert torch.allclose(u, expected, atol=1e-12, rtol=0)


def test_cg_solves_spd_systems_and_vmaps():
    As = torch.stack([_spd(8, s, 0.5, 30.0) for s in range(4)])
    bs = torch.randn(4, 8, dtype=torch.float64)
    solve = linsolve.cg(maxiter=20)
    us = vmap(lambda A, b: solve(lambda v: A @ v, b))(As, bs)
    assert torch.allclose(us, torch.linalg.solve(As, bs), atol=1e-10, rtol=0)
    ridge = linsolve.cg(maxiter=20, ridge=0.3)(lambda v: As[0] @ v, bs[0])
    assert torch.allclose(ridge, torch.linalg.solve(As[0] + 0.3 * torch.eye(8, dtype=torch.float64), bs[0]), atol=1e-10)


def test_cg_zero_rhs_is_zero_not_nan():
    u = linsolve.cg(maxiter=5)(lambda v: 2 * v, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(u, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("bad", [lambda: linsolve.neumann(0, 0.1), lambda: linsolve.neumann(3, 0.0),
                                 lambda: linsolve.cg(0), lambda: linsolve.cg(3, ridge=-1.0)])
def test_bad_solver_arguments(bad):
    with pytest.raises(ConfigError):
        bad()
