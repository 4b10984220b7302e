"""Client tasks shared by the federated bilevel methods (each a pure function of its inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedopt import oracles
from fedopt import random as rnd
from fedopt.algorithms.base import Task
from fedopt.problems.base import AbstractBilevelProblem

__all__ = ["BilevelTasks", "bilevel_tasks"]


@dataclass(frozen=True)
class BilevelTasks:
    """The one-oracle client tasks of Hessian-vector-based federated bilevel methods."""

    grad_y_inner: Task  # (x, y) -> grad_y g_i(x, y; zeta)
    outer_grads: Task  # (x, y) -> (grad_y f_i, grad_x f_i) on one sample xi
    neumann_step: Task  # (x, y, v) or client_payload v -> v - eta * H_i v
    cross: Task  # (x, y, p) -> grad2_xy g_i(x, y; zeta) p
    hvp: Task  # (x, y, v) -> H_i v


def bilevel_tasks(
    problem: AbstractBilevelProblem,
    *,
    batch_size: int | None,
    neumann_lr: float,
    hvp_mode: Literal["fwd", "rev"],
) -> BilevelTasks:
    """Build the tasks for ``problem`` with minibatches of ``batch_size`` (``None``: full local data)."""
    f, g = problem.outer_loss, problem.inner_loss
    b, eta = batch_size, neumann_lr

    def grad_y_inner(payload, client_payload, data, client, key):
        del client_payload
        x, y = payload
        return oracles.grad_y(g, x, y, problem.inner_batch(data, client, key, b))

    def outer_grads(payload, client_payload, data, client, key):
        del client_payload
        x, y = payload
        gx, gy = oracles.grad_xy(f, x, y, problem.outer_batch(data, client, key, b))
        return gy, gx

    def neumann_step(payload, client_payload, data, client, key):
        x, y = payload[0], payload[1]
        v = client_payload if client_payload is not None else payload[2]
        hv = oracles.hvp_yy(g, x, y, problem.inner_batch(data, client, key, b), v, mode=hvp_mode)
        return v - eta * hv

    cross_uses_data = ("inner_loss", "jvp_xy") not in problem.data_free_oracles

    def cross(payload, client_payload, data, client, key):
        del client_payload
        x, y, p = payload
        if not cross_uses_data:  # the same reply from every client, without a minibatch
            out = oracles.jvp_xy(g, x, y, None, p, mode=hvp_mode)
            return out.expand(client.shape + out.shape)
        return oracles.jvp_xy(g, x, y, problem.inner_batch(data, client, rnd.fold_in(key, 1), b), p, mode=hvp_mode)

    def hvp(payload, client_payload, data, client, key):
        del client_payload
        x, y, v = payload
        return oracles.hvp_yy(g, x, y, problem.inner_batch(data, client, key, b), v, mode=hvp_mode)

    def batched(*used: tuple[str, str]) -> bool:
        return oracles.batch_polymorphic(problem, *used)

    return BilevelTasks(
        Task("lower_grad", grad_y_inner, {"grad": 1}, batched(("inner_loss", "grad_y"))),
        Task("outer_grad", outer_grads, {"grad": 1}, batched(("outer_loss", "grad_x"), ("outer_loss", "grad_y"))),
        Task("neumann", neumann_step, {"hvp": 1}, batched(("inner_loss", "hvp_yy"))),
        Task("cross", cross, {"jvp": 1}, batched(("inner_loss", "jvp_xy"))),
        Task("hvp", hvp, {"hvp": 1}, batched(("inner_loss", "hvp_yy"))),
    )
