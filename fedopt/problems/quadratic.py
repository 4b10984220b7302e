r"""The heterogeneous quadratic bilevel problem with closed-form solution (``papers/fedmbo.md`` §6).

.. math::
    g_i(x, y) = \tfrac12 y^\top H_i y - y^\top (J_i x + c_i), \qquad
    f_i(x, y) = \tfrac12 \|y - d_i\|^2 + \tfrac\lambda2 \|x\|^2 + w \textstyle\sum_j \cos x_j

With the means :math:`H, J, c, d` over clients:

.. math::
    y^*(x) = H^{-1}(Jx + c), \quad
    \nabla\Phi(x) = \lambda x - w \sin x + J^\top H^{-1}(y^*(x) - d), \quad
    x^* = -(A^\top A + \lambda I)^{-1} A^\top (H^{-1}c - d),\ A = H^{-1}J \ (w = 0).

:math:`\Phi(x) = f(x, y^*(x))` with :math:`f = \frac1M \sum_i f_i`, so the metric ``phi`` includes
the heterogeneity constant :math:`\tfrac12 \frac1M\sum_i \|d_i - d\|^2` (it moves no iterate; it
makes ``phi`` the value of the upper objective as defined). With :math:`\lambda = 0` and
:math:`A` of rank below ``x_dim`` (e.g. ``x_dim > y_dim``), the minimisers of :math:`\Phi` form the
affine set :math:`x^\dagger + \ker A` (:math:`x^\dagger` the minimum-norm one) and ``x_error`` is
the squared distance to that set, :math:`\|P(x - x^\dagger)\|^2` with :math:`P = A^+ A`; with a
unique minimiser it is :math:`\|x - x^*\|^2`.

Heterogeneity ``delta``: :math:`H_i = \mathrm{clip}_{[\mu, L]}(H_0 + \delta S_i)` (eigenvalues
clipped, so every :math:`g_i` is :math:`\mu`-strongly convex and :math:`L`-smooth),
:math:`J_i = J_0 + \delta E_i`, and :math:`c_i, d_i` spread by ``delta``; ``delta = 0`` makes all
clients identical. Noise ``sigma``: every oracle call sees independently perturbed data
:math:`\tilde H_i = H_i + s\,\mathrm{sym}(G)`, :math:`\tilde J_i, \tilde c_i, \tilde d_i` and a
linear term :math:`\xi^\top x` in :math:`f_i`, with :math:`s = \sigma/\sqrt{b}` for batch size
:math:`b` (zero for the full batch). Every gradient, Hessian-vector and cross product is then
unbiased with variance :math:`\propto \sigma^2 / b`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from fedopt import random as rnd
from fedopt.errors import check
from fedopt.problems.base import AbstractBilevelProblem, ProblemContext
from fedopt.registry import PROBLEMS

__all__ = ["QuadraticBilevel", "quadratic"]


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def _mv(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Matrix times vector, both with optional leading (cohort) axes that broadcast."""
    return (a @ v.unsqueeze(-1)).squeeze(-1) if v.dim() > 1 else a @ v


class QuadraticBilevel(AbstractBilevelProblem):
    """See the module docstring. Build with :func:`quadratic`."""

    def __init__(
        self,
        *,
        clients: int,
        x_dim: int,
        y_dim: int,
        mu: float,
        L: float,
        delta: float,
        sigma: float,
        lam: float,
        cos_weight: float,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
        oracles: str = "closed_form",
    ) -> None:
        self.num_clients, self.x_dim, self.y_dim = clients, x_dim, y_dim
        self.mu, self.L, self.delta, self.sigma = mu, L, delta, sigma
        self.lam, self.cos_weight = lam, cos_weight
        self.dtype, self.device = dtype, device
        # batch-polymorphic: clients (the batch's H, J, c, d, xi) and x, y, v may carry a leading axis
        self.closed_form = {
            ("inner_loss", "grad_y"): lambda x, y, b: _mv(b["H"], y) - (_mv(b["J"], x) + b["c"]),
            ("inner_loss", "hvp_yy"): lambda x, y, b, v: _mv(b["H"], v),
            ("inner_loss", "jvp_xy"): lambda x, y, b, v: -_mv(b["J"].mT, v),
            ("outer_loss", "grad_y"): lambda x, y, b: y - b["d"],
            ("outer_loss", "grad_x"): lambda x, y, b: lam * x + b["xi"] - cos_weight * torch.sin(x),
        } if oracles == "closed_form" else {}
        self.batched_oracles = bool(self.closed_form)
        rng = np.random.default_rng([seed, 0x9A])
        p, q, m = x_dim, y_dim, clients

        basis, _ = np.linalg.qr(rng.standard_normal((q, q)))
        h0 = basis @ np.diag(np.linspace(mu, L, q)) @ basis.T
        s = rng.standard_normal((m, q, q))
        s = 0.5 * (s + s.transpose(0, 2, 1))
        s /= np.linalg.norm(s, ord=2, axis=(1, 2))[:, None, None]
        evals, evecs = np.linalg.eigh(h0[None] + delta * s)
        h = evecs @ (np.clip(evals, mu, L)[..., None] * evecs.transpose(0, 2, 1))
        j = rng.standard_normal((q, p)) / math.sqrt(p) + delta * rng.standard_normal((m, q, p)) / math.sqrt(p)
        c = rng.standard_normal(q) + delta * rng.standard_normal((m, q))
        d = rng.standard_normal(q) + delta * rng.standard_normal((m, q))

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=dtype, device=device)

        self.data = {"H": t(h), "J": t(j), "c": t(c), "d": t(d)}
        # Means in float64 for the exact metrics.
        f64 = torch.float64
        self.H = torch.as_tensor(h.mean(0), dtype=f64)
        self.J = torch.as_tensor(j.mean(0), dtype=f64)
        self.c = torch.as_tensor(c.mean(0), dtype=f64)
        self.d = torch.as_tensor(d.mean(0), dtype=f64)
        self.H_inv = torch.linalg.inv(self.H)
        # (1/M) sum_i 1/2 ||y - d_i||^2 = 1/2 ||y - d||^2 + phi_const
        self.phi_const = float(0.5 * np.square(d - d.mean(0)).sum(-1).mean()) if d.ndim == 2 else 0.0
        self._minimisers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._client_lmax = float(np.linalg.eigvalsh(h).max())
        self._client_lmin = float(np.linalg.eigvalsh(h).min())

    # ---- oracles (pure, vmap-able) -------------------------------------------------------
    def init(self) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros
        return (zeros(self.x_dim, dtype=self.dtype, device=self.device),
                zeros(self.y_dim, dtype=self.dtype, device=self.device))

    def _noise_scale(self, batch_size: int | None) -> float:
        return 0.0 if (batch_size is None or self.sigma == 0) else self.sigma / math.sqrt(batch_size)

    def inner_batch(self, data, client, key, batch_size):
        h, j, c = data["H"][client], data["J"][client], data["c"][client]
        s = self._noise_scale(batch_size)
        if s:
            q, p, dt = self.y_dim, self.x_dim, self.dtype
            h = h + s * _sym(rnd.normal(rnd.fold_in(key, 0), (q, q), dt))
            j = j + s * rnd.normal(rnd.fold_in(key, 1), (q, p), dt)
            c = c + s * rnd.normal(rnd.fold_in(key, 2), (q,), dt)
        return {"H": h, "J": j, "c": c}

    def outer_batch(self, data, client, key, batch_size):
        d = data["d"][client]
        xi = torch.zeros(d.shape[:-1] + (self.x_dim,), dtype=self.dtype, device=d.device)
        s = self._noise_scale(batch_size)
        if s:
            d = d + s * rnd.normal(rnd.fold_in(key, 3), (self.y_dim,), self.dtype)
            xi = s * rnd.normal(rnd.fold_in(key, 4), (self.x_dim,), self.dtype)
        return {"d": d, "xi": xi}

    def inner_loss(self, x, y, batch):
        return 0.5 * y @ (batch["H"] @ y) - y @ (batch["J"] @ x + batch["c"])

    def outer_loss(self, x, y, batch):
        r = y - batch["d"]
        val = 0.5 * r @ r + 0.5 * self.lam * x @ x + batch["xi"] @ x
        if self.cos_weight:
            val = val + self.cos_weight * torch.cos(x).sum()
        return val

    def lower_smoothness(self) -> float:
        return self._client_lmax

    # ---- closed forms (float64) ----------------------------------------------------------
    def y_star(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`y^*(x) = H^{-1}(Jx + c)`."""
        return self.H_inv @ (self.J @ x.to(torch.float64) + self.c)

    def hypergrad(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla\Phi(x)`."""
        x = x.to(torch.float64)
        g = self.lam * x + self.J.T @ (self.H_inv @ (self.y_star(x) - self.d))
        if self.cos_weight:
            g = g - self.cos_weight * torch.sin(x)
        return g

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\Phi(x) = f(x, y^*(x)) = \tfrac12\|y^*(x) - d\|^2 + \tfrac\lambda2\|x\|^2
        + w\sum_j \cos x_j + \tfrac12\frac1M\sum_i\|d_i - d\|^2`."""
        x = x.to(torch.float64)
        r = self.y_star(x) - self.d
        val = 0.5 * r @ r + 0.5 * self.lam * x @ x + self.phi_const
        if self.cos_weight:
            val = val + self.cos_weight * torch.cos(x).sum()
        return val

    def x_star(self) -> torch.Tensor:
        r"""The minimiser of :math:`\Phi` (only for ``cos_weight = 0``, where :math:`\Phi` is convex);
        with several (``lam = 0``, :math:`A` rank-deficient) the one of minimum norm."""
        return self._minimiser_set()[0]

    def _minimiser_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_dagger, P)``: the set of minimisers is ``x_dagger + ker P`` (``P = I``: unique)."""
        check(self.cos_weight == 0, "x_star has a closed form only for cos_weight = 0")
        if self._minimisers is None:
            a = self.H_inv @ self.J
            b = self.H_inv @ self.c - self.d  # Phi(x) = 1/2 ||A x + b||^2 + lam/2 ||x||^2 + const
            eye = torch.eye(self.x_dim, dtype=torch.float64)
            if self.lam > 0:
                self._minimisers = (-torch.linalg.solve(a.T @ a + self.lam * eye, a.T @ b), eye)
            else:
                u, s, vh = torch.linalg.svd(a, full_matrices=False)
                r = int((s > s.max() * max(a.shape) * torch.finfo(torch.float64).eps).sum())
                ur, sr, vr = u[:, :r], s[:r], vh[:r]
                self._minimisers = (-vr.T @ ((ur.T @ b) / sr), vr.T @ vr if r < self.x_dim else eye)
        return self._minimisers

    def x_error(self, x: torch.Tensor) -> float:
        r"""Squared distance from ``x`` to the set of minimisers of :math:`\Phi` (module docstring)."""
        x_dagger, proj = self._minimiser_set()
        return float((proj @ (x.to(torch.float64) - x_dagger)).square().sum())

    def metrics(self, x, y):
        x64, y64 = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
        out = {
            "hypergrad_norm_sq": float(self.hypergrad(x64).square().sum()),
            "inner_error": float((y64 - self.y_star(x64)).square().sum()),
            "phi": float(self.phi(x64)),
        }
        if self.cos_weight == 0:
            out["x_error"] = self.x_error(x64)
        return out


@PROBLEMS.register("quadratic")
def quadratic(
    context: ProblemContext,
    /,
    *,
    x_dim: int = 10,
    y_dim: int = 10,
    mu: float = 1.0,
    L: float = 4.0,
    delta: float = 0.5,
    sigma: float = 0.0,
    lam: float = 0.1,
    cos_weight: float = 0.0,
    oracles: Literal["closed_form", "autodiff"] = "closed_form",
) -> QuadraticBilevel:
    """The heterogeneous quadratic bilevel problem (module docstring).

    Args:
        x_dim, y_dim: dimensions p and q.
        mu, L: every client's lower Hessian has eigenvalues in [mu, L].
        delta: heterogeneity (0: identical clients).
        sigma: oracle noise standard deviation at batch size 1.
        lam: upper-level ridge lambda (> 0 makes x* unique; with 0 and ``x_dim > y_dim`` the
            minimisers form an affine set and ``x_error`` is the distance to it).
        cos_weight: weight w of the nonconvex term w * sum(cos x).
        oracles: ``"closed_form"`` (hand-derived gradients and products, checked against torch.func
            to 1e-10) or ``"autodiff"`` (torch.func on the losses).
    """
    check(context.data is None, "problem 'quadratic' is synthetic and takes no [data] / [partition] tables")
    check(x_dim >= 1 and y_dim >= 1, f"problem.params x_dim and y_dim must be >= 1, got {x_dim}, {y_dim}")
    check(0 < mu <= L, f"problem.params needs 0 < mu <= L, got mu={mu}, L={L}")
    check(delta >= 0, f"problem.params.delta must be >= 0, got {delta}")
    check(sigma >= 0, f"problem.params.sigma must be >= 0, got {sigma}")
    check(lam >= 0, f"problem.params.lam must be >= 0, got {lam}")
    return QuadraticBilevel(
        clients=context.clients, x_dim=x_dim, y_dim=y_dim, mu=mu, L=L, delta=delta, sigma=sigma,
        lam=lam, cos_weight=cos_weight, seed=context.seed, dtype=context.dtype, device=context.device,
        oracles=oracles,
    )
