r"""D-TFBO and S-TFBO on the noise-free quadratic, transcribed to numpy for runs of 10^8 rounds.

The generic programs of :mod:`fedopt.algorithms.centralized.tfbo` run on any problem and engine,
and pay for it: every round goes through the server, the engine and torch's per-op dispatch, about
0.2-0.4 ms on this machine. That makes the small initial steps of F6 (``s = 1e-3``: about
:math:`10^8` rounds, ``experiments/tfbo_budget.py``) a matter of hours. On the noise-free quadratic
of :mod:`fedopt.problems.quadratic` every oracle is a closed form in the mean data
:math:`H, J, c, d`, so the same iterations fit in a few numpy calls per round.

These are the *same* methods, not approximations: the same update order, accumulators, inner-loop
stopping tests, round counting and measurement points as :func:`~fedopt.algorithms.centralized.tfbo.d_tfbo`
and :func:`~fedopt.algorithms.centralized.tfbo.s_tfbo` run by :func:`fedopt.runner.simulate`
(``stop_when`` included). ``tests/algorithms/test_quadratic_kernels.py`` checks that both give the
same iterates to 1e-10 and the same round counts. They differ only in float rounding (numpy's
``dot`` against torch's ``square().sum()``; ``1/sqrt`` against ``rsqrt``).

The directions, with :math:`\sigma = 0` (so the full-federation average of the clients' closed
forms is the closed form at the mean data):

.. math::
    \nabla_y g = Hy - (Jx + c), \qquad \nabla_v R = Hv - (y - d), \qquad
    \bar\nabla f = \lambda x - w\sin x + J^\top v,

and the measurement is :math:`\|\nabla\Phi(x)\|^2` with
:math:`\nabla\Phi(x) = \lambda x - w\sin x + J^\top H^{-1}(H^{-1}(Jx + c) - d)`, computed as
:meth:`QuadraticBilevel.hypergrad` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedopt.errors import check
from fedopt.problems.quadratic import QuadraticBilevel

__all__ = ["KernelRun", "d_tfbo_quadratic", "s_tfbo_quadratic"]


@dataclass
class KernelRun:
    """What a kernel run returns, in the runner's terms.

    ``records`` are ``(k, comm_rounds, hypergrad_norm_sq)`` at every measurement (``k`` a multiple
    of ``eval_every``, or the last iteration); ``status`` is ``"finished"`` or ``"diverged"``;
    ``x, y, v`` the final iterates; ``capped_inner_loops`` counts D-TFBO inner loops that hit
    ``max_inner`` before their tolerance (always 0 for S-TFBO)."""

    records: list[tuple[int, int, float]] = field(default_factory=list)
    status: str = "finished"
    comm_rounds: int = 0
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    v: np.ndarray | None = None
    capped_inner_loops: int = 0


class _Quadratic:
    """The mean data of a noise-free :class:`QuadraticBilevel` as float64 numpy arrays."""

    def __init__(self, problem: QuadraticBilevel) -> None:
        check(isinstance(problem, QuadraticBilevel), "the numpy kernels run only the 'quadratic' problem")
        check(problem.sigma == 0, f"the numpy kernels need the noise-free quadratic (sigma = 0), got {problem.sigma}")
        self.H, self.J, self.c, self.d = (t.numpy().copy() for t in (problem.H, problem.J, problem.c, problem.d))
        self.Jt = np.ascontiguousarray(self.J.T)
        self.H_inv = problem.H_inv.numpy().copy()
        self.lam, self.w = float(problem.lam), float(problem.cos_weight)
        self.x_dim, self.y_dim = problem.x_dim, problem.y_dim

    def grad_x_f(self, x: np.ndarray) -> np.ndarray:
        r""":math:`\nabla_x f = \lambda x - w \sin x`."""
        return self.lam * x - self.w * np.sin(x) if self.w else self.lam * x

    def hypergrad_norm_sq(self, x: np.ndarray) -> float:
        r""":math:`\|\nabla\Phi(x)\|^2`, in :meth:`QuadraticBilevel.hypergrad`'s order of operations."""
        y_star = self.H_inv @ (self.J @ x + self.c)
        g = self.lam * x + self.Jt @ (self.H_inv @ (y_star - self.d))
        if self.w:
            g = g - self.w * np.sin(x)
        return float(g @ g)


class _Measure:
    """The runner's measurement schedule: every ``eval_every`` iterations and the last one; a
    non-finite state ends the run as diverged, ``tol`` (if given) as soon as a measurement meets it.

    Between measurements the state's finiteness is read off the accumulators (Python floats, so
    the check is free): a non-finite iterate makes the next direction, hence the next accumulator,
    non-finite, so a divergence is caught one iteration later than the runner catches it."""

    def __init__(self, quad: _Quadratic, run: KernelRun, K: int, eval_every: int, tol: float | None) -> None:
        check(K >= 0 and eval_every >= 1, f"need K >= 0 and eval_every >= 1, got {K}, {eval_every}")
        self.quad, self.run, self.K, self.every, self.tol = quad, run, K, eval_every, tol

    def stop(self, k: int, accumulators: float, x: np.ndarray, *state: np.ndarray) -> bool:
        measured = k % self.every == 0 or k == self.K
        if not math.isfinite(accumulators) or (measured and not all(np.isfinite(a).all() for a in (x, *state))):
            self.run.status = "diverged"
            return True
        if measured:
            h = self.quad.hypergrad_norm_sq(x)
            self.run.records.append((k, self.run.comm_rounds, h))
            if not math.isfinite(h):
                self.run.status = "diverged"
                return True
            return self.tol is not None and h <= self.tol
        return False


def _start(problem: QuadraticBilevel, K: int, eval_every: int, tol: float | None):
    """The data, an empty run, its measurement schedule and the starting point x = y = v = 0."""
    q = _Quadratic(problem)
    run = KernelRun()
    return q, run, _Measure(q, run, K, eval_every, tol), (np.zeros(q.x_dim), np.zeros(q.y_dim), np.zeros(q.y_dim))


def s_tfbo_quadratic(
    problem: QuadraticBilevel,
    K: int,
    *,
    alpha0: float = 1.0,
    beta0: float = 1.0,
    gamma0: float = 1.0,
    eps: float = 0.0,
    eval_every: int = 1,
    tol: float | None = None,
) -> KernelRun:
    r"""S-TFBO (``papers/tfbo.md`` §2.4) for ``K`` iterations from :math:`x = y = v = 0`:

    .. math::
        &\beta^2 \mathrel{+}= \|\nabla_y g\|^2,\ \gamma^2 \mathrel{+}= \|\nabla_v R\|^2,\
          \alpha^2 \mathrel{+}= \|\bar\nabla f\|^2,\ \varphi = \max(\beta, \gamma) \\
        &y \leftarrow y - \nabla_y g/\beta, \quad v \leftarrow v - \nabla_v R/\varphi, \quad
          x \leftarrow x - \bar\nabla f/(\alpha\varphi),

    all directions at the current point; one round per iteration. Stops early at the first
    measurement with :math:`\|\nabla\Phi\|^2 \le` ``tol``."""
    q, run, measure, (x, y, v) = _start(problem, K, eval_every, tol)
    H, J, Jt, c, d = q.H, q.J, q.Jt, q.c, q.d
    A, B, G = alpha0**2, beta0**2, gamma0**2
    if not measure.stop(0, A + B + G, x, y, v):
        for k in range(1, K + 1):
            g_y = H @ y - (J @ x + c)
            g_v = H @ v - (y - d)
            g_x = q.grad_x_f(x) + Jt @ v
            A += float(g_x @ g_x)
            B += float(g_y @ g_y)
            G += float(g_v @ g_v)
            alpha, beta, gamma = math.sqrt(A), math.sqrt(B), math.sqrt(G)
            phi = max(beta, gamma)
            y = y - g_y / (beta + eps)
            v = v - g_v / (phi + eps)
            x = x - g_x / (alpha * phi + eps)
            run.comm_rounds += 1
            if measure.stop(k, A + B + G, x, y, v):
                break
    run.x, run.y, run.v = x, y, v
    return run


def _tolerance_loop(H: np.ndarray, u: np.ndarray, b: np.ndarray, acc: float, tolerance: float, max_inner: int,
                    run: KernelRun) -> tuple[np.ndarray, float]:
    r"""A D-TFBO inner loop on :math:`\tfrac12 u^\top H u - b^\top u`: while
    :math:`\|d\|^2 = \|Hu - b\|^2 >` ``tolerance``, :math:`c^2 \mathrel{+}= \|d\|^2,\ u \leftarrow u - d/c`
    (at most ``max_inner`` gradients, each one round). Returns the new ``u`` and :math:`c^2`."""
    for _ in range(max_inner):
        d = H @ u - b
        run.comm_rounds += 1
        sq = float(d @ d)
        if sq <= tolerance:
            return u, acc
        acc += sq
        u = u - d * (1.0 / math.sqrt(acc))
    run.capped_inner_loops += 1
    return u, acc


def d_tfbo_quadratic(
    problem: QuadraticBilevel,
    K: int,
    *,
    alpha0: float = 1.0,
    beta0: float = 1.0,
    gamma0: float = 1.0,
    tolerance: float,
    max_inner: int = 100_000,
    accumulators: Literal["cold", "warm"] = "cold",
    eval_every: int = 1,
    tol: float | None = None,
) -> KernelRun:
    r"""D-TFBO (``papers/tfbo.md`` §2.2) for ``K`` outer iterations from :math:`x = y = v = 0`, with
    the generic program's default inner loops (``inner="tolerance"``, :math:`\varepsilon_y =
    \varepsilon_v =` ``tolerance``, HVP refreshed every step):

    .. math::
        &\text{while } \|\nabla_y g(x_t, y)\|^2 > \varepsilon_y:\ \beta^2 \mathrel{+}= \|\nabla_y g\|^2,\
            y \leftarrow y - \nabla_y g / \beta \\
        &\text{while } \|\nabla_v R(x_t, y, v)\|^2 > \varepsilon_v:\ \gamma^2 \mathrel{+}= \|\nabla_v R\|^2,\
            v \leftarrow v - \nabla_v R / \gamma \\
        &h_t = \bar\nabla f(x_t, y, v), \quad \alpha^2 \mathrel{+}= \|h_t\|^2, \quad x_{t+1} = x_t - h_t/\alpha

    Each gradient evaluation is one round (a stopping test's gradient is the step's). ``tolerance``
    must be given (the generic default 1/K needs K up front; pass it explicitly)."""
    check(tolerance > 0, f"tolerance must be > 0, got {tolerance}")
    check(max_inner >= 1, f"max_inner must be >= 1, got {max_inner}")
    q, run, measure, (x, y, v) = _start(problem, K, eval_every, tol)
    H, J, Jt, c, d = q.H, q.J, q.Jt, q.c, q.d
    A, B, G = alpha0**2, beta0**2, gamma0**2
    if not measure.stop(0, A + B + G, x, y, v):
        for k in range(1, K + 1):
            if accumulators == "cold":
                B, G = beta0**2, gamma0**2
            # (a) lower level, grad_y g = H y - (J x + c); (b) linear system, grad_v R = H v - (y - d)
            y, B = _tolerance_loop(H, y, J @ x + c, B, tolerance, max_inner, run)
            v, G = _tolerance_loop(H, v, y - d, G, tolerance, max_inner, run)
            h = q.grad_x_f(x) + Jt @ v  # (c) upper level
            run.comm_rounds += 1
            A += float(h @ h)
            x = x - h * (1.0 / math.sqrt(A))
            if measure.stop(k, A + B + G, x, y, v):
                break
    run.x, run.y, run.v = x, y, v
    return run
