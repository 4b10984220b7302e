r"""FedNest and LFedNest (Tarzanagh, Li, Thrampoulidis and Oymak, "FedNest: Federated Bilevel,
Minimax, and Compositional Optimization", ICML 2022), at the level of the paper's rules
(``papers/fedmbo.md`` §3.1), the baselines FedMBO is compared with.

FedNest, one outer iteration :math:`k`:

.. math::
    &\textbf{FedInn} \times T:\ q = \tfrac1n\textstyle\sum_{S} \nabla_y g_i(x, y);\ \
      y_{i,\nu+1} = y_{i,\nu} - \beta\big(\nabla_y g_i(x, y_{i,\nu}) - \nabla_y g_i(x, y) + q\big),\
      \nu < \tau_y;\ \ y = \tfrac1n\textstyle\sum_S y_{i,\tau_y} \\
    &\textbf{FedIHGP}:\ p_0 = \eta N \tfrac1n\textstyle\sum_{S_0}\nabla_y f_i;\ N' \sim U\{0..N-1\};\
      p_j = \tfrac1n\textstyle\sum_{S_j}(I - \eta\nabla^2_{yy} g_i)\, p_{j-1},\ j \le N' \\
    &\textbf{FedOut}:\ h_i(x') = \nabla_x f_i(x', y) - \nabla^2_{xy} g_i(x', y)\, p_{N'};\
      h = \tfrac1n\textstyle\sum_S h_i(x);\
      x_{i,\nu+1} = x_{i,\nu} - \alpha\big(h_i(x_{i,\nu}) - h_i(x) + h\big),\ \nu < \tau_x

(:math:`\eta = 1/\ell_{g,1}` in the paper.) FedInn takes two rounds with the same cohort
:math:`S`; FedOut takes one round for :math:`h` and, when :math:`\tau_x > 1`, a second round for
the SVRG-corrected local steps (with :math:`\tau_x = 1` that round would return
:math:`x - \alpha h` exactly, so it is skipped). The SVRG correction evaluates both terms on the
same minibatch.

LFedNest: FedInn is local SGD on :math:`y` and averaging (one round); FedOut uses each client's
*local* Neumann series :math:`p_i = \eta\sum_{j<N}(I-\eta\nabla^2_{yy}g_i)^j\nabla_y f_i`
(LFedIHGP, no extra rounds) inside :math:`\tau_x` local SGD steps on :math:`x` (one round).

Parameter names follow :func:`fedopt.algorithms.federated.fedmbo.fedmbo`; ``inner_local_steps``
is :math:`\tau_y` and ``outer_local_steps`` is :math:`\tau_x`.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from fedopt import linsolve, oracles
from fedopt import random as rnd
from fedopt.algorithms.base import FederatedAlgorithm, Program, Round, Steps, Task, conformance
from fedopt.algorithms.federated._tasks import bilevel_tasks
from fedopt.algorithms.federated.fedmbo import neumann_vector
from fedopt.algorithms.parts import COUNT_MAX
from fedopt.errors import check
from fedopt.problems.base import AbstractBilevelProblem
from fedopt.registry import ALGORITHMS

__all__ = ["FedNestState", "fednest", "lfednest"]


class FedNestState(NamedTuple):
    r"""The server state of FedNest and LFedNest after outer iteration :math:`k`: the upper variable
    :math:`x` and the lower variable :math:`y`. Nothing else carries over: FedInn's control average
    :math:`q`, FedIHGP's :math:`p_{N'}` and FedOut's :math:`h` are recomputed every iteration."""

    x: torch.Tensor
    y: torch.Tensor


def _check_common(outer_lr, inner_lr, neumann_lr, neumann_terms, inner_steps, clients_per_round,
                  batch_size, inner_local_steps, outer_local_steps) -> None:
    for name, val in (("outer_lr", outer_lr), ("inner_lr", inner_lr), ("neumann_lr", neumann_lr)):
        check(val > 0, f"algorithm.params.{name} must be > 0, got {val}")
        check(math.isfinite(val), f"algorithm.params.{name} must be a finite number, got {val}")
    check(neumann_terms >= 1, f"algorithm.params.neumann_terms must be >= 1, got {neumann_terms}")
    check(inner_steps >= 0, f"algorithm.params.inner_steps must be >= 0, got {inner_steps}")
    check(clients_per_round >= 1, f"algorithm.params.clients_per_round must be >= 1, got {clients_per_round}")
    check(batch_size is None or 1 <= batch_size <= COUNT_MAX,
          f"algorithm.params.batch_size must be in 1..{COUNT_MAX}, got {batch_size}")
    check(inner_local_steps >= 1, f"algorithm.params.inner_local_steps must be >= 1, got {inner_local_steps}")
    check(outer_local_steps >= 1, f"algorithm.params.outer_local_steps must be >= 1, got {outer_local_steps}")


def _local_tasks(problem: AbstractBilevelProblem, *, batch_size, inner_lr, outer_lr, neumann_lr,
                 neumann_terms, tau_y, tau_x, hvp_mode):
    f, g, b = problem.outer_loss, problem.inner_loss, batch_size

    def h_i(x_, y, p, data, client, key):
        """The client's hypergradient surrogate at x_ with a fixed Neumann vector p."""
        gx = oracles.grad_x(f, x_, y, problem.outer_batch(data, client, rnd.fold_in(key, 0), b))
        return gx - oracles.jvp_xy(g, x_, y, problem.inner_batch(data, client, rnd.fold_in(key, 1), b), p, mode=hvp_mode)

    def svrg_inner(payload, client_payload, data, client, key):
        del client_payload
        x, y, q = payload
        yi = y
        for nu in range(tau_y):
            batch = problem.inner_batch(data, client, rnd.fold_in(key, nu), b)
            yi = yi - inner_lr * (oracles.grad_y(g, x, yi, batch) - oracles.grad_y(g, x, y, batch) + q)
        return yi

    def outer_h(payload, client_payload, data, client, key):
        del client_payload
        x, y, p = payload
        return h_i(x, y, p, data, client, key)

    def svrg_outer(payload, client_payload, data, client, key):
        del client_payload
        x, y, p, h = payload
        xi = x
        for nu in range(tau_x):
            k = rnd.fold_in(key, nu)
            xi = xi - outer_lr * (h_i(xi, y, p, data, client, k) - h_i(x, y, p, data, client, k) + h)
        return xi

    def sgd_inner(payload, client_payload, data, client, key):
        del client_payload
        x, y = payload
        yi = y
        for nu in range(tau_y):
            batch = problem.inner_batch(data, client, rnd.fold_in(key, nu), b)
            yi = yi - inner_lr * oracles.grad_y(g, x, yi, batch)
        return yi

    local_neumann = linsolve.neumann(neumann_terms, neumann_lr)

    def local_outer(payload, client_payload, data, client, key):
        """LFedIHGP inside local SGD on x: the client's own Hessian only, no communication."""
        del client_payload
        x, y = payload
        xi = x
        for nu in range(tau_x):
            k = rnd.fold_in(key, nu)
            fb = problem.outer_batch(data, client, rnd.fold_in(k, 0), b)
            gb = problem.inner_batch(data, client, rnd.fold_in(k, 1), b)
            gx = oracles.grad_x(f, xi, y, fb)
            p_i = local_neumann(lambda v: oracles.hvp_yy(g, xi, y, gb, v, mode=hvp_mode), oracles.grad_y(f, xi, y, fb))
            xi = xi - outer_lr * (gx - oracles.jvp_xy(g, xi, y, gb, p_i, mode=hvp_mode))
        return xi

    return {
        "svrg_inner": Task("svrg_inner", svrg_inner, {"grad": 2 * tau_y}),
        "outer_h": Task("hypergrad", outer_h, {"grad": 1, "jvp": 1}),
        "svrg_outer": Task("svrg_outer", svrg_outer, {"grad": 2 * tau_x, "jvp": 2 * tau_x}),
        "sgd_inner": Task("sgd_inner", sgd_inner, {"grad": tau_y}),
        "local_outer": Task("local_outer", local_outer,
                            {"grad": 2 * tau_x, "hvp": (neumann_terms - 1) * tau_x, "jvp": tau_x}),
    }


@ALGORITHMS.register("fednest")
@conformance(outer_lr=0.1, inner_lr=0.25, neumann_lr=0.25, neumann_terms=3, inner_steps=2, clients_per_round=4, batch_size=2, inner_local_steps=2, outer_local_steps=2)
def fednest(
    *,
    outer_lr: float,
    inner_lr: float,
    neumann_lr: float,
    neumann_terms: int = 10,
    inner_steps: int = 1,
    clients_per_round: int = 10,
    batch_size: int | None = None,
    inner_local_steps: int = 1,
    outer_local_steps: int = 1,
    replace: bool = False,
    hvp_mode: Literal["fwd", "rev"] = "rev",
) -> FederatedAlgorithm:
    """FedNest (module docstring): FedInn (FedSVRG) x T, FedIHGP (random truncation), FedOut."""
    _check_common(outer_lr, inner_lr, neumann_lr, neumann_terms, inner_steps, clients_per_round,
                  batch_size, inner_local_steps, outer_local_steps)
    n, T = clients_per_round, inner_steps

    def setup(problem: AbstractBilevelProblem, K: int, key: torch.Tensor) -> Steps:
        tasks = bilevel_tasks(problem, batch_size=batch_size, neumann_lr=neumann_lr, hvp_mode=hvp_mode)
        local = _local_tasks(problem, batch_size=batch_size, inner_lr=inner_lr, outer_lr=outer_lr,
                             neumann_lr=neumann_lr, neumann_terms=neumann_terms,
                             tau_y=inner_local_steps, tau_x=outer_local_steps, hvp_mode=hvp_mode)

        def init(x0: torch.Tensor, y0: torch.Tensor) -> FedNestState:
            return FedNestState(x0, y0)

        def step(s: FedNestState, k: int) -> Program:
            x, y = s
            for _ in range(T):  # FedInn: two rounds with the same cohort S
                r = yield Round(tasks.grad_y_inner, (x, y), n, replace=replace)
                y = (yield Round(local["svrg_inner"], (x, y, r.mean()), r.clients)).mean()
            # FedIHGP = PHE's Neumann chain with one random truncation shared by all clients;
            # its round-0 direct gradient is unused because FedOut recomputes h_i.
            p, _ = yield from neumann_vector(tasks, x, y, n=n, Q=neumann_terms, eta=neumann_lr,
                                             truncation="random", chains="single", replace=replace,
                                             key=rnd.fold_in(key, k))
            r = yield Round(local["outer_h"], (x, y, p), n, replace=replace)  # FedOut
            h = r.mean()
            if outer_local_steps == 1:
                x = x - outer_lr * h
            else:
                x = (yield Round(local["svrg_outer"], (x, y, p, h), r.clients)).mean()
            return FedNestState(x, y)

        return Steps(init, step)

    return FederatedAlgorithm("fednest", clients_per_round, replace, setup)


@ALGORITHMS.register("lfednest")
@conformance(outer_lr=0.1, inner_lr=0.25, neumann_lr=0.25, neumann_terms=3, inner_steps=2, clients_per_round=4, batch_size=2, inner_local_steps=2, outer_local_steps=2)
def lfednest(
    *,
    outer_lr: float,
    inner_lr: float,
    neumann_lr: float,
    neumann_terms: int = 10,
    inner_steps: int = 1,
    clients_per_round: int = 10,
    batch_size: int | None = None,
    inner_local_steps: int = 1,
    outer_local_steps: int = 1,
    replace: bool = False,
    hvp_mode: Literal["fwd", "rev"] = "rev",
) -> FederatedAlgorithm:
    """LFedNest (module docstring): local SGD + averaging on y, local-Hessian hypergradients on x."""
    _check_common(outer_lr, inner_lr, neumann_lr, neumann_terms, inner_steps, clients_per_round,
                  batch_size, inner_local_steps, outer_local_steps)
    n, T = clients_per_round, inner_steps

    def setup(problem: AbstractBilevelProblem, K: int, key: torch.Tensor) -> Steps:
        del key
        local = _local_tasks(problem, batch_size=batch_size, inner_lr=inner_lr, outer_lr=outer_lr,
                             neumann_lr=neumann_lr, neumann_terms=neumann_terms,
                             tau_y=inner_local_steps, tau_x=outer_local_steps, hvp_mode=hvp_mode)

        def init(x0: torch.Tensor, y0: torch.Tensor) -> FedNestState:
            return FedNestState(x0, y0)

        def step(s: FedNestState, k: int) -> Program:
            x, y = s
            for _ in range(T):
                y = (yield Round(local["sgd_inner"], (x, y), n, replace=replace)).mean()
            x = (yield Round(local["local_outer"], (x, y), n, replace=replace)).mean()
            return FedNestState(x, y)

        return Steps(init, step)

    return FederatedAlgorithm("lfednest", clients_per_round, replace, setup)
