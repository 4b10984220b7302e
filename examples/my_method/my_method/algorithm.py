r"""FedSOBA: SOBA's single loop (Dagréou et al., NeurIPS 2022) with partial participation.

Every round, the sampled clients evaluate the three directions of SOBA at the server's
:math:`(x, y, v)` on their own minibatches, and the server averages and steps:

.. math::
    y \leftarrow y - \beta\,\nabla_y g, \qquad
    v \leftarrow v - \gamma\,(\nabla^2_{yy} g\, v - \nabla_y f), \qquad
    x \leftarrow x - \alpha\,(\nabla_x f - \nabla^2_{xy} g\, v)
"""

from typing import NamedTuple

import torch

from fedopt import oracles
from fedopt import random as rnd
from fedopt.algorithms.base import FederatedAlgorithm, Round, Steps, Task, conformance


class FedSOBAState(NamedTuple):
    x: torch.Tensor  # upper-level variable
    y: torch.Tensor  # lower-level variable
    v: torch.Tensor  # v ~ [grad_yy g]^{-1} grad_y f, the linear system's solution


@conformance(outer_lr=0.3, inner_lr=0.2, v_lr=0.2, clients_per_round=4, batch_size=2)
def fed_soba(*, outer_lr: float, inner_lr: float, v_lr: float, clients_per_round: int = 10,
             batch_size: int | None = None) -> FederatedAlgorithm:
    alpha, beta, gamma, n = outer_lr, inner_lr, v_lr, clients_per_round

    def setup(problem, K, key):
        f, g = problem.outer_loss, problem.inner_loss

        def directions(payload, client_payload, data, client, key):  # one client, one round
            x, y, v = payload
            zeta = problem.inner_batch(data, client, rnd.fold_in(key, 0), batch_size)
            xi = problem.outer_batch(data, client, rnd.fold_in(key, 1), batch_size)
            hv, jv = oracles.hvp_and_jvp(g, x, y, zeta, v)
            fx, fy = oracles.grad_xy(f, x, y, xi)
            return oracles.grad_y(g, x, y, zeta), hv - fy, fx - jv

        task = Task("soba_directions", directions, {"grad": 2, "hvp": 1, "jvp": 1})

        def init(x0, y0):
            return FedSOBAState(x0, y0, torch.zeros_like(y0))

        def step(s, k):
            d_y, d_v, d_x = (yield Round(task, (s.x, s.y, s.v), n)).mean()
            return FedSOBAState(s.x - alpha * d_x, s.y - beta * d_y, s.v - gamma * d_v)

        return Steps(init, step)

    return FederatedAlgorithm("fed_soba", n, False, setup)
