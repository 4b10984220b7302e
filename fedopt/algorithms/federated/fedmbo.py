r"""FedMBO: federated minibatch bilevel optimisation with partial participation.

Huang, Zhang and Ji, "Achieving Linear Speedup in Non-IID Federated Bilevel Learning", ICML 2023
(arXiv:2302.05412). The paper's algorithm boxes could not be read; this follows the documented
reconstruction in ``papers/fedmbo.md`` §2.2 (Algorithms 1 and 2), and every ambiguous choice is an
option whose default is named below.

Algorithm 1 (outer loop), one line of code per line of pseudo-code:

.. math::
    &y_k^{t+1} = y_k^t - \beta \tfrac1n \textstyle\sum_{i \in C_{k,t}} \nabla_y g_i(x_k, y_k^t; \zeta_i),
        \quad t = 0..T-1 \quad\text{(one round each, fresh } C_{k,t}\text{)} \\
    &h_k = \mathrm{PHE}(x_k, y_{k+1}), \qquad x_{k+1} = x_k - \alpha h_k

Algorithm 2 (PHE, the federated hypergradient estimator), single shared chain:

.. math::
    &v_0 = \tfrac1n\textstyle\sum_{C_0} \nabla_y f_i,\ \ g_x = \tfrac1n\sum_{C_0} \nabla_x f_i \\
    &v_q = \tfrac1n\textstyle\sum_{i\in C_q} (I - \eta \nabla^2_{yy} g_i) v_{q-1}
        \quad\text{(one round each, fresh } C_q\text{)} \\
    &p = \eta \textstyle\sum_{q=0}^{Q-1} v_q \ \ \text{(full)} \quad\text{or}\quad
      p = \eta Q\, v_{Q'},\ Q' \sim U\{0..Q-1\} \ \ \text{(random)} \\
    &h = g_x - \tfrac1n\textstyle\sum_{C_{Q'+1}} \nabla^2_{xy} g_i\, p

========================  =====================  ============================================
symbol                    parameter              meaning
========================  =====================  ============================================
:math:`\alpha`            ``outer_lr``           upper step (times :math:`\sqrt{n/K}` if
                                                 ``outer_lr_scaling="theory"``)
:math:`\beta`             ``inner_lr``           lower-level SGD step
:math:`\eta`              ``neumann_lr``         Neumann scaling, :math:`\le 1/L_g`
:math:`Q`                 ``neumann_terms``      Neumann truncation length
:math:`T`                 ``inner_steps``        lower-level rounds per outer iteration
:math:`n`                 ``clients_per_round``  clients sampled in every round
:math:`b`                 ``batch_size``         per-client minibatch (``None``: full local data)
========================  =====================  ============================================

Options for the unverified details (default first):

* ``truncation="full"`` (deterministic sum, exact bias :math:`H^{-1}(I-\eta H)^Q\nabla_y f`, lower
  variance, :math:`Q-1` HVP rounds) or ``"random"`` (one draw :math:`Q'`, unbiased for the
  truncated series, needs the factor :math:`Q`, :math:`Q'` rounds).
* ``chains="single"`` (one global chain, the clients of a round compute in parallel) or
  ``"parallel"`` (:math:`n` independent single-client chains, chain :math:`j` started from round-0
  client :math:`j`'s :math:`\nabla_y f_j`, with its own :math:`Q'_j` under random truncation;
  the chains' :math:`p_j` are averaged before the cross round).
* ``replace=False``: clients sampled without replacement within a round.
* A fresh client sample for every lower-level step and every Neumann term (not optional: reusing
  one cohort destroys the :math:`1/n` variance reduction, ``papers/fedmbo.md`` §6).
* ``warm_start=True``: :math:`y_{k+1}^0 = y_k^T`; ``False`` restarts the lower level from 0.
* :math:`\nabla_x f_i` is collected in round 0 of PHE together with :math:`\nabla_y f_i`.
* ``step_rule="fixed"`` or ``"tuning_free"``: the server replaces :math:`\beta`, :math:`\eta` and
  :math:`\alpha` by inverse cumulative norms (TFBO's rule, Yang et al., ICLR 2025) started at
  :math:`1/\beta, 1/\eta, 1/\alpha`: :math:`c^2 \mathrel{+}= \|d\|^2,\ u \mathrel{-}= d/c` for the
  averaged lower gradient, for the Neumann chain written as gradient descent on
  :math:`R(p) = \tfrac12 p^\top H p - p^\top\nabla_y f` from :math:`p = 0` (the same :math:`Q - 1`
  HVP rounds; with a fixed step it *is* the truncated Neumann sum), and for the hypergradient.
  ``chain_accumulator="cold"`` (default) restarts the chain's accumulator at :math:`1/\eta^2` every
  outer iteration, as the chain restarts at :math:`p = 0` (D-TFBO's cold inner accumulators);
  ``"warm"`` keeps summing across iterations, which shrinks the chain's step round after round and
  so *grows* the truncation bias :math:`(I - \eta_k H)^Q` (measured on the 8-client test quadratic
  after 400 rounds from initial steps 10: :math:`\|\nabla\Phi\|^2` = 1e-2 warm, 3e-6 cold).
  This combination is an **extension, not a result from either paper**; it needs single chains and
  full truncation.

Rounds per outer iteration: :math:`T + 1 + (Q - 1) + 1` (full) or :math:`T + 2 + Q'` (random).

Example:
    >>> import torch, fedopt
    >>> cfg = {"problem": {"name": "quadratic", "params": {"x_dim": 4, "y_dim": 4}},
    ...        "algorithm": {"name": "fedmbo", "params": {"outer_lr": 0.5, "inner_lr": 0.25,
    ...            "neumann_lr": 0.25, "neumann_terms": 40, "inner_steps": 5,
    ...            "clients_per_round": 4}},
    ...        "clients": 4, "rounds": 150, "eval_every": 150}
    >>> df = fedopt.run(cfg)  # full participation, exact oracles: the bias (1 - 0.25)^40 is negligible
    >>> float(df.query("metric == 'hypergrad_norm_sq'").value.iloc[-1]) < 1e-8
    True
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from fedopt import random as rnd
from fedopt.algorithms.base import FederatedAlgorithm, Program, Round, Steps, conformance
from fedopt.algorithms.parts import COUNT_MAX, fixed_step, tuning_free_step
from fedopt.algorithms.parts import step_rule as make_rule
from fedopt.algorithms.federated._tasks import BilevelTasks, bilevel_tasks
from fedopt.errors import check
from fedopt.problems.base import AbstractBilevelProblem
from fedopt.registry import ALGORITHMS

__all__ = ["FedMBOState", "fedmbo", "neumann_vector", "phe"]


def neumann_vector(
    tasks: BilevelTasks,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n: int,
    Q: int,
    eta: float,
    truncation: str,
    chains: str,
    replace: bool,
    key: torch.Tensor,
) -> Program:
    r"""PHE up to its last round: ``p, g_x = yield from neumann_vector(...)`` gives the Neumann
    approximation :math:`p \approx [\nabla^2_{yy} g]^{-1}\nabla_y f` and the direct gradient
    :math:`g_x = \frac1n\sum_{C_0}\nabla_x f_i`."""
    r0 = yield Round(tasks.outer_grads, (x, y), n, replace=replace)
    grads_y, grads_x = r0.values
    g_x = grads_x.mean(0)

    if chains == "single":
        v = grads_y.mean(0)  # v_0
        if truncation == "full":
            s = v
            for _ in range(1, Q):
                v = (yield Round(tasks.neumann_step, (x, y, v), n, replace=replace)).mean()
                s = s + v
            p = eta * s
        else:
            q_prime = int(rnd.randint(key, Q, ()))
            for _ in range(q_prime):
                v = (yield Round(tasks.neumann_step, (x, y, v), n, replace=replace)).mean()
            p = eta * Q * v
    else:  # n independent single-client chains, chain j seeded by round-0 client j
        V = grads_y  # [n, q]
        if truncation == "full":
            S = V
            for _ in range(1, Q):
                V = (yield Round(tasks.neumann_step, (x, y), n, client_payload=V, replace=replace)).values
                S = S + V
            p = eta * S.mean(0)
        else:
            q_prime = rnd.randint(key, Q, (n,))  # Q'_j per chain
            P = eta * Q * V * (q_prime == 0).unsqueeze(-1)
            for q in range(1, int(q_prime.max()) + 1):
                active = torch.nonzero(q_prime >= q).squeeze(-1)
                V_act = (yield Round(tasks.neumann_step, (x, y), active.numel(),
                                     client_payload=V[active], replace=replace)).values
                V = V.index_copy(0, active, V_act)
                done = q_prime == q
                P = torch.where(done.unsqueeze(-1), eta * Q * V, P)
            p = P.mean(0)
    return p, g_x


def phe(tasks: BilevelTasks, x: torch.Tensor, y: torch.Tensor, *, n: int, replace: bool,
        **neumann_options) -> Program:
    """Algorithm 2 (PHE) as a sub-program: ``h = yield from phe(...)``."""
    p, g_x = yield from neumann_vector(tasks, x, y, n=n, replace=replace, **neumann_options)
    w = (yield Round(tasks.cross, (x, y, p), n, replace=replace)).mean()
    return g_x - w


def _phe_tuning_free(tasks: BilevelTasks, x: torch.Tensor, y: torch.Tensor, *, n: int, Q: int, replace: bool,
                     acc_p: torch.Tensor) -> Program:
    """PHE's chain as adaptive gradient descent on R(p) from p = 0 (see ``step_rule``), with the
    chain's accumulator ``acc_p``: ``h, acc_p = yield from _phe_tuning_free(...)``."""
    chain = tuning_free_step(1.0)  # its accumulator is acc_p, started by the caller
    r0 = yield Round(tasks.outer_grads, (x, y), n, replace=replace)
    grads_y, grads_x = r0.values
    b, g_x = grads_y.mean(0), grads_x.mean(0)
    p, acc_p = chain.update(torch.zeros_like(b), -b, acc_p)  # grad R(0) = -b
    for _ in range(1, Q):
        d = (yield Round(tasks.hvp, (x, y, p), n, replace=replace)).mean() - b
        p, acc_p = chain.update(p, d, acc_p)
    w = (yield Round(tasks.cross, (x, y, p), n, replace=replace)).mean()
    return g_x - w, acc_p


class FedMBOState(NamedTuple):
    """FedMBO's server state after outer iteration :math:`k`.

    ``acc_x``, ``acc_y``, ``acc_p``: the tuning-free accumulators :math:`c^2` of :math:`x`, of the
    lower level and of the Neumann chain (``None`` under ``step_rule="fixed"``)."""

    x: torch.Tensor
    y: torch.Tensor
    acc_x: torch.Tensor | None = None
    acc_y: torch.Tensor | None = None
    acc_p: torch.Tensor | None = None


@ALGORITHMS.register("fedmbo")
@conformance(outer_lr=0.5, inner_lr=0.25, neumann_lr=0.25, neumann_terms=3, inner_steps=2, clients_per_round=4, batch_size=2)
def fedmbo(
    *,
    outer_lr: float,
    inner_lr: float,
    neumann_lr: float,
    neumann_terms: int = 10,
    inner_steps: int = 5,
    clients_per_round: int = 10,
    batch_size: int | None = None,
    truncation: Literal["full", "random"] = "full",
    chains: Literal["single", "parallel"] = "single",
    replace: bool = False,
    warm_start: bool = True,
    outer_lr_scaling: Literal["constant", "theory"] = "constant",
    hvp_mode: Literal["fwd", "rev"] = "rev",
    step_rule: Literal["fixed", "tuning_free"] = "fixed",
    chain_accumulator: Literal["cold", "warm"] = "cold",
) -> FederatedAlgorithm:
    """FedMBO (module docstring). Returns the algorithm; all arguments are validated here."""
    for name, val in (("outer_lr", outer_lr), ("inner_lr", inner_lr), ("neumann_lr", neumann_lr)):
        check(val > 0, f"algorithm.params.{name} must be > 0, got {val}")
        check(math.isfinite(val), f"algorithm.params.{name} must be a finite number, got {val}")
    check(neumann_terms >= 1, f"algorithm.params.neumann_terms must be >= 1, got {neumann_terms}")
    check(inner_steps >= 0, f"algorithm.params.inner_steps must be >= 0, got {inner_steps}")
    check(clients_per_round >= 1, f"algorithm.params.clients_per_round must be >= 1, got {clients_per_round}")
    check(batch_size is None or 1 <= batch_size <= COUNT_MAX,
          f"algorithm.params.batch_size must be in 1..{COUNT_MAX}, got {batch_size}")
    alpha, beta, eta, Q, T, n = outer_lr, inner_lr, neumann_lr, neumann_terms, inner_steps, clients_per_round
    tf = step_rule == "tuning_free"
    if tf:
        check(chains == "single" and truncation == "full" and outer_lr_scaling == "constant",
              "algorithm.params.step_rule = 'tuning_free' needs chains = 'single', truncation = 'full' and "
              "outer_lr_scaling = 'constant'")

    rule_x, rule_y, rule_p = (make_rule(step_rule, lr) for lr in (alpha, beta, eta))

    def setup(problem: AbstractBilevelProblem, K: int, key: torch.Tensor) -> Steps:
        tasks = bilevel_tasks(problem, batch_size=batch_size, neumann_lr=eta, hvp_mode=hvp_mode)
        if outer_lr_scaling == "theory":  # alpha sqrt(n/K): the outer step as a fixed rule
            rule_x_k = fixed_step(alpha * math.sqrt(n / K))
        else:
            rule_x_k = rule_x

        def init(x0: torch.Tensor, y0: torch.Tensor) -> FedMBOState:
            return FedMBOState(x0, y0, rule_x.init(x0), rule_y.init(x0), rule_p.init(x0))

        def step(s: FedMBOState, k: int) -> Program:
            x, y, acc_y = s.x, (s.y if warm_start else torch.zeros_like(s.y)), s.acc_y
            for _ in range(T):  # lower level: federated minibatch SGD, fresh clients each round
                d = (yield Round(tasks.grad_y_inner, (x, y), n, replace=replace)).mean()
                y, acc_y = rule_y.update(y, d, acc_y)
            acc_p = s.acc_p
            if tf:
                h, acc_p = yield from _phe_tuning_free(
                    tasks, x, y, n=n, Q=Q, replace=replace,
                    acc_p=rule_p.init(x) if chain_accumulator == "cold" else acc_p)
            else:
                h = yield from phe(tasks, x, y, n=n, Q=Q, eta=eta, truncation=truncation,
                                   chains=chains, replace=replace, key=rnd.fold_in(key, k))
            x, acc_x = rule_x_k.update(x, h, s.acc_x)
            return FedMBOState(x, y, acc_x, acc_y, acc_p)

        return Steps(init, step)

    return FederatedAlgorithm("fedmbo", clients_per_round, replace, setup)
