r"""DBO: decentralized bilevel optimisation with a per-node Jacobian-Hessian-inverse product (JHIP).

Chen, Huang and Ma, "Decentralized Bilevel Optimization", arXiv:2206.05670. The paper body could not
be read; this is the reconstruction of ``papers/decentralized_bilevel.md`` §2.1-2.2 (UNVERIFIED).
Each node keeps a *matrix* :math:`Z_i \in \mathbb R^{p\times q}` estimating
:math:`Z^* = \bar J \bar H^{-1}` (:math:`\bar J = \frac1n\sum_i\nabla^2_{xy} g_i`,
:math:`\bar H = \frac1n\sum_i\nabla^2_{yy} g_i`), the minimiser of
:math:`\frac1n\sum_i \tfrac12\mathrm{tr}(Z H_i Z^\top) - \mathrm{tr}(Z J_i^\top)`:

.. math::
    &1.\ y_i \leftarrow \mathrm{gossip}\big(y_i,\ \beta\nabla_y g_i(x_i, y_i)\big) \quad (T\ \text{times}) \\
    &2.\ Z_i \leftarrow \mathrm{gossip}\big(Z_i,\ \gamma\,[Z_i \nabla^2_{yy} g_i - \nabla^2_{xy} g_i]\big)
        \quad (N\ \text{times}) \\
    &3.\ u_i = \nabla_x f_i(x_i, y_i) - Z_i \nabla_y f_i(x_i, y_i) \\
    &4.\ x_i \leftarrow \mathrm{gossip}(x_i,\ \alpha u_i) \ \ \text{(DGD)} \quad\text{or gradient tracking on } u

:math:`Z_i` costs :math:`O(pq)` memory and floats per gossip round and :math:`p` HVPs plus one
:math:`p\times q` Jacobian per step: use it for small :math:`p` (the cost MA-DSBO removes).
``dbo`` uses full local data (deterministic); ``dbo_stochastic`` the same loops with minibatches
(``papers/decentralized_bilevel.md`` §2.2). Options as in
:mod:`fedopt.algorithms.decentralized.ma_dsbo`: ``gossip_order`` (default ``"atc"``) and
``tracking`` on ``x`` (4b) or none (4a, the default; which one the paper uses is unverified).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from fedopt.algorithms.base import DecentralizedAlgorithm, LocalStep, NodeProgram, Steps, conformance
from fedopt.algorithms.decentralized._common import gossip_step, node_tasks, tracked_step
from fedopt.algorithms.parts import COUNT_MAX
from fedopt.errors import check
from fedopt.problems.base import AbstractBilevelProblem
from fedopt.registry import ALGORITHMS

__all__ = ["DBOState", "dbo", "dbo_stochastic"]


class DBOState(NamedTuple):
    r"""Every node's variables, stacked over the nodes (``[n, ...]``).

    ``x``, ``y``: :math:`x_i`, :math:`y_i`; ``Z``: the JHIP matrices :math:`Z_i` (``[n, p, q]``);
    ``s_x``, ``u_x``: the gradient tracker of step 4b and the direction :math:`u_i` it last absorbed
    (zero without tracking)."""

    x: torch.Tensor
    y: torch.Tensor
    Z: torch.Tensor
    s_x: torch.Tensor
    u_x: torch.Tensor


def _dbo(name: str, *, outer_lr, inner_lr, z_lr, inner_steps, z_steps, batch_size, gossip_order, tracking,
         hvp_mode) -> DecentralizedAlgorithm:
    for pname, val in (("outer_lr", outer_lr), ("inner_lr", inner_lr), ("z_lr", z_lr)):
        check(val > 0, f"algorithm.params.{pname} must be > 0, got {val}")
        check(math.isfinite(val), f"algorithm.params.{pname} must be a finite number, got {val}")
    check(inner_steps >= 1, f"algorithm.params.inner_steps must be >= 1, got {inner_steps}")
    check(z_steps >= 1, f"algorithm.params.z_steps must be >= 1, got {z_steps}")
    check(batch_size is None or 1 <= batch_size <= COUNT_MAX,
          f"algorithm.params.batch_size must be in 1..{COUNT_MAX}, got {batch_size}")
    alpha, beta, gamma, order = outer_lr, inner_lr, z_lr, gossip_order

    def setup(problem: AbstractBilevelProblem, K: int, key: torch.Tensor, n: int) -> Steps:
        del K, key
        tasks = node_tasks(problem, batch_size=batch_size, hvp_mode=hvp_mode)
        p, q = problem.x_dim, problem.y_dim

        def init(x0: torch.Tensor, y0: torch.Tensor) -> DBOState:
            X, Y = x0.expand(n, -1).clone(), y0.expand(n, -1).clone()
            Z = torch.zeros(n, p, q, dtype=X.dtype, device=X.device)
            return DBOState(X, Y, Z, torch.zeros_like(X), torch.zeros_like(X))

        def step(s: DBOState, k: int) -> NodeProgram:
            X, Y, Z, Sx, Ux = s.x, s.y, s.Z, s.s_x, s.u_x
            for _ in range(inner_steps):  # 1. lower level: gossip GD on y
                D = yield LocalStep(tasks["lower_grad"], (X, Y))
                Y = yield from gossip_step(Y, D, beta, "y", order)
            for _ in range(z_steps):  # 2. JHIP: gossip GD on the matrix system, flattened for gossip
                D = yield LocalStep(tasks["jhip_grad"], (X, Y, Z))
                Z = (yield from gossip_step(Z.reshape(n, -1), D.reshape(n, -1), gamma, "Z", order)).reshape(n, p, q)
            U = yield LocalStep(tasks["hypergrad_jhip"], (X, Y, Z))  # 3. local hypergradient
            if tracking == "x":  # 4b. gradient tracking on u
                X, Sx = yield from tracked_step(X, Sx, U, Ux, alpha, "x", order)
                Ux = U
            else:  # 4a. DGD
                X = yield from gossip_step(X, U, alpha, "x", order)
            return DBOState(X, Y, Z, Sx, Ux)

        return Steps(init, step, variables=lambda s: {"x": s.x, "y": s.y, "Z": s.Z.reshape(n, -1)})

    return DecentralizedAlgorithm(name, setup)


@ALGORITHMS.register("dbo")
@conformance(outer_lr=0.3, inner_lr=0.2, z_lr=0.2, inner_steps=2, z_steps=2)
def dbo(
    *,
    outer_lr: float,
    inner_lr: float,
    z_lr: float,
    inner_steps: int = 5,
    z_steps: int = 5,
    gossip_order: Literal["atc", "cta"] = "atc",
    tracking: Literal["none", "x"] = "none",
    hvp_mode: Literal["fwd", "rev"] = "rev",
) -> DecentralizedAlgorithm:
    """DBO, deterministic: every oracle on the node's full local data (module docstring)."""
    return _dbo("dbo", outer_lr=outer_lr, inner_lr=inner_lr, z_lr=z_lr, inner_steps=inner_steps, z_steps=z_steps,
                batch_size=None, gossip_order=gossip_order, tracking=tracking, hvp_mode=hvp_mode)


@ALGORITHMS.register("dbo_stochastic")
@conformance(outer_lr=0.3, inner_lr=0.2, z_lr=0.2, inner_steps=2, z_steps=2, batch_size=2)
def dbo_stochastic(
    *,
    outer_lr: float,
    inner_lr: float,
    z_lr: float,
    inner_steps: int = 5,
    z_steps: int = 5,
    batch_size: int = 32,
    gossip_order: Literal["atc", "cta"] = "atc",
    tracking: Literal["none", "x"] = "none",
    hvp_mode: Literal["fwd", "rev"] = "rev",
) -> DecentralizedAlgorithm:
    """DBO's stochastic variant (the paper's "DSBO"): the same loops on minibatches."""
    return _dbo("dbo_stochastic", outer_lr=outer_lr, inner_lr=inner_lr, z_lr=z_lr, inner_steps=inner_steps,
                z_steps=z_steps, batch_size=batch_size, gossip_order=gossip_order, tracking=tracking,
                hvp_mode=hvp_mode)
