r"""Synthetic federated minimax problems with exact progress measures (``papers/fess_gda.md`` §6).

==================  ========  ==========================================================  ==========================
problem             class     :math:`f_i(x, y)`                                           exact measures
==================  ========  ==========================================================  ==========================
``pl_pl``           PL-PL     :math:`-\tfrac12\|y\|^2 - b_i^\top y + y^\top A_i x          saddle distance, duality
                              + \tfrac\lambda2\|x\|^2`                                    gap, :math:`\|\nabla\Phi\|`
``nc_sc``           NC-SC     ``pl_pl`` :math:`+\ w\sum_j\cos x_j`                         :math:`\|\nabla\Phi\|`
``nc_pl``           NC-PL     :math:`-\tfrac12\|My\|^2 + (My)^\top(A_i x - b_i)            :math:`\|\nabla\Phi\|`
                              + \tfrac\lambda2\|x\|^2 + w\sum_j\cos x_j`
``simplex_minimax`` form (2)  :math:`\sum_j y_j\,\tfrac12\|x - a_{ij}\|^2`,                :math:`\Phi - \Phi^*`,
                              :math:`y\in\Delta_J`                                         distance to the solution,
                                                                                          Moreau-envelope gradient
``nc_c``            NC-C      ``simplex_minimax`` :math:`+\ w\sum_k\cos x_k`               Moreau-envelope gradient
==================  ========  ==========================================================  ==========================

``pl_pl`` is the FedNest synthetic minimax problem (``A_i`` diagonal, FedNest's
``minmax_dataset``) with a heterogeneity knob: :math:`a_i = \mathrm{clip}(a_0 + \delta u_i)`,
:math:`b_i = b_0 + \delta s\,\epsilon_i` (``delta = 0``: identical clients). With :math:`\lambda > 0` it
is strongly-convex-strongly-concave, the simplest PL-PL instance (two-sided PL holds; the x-side is
in fact strongly convex). Closed forms with :math:`A = \bar A`, :math:`b = \bar b`:
:math:`y^*(x) = Ax - b`, :math:`\Phi(x) = \tfrac12\|Ax - b\|^2 + \tfrac\lambda2\|x\|^2\ (+ w\sum\cos x_j)`,
:math:`x^* = (A^\top A + \lambda I)^{-1}A^\top b`, :math:`y^* = Ax^* - b`, and the duality gap
:math:`\Phi(x) - \Psi(y)` with :math:`\Psi(y) = \min_x f(x, y) = -\tfrac12\|y\|^2 - b^\top y - \|A^\top y\|^2/(2\lambda)`.

``nc_pl``: :math:`M \in \mathbb R^{r\times q}` with full row rank :math:`r < q`, so :math:`f(x,\cdot)`
is concave but not strongly concave (its Hessian :math:`-M^\top M` has rank :math:`r`), and
:math:`-f(x,\cdot)` is PL with :math:`\mu = \sigma_{\min}(M)^2`; :math:`\max_y f = \tfrac12\|Ax-b\|^2 + \dots`
is attained on the affine set :math:`My = Ax - b`.

``simplex_minimax`` / ``nc_c``: the :math:`\bar a_j` are the vertices of a regular simplex with
centre :math:`c` and radius :math:`R`, and the client offsets :math:`a_{ij} - \bar a_j` (spread
``delta``) have equal mean squares :math:`2v` for every :math:`j`, so :math:`F_j(x) = \tfrac12\|x -
\bar a_j\|^2 + v` and, for :math:`w = 0`, :math:`x^* = c`, :math:`y^* = \mathbf 1/J`,
:math:`\Phi^* = \tfrac12R^2 + v`. With :math:`w > 0` (``nc_c``) :math:`f` is nonconvex in :math:`x`
and linear (concave, not strongly) in :math:`y`.

Moreau envelope (Def. 2.4 of the FESS-GDA paper): :math:`\Phi_{1/2l}(x) = \min_u \Phi(u) + l\|u - x\|^2`,
:math:`\nabla\Phi_{1/2l}(x) = 2l(x - u^*)`. :meth:`SimplexMinimax.moreau` solves the proximal
subproblem through its dual: for fixed :math:`y \in \Delta_J` the inner problem separates over
coordinates into strictly convex 1-D problems (Newton), and the concave dual :math:`\psi(y)` is
maximized by accelerated projected gradient; the returned duality gap certifies the solution
(:math:`\|u - u^*\|^2 \le 2\,\mathrm{gap}/(1 + 2l - w)`).

Noise ``sigma``: every oracle call adds :math:`s\,(\xi_x^\top x - \xi_y^\top y)` to :math:`f_i` with
:math:`\xi \sim N(0, I)` and :math:`s = \sigma/\sqrt b` (zero for the full batch), so gradients are
unbiased with variance :math:`\sigma^2/b` per coordinate.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from fedopt import random as rnd
from fedopt.errors import ConfigError, check
from fedopt.problems.base import AbstractMinimaxProblem, ProblemContext
from fedopt.problems.ysets import make_yset, project_simplex
from fedopt.registry import PROBLEMS

__all__ = ["MinimaxQuadratic", "NCPLQuadratic", "SimplexMinimax", "nc_c", "nc_pl", "nc_sc", "pl_pl", "simplex_minimax"]

_F64 = torch.float64


def _pick_measure(cls_name: str, problem_class: str, measures: tuple[str, ...], measure: str | None) -> str:
    if measure is None:
        return measures[0]
    if measure not in measures:
        raise ConfigError(f"problem.params.measure = {measure!r} does not apply to {cls_name} (class {problem_class}); "
                          f"allowed: {', '.join(measures)}")
    return measure


class _Synthetic(AbstractMinimaxProblem):
    """Shared noise handling of the synthetic problems."""

    sigma: float

    @functools.cached_property
    def _noise_tags(self) -> torch.Tensor:
        """The stream tags of the x and y noise (7 and 8), as one int64 tensor on the problem's device."""
        return torch.tensor([7, 8], dtype=torch.int64, device=self.device)

    def _noise(self, key: torch.Tensor, batch_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        s = 0.0 if (batch_size is None or self.sigma == 0) else self.sigma / math.sqrt(batch_size)
        if not s:
            return (torch.zeros(self.x_dim, dtype=self.dtype, device=self.device),
                    torch.zeros(self.y_dim, dtype=self.dtype, device=self.device))
        if self.x_dim == self.y_dim:
            # Both draws in one call on the key pair (fold_in(key, 7), fold_in(key, 8)): every number
            # is a pure function of its own key and counter, so this is bit-identical to the two calls
            # below with half the ops (the per-op overhead dominates a local step under vmap).
            xi = s * rnd.normal(rnd.fold_in(key.unsqueeze(-1), self._noise_tags), (self.x_dim,), self.dtype)
            return xi[..., 0, :], xi[..., 1, :]
        return (s * rnd.normal(rnd.fold_in(key, 7), (self.x_dim,), self.dtype),
                s * rnd.normal(rnd.fold_in(key, 8), (self.y_dim,), self.dtype))

    def _grad_mapping(self, gx: torch.Tensor, gy: torch.Tensor, y: torch.Tensor) -> float:
        """Def. 2.1's stationarity of f at (x, y) with eta_y = 1: sqrt(|grad_x f|^2 + |y - P_Y(y + grad_y f)|^2)."""
        gm = y - self.y_set.project(y + gy)
        return float(torch.sqrt(gx.square().sum() + gm.square().sum()))


class MinimaxQuadratic(_Synthetic):
    """``pl_pl`` / ``nc_sc`` (module docstring). Build with :func:`pl_pl` or :func:`nc_sc`."""

    def __init__(self, ctx: ProblemContext, *, name: str, dim: int, lam: float, cos_weight: float, delta: float,
                 b_scale: float, sigma: float, init_scale: float, measure: str | None, y_set: str = "none",
                 y_bounds: list[float] | None = None, y_radius: float | None = None) -> None:
        self.num_clients, self.x_dim, self.y_dim = ctx.clients, dim, dim
        self.dtype, self.device = ctx.dtype, ctx.device
        self.lam, self.cos_weight, self.sigma, self.init_scale = lam, cos_weight, sigma, init_scale
        check(y_set != "simplex", f"problem {name!r}: y_set = 'simplex' is not offered here (use simplex_minimax); "
                                  "allowed: none, box, ball")
        check(y_bounds is None or (isinstance(y_bounds, list) and len(y_bounds) == 2
                                   and all(isinstance(v, int | float) and not isinstance(v, bool) for v in y_bounds)),
              f"problem.params.y_bounds must be a list [lo, hi], got {y_bounds!r}")
        lo, hi = (None, None) if y_bounds is None else (float(y_bounds[0]), float(y_bounds[1]))
        self.y_set = make_yset(y_set, dim, lo=lo, hi=hi, radius=y_radius)
        self.problem_class = "PL-PL" if cos_weight == 0 else "NC-SC"
        if y_set != "none":  # the saddle point and the duality gap have closed forms only for Y = R^q
            self.measures = ("grad_phi_norm",)
        else:
            self.measures = (("saddle_distance", "duality_gap", "grad_phi_norm") if cos_weight == 0
                             else ("grad_phi_norm",))
        self.measure = _pick_measure(name, self.problem_class, self.measures, measure)
        rng = np.random.default_rng([ctx.seed, 0x3A])
        M = ctx.clients
        a0 = rng.uniform(0.1, 1.0, dim)
        a = np.clip(a0 + delta * rng.uniform(-0.5, 0.5, (M, dim)), 0.05, 1.0)
        b = b_scale * rng.standard_normal(dim) + delta * b_scale * rng.standard_normal((M, dim))
        self.data = {"a": torch.as_tensor(a, dtype=self.dtype, device=self.device),
                     "b": torch.as_tensor(b, dtype=self.dtype, device=self.device)}
        self.a, self.b = torch.as_tensor(a.mean(0), dtype=_F64), torch.as_tensor(b.mean(0), dtype=_F64)
        self._l = max(1.0, lam + cos_weight) + float(a.max())
        w = cos_weight
        self.closed_form = {
            ("loss", "grad_x"): lambda x, y, bt: bt["a"] * y + lam * x - w * torch.sin(x) + bt["xi_x"],
            ("loss", "grad_y"): lambda x, y, bt: -y - bt["b"] + bt["a"] * x - bt["xi_y"],
        }

    def init(self):
        full = torch.full
        return (full((self.x_dim,), self.init_scale, dtype=self.dtype, device=self.device),
                self.y_set.project(full((self.y_dim,), self.init_scale, dtype=self.dtype, device=self.device)))

    def batch(self, data, client, key, batch_size):
        xi_x, xi_y = self._noise(key, batch_size)
        return {"a": data["a"][client], "b": data["b"][client], "xi_x": xi_x, "xi_y": xi_y}

    def loss(self, x, y, batch):
        val = -0.5 * y @ y - batch["b"] @ y + y @ (batch["a"] * x) + 0.5 * self.lam * x @ x
        if self.cos_weight:
            val = val + self.cos_weight * torch.cos(x).sum()
        return val + batch["xi_x"] @ x - batch["xi_y"] @ y

    def smoothness(self) -> float:
        return self._l

    # ---- closed forms (float64) ----------------------------------------------------------
    def y_star(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`y^*(x) = P_Y(Ax - b)`, since :math:`f = -\tfrac12\|y - (Ax - b)\|^2 + \tfrac12\|Ax - b\|^2 + \dots`."""
        return self.y_set.project(self.a * x - self.b)

    def grad_phi(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla\Phi(x) = A y^*(x) + \lambda x - w\sin x` (Danskin; :math:`= A(Ax - b) + \dots` for :math:`Y = \mathbb R^q`)."""
        return self.a * self.y_star(x) + self.lam * x - self.cos_weight * torch.sin(x)

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        r = self.a * x - self.b
        d = self.y_star(x) - r
        return 0.5 * r @ r - 0.5 * d @ d + 0.5 * self.lam * x @ x + self.cos_weight * torch.cos(x).sum()

    def saddle(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The saddle point :math:`(x^*, y^*)` (``cos_weight = 0``)."""
        check(self.cos_weight == 0 and self.y_set.kind == "none",
              "the saddle point has a closed form only for cos_weight = 0 and y_set = 'none'")
        x = self.a * self.b / (self.a.square() + self.lam)
        return x, self.y_star(x)

    def metrics(self, x, y):
        x64, y64 = x.detach().to("cpu", _F64), y.detach().to("cpu", _F64)
        g = self.grad_phi(x64)
        gx = self.a * y64 + self.lam * x64 - self.cos_weight * torch.sin(x64)
        gy = -y64 - self.b + self.a * x64
        out = {"grad_phi_norm": float(g.norm()), "grad_phi_norm_sq": float(g.square().sum()),
               "phi": float(self.phi(x64)), "y_error": float((y64 - self.y_star(x64)).norm()),
               "grad_mapping": self._grad_mapping(gx, gy, y64)}
        if self.cos_weight == 0 and self.y_set.kind == "none":
            xs, ys = self.saddle()
            out["saddle_distance"] = float(torch.sqrt((x64 - xs).square().sum() + (y64 - ys).square().sum()))
            if self.lam > 0:
                psi = -0.5 * y64 @ y64 - self.b @ y64 - (self.a * y64).square().sum() / (2 * self.lam)
                out["duality_gap"] = float(self.phi(x64) - psi)
        out["stationarity"] = out[self.measure]
        return out


class NCPLQuadratic(_Synthetic):
    """``nc_pl`` (module docstring). Build with :func:`nc_pl`."""

    def __init__(self, ctx: ProblemContext, *, x_dim: int, y_dim: int, rank: int, lam: float, cos_weight: float,
                 delta: float, sigma: float, init_scale: float, measure: str | None) -> None:
        self.num_clients, self.x_dim, self.y_dim = ctx.clients, x_dim, y_dim
        self.dtype, self.device = ctx.dtype, ctx.device
        self.lam, self.cos_weight, self.sigma, self.init_scale = lam, cos_weight, sigma, init_scale
        self.y_set = make_yset("none", y_dim)
        self.problem_class, self.measures = "NC-PL", ("grad_phi_norm",)
        self.measure = _pick_measure("nc_pl", self.problem_class, self.measures, measure)
        rng = np.random.default_rng([ctx.seed, 0x3B])
        Mc = ctx.clients
        u, _ = np.linalg.qr(rng.standard_normal((y_dim, y_dim)))
        m_mat = np.diag(np.linspace(1.0, 0.5, rank)) @ u[:rank]  # r x q, singular values 1 .. 0.5
        a0 = rng.standard_normal((rank, x_dim)) / math.sqrt(x_dim)
        a = a0 + delta * rng.standard_normal((Mc, rank, x_dim)) / math.sqrt(x_dim)
        b = rng.standard_normal(rank) + delta * rng.standard_normal((Mc, rank))
        t = lambda v: torch.as_tensor(v, dtype=self.dtype, device=self.device)  # noqa: E731
        self.data = {"M": t(m_mat), "A": t(a), "b": t(b)}
        self.M = torch.as_tensor(m_mat, dtype=_F64)
        self.A, self.b = torch.as_tensor(a.mean(0), dtype=_F64), torch.as_tensor(b.mean(0), dtype=_F64)
        self.mu = 0.25  # sigma_min(M)^2
        w = cos_weight
        self.closed_form = {
            ("loss", "grad_x"): lambda x, y, bt: bt["A"].T @ (bt["M"] @ y) + lam * x - w * torch.sin(x) + bt["xi_x"],
            ("loss", "grad_y"): lambda x, y, bt: bt["M"].T @ (bt["A"] @ x - bt["b"] - bt["M"] @ y) - bt["xi_y"],
        }
        # joint Hessian [[lam I - w cos, A^T M], [M^T A, -M^T M]] with ||M|| = 1
        self._l = max(lam + cos_weight, 1.0) + float(np.linalg.norm(a, ord=2, axis=(1, 2)).max())

    def init(self):
        full = torch.full
        return (full((self.x_dim,), self.init_scale, dtype=self.dtype, device=self.device),
                torch.zeros(self.y_dim, dtype=self.dtype, device=self.device))

    def batch(self, data, client, key, batch_size):
        xi_x, xi_y = self._noise(key, batch_size)
        return {"M": data["M"], "A": data["A"][client], "b": data["b"][client], "xi_x": xi_x, "xi_y": xi_y}

    def loss(self, x, y, batch):
        my = batch["M"] @ y
        val = -0.5 * my @ my + my @ (batch["A"] @ x - batch["b"]) + 0.5 * self.lam * x @ x
        if self.cos_weight:
            val = val + self.cos_weight * torch.cos(x).sum()
        return val + batch["xi_x"] @ x - batch["xi_y"] @ y

    def smoothness(self) -> float:
        return self._l

    def grad_phi(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla\Phi(x) = A^\top(Ax - b) + \lambda x - w\sin x`."""
        return self.A.T @ (self.A @ x - self.b) + self.lam * x - self.cos_weight * torch.sin(x)

    def metrics(self, x, y):
        x64, y64 = x.detach().to("cpu", _F64), y.detach().to("cpu", _F64)
        g = self.grad_phi(x64)
        r = self.M @ y64 - (self.A @ x64 - self.b)
        gx = self.A.T @ (self.M @ y64) + self.lam * x64 - self.cos_weight * torch.sin(x64)
        gy = -self.M.T @ r
        out = {"grad_phi_norm": float(g.norm()), "grad_phi_norm_sq": float(g.square().sum()),
               "y_gap": float(0.5 * r @ r),  # Phi(x) - f(x, y) >= 0
               "grad_mapping": self._grad_mapping(gx, gy, y64)}
        out["stationarity"] = out[self.measure]
        return out


class SimplexMinimax(_Synthetic):
    """``simplex_minimax`` (form (2)) and ``nc_c`` (module docstring)."""

    def __init__(self, ctx: ProblemContext, *, name: str, dim: int, groups: int, radius: float, delta: float,
                 cos_weight: float, sigma: float, init_scale: float, measure: str | None) -> None:
        check(dim >= groups, f"problem.params.dim = {dim} must be >= groups = {groups} (the simplex vertices span "
                             "groups - 1 dimensions)")
        self.num_clients, self.x_dim, self.y_dim = ctx.clients, dim, groups
        self.dtype, self.device = ctx.dtype, ctx.device
        self.cos_weight, self.sigma, self.init_scale, self.radius = cos_weight, sigma, init_scale, radius
        self.y_set = make_yset("simplex", groups)
        if cos_weight == 0:
            self.problem_class = "form2"
            self.measures = ("moreau_grad_norm", "phi_gap", "solution_distance")
        else:
            self.problem_class, self.measures = "NC-C", ("moreau_grad_norm",)
        self.measure = _pick_measure(name, self.problem_class, self.measures, measure)
        rng = np.random.default_rng([ctx.seed, 0x3C])
        J, M = groups, ctx.clients
        basis, _ = np.linalg.qr(rng.standard_normal((dim, J)))  # orthonormal columns
        e = np.eye(J) - 1.0 / J
        vertices = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ basis.T * radius  # [J, dim], centred
        self.centre = rng.standard_normal(dim)
        a_bar = self.centre + vertices
        eps = rng.standard_normal((M, J, dim))
        eps -= eps.mean(0, keepdims=True)
        ms = (eps**2).sum(-1).mean(0)  # [J]
        eps *= np.sqrt(dim / np.where(ms > 0, ms, 1.0))[None, :, None]  # equal mean squares (M >= 2)
        a = a_bar[None] + delta * eps
        self.data = {"a": torch.as_tensor(a, dtype=self.dtype, device=self.device)}
        self.a_bar = torch.as_tensor(a.mean(0), dtype=_F64)
        self.v = torch.as_tensor(0.5 * ((a - a.mean(0)) ** 2).sum(-1).mean(0), dtype=_F64)  # [J], equal if M >= 2
        self.l = 1.0 + cos_weight  # smoothness of x -> F_j; f is linear in y
        w = cos_weight
        self.closed_form = {
            ("loss", "grad_x"): lambda x, y, bt: (y.unsqueeze(-1) * (x - bt["a"])).sum(0) - w * y.sum() * torch.sin(x)
            + bt["xi_x"],
            ("loss", "grad_y"): lambda x, y, bt: 0.5 * (x - bt["a"]).square().sum(-1) + w * torch.cos(x).sum() - bt["xi_y"],
        }

    def init(self):
        x0 = torch.as_tensor(self.centre, dtype=self.dtype, device=self.device) + self.init_scale
        return x0, torch.full((self.y_dim,), 1.0 / self.y_dim, dtype=self.dtype, device=self.device)

    def batch(self, data, client, key, batch_size):
        xi_x, xi_y = self._noise(key, batch_size)
        return {"a": data["a"][client], "xi_x": xi_x, "xi_y": xi_y}

    def loss(self, x, y, batch):
        F = 0.5 * (x - batch["a"]).square().sum(-1)  # [J]
        if self.cos_weight:
            F = F + self.cos_weight * torch.cos(x).sum()
        return y @ F + batch["xi_x"] @ x - batch["xi_y"] @ y

    def smoothness(self) -> float:
        # Jointly: ||grad_x^2|| <= 1 + w (since y in the simplex), ||grad_xy|| <= sqrt(J) max_j ||x - a_j||,
        # which is unbounded; the theory's l for x -> f(x, y) is what p = 2l needs.
        return self.l

    def F(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`F_j(x)`, the global group losses ``[J]`` (float64)."""
        return 0.5 * (x - self.a_bar).square().sum(-1) + self.v + self.cos_weight * torch.cos(x).sum()

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        return self.F(x).max()

    def solution(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """:math:`(x^*, y^*, \\Phi^*)` for ``cos_weight = 0``."""
        check(self.cos_weight == 0, "the solution has a closed form only for cos_weight = 0")
        x = torch.as_tensor(self.centre, dtype=_F64)
        return x, torch.full((self.y_dim,), 1.0 / self.y_dim, dtype=_F64), float(self.phi(x))

    def moreau(self, x: torch.Tensor, *, rel_tol: float = 1e-3, iters: int = 20000) -> tuple[torch.Tensor, float]:
        r"""The Moreau-envelope gradient :math:`\nabla\Phi_{1/2l}(x) = 2l(x - u^*)` and the duality gap
        certifying :math:`u^*` (module docstring). Stops once the certified error of the returned
        gradient, :math:`2l\sqrt{2\,\mathrm{gap}/(1 + 2l - w)}`, is below ``rel_tol`` times its norm
        (or 1e-12): the measure is exact to 0.1 % by default, whatever its size."""
        x = x.detach().to("cpu", _F64)
        l, w = self.l, self.cos_weight
        curv = 1.0 + 2 * l - w  # strong convexity of the proximal subproblem
        A = self.a_bar

        def u_of(y: torch.Tensor) -> torch.Tensor:
            s = y @ A  # sum_j y_j a_j
            u = (s + 2 * l * x) / (1 + 2 * l)  # exact for w = 0
            for _ in range(50 if w else 0):  # Newton on u - s - w sin u + 2l(u - x) = 0, h'' >= curv > 0
                step = (u - s - w * torch.sin(u) + 2 * l * (u - x)) / (1 + 2 * l - w * torch.cos(u))
                u = u - step
                if float(step.abs().max()) < 1e-15:
                    break
            return u

        def gap_of(y: torch.Tensor, u: torch.Tensor) -> float:
            Fu = self.F(u)
            return float(Fu.max() - y @ Fu)  # primal - dual; the proximal terms cancel

        def converged(u: torch.Tensor, gap: float) -> bool:
            bound = 2 * l * math.sqrt(2 * max(gap, 0.0) / curv)
            return bound <= max(rel_tol * float((2 * l * (x - u)).norm()), 1e-12)

        y = torch.full((self.y_dim,), 1.0 / self.y_dim, dtype=_F64)
        z, t_k = y, 1.0
        u = u_of(y)
        gap = gap_of(y, u)
        for _ in range(iters):
            if converged(u, gap):
                break
            uz = u_of(z)
            G = uz - A  # rows: grad F_j(u(z)); the dual's curvature is at most ||G||^2 / curv
            step = curv / float(torch.linalg.matrix_norm(G, ord=2) ** 2 + 1e-300)
            y_next = project_simplex(z + step * self.F(uz))
            t_next = 0.5 * (1 + math.sqrt(1 + 4 * t_k * t_k))
            z = y_next + ((t_k - 1) / t_next) * (y_next - y)
            y, t_k = y_next, t_next
            u = u_of(y)
            gap = gap_of(y, u)
        return 2 * l * (x - u), gap

    def metrics(self, x, y):
        x64, y64 = x.detach().to("cpu", _F64), y.detach().to("cpu", _F64)
        Fx = self.F(x64)
        gx = (y64[:, None] * (x64 - self.a_bar)).sum(0) - self.cos_weight * torch.sin(x64)
        out = {"phi": float(Fx.max()), "grad_mapping": self._grad_mapping(gx, Fx, y64)}
        g, gap = self.moreau(x64)
        out["moreau_grad_norm"], out["moreau_gap"] = float(g.norm()), gap
        if self.cos_weight == 0:
            xs, ys, phis = self.solution()
            out["phi_gap"] = out["phi"] - phis
            out["solution_distance"] = float((x64 - xs).norm())
            out["y_distance"] = float((y64 - ys).norm())
        out["stationarity"] = out[self.measure]
        return out


def _common_checks(name: str, ctx: ProblemContext, sigma: float, delta: float) -> None:
    check(ctx.data is None, f"problem {name!r} is synthetic and takes no [data] / [partition] tables")
    check(sigma >= 0, f"problem.params.sigma must be >= 0, got {sigma}")
    check(delta >= 0, f"problem.params.delta must be >= 0, got {delta}")


@PROBLEMS.register("pl_pl")
def pl_pl(context: ProblemContext, /, *, dim: int = 10, lam: float = 0.5, delta: float = 0.5, b_scale: float = 1.0,
          sigma: float = 0.0, init_scale: float = 1.0, measure: str | None = None, y_set: str = "none",
          y_bounds: list | None = None, y_radius: float | None = None) -> MinimaxQuadratic:
    """The PL-PL quadratic (FedNest's synthetic minimax problem; module docstring).

    Args:
        dim: dimension of x and y.
        lam: ridge weight on x (> 0: a unique saddle point and a finite duality gap).
        delta: heterogeneity (0: identical clients).
        b_scale: spread s of the linear terms b_i.
        sigma: oracle noise standard deviation at batch size 1.
        init_scale: x0 = y0 = init_scale * 1 (FedNest's code uses 10).
        measure: the reported ``stationarity`` (default ``saddle_distance``).
        y_set, y_bounds, y_radius: constrain y to a box ``[lo, hi]^q`` or a ball (default: none);
            then :math:`y^*(x) = P_Y(Ax - b)` and only ``grad_phi_norm`` is exact.
    """
    _common_checks("pl_pl", context, sigma, delta)
    check(dim >= 1, f"problem.params.dim must be >= 1, got {dim}")
    check(lam > 0, f"problem.params.lam must be > 0 for pl_pl (a unique saddle point), got {lam}")
    return MinimaxQuadratic(context, name="pl_pl", dim=dim, lam=lam, cos_weight=0.0, delta=delta, b_scale=b_scale,
                            sigma=sigma, init_scale=init_scale, measure=measure, y_set=y_set, y_bounds=y_bounds,
                            y_radius=y_radius)


@PROBLEMS.register("nc_sc")
def nc_sc(context: ProblemContext, /, *, dim: int = 10, lam: float = 0.1, cos_weight: float = 0.5, delta: float = 0.5,
          b_scale: float = 1.0, sigma: float = 0.0, init_scale: float = 1.0, measure: str | None = None,
          y_set: str = "none", y_bounds: list | None = None, y_radius: float | None = None) -> MinimaxQuadratic:
    r"""NC-SC: the PL-PL quadratic plus :math:`w\sum_j\cos x_j` (nonconvex in x when
    :math:`w > \lambda + \min_j a_j^2`; 1-strongly concave in y, so :math:`\kappa = l`)."""
    _common_checks("nc_sc", context, sigma, delta)
    check(dim >= 1, f"problem.params.dim must be >= 1, got {dim}")
    check(lam >= 0, f"problem.params.lam must be >= 0, got {lam}")
    check(cos_weight > 0, f"problem.params.cos_weight must be > 0 for nc_sc (0 is pl_pl), got {cos_weight}")
    return MinimaxQuadratic(context, name="nc_sc", dim=dim, lam=lam, cos_weight=cos_weight, delta=delta,
                            b_scale=b_scale, sigma=sigma, init_scale=init_scale, measure=measure, y_set=y_set,
                            y_bounds=y_bounds, y_radius=y_radius)


@PROBLEMS.register("nc_pl")
def nc_pl(context: ProblemContext, /, *, x_dim: int = 10, y_dim: int = 10, rank: int = 5, lam: float = 0.1,
          cos_weight: float = 0.5, delta: float = 0.5, sigma: float = 0.0, init_scale: float = 1.0,
          measure: str | None = None) -> NCPLQuadratic:
    """NC-PL: y enters through a rank-``rank`` map ``M`` (module docstring)."""
    _common_checks("nc_pl", context, sigma, delta)
    check(x_dim >= 1, f"problem.params.x_dim must be >= 1, got {x_dim}")
    check(1 <= rank < y_dim, f"problem.params.rank must be in 1..y_dim-1 = {y_dim - 1} (rank-deficient in y), got {rank}")
    check(lam >= 0, f"problem.params.lam must be >= 0, got {lam}")
    check(cos_weight >= 0, f"problem.params.cos_weight must be >= 0, got {cos_weight}")
    return NCPLQuadratic(context, x_dim=x_dim, y_dim=y_dim, rank=rank, lam=lam, cos_weight=cos_weight, delta=delta,
                         sigma=sigma, init_scale=init_scale, measure=measure)


@PROBLEMS.register("simplex_minimax")
def simplex_minimax(context: ProblemContext, /, *, dim: int = 10, groups: int = 4, radius: float = 1.0,
                    delta: float = 0.5, sigma: float = 0.0, init_scale: float = 1.0,
                    measure: str | None = None) -> SimplexMinimax:
    r"""Form (2): :math:`\min_x\max_{y\in\Delta_J}\sum_j y_j F_j(x)` with a known solution (module docstring)."""
    _common_checks("simplex_minimax", context, sigma, delta)
    check(groups >= 2, f"problem.params.groups must be >= 2, got {groups}")
    check(radius > 0, f"problem.params.radius must be > 0, got {radius}")
    check(context.clients >= 2 or delta == 0, "problem 'simplex_minimax' with delta > 0 needs clients >= 2")
    return SimplexMinimax(context, name="simplex_minimax", dim=dim, groups=groups, radius=radius, delta=delta,
                          cos_weight=0.0, sigma=sigma, init_scale=init_scale, measure=measure)


@PROBLEMS.register("nc_c")
def nc_c(context: ProblemContext, /, *, dim: int = 10, groups: int = 4, radius: float = 1.0, delta: float = 0.5,
         cos_weight: float = 1.5, sigma: float = 0.0, init_scale: float = 1.0,
         measure: str | None = None) -> SimplexMinimax:
    r"""NC-C: form (2) plus :math:`w\sum_k\cos x_k` (nonconvex in x for :math:`w > 1`, linear in y)."""
    _common_checks("nc_c", context, sigma, delta)
    check(groups >= 2, f"problem.params.groups must be >= 2, got {groups}")
    check(radius > 0, f"problem.params.radius must be > 0, got {radius}")
    check(cos_weight > 0, f"problem.params.cos_weight must be > 0 for nc_c (0 is simplex_minimax), got {cos_weight}")
    check(context.clients >= 2 or delta == 0, "problem 'nc_c' with delta > 0 needs clients >= 2")
    return SimplexMinimax(context, name="nc_c", dim=dim, groups=groups, radius=radius, delta=delta,
                          cos_weight=cos_weight, sigma=sigma, init_scale=init_scale, measure=measure)
