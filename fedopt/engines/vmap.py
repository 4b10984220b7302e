"""The default engine: all picked clients in one batched call.

The problem's data stays where it is (one copy, not gathered per client); each client's task
indexes it by its (batched) client id, so a round's minibatches are one gather.

A task is batched by ``torch.func.vmap`` unless it is batch-polymorphic (``Task.batched``: its
draws and oracles are closed forms that broadcast over a leading cohort axis, as the quadratic's
and the linear classifiers' are). Such a task is called once on the whole cohort: the same numbers
as ``vmap(fn)`` (tested to 1e-12) without vmap's per-op batching, which dominates small models
(``benchmarks/bench_fedmbo.py``). ``batched_tasks = false`` always uses ``vmap``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import vmap
from torch.utils._pytree import tree_map

from fedopt.algorithms.base import Task
from fedopt.engines.base import AbstractEngine
from fedopt.errors import check
from fedopt.registry import ENGINES

__all__ = ["VmapEngine", "vmap_engine"]


class VmapEngine(AbstractEngine):
    """``vmap`` over the cohort axis; ``chunk_size`` bounds peak memory for large cohorts."""

    def __init__(self, problem, chunk_size: int | None = None, batched_tasks: bool = True) -> None:
        super().__init__(problem)
        self.chunk_size = chunk_size
        self.batched_tasks = batched_tasks

    def map_clients(self, task: Task, payload: Any, client_payload: Any, clients: torch.Tensor,
                    keys: torch.Tensor) -> Any:
        data, fn = self.problem.data, task.fn
        if task.batched and self.batched_tasks:
            return self._call_batched(fn, payload, client_payload, data, clients, keys)
        # Unbatched inputs (the broadcast payload, the problem's data) are captured by closure rather
        # than passed with in_dims=None: vmap then never flattens their pytrees (measured: a third
        # of the per-round cost at 10 clients). The wrappers are cheap to create.
        if client_payload is None:
            per_client = vmap(lambda c, k: fn(payload, None, data, c, k), chunk_size=self.chunk_size)
            return per_client(clients, keys)
        per_client = vmap(lambda cp, c, k: fn(payload, cp, data, c, k), chunk_size=self.chunk_size)
        return per_client(client_payload, clients, keys)

    def _call_batched(self, fn, payload, client_payload, data, clients, keys) -> Any:
        """A batch-polymorphic task on the whole cohort, in chunks of ``chunk_size`` if set."""
        m = clients.shape[0]
        if self.chunk_size is None or m <= self.chunk_size:
            return fn(payload, client_payload, data, clients, keys)
        parts = []
        for lo in range(0, m, self.chunk_size):
            sl = slice(lo, lo + self.chunk_size)
            cp = None if client_payload is None else tree_map(lambda t, sl=sl: t[sl], client_payload)
            parts.append(fn(payload, cp, data, clients[sl], keys[sl]))
        return tree_map(lambda *ts: torch.cat(ts), *parts)


@ENGINES.register("vmap")
def vmap_engine(problem, *, chunk_size: int = 0, batched_tasks: bool = True) -> VmapEngine:
    """Batched clients: ``torch.func.vmap``, or one plain call for batch-polymorphic tasks.

    Args:
        chunk_size: clients per batched chunk (0: the whole cohort at once).
        batched_tasks: call batch-polymorphic tasks (``Task.batched``) once on the whole cohort;
            ``false``: always ``torch.func.vmap``.
    """
    check(chunk_size >= 0, f"engine.params.chunk_size must be >= 0, got {chunk_size}")
    return VmapEngine(problem, chunk_size or None, batched_tasks)
