r"""The client side of federated minimax methods: ``K`` local stochastic GDA steps.

One pure client function covers every method in :mod:`fedopt.algorithms.federated.minimax`; static
options (fixed when the task is built) pick the variant, so the function ``vmap``\ s over clients:

* ``order``: ``"simultaneous"`` — both gradients at :math:`(x^k, y^k)` on one sample, as in the
  FESS-GDA equations of ``papers/fess_gda.md`` §2.3 — or ``"alternating"`` — the ascent gradient
  at the new :math:`x^{k+1}` on the same sample (Smoothed-AGDA's order).
* ``client_smoothing``: add :math:`p(x^k - z_t)` to every local descent gradient (``z_t`` in the
  payload) — the "client" placement of FESS-GDA's smoothing.
* ``snapshot``: take the ascent gradient at the server's snapshot :math:`\tilde x` instead of the
  current :math:`x^k` (Local SGDA+ and Fed-Norm-SGDA+).
* ``control``: SCAFFOLD-style control variates (SAGDA): the local gradient is corrected by
  :math:`-\nabla f_i(x_t, y_t; \xi') + v`, with the client's own round-start gradient
  :math:`\nabla f_i(x_t, y_t; \xi')` as its ``client_payload`` and the server average :math:`v`
  in the payload.
* ``tau_min < K``: the client runs :math:`\tau_i \sim U\{\tau_{\min}, \dots, K\}` steps this round
  (drawn from its key: heterogeneous compute); the later steps are masked, not skipped, so the
  loop length is static under ``vmap``.
* ``project_local``: project :math:`y` after every local ascent step (``papers/fess_gda.md`` §6.3,
  the default) or leave the local steps unprojected and project only the server's average.
* ``reply``: ``"iterate"`` returns :math:`(x^{\tau_i+1}, y^{\tau_i+1})`; ``"normalized"`` returns
  Fed-Norm-SGDA's normalized directions :math:`h_i = \frac1{\tau_i}\sum_k g^k` and :math:`\tau_i`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fedopt import oracles
from fedopt import random as rnd
from fedopt.algorithms.base import Task
from fedopt.problems.base import AbstractMinimaxProblem

__all__ = ["LocalGDA", "grad_task", "local_gda_task"]


@dataclass(frozen=True)
class LocalGDA:
    """Static options of the client's local loop (module docstring)."""

    local_steps: int
    lr_x: float
    lr_y: float
    batch_size: int | None
    order: Literal["simultaneous", "alternating"] = "simultaneous"
    client_smoothing: float = 0.0  # p of the "client" placement; 0: none
    snapshot: bool = False
    control: bool = False
    tau_min: int | None = None  # None: every client runs local_steps
    reply: Literal["iterate", "normalized"] = "iterate"
    project_local: bool = True  # False: local y steps unprojected, the server projects the average


def local_gda_task(problem: AbstractMinimaxProblem, opt: LocalGDA) -> Task:
    """The client task ``payload = {"x", "y", ["z"], ["x_snap"], ["v_x", "v_y"]}`` ->
    local iterate or normalized directions (see :class:`LocalGDA`)."""
    f, project, K, b = problem.loss, problem.y_set.project, opt.local_steps, opt.batch_size
    p = opt.client_smoothing

    # Static: with every client running K steps (no tau_min) nothing is masked, and with
    # reply="iterate" the gradient sums are never used, so neither costs ops (per-op overhead
    # dominates these small tensors under vmap). Both shortcuts give bit-identical results:
    # torch.where(True, a, b) is a, and a + where(True, g, 0) is a + g.
    masked = opt.tau_min is not None and opt.tau_min < K
    normalized = opt.reply == "normalized"

    def fn(payload, client_payload, data, client, key):
        x, y = payload["x"], payload["y"]
        # the keys fold_in(key, k) of the K steps (and, masked, fold_in(key, K) of tau) in one call:
        # elementwise the same numbers as K + 1 separate calls, without their per-call op overhead
        keys = rnd.fold_in(key.unsqueeze(-1), torch.arange(K + int(masked), device=key.device))
        if masked:
            tau = opt.tau_min + rnd.randint(keys[..., K], K - opt.tau_min + 1, ())
        if normalized:
            sum_gx, sum_gy = torch.zeros_like(x), torch.zeros_like(y)
        for k in range(K):
            batch = problem.batch(data, client, keys[..., k], b)
            gx, gy = oracles.grad_xy(f, x, y, batch)
            if opt.snapshot:
                gy = oracles.grad_y(f, payload["x_snap"], y, batch)
            if p:
                gx = gx + p * (x - payload["z"])
            if opt.control:
                gx = gx - client_payload[0] + payload["v_x"]
            x_next = x - opt.lr_x * gx
            if opt.order == "alternating":
                gy = oracles.grad_y(f, payload["x_snap"] if opt.snapshot else x_next, y, batch)
                if opt.control:
                    gy = gy - client_payload[1] + payload["v_y"]
            elif opt.control:
                gy = gy - client_payload[1] + payload["v_y"]
            y_next = y + opt.lr_y * gy
            if opt.project_local:
                y_next = project(y_next)
            if masked:
                active = k < tau
                x, y = torch.where(active, x_next, x), torch.where(active, y_next, y)
                if normalized:
                    sum_gx = sum_gx + torch.where(active, gx, torch.zeros_like(gx))
                    sum_gy = sum_gy + torch.where(active, gy, torch.zeros_like(gy))
            else:
                x, y = x_next, y_next
                if normalized:
                    sum_gx, sum_gy = sum_gx + gx, sum_gy + gy
        if normalized:
            t = tau.to(x.dtype) if masked else torch.full((), K, dtype=x.dtype, device=x.device)
            return sum_gx / t, sum_gy / t, t
        return x, y

    per_step = 1 + int(opt.snapshot or opt.order == "alternating")
    return Task("local_gda", fn, {"grad": K * per_step})


def grad_task(problem: AbstractMinimaxProblem, batch_size: int | None) -> Task:
    r"""``payload = (x, y)`` -> :math:`(\nabla_x f_i, \nabla_y f_i)` on one sample (SAGDA's control round)."""
    f = problem.loss

    def fn(payload, client_payload, data, client, key):
        del client_payload
        x, y = payload
        return oracles.grad_xy(f, x, y, problem.batch(data, client, key, batch_size))

    return Task("minimax_grad", fn, {"grad": 1})
