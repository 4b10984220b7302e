r"""Node tasks and gossip steps shared by the decentralized bilevel methods.

Gossip order (``order``), for a local direction :math:`D` and step :math:`\eta`:

* ``"atc"`` adapt-then-combine: :math:`X \leftarrow W(X - \eta D)`. On the complete graph this is
  the centralized step exactly.
* ``"cta"`` combine-then-adapt: :math:`X \leftarrow WX - \eta D`. Rows keep an
  :math:`O(\eta)` disagreement even on the complete graph, which biases the next gradients
  (``papers/dsbo.md`` §5.1 item 2).

Gradient tracking (a tracker :math:`S` of the network-average direction, :math:`D^-` the previous
direction, both per node):

* ``"cta"``: DIGing (Nedić, Olshevsky and Shi, 2017), one round gossiping :math:`[X, S]`:
  :math:`S \leftarrow WS + D - D^-`, :math:`X \leftarrow WX - \eta S`.
* ``"atc"``: ATC-DIGing (Nedić, Olshevsky, Shi and Uribe, 2017), two rounds:
  :math:`S \leftarrow W(S + D - D^-)`, then :math:`X \leftarrow W(X - \eta S)`.

With trackers started at :math:`S = D^- = 0`, the mean of :math:`S` equals the mean of the
latest directions at every step, so a constant step reaches the exact fixed point despite
heterogeneous nodes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.func import vmap

from fedopt import oracles
from fedopt import random as rnd
from fedopt.algorithms.base import Gossip, NodeProgram, Task
from fedopt.problems.base import AbstractBilevelProblem

__all__ = ["adaptive_step", "gossip_step", "node_tasks", "tracked_step"]

Order = Literal["atc", "cta"]


def gossip_step(X: torch.Tensor, D: torch.Tensor, lr: float, name: str, order: Order) -> NodeProgram:
    """One decentralized (S)GD step on the stacked ``X`` with local directions ``D``."""
    if order == "atc":
        (X,) = yield Gossip((X - lr * D,), (name,))
        return X
    (WX,) = yield Gossip((X,), (name,))
    return WX - lr * D


def adaptive_step(X: torch.Tensor, A: torch.Tensor, D: torch.Tensor, name: str, order: Order) -> NodeProgram:
    r"""A tuning-free step with per-node squared accumulators ``A`` ([n, 1]): accumulate the local
    direction, step by :math:`D / \sqrt{A}`, and gossip the accumulators in the same round as
    ``X`` (average consensus), so that the nodes' steps stay close. Returns ``(X, A)``; with one node
    it is the centralized rule exactly."""
    A = A + D.square().sum(-1, keepdim=True)
    if order == "atc":
        X, A = yield Gossip((X - D * A.rsqrt(), A), (name, f"{name}_accumulator"))
        return X, A
    WX, WA = yield Gossip((X, A), (name, f"{name}_accumulator"))
    return WX - D * A.rsqrt(), WA


def tracked_step(X: torch.Tensor, S: torch.Tensor, D: torch.Tensor, D_old: torch.Tensor, lr: float, name: str,
                 order: Order) -> NodeProgram:
    """One gradient-tracking step; returns the new ``(X, S)`` (see the module docstring)."""
    if order == "atc":
        (S,) = yield Gossip((S + D - D_old,), (f"{name}_tracker",))
        (X,) = yield Gossip((X - lr * S,), (name,))
        return X, S
    WX, WS = yield Gossip((X, S), (name, f"{name}_tracker"))
    S = WS + D - D_old
    return WX - lr * S, S


def node_tasks(problem: AbstractBilevelProblem, *, batch_size: int | None, hvp_mode: Literal["fwd", "rev"] = "rev"):
    """Per-node tasks ``fn(payload, node_state, data, node, key)``. Every oracle call draws its own
    minibatch (independent samples for the HVP and grad_y f, and for the cross product and grad_x f).
    The state is the node's own row of the stacked state, or, when there is none (a centralized
    program broadcasting one point to every client), the payload."""
    f, g, b = problem.outer_loss, problem.inner_loss, batch_size

    def inner(data, node, key, stream):
        return problem.inner_batch(data, node, rnd.fold_in(key, stream), b)

    def outer(data, node, key, stream):
        return problem.outer_batch(data, node, rnd.fold_in(key, stream), b)

    def lower_grad(payload, state, data, node, key):
        state = payload if state is None else state
        x, y = state
        return oracles.grad_y(g, x, y, inner(data, node, key, 0))

    def upper_grad_y(payload, state, data, node, key):
        """grad_y f_i (the linear system's gradient at v = 0, up to sign)."""
        x, y = (payload if state is None else state)[:2]
        return oracles.grad_y(f, x, y, outer(data, node, key, 1))

    def z_grad(payload, state, data, node, key):
        """Gradient of the node's share of the linear system: H_i z - grad_y f_i."""
        state = payload if state is None else state
        x, y, z = state
        hz = oracles.hvp_yy(g, x, y, inner(data, node, key, 0), z, mode=hvp_mode)
        return hz - oracles.grad_y(f, x, y, outer(data, node, key, 1))

    def hypergrad(payload, state, data, node, key):
        """u_i = grad_x f_i - grad2_xy g_i z_i."""
        state = payload if state is None else state
        x, y, z = state
        jz = oracles.jvp_xy(g, x, y, inner(data, node, key, 0), z, mode=hvp_mode)
        return oracles.grad_x(f, x, y, outer(data, node, key, 1)) - jz

    def jhip_grad(payload, state, data, node, key):
        """Gradient of the node's share of the JHIP system: Z_i H_i - J_i (p x q), H_i and J_i from
        one sample; Z H by one HVP per row of Z (H symmetric), J by one cross product per column."""
        state = payload if state is None else state
        x, y, Z = state
        batch = inner(data, node, key, 0)
        ZH = vmap(lambda row: oracles.hvp_yy(g, x, y, batch, row, mode=hvp_mode))(Z)
        # [p, q] = d^2 g / dx dy, column j the cross product with e_j: the q declared cross products
        J = vmap(lambda e: oracles.jvp_xy(g, x, y, batch, e, mode=hvp_mode))(torch.eye(q, dtype=y.dtype, device=y.device)).T
        return ZH - J

    def hypergrad_jhip(payload, state, data, node, key):
        """u_i = grad_x f_i - Z_i grad_y f_i (one sample)."""
        state = payload if state is None else state
        x, y, Z = state
        gx, gy = oracles.grad_xy(f, x, y, outer(data, node, key, 1))
        return gx - Z @ gy

    def joint(payload, state, data, node, key):
        """All three directions at one point (x, y, v): grad_y g, H v - grad_y f, grad_x f - J v;
        one inner sample serves grad_y g, the HVP and the cross product, one outer sample both
        gradients of f (the official S-TFBO code's sampling)."""
        x, y, v = payload if state is None else state
        gb, fb = inner(data, node, key, 0), outer(data, node, key, 1)
        hv, jv = oracles.hvp_and_jvp(g, x, y, gb, v)
        fx, fy = oracles.grad_xy(f, x, y, fb)
        return oracles.grad_y(g, x, y, gb), hv - fy, fx - jv

    p, q = problem.x_dim, problem.y_dim
    gy_g, gy_f, gx_f = ("inner_loss", "grad_y"), ("outer_loss", "grad_y"), ("outer_loss", "grad_x")
    hvp, cross = ("inner_loss", "hvp_yy"), ("inner_loss", "jvp_xy")

    def batched(*used: tuple[str, str]) -> bool:  # one call on all nodes (the vmap engine), see Task
        return oracles.batch_polymorphic(problem, *used)

    return {
        "joint": Task("joint", joint, {"grad": 2, "hvp": 1, "jvp": 1}, batched(gy_g, hvp, cross, gx_f, gy_f)),
        "upper_grad_y": Task("upper_grad_y", upper_grad_y, {"grad": 1}, batched(gy_f)),
        "lower_grad": Task("lower_grad", lower_grad, {"grad": 1}, batched(gy_g)),
        "z_grad": Task("z_grad", z_grad, {"hvp": 1, "grad": 1}, batched(hvp, gy_f)),
        "hypergrad": Task("hypergrad", hypergrad, {"grad": 1, "jvp": 1}, batched(cross, gx_f)),
        # per-node matrices (vmap over rows and columns, Z @ g): always traced
        "jhip_grad": Task("jhip_grad", jhip_grad, {"hvp": p, "jvp": q}),
        "hypergrad_jhip": Task("hypergrad_jhip", hypergrad_jhip, {"grad": 1}),
    }
