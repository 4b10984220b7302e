"""Engines decide *where* client tasks run; they only move data and call pure functions.

``map_clients(task, payload, client_payload, clients, keys)`` runs ``task.fn`` for every client
in ``clients`` (an int64 id tensor, cohort order) with its key, and returns the replies stacked
along a leading cohort axis. ``client_payload`` (or ``None``) has one row per cohort member. No
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

    def close(self) -> None:  # noqa: B027 - in-process engines hold nothing
        """Release workers and devices."""
