"""The default engine: all picked clients in one batched call of ``torch.func.vmap``.

The problem's data stays where it is (one copy, not gathered per client); each client's task
indexes it by its (batched) client id, so a round's minibatches are one gather.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import vmap

from fedopt.algorithms.base import Task
from fedopt.engines.base import AbstractEngine
from fedopt.errors import check
from fedopt.registry import ENGINES

__all__ = ["VmapEngine", "vmap_engine"]


class VmapEngine(AbstractEngine):
    """``vmap`` over the cohort axis; ``chunk_size`` bounds peak memory for large cohorts."""

    def __init__(self, problem, chunk_size: int | None = None) -> None:
        super().__init__(problem)
        self.chunk_size = chunk_size

    def map_clients(self, task: Task, payload: Any, client_payload: Any, clients: torch.Tensor,
                    keys: torch.Tensor) -> Any:
        # Unbatched inputs (the broadcast payload, the problem's data) are captured by closure rather
        # than passed with in_dims=None: vmap then never flattens their pytrees (measured: a third
        # of the per-round cost at 10 clients). The wrappers are cheap to create.
        data, fn = self.problem.data, task.fn
        if client_payload is None:
            per_client = vmap(lambda c, k: fn(payload, None, data, c, k), chunk_size=self.chunk_size)
            return per_client(clients, keys)
        per_client = vmap(lambda cp, c, k: fn(payload, cp, data, c, k), chunk_size=self.chunk_size)
        return per_client(client_payload, clients, keys)


@ENGINES.register("vmap")
def vmap_engine(problem, *, chunk_size: int = 0) -> VmapEngine:
    """Batched clients with ``torch.func.vmap``.

    Args:
        chunk_size: clients per vmapped chunk (0: the whole cohort at once).
    """
    check(chunk_size >= 0, f"engine.params.chunk_size must be >= 0, got {chunk_size}")
    return VmapEngine(problem, chunk_size or None)
