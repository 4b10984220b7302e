r"""Small pure pieces that algorithms compose instead of repeating flags.

A **step rule** turns a direction :math:`d` into an update of a variable :math:`u`, with its own
piece of state (``None`` for a fixed step):

* :func:`fixed_step` (``lr``): :math:`u \leftarrow u - \eta\, d`;
* :func:`tuning_free_step` (``lr``): TFBO's inverse cumulative norm (Yang, Ban, Huang, Ma and Ji,
  ICLR 2025, ``papers/tfbo.md`` §2.1): accumulate first, then step,
  :math:`c^2 \mathrel{+}= \|d\|^2,\ u \leftarrow u - d / c`, from :math:`c_0^2 = 1/\eta^2` (so the
  first step is at most :math:`\eta`).

:func:`step_rule` picks one by the name used in configs (``"fixed"`` / ``"tuning_free"``). A rule
is a pair of pure functions, so its state lives in the algorithm's explicit state and is
checkpointed with it:

.. code-block:: python

    rule = step_rule(step_rule_name, beta)
    acc = rule.init(y)                    # in init
    y, acc = rule.update(y, d, acc)       # in step

Decentralized pieces (gossip orders, gradient tracking, the per-node tuning-free step gossiping its
accumulators) are in :mod:`fedopt.algorithms.decentralized._common`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

__all__ = ["COUNT_MAX", "StepRule", "fixed_step", "moving_average", "step_rule", "tuning_free_step"]

COUNT_MAX = 2**31 - 1  # the largest count a parameter may give (clients, batch sizes, steps: int32)


class StepRule(NamedTuple):
    """``init(like) -> rule state``; ``update(u, d, rule_state) -> (u, rule_state)``."""

    init: Callable[[torch.Tensor], Any]
    update: Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]


def fixed_step(lr: float) -> StepRule:
    r""":math:`u \leftarrow u - \eta d` (no rule state)."""
    return StepRule(lambda like: None, lambda u, d, acc: (u - lr * d, acc))


def tuning_free_step(lr: float) -> StepRule:
    r"""The tuning-free rule: :math:`c^2 \mathrel{+}= \|d\|^2,\ u \leftarrow u - d/c` from
    :math:`c_0^2 = 1/\eta^2` (a 0-d tensor of ``u``'s dtype and device)."""

    def init(like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(1.0 / lr**2, dtype=like.dtype, device=like.device)

    def update(u: torch.Tensor, d: torch.Tensor, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc = acc + d.square().sum()
        return u - d * acc.rsqrt(), acc

    return StepRule(init, update)


def step_rule(name: Literal["fixed", "tuning_free"], lr: float) -> StepRule:
    """The rule called ``name`` (a config's ``step_rule``) with initial step ``lr``."""
    return tuning_free_step(lr) if name == "tuning_free" else fixed_step(lr)


def moving_average(r: torch.Tensor, u: torch.Tensor, theta: float) -> torch.Tensor:
    r""":math:`r \leftarrow (1 - \theta) r + \theta u`: the moving-average direction of MA-DSBO and
    AID's momentum."""
    return (1 - theta) * r + theta * u
