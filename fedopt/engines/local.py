"""The reference engine: a plain Python loop over the picked clients."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

from fedopt.algorithms.base import Task
from fedopt.engines.base import AbstractEngine
from fedopt.registry import ENGINES

__all__ = ["LocalEngine", "local"]


class LocalEngine(AbstractEngine):
    """Calls ``task.fn`` once per client, in cohort order, and stacks the replies."""

    def map_clients(self, task: Task, payload: Any, client_payload: Any, clients: torch.Tensor,
                    keys: torch.Tensor) -> Any:
        data = self.problem.data
        replies = []
        for j in range(clients.numel()):
            cp = None if client_payload is None else tree_map(lambda t, j=j: t[j], client_payload)
            replies.append(task.fn(payload, cp, data, clients[j], keys[j]))
        return tree_map(lambda *ts: torch.stack(ts), *replies)


    def gossip(self, w, w_numpy, values):
        """The reference: node by node, the weighted sum over its neighbours (and itself)."""
        del w
        out = []
        for v in values:
            rows = []
            for i in range(v.shape[0]):
                nbrs = np.flatnonzero(w_numpy[i])
                weights = torch.as_tensor(w_numpy[i, nbrs], dtype=v.dtype, device=v.device)
                rows.append((weights.unsqueeze(-1) * v[torch.as_tensor(nbrs, device=v.device)]).sum(0))
            out.append(torch.stack(rows))
        return tuple(out)


@ENGINES.register("local")
def local(problem) -> LocalEngine:
    """The plain loop over clients (the reference for every other engine)."""
    return LocalEngine(problem)
