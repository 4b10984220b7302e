r"""Centralized bilevel solvers: tuning-free D-TFBO and S-TFBO, and fixed-step AID and SOBA.

"Centralized" means every oracle is the full-federation average: each round asks *all* clients
(no sampling) and the server averages, so with one client these are plain single-machine methods
and with many they run on the global objective :math:`f = \frac1M\sum f_i`, :math:`g = \frac1M\sum g_i`.
They are also the one-client / one-node references of the federated and decentralized methods:
FedMBO with one client and full participation *is* :func:`aid` with ``warm_start_v=False``,
``v_steps = neumann_terms`` and (tuning-free) ``v_accumulator`` equal to its ``chain_accumulator``;
MA-DSBO with one node *is* :func:`aid` with ``warm_start_v=True`` and its ``theta``
(``tests/algorithms/test_tfbo.py`` checks both to 1e-10, with fixed and with tuning-free steps).

Measured (``experiments/tfbo_budget.py``): from every initial step 1e-3 ... 10 both TFBO methods
reach :math:`\|\nabla\Phi\|^2 \le 10^{-8}` on the noise-free quadratic, where fixed steps of 1 and 10
diverge. Small initial steps cost: accumulators only grow, so D-TFBO's x-step stays below
:math:`s` and S-TFBO's is about :math:`s^2` (the :math:`1/(\alpha\varphi)` design); the iterations
grow as :math:`s^{-1}` and :math:`s^{-2}`, and from :math:`s = 10^{-3}` D-TFBO needs 47,196 outer
iterations (8.2e7 rounds) and S-TFBO 6.9e7 iterations. On F6's fixed budget (``fedopt reproduce F6``)
a fixed-step SOBA with the same small :math:`s` gets further than S-TFBO. The runs from
:math:`s \le 3\cdot 10^{-3}` use the numpy transcriptions of
:mod:`fedopt.algorithms.centralized.quadratic_kernels` (the same iterations, 25-50x faster).

Tuning-free steps (Yang, Ban, Huang, Ma and Ji, "Tuning-Free Bilevel Optimization: New Algorithms
and Convergence Analysis", ICLR 2025, arXiv:2410.05140; ``papers/tfbo.md`` §2.1): for a variable
updated along directions :math:`d_0, d_1, \dots`, accumulate first, then step:

.. math::
    c_{k+1}^2 = c_k^2 + \|d_k\|^2, \qquad u_{k+1} = u_k - d_k / c_{k+1},

with initial accumulators :math:`\alpha_0, \beta_0, \gamma_0` for :math:`x, y, v` (the initial steps
are their inverses). Notation: :math:`R(v) = \tfrac12 v^\top\nabla^2_{yy} g\, v - v^\top\nabla_y f`,
:math:`\nabla_v R = \nabla^2_{yy} g\, v - \nabla_y f`, and
:math:`\bar\nabla f(x, y, v) = \nabla_x f - \nabla^2_{xy} g\, v`.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from fedopt.algorithms.base import FederatedAlgorithm, Program, Round, Steps, conformance
from fedopt.algorithms.decentralized._common import node_tasks
from fedopt.algorithms.parts import COUNT_MAX, moving_average, tuning_free_step
from fedopt.algorithms.parts import step_rule as make_rule
from fedopt.errors import check
from fedopt.problems.base import AbstractBilevelProblem
from fedopt.registry import ALGORITHMS

__all__ = ["AIDState", "SOBAState", "TFBOState", "aid", "d_tfbo", "s_tfbo", "soba"]


class AIDState(NamedTuple):
    r"""AID's server state after outer iteration :math:`k`: ``x``, ``y``, ``v`` (:math:`v`, the
    linear-system iterate), ``r`` (:math:`r`, the momentum direction); ``acc_x``, ``acc_y``,
    ``acc_v``: the tuning-free accumulators :math:`c^2` of :math:`x, y, v` (``None`` under
    ``step_rule="fixed"``)."""

    x: torch.Tensor
    y: torch.Tensor
    v: torch.Tensor
    r: torch.Tensor
    acc_x: torch.Tensor | None = None
    acc_y: torch.Tensor | None = None
    acc_v: torch.Tensor | None = None


class TFBOState(NamedTuple):
    r"""D-TFBO's and S-TFBO's server state after outer iteration :math:`t`: ``x``, ``y``, ``v``;
    ``alpha_sq``, ``beta_sq``, ``gamma_sq``: the accumulators :math:`\alpha^2, \beta^2, \gamma^2`
    (D-TFBO restarts the last two from :math:`\beta_0^2, \gamma_0^2` every iteration under
    ``accumulators="cold"``)."""

    x: torch.Tensor
    y: torch.Tensor
    v: torch.Tensor
    alpha_sq: torch.Tensor
    beta_sq: torch.Tensor
    gamma_sq: torch.Tensor


class SOBAState(NamedTuple):
    """SOBA's server state after iteration :math:`t`: ``x``, ``y`` and the linear-system iterate ``v``."""

    x: torch.Tensor
    y: torch.Tensor
    v: torch.Tensor


def _sq(d: torch.Tensor) -> torch.Tensor:
    return d.square().sum()


def _positive(**values: float) -> None:
    for name, val in values.items():
        check(val > 0, f"algorithm.params.{name} must be > 0, got {val}")
        check(math.isfinite(val), f"algorithm.params.{name} must be a finite number, got {val}")


def _batch_size(batch_size: int | None) -> None:
    check(batch_size is None or 1 <= batch_size <= COUNT_MAX,
          f"algorithm.params.batch_size must be in 1..{COUNT_MAX}, got {batch_size}")


def _everyone(problem: AbstractBilevelProblem):
    """A round on all clients (the full-federation average)."""
    M = problem.num_clients
    return lambda task, payload: Round(task, payload, M)


@ALGORITHMS.register("aid")
@conformance(outer_lr=0.3, inner_lr=0.2, v_lr=0.2, inner_steps=2, v_steps=2, batch_size=2)
def aid(
    *,
    outer_lr: float,
    inner_lr: float,
    v_lr: float,
    inner_steps: int = 5,
    v_steps: int = 5,
    warm_start_v: bool = True,
    theta: float = 1.0,
    step_rule: Literal["fixed", "tuning_free"] = "fixed",
    v_accumulator: Literal["warm", "cold"] = "warm",
    batch_size: int | None = None,
    hvp_mode: Literal["fwd", "rev"] = "rev",
) -> FederatedAlgorithm:
    r"""AID: approximate implicit differentiation with inner gradient descent (Ji, Yang and Liang,
    ICML 2021; Ghadimi and Wang, 2018), double loop:

    .. math::
        &y \leftarrow y - \beta\nabla_y g(x, y) \quad (T\ \text{times, warm-started}) \\
        &v \leftarrow v - \gamma\nabla_v R(x, y, v) \quad (N\ \text{times; from } v = 0
            \text{ unless } \texttt{warm\_start\_v}) \\
        &r \leftarrow (1 - \theta) r + \theta\,\bar\nabla f(x, y, v), \qquad x \leftarrow x - \alpha r

    From :math:`v = 0`, :math:`N` steps of gradient descent on :math:`R` are exactly the Neumann
    series :math:`\gamma\sum_{q<N}(I - \gamma H)^q\nabla_y f` (the first step needs no HVP).
    ``step_rule="tuning_free"`` replaces :math:`\alpha, \beta, \gamma` by inverse cumulative norms
    started at :math:`1/\text{outer\_lr}, 1/\text{inner\_lr}, 1/\text{v\_lr}`, kept across outer
    iterations except the :math:`v` accumulator under ``v_accumulator="cold"`` (restarted every outer
    iteration; FedMBO's default chain). With fixed steps this is the hand-tuned baseline of the TFBO
    paper's comparisons.
    """
    _positive(outer_lr=outer_lr, inner_lr=inner_lr, v_lr=v_lr)
    check(inner_steps >= 0, f"algorithm.params.inner_steps must be >= 0, got {inner_steps}")
    check(v_steps >= 1, f"algorithm.params.v_steps must be >= 1, got {v_steps}")
    check(0 < theta <= 1, f"algorithm.params.theta must be in (0, 1], got {theta}")
    _batch_size(batch_size)
    rule_x, rule_y, rule_v = (make_rule(step_rule, lr) for lr in (outer_lr, inner_lr, v_lr))

    def setup(problem: AbstractBilevelProblem, K: int, key: torch.Tensor) -> Steps:
        del K, key
        tasks = node_tasks(problem, batch_size=batch_size, hvp_mode=hvp_mode)
        everyone = _everyone(problem)

        def init(x0: torch.Tensor, y0: torch.Tensor) -> AIDState:
            return AIDState(x0, y0, torch.zeros_like(y0), torch.zeros_like(x0),
                            rule_x.init(x0), rule_y.init(x0), rule_v.init(x0))

        def step(s: AIDState, k: int) -> Program:
            x, y, acc_y = s.x, s.y, s.acc_y
            for _ in range(inner_steps):
                d = (yield everyone(tasks["lower_grad"], (x, y))).mean()
                y, acc_y = rule_y.update(y, d, acc_y)
            v = s.v if warm_start_v else torch.zeros_like(y)
            acc_v = rule_v.init(x) if v_accumulator == "cold" else s.acc_v
            for t in range(v_steps):
                if t == 0 and not warm_start_v:  # grad R at v = 0 is -grad_y f: no HVP needed
                    d = -(yield everyone(tasks["upper_grad_y"], (x, y))).mean()
                else:
                    d = (yield everyone(tasks["z_grad"], (x, y, v))).mean()
                v, acc_v = rule_v.update(v, d, acc_v)
            u = (yield everyone(tasks["hypergrad"], (x, y, v))).mean()
            r = moving_average(s.r, u, theta)
            x, acc_x = rule_x.update(x, r, s.acc_x)
            return AIDState(x, y, v, r, acc_x, acc_y, acc_v)

        return Steps(init, step)

    return FederatedAlgorithm("aid", None, False, setup)


@ALGORITHMS.register("d_tfbo")
@conformance(alpha0=3.0, beta0=3.0, gamma0=3.0, inner="fixed", inner_steps=2, batch_size=2)
def d_tfbo(
    *,
    alpha0: float = 1.0,
    beta0: float = 1.0,
    gamma0: float = 1.0,
    inner: Literal["tolerance", "fixed"] = "tolerance",
    tolerance: float = 0.0,
    inner_steps: int = 10,
    max_inner: int = 100_000,
    accumulators: Literal["cold", "warm"] = "cold",
    batch_size: int | None = None,
    hvp_mode: Literal["fwd", "rev"] = "rev",
) -> FederatedAlgorithm:
    r"""D-TFBO, the double-loop tuning-free method (``papers/tfbo.md`` §2.2; paper form reconstructed
    from AdaRHD's Algorithm 1, UNVERIFIED in detail). Outer iteration :math:`t`:

    .. math::
        &\text{while } \|\nabla_y g(x_t, y)\|^2 > \varepsilon_y:\ \beta^2 \mathrel{+}= \|\nabla_y g\|^2,\
            y \leftarrow y - \nabla_y g / \beta \\
        &\text{while } \|\nabla_v R(x_t, y, v)\|^2 > \varepsilon_v:\ \gamma^2 \mathrel{+}= \|\nabla_v R\|^2,\
            v \leftarrow v - \nabla_v R / \gamma \\
        &h_t = \bar\nabla f(x_t, y, v), \quad \alpha^2 \mathrel{+}= \|h_t\|^2, \quad x_{t+1} = x_t - h_t/\alpha

    :math:`y` and :math:`v` are warm-started across outer iterations; the HVP is refreshed at every
    :math:`v`-step (the official code's JAX path; its numpy path reuses a stale HVP).

    Options (default first): ``inner="tolerance"`` with :math:`\varepsilon_y = \varepsilon_v =`
    ``tolerance`` (0 means :math:`1/K`, the reconstruction's choice, which needs :math:`K` up front)
    or ``"fixed"`` (``inner_steps`` each, the official code); ``accumulators="cold"`` (:math:`\beta,
    \gamma` restart from :math:`\beta_0, \gamma_0` every outer iteration, the paper's reading) or
    ``"warm"`` (never reset, the code). ``max_inner`` caps a tolerance loop (a safeguard, not part of
    the method). A tolerance check costs one round; the gradient it evaluates is the step's.
    """
    _positive(alpha0=alpha0, beta0=beta0, gamma0=gamma0)
    check(tolerance >= 0 and math.isfinite(tolerance),
          f"algorithm.params.tolerance must be a finite number >= 0, got {tolerance}")
    check(inner_steps >= 1 and max_inner >= 1, "algorithm.params.inner_steps and max_inner must be >= 1")
    _batch_size(batch_size)

    tuning_free = tuning_free_step(1.0).update  # the rule; its accumulators start at alpha0^2, ...

    def setup(problem: AbstractBilevelProblem, K: int, key: torch.Tensor) -> Steps:
        del key
        tasks = node_tasks(problem, batch_size=batch_size, hvp_mode=hvp_mode)
        everyone = _everyone(problem)
        eps = tolerance or 1.0 / max(K, 1)
        steps = max_inner if inner == "tolerance" else inner_steps

        def sq(c: float, like: torch.Tensor) -> torch.Tensor:
            return torch.tensor(c**2, dtype=like.dtype, device=like.device)

        def init(x0: torch.Tensor, y0: torch.Tensor) -> TFBOState:
            return TFBOState(x0, y0, torch.zeros_like(y0), sq(alpha0, x0), sq(beta0, x0), sq(gamma0, x0))

        def step(s: TFBOState, k: int) -> Program:
            x, y, v = s.x, s.y, s.v
            beta_sq, gamma_sq = (sq(beta0, x), sq(gamma0, x)) if accumulators == "cold" else (s.beta_sq, s.gamma_sq)
            for _ in range(steps):  # (a) lower level
                d = (yield everyone(tasks["lower_grad"], (x, y))).mean()
                if inner == "tolerance" and _sq(d) <= eps:
                    break
                y, beta_sq = tuning_free(y, d, beta_sq)
            for _ in range(steps):  # (b) linear system, HVP refreshed every step
                d = (yield everyone(tasks["z_grad"], (x, y, v))).mean()
                if inner == "tolerance" and _sq(d) <= eps:
                    break
                v, gamma_sq = tuning_free(v, d, gamma_sq)
            h = (yield everyone(tasks["hypergrad"], (x, y, v))).mean()  # (c) upper level
            x, alpha_sq = tuning_free(x, h, s.alpha_sq)
            return TFBOState(x, y, v, alpha_sq, beta_sq, gamma_sq)

        return Steps(init, step)

    return FederatedAlgorithm("d_tfbo", None, False, setup)


@ALGORITHMS.register("s_tfbo")
@conformance(alpha0=3.0, beta0=3.0, gamma0=3.0, batch_size=2)
def s_tfbo(
    *,
    alpha0: float = 1.0,
    beta0: float = 1.0,
    gamma0: float = 1.0,
    eps: float = 0.0,
    batch_size: int | None = None,
) -> FederatedAlgorithm:
    r"""S-TFBO, the single-loop tuning-free method (``papers/tfbo.md`` §2.4, exact from the official
    code). All three directions at the current :math:`(x_t, y_t, v_t)`:

    .. math::
        &\beta^2 \mathrel{+}= \|\nabla_y g\|^2,\ \gamma^2 \mathrel{+}= \|\nabla_v R\|^2,\
          \alpha^2 \mathrel{+}= \|\bar\nabla f\|^2,\ \varphi = \max(\beta, \gamma) \\
        &y \leftarrow y - \nabla_y g/\beta, \quad v \leftarrow v - \nabla_v R/\varphi, \quad
          x \leftarrow x - \bar\nabla f/(\alpha\varphi)

    The product :math:`\alpha\varphi` puts :math:`x` on a slower time scale than :math:`y, v`. ``eps``
    is added to the denominators (the code's JAX path uses 1e-8; default 0). One round per iteration.
    """
    _positive(alpha0=alpha0, beta0=beta0, gamma0=gamma0)
    check(eps >= 0 and math.isfinite(eps), f"algorithm.params.eps must be a finite number >= 0, got {eps}")
    _batch_size(batch_size)

    def setup(problem: AbstractBilevelProblem, K: int, key: torch.Tensor) -> Steps:
        del K, key
        joint = node_tasks(problem, batch_size=batch_size)["joint"]
        everyone = _everyone(problem)

        def init(x0: torch.Tensor, y0: torch.Tensor) -> TFBOState:
            alpha_sq, beta_sq, gamma_sq = (torch.tensor(c**2, dtype=x0.dtype, device=x0.device)
                                           for c in (alpha0, beta0, gamma0))
            return TFBOState(x0, y0, torch.zeros_like(y0), alpha_sq, beta_sq, gamma_sq)

        def step(s: TFBOState, k: int) -> Program:
            x, y, v = s.x, s.y, s.v
            g_y, g_v, g_x = (yield everyone(joint, (x, y, v))).mean()
            alpha_sq, beta_sq, gamma_sq = s.alpha_sq + _sq(g_x), s.beta_sq + _sq(g_y), s.gamma_sq + _sq(g_v)
            alpha, beta, gamma = alpha_sq.sqrt(), beta_sq.sqrt(), gamma_sq.sqrt()
            phi = torch.maximum(beta, gamma)
            y = y - g_y / (beta + eps)
            v = v - g_v / (phi + eps)
            x = x - g_x / (alpha * phi + eps)
            return TFBOState(x, y, v, alpha_sq, beta_sq, gamma_sq)

        return Steps(init, step)

    return FederatedAlgorithm("s_tfbo", None, False, setup)


@ALGORITHMS.register("soba")
@conformance(outer_lr=0.3, inner_lr=0.2, v_lr=0.2, batch_size=2)
def soba(
    *,
    outer_lr: float,
    inner_lr: float,
    v_lr: float,
    batch_size: int | None = None,
) -> FederatedAlgorithm:
    r"""SOBA with fixed steps (Dagréou, Ablin, Vaiter and Moreau, NeurIPS 2022): S-TFBO's loop with
    hand-tuned :math:`\alpha, \beta, \gamma`: :math:`y \mathrel{-}= \beta\nabla_y g`,
    :math:`v \mathrel{-}= \gamma\nabla_v R`, :math:`x \mathrel{-}= \alpha\bar\nabla f`, all at the
    current point."""
    _positive(outer_lr=outer_lr, inner_lr=inner_lr, v_lr=v_lr)
    _batch_size(batch_size)

    def setup(problem: AbstractBilevelProblem, K: int, key: torch.Tensor) -> Steps:
        del K, key
        joint = node_tasks(problem, batch_size=batch_size)["joint"]
        everyone = _everyone(problem)

        def init(x0: torch.Tensor, y0: torch.Tensor) -> SOBAState:
            return SOBAState(x0, y0, torch.zeros_like(y0))

        def step(s: SOBAState, k: int) -> Program:
            g_y, g_v, g_x = (yield everyone(joint, (s.x, s.y, s.v))).mean()
            return SOBAState(s.x - outer_lr * g_x, s.y - inner_lr * g_y, s.v - v_lr * g_v)

        return Steps(init, step)

    return FederatedAlgorithm("soba", None, False, setup)
