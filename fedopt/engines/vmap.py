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
        in_dims = (None, 0 if client_payload is not None else None, None, 0, 0)
        fn = vmap(task.fn, in_dims=in_dims, chunk_size=self.chunk_size)  # a wrapper: cheap to create
        return fn(payload, client_payload, self.problem.data, clients, keys)


@ENGINES.register("vmap")
def vmap_engine(problem, *, chunk_size: int = 0) -> VmapEngine:
    """Batched clients with ``torch.func.vmap``.

    Args:
        chunk_size: clients per vmapped chunk (0: the whole cohort at once).
    """
    check(chunk_size >= 0, f"engine.params.chunk_size must be >= 0, got {chunk_size}")
    return VmapEngine(problem, chunk_size or None)
