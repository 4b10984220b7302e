r"""Federated minimax methods: FESS-GDA and its baselines Local SGDA(+), SAGDA, Fed-Norm-SGDA(+).

All solve :math:`\min_x \max_{y\in Y} \frac1M\sum_i f_i(x, y)` with ``m`` of ``M`` clients per round;
one communication round per iteration (SAGDA: two). The clients' local loop is
:func:`fedopt.algorithms.federated._minimax_tasks.local_gda_task`.

**FESS-GDA** (Shen, Huang, Zhang and Shen, "Stochastic Smoothed Gradient Descent Ascent for Federated
Minimax Optimization", AISTATS 2024, arXiv:2311.00944), ``papers/fess_gda.md`` §2.3. The paper's
algorithm box could not be read; the equations are those of a third-party reproduction **[V3]**:

.. math::
    &x_{t,i}^{k+1} = x_{t,i}^k - \eta_{x,l}\nabla_x f_i(x_{t,i}^k, y_{t,i}^k; \xi_{t,i}^k), \quad
     y_{t,i}^{k+1} = P_Y\big(y_{t,i}^k + \eta_{y,l}\nabla_y f_i(x_{t,i}^k, y_{t,i}^k; \xi_{t,i}^k)\big)
     \quad (k = 1..K) \\
    &x_{t+1} = x_t + \eta_{x,g}\big(\tfrac1m\textstyle\sum_{i\in S_t} x_{t,i}^{K+1} - x_t\big)
     - \eta_{x,l}\eta_{x,g} K p\,(x_t - z_t) \\
    &y_{t+1} = P_Y\big(y_t + \eta_{y,g}(\tfrac1m\textstyle\sum_{i\in S_t} y_{t,i}^{K+1} - y_t)\big), \qquad
     z_{t+1} = z_t + \beta(x_{t+1} - z_t), \quad z_0 = x_0

==================  ==========================  ===================================================
symbol              parameter                   meaning
==================  ==========================  ===================================================
:math:`\eta_{x,l}`  ``lr_x``                    local descent step
:math:`\eta_{y,l}`  ``lr_y``                    local ascent step
:math:`\eta_{x,g}`  ``lr_x_global``             server step on the averaged x-update
:math:`\eta_{y,g}`  ``lr_y_global``             server step on the averaged y-update
:math:`K`           ``local_steps``             local steps per round
:math:`m`           ``clients_per_round``       clients sampled per round
:math:`p`           ``p``                       smoothing weight; ``None``: :math:`2l` from the problem
:math:`\beta`       ``beta``                    anchor averaging rate, in (0, 1]
==================  ==========================  ===================================================

Unverified placements, as options (default first):

* ``smoothing="server"`` (the equations above: :math:`p(x_t - z_t)` evaluated once at the server
  and counted for all :math:`K` local steps; clients never see :math:`z`) or ``"client"`` (every
  local descent step uses :math:`\nabla_x f_i + p(x_{t,i}^k - z_t)`, :math:`z_t` is broadcast, and
  the server step has no extra term).
* ``order="simultaneous"`` (both gradients at :math:`(x^k, y^k)`, as above) or ``"alternating"``
  (:math:`y` ascends at :math:`x^{k+1}`, as in centralized Smoothed-AGDA).
* ``local_projection=True``: project :math:`y` onto :math:`Y` after every local ascent step (the
  spec's reading) as well as after aggregation; ``False`` projects only at the server. On a
  constrained :math:`Y` with heterogeneous clients the average of projected local iterates is not
  the projection of the averaged step, which leaves a bias that does *not* shrink with the step
  size (measured on ``nc_c``, 4 clients, ``delta = 0.5``, ``K = 5``: Moreau-envelope gradient
  stalls at 5.9e-2 for local steps 1e-3 and 5e-3 alike; ``tests/algorithms/test_minimax.py``).
* ``replace=False``: clients sampled without replacement.

Sanity reductions (tested): ``p = 0`` and global steps 1 is Local SGDA exactly; ``M = m = K = 1``
is centralized smoothed GDA.

**Baselines** (``papers/fess_gda.md`` §3; update rules from the baseline papers as summarized
there, exact forms UNVERIFIED where marked):

* :func:`local_sgda` — Sharma, Panda, Joshi and Varshney, ICML 2022: ``K`` local SGDA steps, the
  server averages. (= FESS-GDA with ``p = 0`` and unit global steps.)
* :func:`local_sgda_plus` — same paper: the ascent gradients use a snapshot :math:`\tilde x`
  refreshed every ``snapshot_every`` rounds.
* :func:`sagda` — Yang, Liu, Zhang and Liu, NeurIPS 2022: control variates assembled from the
  sampled clients' stochastic gradients plus client and server step sizes. The control variate is
  collected in its own round from the same cohort (two rounds per iteration; UNVERIFIED reading).
* :func:`fed_norm_sgda` — Sharma, Panda and Joshi, TMLR 2023: client :math:`i` runs
  :math:`\tau_i` steps and returns normalized directions :math:`h_i = \frac1{\tau_i}\sum_k g^k`;
  the server steps :math:`x_{t+1} = x_t - \tau_{\mathrm{eff}}\gamma_x\eta_x\frac1m\sum_i h_{x,i}`
  (likewise for :math:`y` with projection), :math:`\tau_{\mathrm{eff}} = \frac1m\sum_i\tau_i`.
  ``snapshot_every`` > 0 gives Fed-Norm-SGDA+.

Example:
    >>> import fedopt
    >>> cfg = {"problem": {"name": "pl_pl", "params": {"dim": 5, "delta": 0.25}},
    ...        "algorithm": {"name": "fess_gda", "params": {"lr_x": 0.001, "lr_y": 0.001, "lr_x_global": 50,
    ...            "lr_y_global": 50, "local_steps": 5, "clients_per_round": 8, "p": 0.0}},
    ...        "clients": 8, "rounds": 300, "eval_every": 300}
    >>> df = fedopt.run(cfg)
    >>> float(df.query("metric == 'saddle_distance'").value.iloc[-1]) < 1e-4
    True
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from fedopt.algorithms.base import FederatedAlgorithm, Program, Round, Steps, conformance
from fedopt.algorithms.federated._minimax_tasks import LocalGDA, grad_task, local_gda_task
from fedopt.errors import ConfigError, check
from fedopt.problems.base import AbstractMinimaxProblem
from fedopt.registry import ALGORITHMS

__all__ = ["FESSGDAState", "FedNormSGDAState", "LocalSGDAState", "SAGDAState", "fed_norm_sgda", "fess_gda",
           "local_sgda", "local_sgda_plus", "sagda"]

_P = "algorithm.params"


class FESSGDAState(NamedTuple):
    r"""FESS-GDA's server state after round :math:`t`: :math:`x_t`, :math:`y_t` and the smoothing
    anchor :math:`z_t` (:math:`z_0 = x_0`)."""

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor


class LocalSGDAState(NamedTuple):
    r"""Local SGDA(+)'s server state after round :math:`t`: :math:`x_t`, :math:`y_t` and, for Local
    SGDA+, the snapshot :math:`\tilde x` at which the ascent gradients are taken (``None`` for Local
    SGDA)."""

    x: torch.Tensor
    y: torch.Tensor
    x_snap: torch.Tensor | None = None


class SAGDAState(NamedTuple):
    r"""SAGDA's server state after round :math:`t`: :math:`x_t` and :math:`y_t` (the control variates
    :math:`c_i` and :math:`v` are collected afresh every round)."""

    x: torch.Tensor
    y: torch.Tensor


class FedNormSGDAState(NamedTuple):
    r"""Fed-Norm-SGDA(+)'s server state after round :math:`t`: :math:`x_t`, :math:`y_t` and, for
    Fed-Norm-SGDA+, the snapshot :math:`\tilde x` (``None`` without snapshots)."""

    x: torch.Tensor
    y: torch.Tensor
    x_snap: torch.Tensor | None = None


def _require_minimax(problem: object, name: str) -> AbstractMinimaxProblem:
    if not isinstance(problem, AbstractMinimaxProblem):
        raise ConfigError(f"algorithm {name!r} solves minimax problems; problem {type(problem).__name__} is bilevel "
                          "(use a minimax problem such as nc_sc, nc_pl, pl_pl, nc_c, simplex_minimax, "
                          "fair_classification, gan_mixture)")
    return problem


def _snapshot(s: LocalSGDAState | FedNormSGDAState, t: int, every: int) -> torch.Tensor | None:
    r"""The snapshot :math:`\tilde x` used in round :math:`t`: refreshed to :math:`x_t` every ``every``
    rounds (``every = 0``: no snapshot, ``None``)."""
    return s.x if every and t % every == 0 else s.x_snap


def _check_steps(**steps: float) -> None:
    for name, val in steps.items():
        check(val > 0 and math.isfinite(val), f"{_P}.{name} must be a finite number > 0, got {val}")


def _check_common(lr_x: float, lr_y: float, local_steps: int, clients_per_round: int, batch_size: int | None) -> None:
    _check_steps(lr_x=lr_x, lr_y=lr_y)
    check(local_steps >= 1, f"{_P}.local_steps must be >= 1, got {local_steps}")
    check(clients_per_round >= 1, f"{_P}.clients_per_round must be >= 1, got {clients_per_round}")
    check(batch_size is None or batch_size >= 1, f"{_P}.batch_size must be >= 1, got {batch_size}")


@ALGORITHMS.register("fess_gda")
@conformance(lr_x=0.05, lr_y=0.05, local_steps=3, clients_per_round=3, batch_size=2, p=2.0)
def fess_gda(
    *,
    lr_x: float,
    lr_y: float,
    lr_x_global: float = 1.0,
    lr_y_global: float = 1.0,
    local_steps: int = 10,
    clients_per_round: int = 10,
    p: float | None = None,
    beta: float = 0.1,
    batch_size: int | None = None,
    smoothing: Literal["server", "client"] = "server",
    order: Literal["simultaneous", "alternating"] = "simultaneous",
    local_projection: bool = True,
    replace: bool = False,
) -> FederatedAlgorithm:
    """FESS-GDA (module docstring). ``p=None`` takes :math:`p = 2l` from the problem's smoothness."""
    _check_common(lr_x, lr_y, local_steps, clients_per_round, batch_size)
    _check_steps(lr_x_global=lr_x_global, lr_y_global=lr_y_global)
    check(p is None or (p >= 0 and math.isfinite(p)), f"{_P}.p must be >= 0 (or omitted for p = 2l), got {p}")
    check(0 < beta <= 1, f"{_P}.beta must be in (0, 1], got {beta}")
    K, m = local_steps, clients_per_round

    def setup(problem, T: int, key: torch.Tensor) -> Steps:
        del key
        problem = _require_minimax(problem, "fess_gda")
        p_ = p
        if p_ is None:
            l = problem.smoothness()
            check(l is not None, f"{_P}.p: problem {type(problem).__name__} has no known smoothness constant l; "
                                 "set p explicitly (p = 2l in the theory)")
            p_ = 2.0 * l
        opt = LocalGDA(K, lr_x, lr_y, batch_size, order=order,
                       client_smoothing=p_ if smoothing == "client" else 0.0, project_local=local_projection)
        task = local_gda_task(problem, opt)
        server_p = p_ if smoothing == "server" else 0.0

        def init(x0: torch.Tensor, y0: torch.Tensor) -> FESSGDAState:
            return FESSGDAState(x0, y0, x0)  # z_0 = x_0

        def step(s: FESSGDAState, t: int) -> Program:
            x, y, z = s
            payload = {"x": x, "y": y, "z": z} if smoothing == "client" and p_ else {"x": x, "y": y}
            x_bar, y_bar = (yield Round(task, payload, m, replace=replace)).mean()
            x_next = x + lr_x_global * (x_bar - x) - lr_x * lr_x_global * K * server_p * (x - z)
            y_next = problem.y_set.project(y + lr_y_global * (y_bar - y))
            z_next = z + beta * (x_next - z)
            return FESSGDAState(x_next, y_next, z_next)

        return Steps(init, step)

    return FederatedAlgorithm("fess_gda", clients_per_round, replace, setup, "minimax")


def _local_sgda_setup(name: str, opt: LocalGDA, m: int, replace: bool, snapshot_every: int):
    def setup(problem, T: int, key: torch.Tensor) -> Steps:
        del key
        problem = _require_minimax(problem, name)
        task = local_gda_task(problem, opt)

        def init(x0: torch.Tensor, y0: torch.Tensor) -> LocalSGDAState:
            return LocalSGDAState(x0, y0, x0 if snapshot_every else None)

        def step(s: LocalSGDAState, t: int) -> Program:
            x, y, x_snap = s.x, s.y, _snapshot(s, t, snapshot_every)
            payload = {"x": x, "y": y, "x_snap": x_snap} if snapshot_every else {"x": x, "y": y}
            x, y = (yield Round(task, payload, m, replace=replace)).mean()
            y = problem.y_set.project(y)  # the average of points of a convex Y is in Y; rounding only
            return LocalSGDAState(x, y, x_snap)

        return Steps(init, step)

    return setup


@ALGORITHMS.register("local_sgda")
@conformance(lr_x=0.05, lr_y=0.05, local_steps=3, clients_per_round=3, batch_size=2)
def local_sgda(
    *,
    lr_x: float,
    lr_y: float,
    local_steps: int = 10,
    clients_per_round: int = 10,
    batch_size: int | None = None,
    order: Literal["simultaneous", "alternating"] = "simultaneous",
    local_projection: bool = True,
    replace: bool = False,
) -> FederatedAlgorithm:
    """Local SGDA (Sharma et al., ICML 2022): ``K`` local SGDA steps from the server model, then
    the server averages the sampled clients' iterates. ``local_projection`` as for FESS-GDA."""
    _check_common(lr_x, lr_y, local_steps, clients_per_round, batch_size)
    opt = LocalGDA(local_steps, lr_x, lr_y, batch_size, order=order, project_local=local_projection)
    return FederatedAlgorithm("local_sgda", clients_per_round, replace,
                              _local_sgda_setup("local_sgda", opt, clients_per_round, replace, 0), "minimax")


@ALGORITHMS.register("local_sgda_plus")
@conformance(lr_x=0.05, lr_y=0.05, local_steps=3, clients_per_round=3, batch_size=2, snapshot_every=2)
def local_sgda_plus(
    *,
    lr_x: float,
    lr_y: float,
    local_steps: int = 10,
    clients_per_round: int = 10,
    snapshot_every: int = 10,
    batch_size: int | None = None,
    order: Literal["simultaneous", "alternating"] = "simultaneous",
    replace: bool = False,
) -> FederatedAlgorithm:
    r"""Local SGDA+ (Sharma et al., ICML 2022, for NC-C / NC-1PC): as Local SGDA, but every ascent
    gradient is taken at the snapshot :math:`\tilde x`, refreshed to :math:`x_t` every
    ``snapshot_every`` rounds."""
    _check_common(lr_x, lr_y, local_steps, clients_per_round, batch_size)
    check(snapshot_every >= 1, f"{_P}.snapshot_every must be >= 1, got {snapshot_every}")
    opt = LocalGDA(local_steps, lr_x, lr_y, batch_size, order=order, snapshot=True)
    return FederatedAlgorithm("local_sgda_plus", clients_per_round, replace,
                              _local_sgda_setup("local_sgda_plus", opt, clients_per_round, replace, snapshot_every), "minimax")


@ALGORITHMS.register("sagda")
@conformance(lr_x=0.05, lr_y=0.05, local_steps=3, clients_per_round=3, batch_size=2, lr_x_global=1.5)
def sagda(
    *,
    lr_x: float,
    lr_y: float,
    lr_x_global: float = 1.0,
    lr_y_global: float = 1.0,
    local_steps: int = 10,
    clients_per_round: int = 10,
    batch_size: int | None = None,
    local_projection: bool = True,
    replace: bool = False,
) -> FederatedAlgorithm:
    r"""SAGDA (Yang, Liu, Zhang and Liu, NeurIPS 2022), in the SCAFFOLD-like reading of
    ``papers/fess_gda.md`` §3 (exact form UNVERIFIED). Round 1: the cohort sends
    :math:`c_i = \nabla f_i(x_t, y_t; \xi')`; the server averages :math:`v = \frac1m\sum_i c_i`.
    Round 2: the same cohort runs ``K`` local steps with :math:`\nabla f_i(x, y; \xi) - c_i + v`;
    the server steps :math:`x_{t+1} = x_t + \eta_{x,g}(\bar x - x_t)`,
    :math:`y_{t+1} = P_Y(y_t + \eta_{y,g}(\bar y - y_t))`. Without control variates this is FSGDA
    (Local SGDA with server step sizes). ``local_projection`` as for FESS-GDA."""
    _check_common(lr_x, lr_y, local_steps, clients_per_round, batch_size)
    _check_steps(lr_x_global=lr_x_global, lr_y_global=lr_y_global)
    opt = LocalGDA(local_steps, lr_x, lr_y, batch_size, control=True, project_local=local_projection)
    m = clients_per_round

    def setup(problem, T: int, key: torch.Tensor) -> Steps:
        del key
        problem = _require_minimax(problem, "sagda")
        control, local = grad_task(problem, batch_size), local_gda_task(problem, opt)

        def init(x0: torch.Tensor, y0: torch.Tensor) -> SAGDAState:
            return SAGDAState(x0, y0)

        def step(s: SAGDAState, t: int) -> Program:
            x, y = s
            r = yield Round(control, (x, y), m, replace=replace)
            v_x, v_y = r.mean()
            x_bar, y_bar = (yield Round(local, {"x": x, "y": y, "v_x": v_x, "v_y": v_y}, r.clients,
                                        client_payload=r.values)).mean()
            x = x + lr_x_global * (x_bar - x)
            y = problem.y_set.project(y + lr_y_global * (y_bar - y))
            return SAGDAState(x, y)

        return Steps(init, step)

    return FederatedAlgorithm("sagda", clients_per_round, replace, setup, "minimax")


@ALGORITHMS.register("fed_norm_sgda")
@conformance(lr_x=0.05, lr_y=0.05, local_steps=3, clients_per_round=3, batch_size=2, min_local_steps=1, snapshot_every=3)
def fed_norm_sgda(
    *,
    lr_x: float,
    lr_y: float,
    lr_x_global: float = 1.0,
    lr_y_global: float = 1.0,
    local_steps: int = 10,
    min_local_steps: int | None = None,
    clients_per_round: int = 10,
    snapshot_every: int = 0,
    batch_size: int | None = None,
    local_projection: bool = True,
    replace: bool = False,
) -> FederatedAlgorithm:
    r"""Fed-Norm-SGDA (Sharma, Panda and Joshi, TMLR 2023; module docstring). Client :math:`i` runs
    :math:`\tau_i \sim U\{\text{min\_local\_steps}, \dots, K\}` steps (default: all run :math:`K`)
    with local steps :math:`\eta_x, \eta_y` and returns :math:`h_i`; the server steps with
    :math:`\tau_{\mathrm{eff}}\gamma\eta`, :math:`\gamma` = ``lr_*_global``, uniform weights
    :math:`w_i = 1/m`. ``snapshot_every > 0``: Fed-Norm-SGDA+ (ascent gradients at a snapshot).
    ``local_projection`` as for FESS-GDA."""
    _check_common(lr_x, lr_y, local_steps, clients_per_round, batch_size)
    _check_steps(lr_x_global=lr_x_global, lr_y_global=lr_y_global)
    check(min_local_steps is None or 1 <= min_local_steps <= local_steps,
          f"{_P}.min_local_steps must be in 1..local_steps = {local_steps}, got {min_local_steps}")
    check(snapshot_every >= 0, f"{_P}.snapshot_every must be >= 0, got {snapshot_every}")
    opt = LocalGDA(local_steps, lr_x, lr_y, batch_size, snapshot=snapshot_every > 0, tau_min=min_local_steps,
                   reply="normalized", project_local=local_projection)
    m = clients_per_round

    def setup(problem, T: int, key: torch.Tensor) -> Steps:
        del key
        problem = _require_minimax(problem, "fed_norm_sgda")
        task = local_gda_task(problem, opt)

        def init(x0: torch.Tensor, y0: torch.Tensor) -> FedNormSGDAState:
            return FedNormSGDAState(x0, y0, x0 if snapshot_every else None)

        def step(s: FedNormSGDAState, t: int) -> Program:
            x, y, x_snap = s.x, s.y, _snapshot(s, t, snapshot_every)
            payload = {"x": x, "y": y, "x_snap": x_snap} if snapshot_every else {"x": x, "y": y}
            h_x, h_y, tau = (yield Round(task, payload, m, replace=replace)).mean()
            x = x - tau * lr_x_global * lr_x * h_x
            y = problem.y_set.project(y + tau * lr_y_global * lr_y * h_y)
            return FedNormSGDAState(x, y, x_snap)

        return Steps(init, step)

    return FederatedAlgorithm("fed_norm_sgda", clients_per_round, replace, setup, "minimax")
