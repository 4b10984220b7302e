r"""Constraint sets :math:`Y` for the maximization variable of minimax problems, with the
Euclidean projection :math:`P_Y` as a pure, ``vmap``-able tensor function.

=============  =====================================================  ==========================
name           set                                                    projection
=============  =====================================================  ==========================
``none``       :math:`\mathbb R^q`                                    identity
``simplex``    :math:`\Delta_q = \{y \ge 0,\ \sum_j y_j = 1\}`         sort-based, O(q log q)
``box``        :math:`\{lo \le y_j \le hi\}`                          clamp
``ball``       :math:`\{\|y\| \le r\}`                                rescale
=============  =====================================================  ==========================

The simplex projection is the sort-and-threshold algorithm of Held, Wolfe and Crowder (1974) as
written by Duchi, Shalev-Shwartz, Singer and Chandra, ICML 2008, Fig. 1: with :math:`u` sorted
descending, :math:`\rho = \max\{j : u_j - (\sum_{r\le j} u_r - 1)/j > 0\}`,
:math:`\theta = (\sum_{r\le\rho} u_r - 1)/\rho` and :math:`P(y) = \max(y - \theta, 0)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedopt.errors import check

__all__ = ["YSet", "make_yset", "project_simplex"]


def project_simplex(y: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``y`` (``[q]``, or ``[..., q]``) onto the probability simplex."""
    u, _ = torch.sort(y, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    j = torch.arange(1, y.shape[-1] + 1, dtype=y.dtype, device=y.device)
    rho = (u - css / j > 0).sum(-1, keepdim=True)  # >= 1 always (j = 1 holds)
    theta = torch.gather(css, -1, rho - 1) / rho.to(y.dtype)
    return torch.clamp(y - theta, min=0.0)


@dataclass(frozen=True)
class YSet:
    """A closed convex set :math:`Y \\subseteq \\mathbb R^q` (see the module docstring)."""

    kind: str = "none"
    dim: int = 0
    lo: float = -math.inf
    hi: float = math.inf
    radius: float = math.inf

    @property
    def compact(self) -> bool:
        return self.kind == "simplex" or (self.kind == "box" and math.isfinite(self.lo) and math.isfinite(self.hi)) \
            or (self.kind == "ball" and math.isfinite(self.radius))

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """:math:`P_Y(y)`."""
        if self.kind == "simplex":
            return project_simplex(y)
        if self.kind == "box":
            return torch.clamp(y, self.lo, self.hi)
        if self.kind == "ball":
            norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
            return y * torch.clamp(self.radius / torch.clamp(norm, min=1e-300), max=1.0)
        return y

    def contains(self, y: torch.Tensor, tol: float = 1e-9) -> bool:
        """Whether ``y`` lies in :math:`Y` up to ``tol`` (for tests and checks)."""
        return bool(torch.linalg.vector_norm(self.project(y) - y) <= tol)


def make_yset(kind: str, dim: int, *, lo: float | None = None, hi: float | None = None,
              radius: float | None = None, where: str = "problem.params") -> YSet:
    """A validated :class:`YSet`; an empty or inconsistent description is a ConfigError naming it."""
    kinds = ("none", "simplex", "box", "ball")
    check(kind in kinds, f"{where}.y_set = {kind!r} is not a constraint set; allowed: {', '.join(kinds)}")
    check(dim >= 1, f"{where}: Y needs dimension >= 1, got {dim}")
    if kind != "box":
        check(lo is None and hi is None, f"{where}.y_bounds applies only to y_set = 'box', not {kind!r}")
    if kind != "ball":
        check(radius is None, f"{where}.y_radius applies only to y_set = 'ball', not {kind!r}")
    if kind == "box":
        lo = -math.inf if lo is None else lo
        hi = math.inf if hi is None else hi
        check(not (math.isnan(lo) or math.isnan(hi)), f"{where}.y_bounds must be numbers, got [{lo}, {hi}]")
        check(lo <= hi, f"{where}.y_bounds = [{lo}, {hi}] is empty (lo > hi); allowed: lo <= hi")
        return YSet("box", dim, lo=lo, hi=hi)
    if kind == "ball":
        check(radius is not None and radius > 0 and not math.isnan(radius),
              f"{where}.y_radius must be > 0 for y_set = 'ball', got {radius}")
        return YSet("ball", dim, radius=float(radius))  # type: ignore[arg-type]
    return YSet(kind, dim)
