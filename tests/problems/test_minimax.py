"""Synthetic minimax problems: closed forms against autodiff and brute force, projections, bad input."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch.func import grad, vmap

from fedopt import oracles
from fedopt import random as rnd
from fedopt.errors import ConfigError
from fedopt.problems import ProblemContext
from fedopt.problems.minimax import nc_c, nc_pl, nc_sc, pl_pl, simplex_minimax
from fedopt.problems.ysets import make_yset, project_simplex

F64 = torch.float64


def ctx(clients=5, seed=0):
    return ProblemContext(clients=clients, seed=seed, dtype=F64, device=torch.device("cpu"))


FACTORIES = {
    "pl_pl": lambda: pl_pl(ctx(), dim=4),
    "nc_sc": lambda: nc_sc(ctx(), dim=4),
    "nc_sc_box": lambda: nc_sc(ctx(), dim=4, y_set="box", y_bounds=[-0.3, 0.4]),
    "nc_pl": lambda: nc_pl(ctx(), x_dim=4, y_dim=5, rank=3),
    "simplex_minimax": lambda: simplex_minimax(ctx(), dim=5, groups=3),
    "nc_c": lambda: nc_c(ctx(), dim=5, groups=3),
}


# ---- projections --------------------------------------------------------------------------

def test_simplex_projection_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(0)
    for q in (1, 2, 5, 17):
        for _ in range(20):
            v = 3 * torch.randn(q, generator=g, dtype=F64)
            p = project_simplex(v)
            assert float(p.min()) >= 0 and abs(float(p.sum()) - 1) < 1e-12
            # optimality: <v - p, u - p> <= 0 for every vertex u of the simplex
            assert float(((v - p) @ (torch.eye(q, dtype=F64) - p).T).max()) <= 1e-12
    batch = torch.randn(7, 4, generator=g, dtype=F64)
    assert torch.allclose(vmap(project_simplex)(batch), torch.stack([project_simplex(b) for b in batch]))


def test_box_and_ball_projections():
    box, ball = make_yset("box", 3, lo=-1.0, hi=2.0), make_yset("ball", 3, radius=2.0)
    v = torch.tensor([-3.0, 0.5, 5.0], dtype=F64)
    assert box.project(v).tolist() == [-1.0, 0.5, 2.0]
    assert abs(float(ball.project(v).norm()) - 2.0) < 1e-12 and ball.contains(ball.project(v))
    assert torch.equal(ball.project(v / 10), v / 10)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(kind="box", dim=3, lo=1.0, hi=0.0), "is empty"),
    (dict(kind="ball", dim=3, radius=0.0), "y_radius must be > 0"),
    (dict(kind="ball", dim=3), "y_radius must be > 0"),
    (dict(kind="box", dim=3, radius=1.0), "applies only to y_set = 'ball'"),
    (dict(kind="simplex", dim=3, lo=0.0, hi=1.0), "applies only to y_set = 'box'"),
    (dict(kind="cube", dim=3), "allowed: none, simplex, box, ball"),
    (dict(kind="simplex", dim=0), "dimension >= 1"),
])
def test_bad_constraint_sets_are_one_line_errors(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        make_yset(**kwargs)
    assert "\n" not in str(e.value)


# ---- oracles and closed forms -------------------------------------------------------------

@pytest.mark.parametrize("name", list(FACTORIES))
def test_closed_form_gradients_match_autodiff_and_vmap(name):
    prob = FACTORIES[name]()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(prob.x_dim, generator=g, dtype=F64), prob.y_set.project(torch.randn(prob.y_dim, generator=g, dtype=F64))
    key = rnd.key(3)
    clients = torch.arange(prob.num_clients)
    for b in (None, 2):
        batch = prob.batch(prob.data, clients[1], key, b)
        gx, gy = oracles.grad_xy(prob.loss, x, y, batch)
        ax, ay = grad(lambda x_, y_: prob.loss(x_, y_, batch), argnums=(0, 1))(x, y)
        assert torch.allclose(gx, ax, atol=1e-12) and torch.allclose(gy, ay, atol=1e-12)
    keys = torch.stack([rnd.fold_in(key, int(i)) for i in clients])
    batched = vmap(lambda c, k: oracles.grad_xy(prob.loss, x, y, prob.batch(prob.data, c, k, 2)))(clients, keys)
    looped = [oracles.grad_xy(prob.loss, x, y, prob.batch(prob.data, c, k, 2)) for c, k in zip(clients, keys, strict=True)]
    assert torch.allclose(batched[0], torch.stack([lx for lx, _ in looped]), atol=1e-12)


def _full_f(prob):
    """The global objective (1/M) sum_i f_i at full batch."""
    def f(x, y):
        return sum(prob.loss(x, y, prob.batch(prob.data, torch.tensor(i), rnd.key(0), None))
                   for i in range(prob.num_clients)) / prob.num_clients
    return f


@pytest.mark.parametrize("name", ["pl_pl", "nc_sc", "nc_sc_box", "nc_pl"])
def test_grad_phi_is_grad_x_f_at_the_maximiser_and_matches_finite_differences(name):
    prob = FACTORIES[name]()
    f = _full_f(prob)
    x = torch.linspace(-1.0, 1.5, prob.x_dim, dtype=F64)
    if name == "nc_pl":  # y*(x) is a set; take the min-norm solution of M y = A x - b
        y_star = torch.linalg.lstsq(prob.M, prob.A @ x - prob.b).solution
    else:
        y_star = prob.y_star(x)
    # y* maximises f(x, .) over Y: the projected gradient step does not move it
    gy = grad(f, argnums=1)(x, y_star)
    assert float((prob.y_set.project(y_star + gy) - y_star).norm()) < 1e-10
    assert torch.allclose(prob.grad_phi(x), grad(f, argnums=0)(x, y_star), atol=1e-10)
    if name != "nc_pl":
        h = 1e-6
        fd = torch.stack([(prob.phi(x + h * e) - prob.phi(x - h * e)) / (2 * h) for e in torch.eye(prob.x_dim, dtype=F64)])
        assert torch.allclose(prob.grad_phi(x), fd, atol=1e-7)
        assert abs(float(prob.phi(x) - f(x, y_star))) < 1e-10


def test_pl_pl_saddle_point_and_duality_gap():
    prob = FACTORIES["pl_pl"]()
    f = _full_f(prob)
    xs, ys = prob.saddle()
    gx, gy = grad(f, argnums=(0, 1))(xs, ys)
    assert float(gx.norm()) < 1e-12 and float(gy.norm()) < 1e-12
    m = prob.metrics(xs, ys)
    assert m["saddle_distance"] < 1e-12 and abs(m["duality_gap"]) < 1e-12 and m["stationarity"] == m["saddle_distance"]
    m2 = prob.metrics(xs + 0.1, ys - 0.1)
    assert m2["duality_gap"] > 1e-4 and m2["saddle_distance"] == pytest.approx(0.1 * math.sqrt(2 * prob.x_dim))


def test_nc_pl_is_concave_but_not_strongly_concave_in_y():
    prob = FACTORIES["nc_pl"]()
    H = prob.M.T @ prob.M  # -Hessian in y
    ev = torch.linalg.eigvalsh(H)
    assert float(ev.min()) < 1e-12 and float(ev.max()) > 0.5  # rank-deficient: PL (mu = 0.25), not SC
    assert float(ev[ev > 1e-9].min()) == pytest.approx(prob.mu)


def test_simplex_form_solution_is_the_minimiser_of_phi():
    prob = FACTORIES["simplex_minimax"]()
    xs, ys, phi_star = prob.solution()
    F = prob.F(xs)
    assert float(F.max() - F.min()) < 1e-12  # all groups active at the centre
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        d = torch.randn(prob.x_dim, generator=g, dtype=F64)
        assert float(prob.phi(xs + 1e-3 * d / d.norm())) > phi_star
    m = prob.metrics(xs, ys)
    assert m["phi_gap"] == 0 and m["solution_distance"] == 0 and m["moreau_grad_norm"] < 1e-9


@pytest.mark.parametrize("name", ["simplex_minimax", "nc_c"])
def test_moreau_envelope_gradient_matches_an_independent_solver(name):
    """The dual solve (certified by its duality gap) against SLSQP on the epigraph form."""
    prob = FACTORIES[name]()
    A, v, w, l = prob.a_bar.numpy(), prob.v.numpy(), prob.cos_weight, prob.l

    def F(u):
        return 0.5 * ((u - A) ** 2).sum(-1) + v + w * np.cos(u).sum()

    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.as_tensor(prob.centre, dtype=F64) + torch.randn(prob.x_dim, generator=g, dtype=F64)
        grad_moreau, gap = prob.moreau(x, rel_tol=1e-9)
        assert -1e-12 <= gap < 1e-10  # primal - dual >= 0 up to rounding
        xn = x.numpy()
        res = minimize(lambda z: z[-1] + l * ((z[:-1] - xn) ** 2).sum(), np.append(xn, F(xn).max()), method="SLSQP",
                       constraints=[{"type": "ineq", "fun": lambda z: z[-1] - F(z[:-1])}],
                       options={"ftol": 1e-12, "maxiter": 500})
        assert res.status in (0, 8)  # 8: converged to rounding ("positive directional derivative")
        assert np.allclose(grad_moreau.numpy(), 2 * l * (xn - res.x[:-1]), atol=1e-5)


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("make, fragment", [
    (lambda: nc_sc(ctx(), measure="duality_gap"), "does not apply to nc_sc .class NC-SC.; allowed: grad_phi_norm"),
    (lambda: pl_pl(ctx(), y_set="box", y_bounds=[-1.0, 1.0], measure="saddle_distance"), "does not apply"),
    (lambda: nc_c(ctx(), measure="phi_gap"), "allowed: moreau_grad_norm"),
    (lambda: pl_pl(ctx(), y_set="box", y_bounds=[2.0, 1.0]), "is empty"),
    (lambda: pl_pl(ctx(), y_set="box", y_bounds=[1.0]), r"must be a list \[lo, hi\]"),
    (lambda: nc_sc(ctx(), y_set="ball", y_radius=-1.0), "y_radius must be > 0"),
    (lambda: nc_sc(ctx(), y_set="ball", y_bounds=[0.0, 1.0], y_radius=1.0), "applies only to y_set = 'box'"),
    (lambda: nc_sc(ctx(), y_set="simplex"), "not offered here"),
    (lambda: pl_pl(ctx(), lam=0.0), "lam must be > 0"),
    (lambda: nc_pl(ctx(), y_dim=4, rank=4), "rank must be in 1..y_dim-1"),
    (lambda: simplex_minimax(ctx(), dim=3, groups=4), "must be >= groups"),
])
def test_bad_problem_parameters_are_one_line_errors(make, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        make()
    assert "\n" not in str(e.value)


def test_the_default_moreau_accuracy_is_certified_to_a_tenth_of_a_percent():
    prob = FACTORIES["nc_c"]()
    g = torch.Generator().manual_seed(5)
    for scale in (1e-4, 1e-2, 1.0):
        x = torch.as_tensor(prob.centre, dtype=F64) + scale * torch.randn(prob.x_dim, generator=g, dtype=F64)
        exact, _ = prob.moreau(x, rel_tol=1e-10)
        fast, gap = prob.moreau(x)
        bound = 2 * prob.l * math.sqrt(2 * gap / (1 + 2 * prob.l - prob.cos_weight))
        assert float((fast - exact).norm()) <= bound + 1e-12
        assert bound <= 1e-3 * float(fast.norm()) + 1e-12
