"""What a federated bilevel problem gives the algorithms.

.. math::
    \\min_x \\Phi(x) = f(x, y^*(x)) = \\frac1M \\sum_{i=1}^M f_i(x, y^*(x)), \\qquad
    y^*(x) = \\arg\\min_y g(x, y) = \\frac1M \\sum_{i=1}^M g_i(x, y)

``x`` and ``y`` are flat vectors (a model's parameters are raveled and unraveled inside the
problem), so algorithms do plain vector arithmetic, count floats by ``numel`` and gossip by matmul.

Client tasks see a problem only through pure, ``vmap``-able functions of ``(data, client, key)``:
``outer_batch`` / ``inner_batch`` draw client ``client``'s minibatch for :math:`f_i` / :math:`g_i`
from the problem's ``data`` (a dict of tensors shared by all clients) using the counter-based
``key``; ``outer_loss`` / ``inner_loss`` evaluate on such a batch. ``batch_size=None`` means the
client's full local data (deterministic oracles). Metrics come from ``metrics(x, y)`` on the
server, never from inside client tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fedopt.data import FederatedData

__all__ = ["AbstractBilevelProblem", "Batch", "ProblemContext"]

Batch = Any  # a pytree of tensors


@dataclass(frozen=True)
class ProblemContext:
    """What every problem factory receives besides its own parameters."""

    clients: int
    seed: int
    dtype: torch.dtype
    device: torch.device
    data: FederatedData | None = None


class AbstractBilevelProblem(ABC):
    """A federated bilevel problem over ``num_clients`` clients (see the module docstring)."""

    num_clients: int
    x_dim: int
    y_dim: int
    data: dict[str, torch.Tensor]
    dtype: torch.dtype
    device: torch.device
    closed_form: dict[tuple[str, str], object] = {}  # optional hand-derived oracles (see fedopt.oracles)

    @abstractmethod
    def init(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The starting point ``(x0, y0)``; deterministic given the problem's seed."""

    @abstractmethod
    def outer_batch(self, data: dict[str, torch.Tensor], client: torch.Tensor, key: torch.Tensor,
                    batch_size: int | None) -> Batch:
        """A minibatch of client ``client``'s upper-level data (for :math:`f_i`)."""

    @abstractmethod
    def inner_batch(self, data: dict[str, torch.Tensor], client: torch.Tensor, key: torch.Tensor,
                    batch_size: int | None) -> Batch:
        """A minibatch of client ``client``'s lower-level data (for :math:`g_i`)."""

    @abstractmethod
    def outer_loss(self, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        """:math:`f_i(x, y; \\xi)`."""

    @abstractmethod
    def inner_loss(self, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        """:math:`g_i(x, y; \\zeta)`."""

    @abstractmethod
    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Exact (full-data or closed-form) progress measures at ``(x, y)``."""

    def lower_smoothness(self) -> float | None:
        """An upper bound on :math:`\\max_i \\lambda_{\\max}(\\nabla^2_{yy} g_i)` if known."""
        return None
