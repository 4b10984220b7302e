r"""First- and second-order oracles of bilevel objectives, built with ``torch.func``.

Every oracle takes a scalar function ``fn(x, y, batch)`` (an upper objective :math:`f_i` or a
lower objective :math:`g_i`), flat parameter vectors ``x`` (:math:`\in\mathbb R^p`) and ``y``
(:math:`\in\mathbb R^q`) and a minibatch. None forms a Hessian: second-order products are one
Jacobian-vector or vector-Jacobian product of a gradient. All are pure, so they ``vmap`` over a
leading client axis of ``batch`` (and of ``x``, ``y``, ``v`` where those are per client).

======================  =========================================  ===========================
oracle                  value                                      shape
======================  =========================================  ===========================
``grad_x``              :math:`\nabla_x \mathrm{fn}(x, y)`         ``[p]``
``grad_y``              :math:`\nabla_y \mathrm{fn}(x, y)`         ``[q]``
``hvp_yy``              :math:`\nabla^2_{yy} \mathrm{fn}\, v`      ``[q]`` (``v``: ``[q]``)
``jvp_xy``              :math:`\nabla^2_{xy} \mathrm{fn}\, v`      ``[p]`` (``v``: ``[q]``)
``hvp_and_jvp``         both of the above from one VJP (SOBA)      ``([q], [p])``
======================  =========================================  ===========================

Closed forms: a problem may carry hand-derived oracles for its losses in a mapping
``problem.closed_form[(loss_name, oracle_name)]`` (e.g. ``("inner_loss", "hvp_yy")``); every
oracle here uses them when the loss is that problem's bound method, and ``torch.func`` otherwise.
They exist only where they are checked against ``torch.func`` to 1e-10 (``tests/test_oracles.py``)
and they remove autodiff's per-op overhead, which dominates small models under ``vmap``.

``mode="fwd"`` is forward-over-reverse (``jvp`` of ``grad``), the memory-light choice the
``torch.func.hessian`` docs recommend; ``mode="rev"`` is reverse-over-reverse (``vjp`` of
``grad``). Both give the same numbers to rounding. On CPU under ``vmap`` reverse-over-reverse
measured 1.4-1.6x faster for small models (``benchmarks/bench_fedmbo.py``), so algorithms expose the
choice as ``hvp_mode``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch.func import grad, jvp, vjp

__all__ = ["Objective", "batch_polymorphic", "grad_x", "grad_xy", "grad_y", "hvp_and_jvp", "hvp_yy", "jvp_xy"]

Objective = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]
Mode = Literal["fwd", "rev"]


def _closed_form(fn: Objective, oracle: str):
    """The problem's closed form of ``oracle`` for the bound loss ``fn``, if it has one."""
    table = getattr(getattr(fn, "__self__", None), "closed_form", None)
    return table.get((fn.__name__, oracle)) if table else None


def batch_polymorphic(problem, *used: tuple[str, str]) -> bool:
    """Whether a client task that draws the problem's batches and calls the oracles ``used``
    (``(loss_name, oracle_name)`` pairs) runs as one call on a whole cohort: the problem's draws are
    batch-polymorphic (``batched_oracles``) and every oracle used has such a closed form."""
    return bool(getattr(problem, "batched_oracles", False)) and all(o in problem.closed_form for o in used)


def grad_x(fn: Objective, x: torch.Tensor, y: torch.Tensor, batch: object) -> torch.Tensor:
    r""":math:`\nabla_x \mathrm{fn}(x, y; \mathrm{batch})`."""
    closed = _closed_form(fn, "grad_x")
    return closed(x, y, batch) if closed else grad(fn, argnums=0)(x, y, batch)


def grad_y(fn: Objective, x: torch.Tensor, y: torch.Tensor, batch: object) -> torch.Tensor:
    r""":math:`\nabla_y \mathrm{fn}(x, y; \mathrm{batch})`."""
    closed = _closed_form(fn, "grad_y")
    return closed(x, y, batch) if closed else grad(fn, argnums=1)(x, y, batch)


def grad_xy(fn: Objective, x: torch.Tensor, y: torch.Tensor, batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(\nabla_x \mathrm{fn}, \nabla_y \mathrm{fn})` on one batch (one backward pass)."""
    if _closed_form(fn, "grad_x") and _closed_form(fn, "grad_y"):
        return grad_x(fn, x, y, batch), grad_y(fn, x, y, batch)
    gx, gy = grad(fn, argnums=(0, 1))(x, y, batch)
    return gx, gy


def hvp_yy(
    fn: Objective, x: torch.Tensor, y: torch.Tensor, batch: object, v: torch.Tensor, mode: Mode = "fwd"
) -> torch.Tensor:
    r"""Hessian-vector product :math:`\nabla^2_{yy} \mathrm{fn}(x, y)\, v`."""
    closed = _closed_form(fn, "hvp_yy")
    if closed:
        return closed(x, y, batch, v)

    def gy(y_: torch.Tensor) -> torch.Tensor:
        return grad(fn, argnums=1)(x, y_, batch)

    if mode == "fwd":
        return jvp(gy, (y,), (v,))[1]
    return vjp(gy, y)[1](v)[0]


def jvp_xy(
    fn: Objective, x: torch.Tensor, y: torch.Tensor, batch: object, v: torch.Tensor, mode: Mode = "fwd"
) -> torch.Tensor:
    r"""Cross product :math:`\nabla^2_{xy} \mathrm{fn}(x, y)\, v \in \mathbb R^p` for :math:`v \in \mathbb R^q`.

    ``fwd`` differentiates :math:`\nabla_x \mathrm{fn}` along :math:`y` in direction :math:`v`;
    ``rev`` pulls :math:`v` back through :math:`x \mapsto \nabla_y \mathrm{fn}(x, y)`.
    """
    closed = _closed_form(fn, "jvp_xy")
    if closed:
        return closed(x, y, batch, v)
    if mode == "fwd":

        def gx(y_: torch.Tensor) -> torch.Tensor:
            return grad(fn, argnums=0)(x, y_, batch)

        return jvp(gx, (y,), (v,))[1]

    def gy(x_: torch.Tensor) -> torch.Tensor:
        return grad(fn, argnums=1)(x_, y, batch)

    return vjp(gy, x)[1](v)[0]


def hvp_and_jvp(
    fn: Objective, x: torch.Tensor, y: torch.Tensor, batch: object, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(\nabla^2_{yy} \mathrm{fn}\, v,\ \nabla^2_{xy} \mathrm{fn}\, v)` from one VJP of
    :math:`(x, y) \mapsto \nabla_y \mathrm{fn}(x, y)` (the SOBA trick: one backward pass, two products)."""
    if _closed_form(fn, "hvp_yy") and _closed_form(fn, "jvp_xy"):
        return hvp_yy(fn, x, y, batch, v), jvp_xy(fn, x, y, batch, v)

    def gy(x_: torch.Tensor, y_: torch.Tensor) -> torch.Tensor:
        return grad(fn, argnums=1)(x_, y_, batch)

    jxy_v, hyy_v = vjp(gy, x, y)[1](v)
    return hyy_v, jxy_v
