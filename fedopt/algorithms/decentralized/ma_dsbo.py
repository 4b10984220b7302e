r"""MA-DSBO and MA-DSBO-GT: decentralized stochastic bilevel optimisation with a moving-average
hypergradient and Hessian-vector products only.

Chen, Huang, Ma and Balasubramanian, "Decentralized Stochastic Bilevel Optimization with Improved
per-Iteration Complexity", ICML 2023 (arXiv:2210.12839). The paper body could not be read; this is
the reconstruction of ``papers/dsbo.md`` §2.3-2.4 (UNVERIFIED in detail), with every open point an
option. Node :math:`i` keeps :math:`x_i, y_i, z_i, r_i`; one outer iteration :math:`k`:

.. math::
    &1.\ y_i \leftarrow \mathrm{gossip}\big(y_i,\ \beta\,\nabla_y g_i(x_i, y_i;\xi)\big) \quad (T\ \text{times}) \\
    &2.\ z_i \leftarrow \mathrm{gossip}\big(z_i,\ \gamma\,[\nabla^2_{yy} g_i(x_i, y_i;\xi') z_i
        - \nabla_y f_i(x_i, y_i;\phi')]\big) \quad (N\ \text{times}) \\
    &3.\ u_i = \nabla_x f_i(x_i, y_i;\phi) - \nabla^2_{xy} g_i(x_i, y_i;\xi'')\, z_i \\
    &4.\ r_i \leftarrow (1-\theta)\, r_i + \theta\, u_i \\
    &5.\ x_i \leftarrow \mathrm{gossip}(x_i,\ \alpha\, r_i)

Step 2 is decentralized SGD on :math:`z^* = [\nabla^2_{yy} g]^{-1}\nabla_y f` (the *global*
system: :math:`z` is gossiped every step, never a local inverse), warm-started across iterations.

===========  =================  ===================================================
symbol       parameter          meaning
===========  =================  ===================================================
α, β, γ      outer_lr,          steps for x, y, z
             inner_lr, z_lr
θ            theta              moving-average weight of the newest estimate
T, N         inner_steps,       gossip-SGD steps on y and on z per outer iteration
             z_steps
b            batch_size         per-node minibatch (``None``: full local data)
===========  =================  ===================================================

Options for the unverified details (default first):

* ``gossip_order="atc"`` (:math:`W(X - \eta D)`) or ``"cta"`` (:math:`WX - \eta D`, the literal
  form of the reconstructed pseudo-code). The default is ATC because CTA keeps an :math:`O(\eta)`
  bias even on the complete graph (measured in ``tests/algorithms/test_decentralized.py``).
* ``tracking``: ``"none"`` (MA-DSBO), ``"x"`` (track the moving-average direction :math:`r`),
  ``"xyz"`` (track on all three levels, the default of :func:`ma_dsbo_gt`); which levels carry
  tracking in the published MA-DSBO-GT is unverified.
* :math:`r^0 = 0` (``r_init="zero"``) or the first estimate :math:`u^0` (``"first"``); :math:`r` is
  kept local (not gossiped); step 5 uses the updated :math:`r^{k+1}`; steps 2-3 use :math:`y^{k+1}`.
* ``step_rule="fixed"`` or ``"tuning_free"``: every node replaces :math:`\beta, \gamma, \alpha` by
  inverse square roots of its own accumulated squared direction norms (TFBO's rule, Yang et al.,
  ICLR 2025), started at :math:`1/\beta^2, 1/\gamma^2, 1/\alpha^2`, and gossips the accumulators
  together with the variable they scale (``papers/tfbo.md`` §5.4, option (i)), so nodes keep
  nearly equal steps. This is an **extension, not a result from the papers**; without tracking only.

Gossip rounds per iteration: :math:`T + N + 1` (CTA tracking gossips :math:`[X, S]` in one round;
ATC tracking takes two rounds per tracked step).

Tracking needs smaller steps, and a mixing matrix without strongly negative eigenvalues: on the
4x4 torus (Metropolis weights, eigenvalue -0.6) MA-DSBO-GT with :math:`\beta = \gamma = 0.1`
diverges while :math:`\beta = \gamma = 0.05`, or ``mixing = "lazy_metropolis"`` at 0.1, reaches
:math:`\|\nabla\Phi(\bar x)\|^2 \approx 10^{-14}`; on the 16-ring (eigenvalues
:math:`\ge -1/3`) 0.1 is stable.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from fedopt.algorithms.base import DecentralizedAlgorithm, LocalStep, NodeProgram, Steps, conformance
from fedopt.algorithms.decentralized._common import adaptive_step, gossip_step, node_tasks, tracked_step
from fedopt.algorithms.parts import COUNT_MAX, moving_average
from fedopt.errors import check
from fedopt.problems.base import AbstractBilevelProblem
from fedopt.registry import ALGORITHMS

__all__ = ["MADSBOState", "ma_dsbo", "ma_dsbo_gt"]


class MADSBOState(NamedTuple):
    """Every node's variables, stacked over the nodes (``[n, ...]``).

    ``x, y, z``: upper variable, lower variable, linear-system solution; ``r``: the moving-average
    hypergradient direction; ``s_*`` / ``d_y``, ``d_z``, ``r_x``: gradient trackers and the
    directions they last absorbed (zero without tracking); ``acc_*``: the tuning-free squared
    accumulators (``[n, 1]``, unused with fixed steps)."""

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    r: torch.Tensor
    s_y: torch.Tensor
    d_y: torch.Tensor
    s_z: torch.Tensor
    d_z: torch.Tensor
    s_x: torch.Tensor
    r_x: torch.Tensor
    acc_x: torch.Tensor
    acc_y: torch.Tensor
    acc_z: torch.Tensor


def _check(outer_lr, inner_lr, z_lr, theta, inner_steps, z_steps, batch_size) -> None:
    for name, val in (("outer_lr", outer_lr), ("inner_lr", inner_lr), ("z_lr", z_lr)):
        check(val > 0, f"algorithm.params.{name} must be > 0, got {val}")
        check(math.isfinite(val), f"algorithm.params.{name} must be a finite number, got {val}")
    check(0 < theta <= 1, f"algorithm.params.theta must be in (0, 1], got {theta}")
    check(inner_steps >= 1, f"algorithm.params.inner_steps must be >= 1, got {inner_steps}")
    check(z_steps >= 1, f"algorithm.params.z_steps must be >= 1, got {z_steps}")
    check(batch_size is None or 1 <= batch_size <= COUNT_MAX,
          f"algorithm.params.batch_size must be in 1..{COUNT_MAX}, got {batch_size}")


@ALGORITHMS.register("ma_dsbo")
@conformance(outer_lr=0.3, inner_lr=0.2, z_lr=0.2, theta=0.8, inner_steps=2, z_steps=2, batch_size=2)
def ma_dsbo(
    *,
    outer_lr: float,
    inner_lr: float,
    z_lr: float,
    theta: float = 0.8,
    inner_steps: int = 5,
    z_steps: int = 5,
    batch_size: int | None = None,
    gossip_order: Literal["atc", "cta"] = "atc",
    tracking: Literal["none", "x", "xyz"] = "none",
    r_init: Literal["zero", "first"] = "zero",
    hvp_mode: Literal["fwd", "rev"] = "rev",
    step_rule: Literal["fixed", "tuning_free"] = "fixed",
) -> DecentralizedAlgorithm:
    """MA-DSBO (module docstring)."""
    _check(outer_lr, inner_lr, z_lr, theta, inner_steps, z_steps, batch_size)
    alpha, beta, gamma, T, N, order = outer_lr, inner_lr, z_lr, inner_steps, z_steps, gossip_order
    track_x, track_yz = tracking in ("x", "xyz"), tracking == "xyz"
    tf = step_rule == "tuning_free"
    check(not (tf and tracking != "none"), "algorithm.params.step_rule = 'tuning_free' needs tracking = 'none'")

    def setup(problem: AbstractBilevelProblem, K: int, key: torch.Tensor, n: int) -> Steps:
        del K, key
        tasks = node_tasks(problem, batch_size=batch_size, hvp_mode=hvp_mode)

        def init(x0: torch.Tensor, y0: torch.Tensor) -> MADSBOState:
            X, Y = x0.expand(n, -1).clone(), y0.expand(n, -1).clone()
            Z, R = torch.zeros_like(Y), torch.zeros_like(X)
            zeros = (torch.zeros_like(v) for v in (Y, Y, Z, Z, X, X))
            acc = (torch.full((n, 1), 1.0 / lr**2, dtype=X.dtype, device=X.device) for lr in (alpha, beta, gamma))
            return MADSBOState(X, Y, Z, R, *zeros, *acc)

        def step(s: MADSBOState, k: int) -> NodeProgram:
            X, Y, Z, R = s.x, s.y, s.z, s.r
            Sy, Dy, Sz, Dz, Sx, Rx, Ax, Ay, Az = s.s_y, s.d_y, s.s_z, s.d_z, s.s_x, s.r_x, s.acc_x, s.acc_y, s.acc_z
            for _ in range(T):  # 1. lower level: gossip SGD on y
                D = yield LocalStep(tasks["lower_grad"], (X, Y))
                if tf:
                    Y, Ay = yield from adaptive_step(Y, Ay, D, "y", order)
                elif track_yz:
                    Y, Sy = yield from tracked_step(Y, Sy, D, Dy, beta, "y", order)
                    Dy = D
                else:
                    Y = yield from gossip_step(Y, D, beta, "y", order)
            for _ in range(N):  # 2. the global linear system for z, by gossip SGD
                D = yield LocalStep(tasks["z_grad"], (X, Y, Z))
                if tf:
                    Z, Az = yield from adaptive_step(Z, Az, D, "z", order)
                elif track_yz:
                    Z, Sz = yield from tracked_step(Z, Sz, D, Dz, gamma, "z", order)
                    Dz = D
                else:
                    Z = yield from gossip_step(Z, D, gamma, "z", order)
            U = yield LocalStep(tasks["hypergrad"], (X, Y, Z))  # 3. local hypergradient estimate
            R = U if (k == 0 and r_init == "first") else moving_average(R, U, theta)  # 4. moving average
            if tf:  # 5. upper level
                X, Ax = yield from adaptive_step(X, Ax, R, "x", order)
            elif track_x:
                X, Sx = yield from tracked_step(X, Sx, R, Rx, alpha, "x", order)
                Rx = R
            else:
                X = yield from gossip_step(X, R, alpha, "x", order)
            return MADSBOState(X, Y, Z, R, Sy, Dy, Sz, Dz, Sx, Rx, Ax, Ay, Az)

        return Steps(init, step, variables=lambda s: {"x": s.x, "y": s.y, "z": s.z})

    return DecentralizedAlgorithm("ma_dsbo" if tracking == "none" else "ma_dsbo_gt", setup)


@ALGORITHMS.register("ma_dsbo_gt")
@conformance(outer_lr=0.2, inner_lr=0.1, z_lr=0.1, theta=0.8, inner_steps=2, z_steps=2, batch_size=2)
def ma_dsbo_gt(
    *,
    outer_lr: float,
    inner_lr: float,
    z_lr: float,
    theta: float = 0.8,
    inner_steps: int = 5,
    z_steps: int = 5,
    batch_size: int | None = None,
    gossip_order: Literal["atc", "cta"] = "atc",
    tracking: Literal["x", "xyz"] = "xyz",
    r_init: Literal["zero", "first"] = "zero",
    hvp_mode: Literal["fwd", "rev"] = "rev",
) -> DecentralizedAlgorithm:
    """MA-DSBO-GT: MA-DSBO with gradient tracking (default on x, y and z; see the module docstring)."""
    return ma_dsbo(outer_lr=outer_lr, inner_lr=inner_lr, z_lr=z_lr, theta=theta, inner_steps=inner_steps,
                   z_steps=z_steps, batch_size=batch_size, gossip_order=gossip_order, tracking=tracking,
                   r_init=r_init, hvp_mode=hvp_mode)
