"""Engines decide *where* client tasks run; they only move data and call pure functions.

``map_clients(task, payload, client_payload, clients, keys)`` runs ``task.fn`` for every client
in ``clients`` (an int64 id tensor, cohort order) with its key, and returns the replies stacked
along a leading cohort axis. ``client_payload`` (or ``None``) has one row per cohort member; a
decentralized node step is the same call with every node as a client and the stacked node state
as ``client_payload``. ``gossip(w, values)`` mixes stacked node variables over the graph. No
engine knows which algorithm it serves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from fedopt.algorithms.base import Task
from fedopt.problems.base import AbstractBilevelProblem

__all__ = ["AbstractEngine"]


class AbstractEngine(ABC):
    """Runs client tasks of one problem."""

    def __init__(self, problem: AbstractBilevelProblem) -> None:
        self.problem = problem

    @abstractmethod
    def map_clients(self, task: Task, payload: Any, client_payload: Any, clients: torch.Tensor,
                    keys: torch.Tensor) -> Any:
        """Run ``task`` on every client of ``clients``; replies stacked in cohort order."""

    def gossip(self, w: torch.Tensor, w_numpy: Any, values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """One gossip round: every row of every ``[n, d]`` tensor becomes the ``w``-weighted average
        of its neighbours' rows. ``w`` is a dense or sparse (CSR) torch matrix (``w_numpy`` the same,
        as a numpy array). Default: one (sparse) matmul per tensor."""
        del w_numpy
        return tuple(w @ v if w.layout == torch.strided else torch.sparse.mm(w, v) for v in values)

    def close(self) -> None:  # noqa: B027 - in-process engines hold nothing
        """Release workers and devices."""
