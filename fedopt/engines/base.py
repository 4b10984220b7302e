"""Engines decide *where* client tasks run; they only move data and call pure functions.

``map_clients(task, payload, client_payload, clients, keys)`` runs ``task.fn`` for every client
in ``clients`` (an int64 id tensor, cohort order) with its key, and returns the replies stacked
along a leading cohort axis. ``client_payload`` (or ``None``) has one row per cohort member; a
decentralized node step is the same call with every node as a client and the stacked node state
as ``client_payload``. ``gossip(w, values)`` mixes stacked node variables over the graph. No
engine knows which algorithm it serves.

The engine owns the loop it runs: :meth:`AbstractEngine.run` carries a whole run out (the
in-process and Ray engines run :func:`fedopt.simulation.simulate`, the Flower engine starts Flower's
ServerApp), and :meth:`AbstractEngine.refuses` says, before any work, why an algorithm cannot run
on it, so the runner has no engine-specific branch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch

from fedopt.algorithms.base import Task
from fedopt.problems.base import AbstractBilevelProblem

if TYPE_CHECKING:
    from fedopt.network import Network
    from fedopt.simulation import RunResult

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

    def refuses(self, algorithm: Any, network: Network | None) -> str | None:
        """Why this engine cannot run ``algorithm`` (on ``network`` if decentralized); ``None``
        when it can. Asked when a run is built, so a bad pair fails before any work."""
        del algorithm, network
        return None

    def run(self, algorithm: Any, *, network: Network | None = None, **loop: Any) -> RunResult:
        """Run ``algorithm`` to the end: :func:`fedopt.simulation.simulate` (or
        :func:`~fedopt.simulation.simulate_decentralized` on ``network``) with this engine and the
        loop options ``loop`` (``rounds``, ``seed``, ``eval_every``, ``on_iterate``, ``stop_when``,
        ``checkpoint_every``, ``on_checkpoint``, ``resume``, ``state_metrics``)."""
        from fedopt.simulation import simulate, simulate_decentralized

        if network is not None:
            return simulate_decentralized(self.problem, algorithm, self, network, **loop)
        return simulate(self.problem, algorithm, self, **loop)

    def close(self) -> None:  # noqa: B027 - in-process engines hold nothing
        """Release workers and devices."""
