r"""Solvers for :math:`A u = b` given only ``matvec(u) = A u`` (a symmetric positive definite
:math:`A`, in practice :math:`\nabla^2_{yy} g`).

Each constructor returns ``solve(matvec, b)`` (the jaxopt / torchopt convention). Both run a fixed
number of iterations with no data-dependent branches, so ``solve`` is ``vmap``-able over clients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedopt.errors import check

__all__ = ["Solve", "cg", "neumann"]

MatVec = Callable[[torch.Tensor], torch.Tensor]
Solve = Callable[[MatVec, torch.Tensor], torch.Tensor]


def neumann(num_terms: int, step: float) -> Solve:
    r"""Truncated Neumann series :math:`u_Q = \eta \sum_{q=0}^{Q-1} (I - \eta A)^q b`.

    With :math:`0 < \eta \le 1/\lambda_{\max}(A)` it equals
    :math:`A^{-1}(I - (I - \eta A)^Q) b`, i.e. :math:`A^{-1}b` up to the exact truncation bias
    :math:`A^{-1}(I - \eta A)^Q b`.
    """
    check(num_terms >= 1, f"neumann num_terms must be >= 1, got {num_terms}")
    check(step > 0, f"neumann step must be > 0, got {step}")

    def solve(matvec: MatVec, b: torch.Tensor) -> torch.Tensor:
        term, total = b, b
        for _ in range(num_terms - 1):
            term = term - step * matvec(term)
            total = total + term
        return step * total

    return solve


def cg(maxiter: int, ridge: float = 0.0) -> Solve:
    r"""Conjugate gradient on :math:`(A + \mathrm{ridge}\, I) u = b`, ``maxiter`` iterations from 0.

    Exact after :math:`\dim b` iterations in exact arithmetic. Steps whose residual is already zero
    are no-ops (guarded divisions), which keeps the solver branch-free for ``vmap``.
    """
    check(maxiter >= 1, f"cg maxiter must be >= 1, got {maxiter}")
    check(ridge >= 0, f"cg ridge must be >= 0, got {ridge}")

    def solve(matvec: MatVec, b: torch.Tensor) -> torch.Tensor:
        def op(u: torch.Tensor) -> torch.Tensor:
            return matvec(u) + ridge * u if ridge else matvec(u)

        u = torch.zeros_like(b)
        r = b
        d = r
        rr = torch.dot(r, r)
        tiny = torch.finfo(b.dtype).tiny
        for _ in range(maxiter):
            ad = op(d)
            dad = torch.dot(d, ad)
            alpha = torch.where(dad > tiny, rr / torch.clamp(dad, min=tiny), torch.zeros_like(rr))
            u = u + alpha * d
            r = r - alpha * ad
            rr_new = torch.dot(r, r)
            beta = torch.where(rr > tiny, rr_new / torch.clamp(rr, min=tiny), torch.zeros_like(rr))
            d = r + beta * d
            rr = rr_new
        return u

    return solve
