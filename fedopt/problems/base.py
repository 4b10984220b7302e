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
    from fedopt.problems.ysets import YSet

__all__ = ["AbstractBilevelProblem", "AbstractMinimaxProblem", "Batch", "ProblemContext"]

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
    # True when ``inner_batch`` / ``outer_batch`` and every closed form are batch-polymorphic: given
    # ``[m]`` clients and keys (and x, y, v with or without a leading ``[m]`` axis) they return what
    # ``vmap`` over the cohort would, so an engine may run a whole cohort as one plain call.
    batched_oracles: bool = False
    # closed forms (``(loss_name, oracle_name)``) whose value does not depend on the batch: a task
    # may then pass ``batch=None`` and skip the client's draw
    data_free_oracles: frozenset[tuple[str, str]] = frozenset()

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


class AbstractMinimaxProblem(ABC):
    r"""A federated minimax problem over ``num_clients`` clients.

    .. math::
        \min_{x} \max_{y \in Y} f(x, y) = \frac1M \sum_{i=1}^M f_i(x, y), \qquad
        \Phi(x) = \max_{y \in Y} f(x, y)

    ``x`` descends, ``y`` ascends and stays in ``y_set`` (projected by the algorithms). As for
    bilevel problems, client tasks see only the pure functions ``batch`` and ``loss``; ``metrics``
    runs on the server with exact (closed-form or full-data) quantities.

    ``problem_class`` names the structure the theory needs (``"NC-SC"``, ``"NC-PL"``, ``"PL-PL"``,
    ``"NC-C"``, ``"form2"``, ``"NC-NC"``); ``measures`` lists the stationarity measures ``metrics``
    reports for it, and ``measure`` (one of them) is also reported as ``stationarity``, the value
    figures and sweeps compare across classes. ``smoothness`` is the smoothness constant :math:`l`
    when known (FESS-GDA's ``p = 2l`` default needs it).
    """

    num_clients: int
    x_dim: int
    y_dim: int
    data: dict[str, torch.Tensor]
    dtype: torch.dtype
    device: torch.device
    y_set: YSet
    problem_class: str
    measures: tuple[str, ...]
    measure: str
    closed_form: dict[tuple[str, str], object] = {}

    @abstractmethod
    def init(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The starting point ``(x0, y0)`` with ``y0`` in ``y_set``; deterministic given the seed."""

    @abstractmethod
    def batch(self, data: dict[str, torch.Tensor], client: torch.Tensor, key: torch.Tensor,
              batch_size: int | None) -> Batch:
        r"""A minibatch :math:`\xi` of client ``client``'s data."""

    @abstractmethod
    def loss(self, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        r""":math:`f_i(x, y; \xi)`."""

    @abstractmethod
    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Exact progress measures at ``(x, y)``, including ``stationarity``."""

    def smoothness(self) -> float | None:
        """The smoothness constant :math:`l` of every :math:`f_i` if known."""
        return None
