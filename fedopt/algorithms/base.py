r"""The vocabulary of federated algorithms: client tasks, communication rounds, server programs.

A federated algorithm is a *server program*: a generator that reads like the paper's pseudo-code.
It ``yield``\ s a :class:`Round` (a client task, what the server broadcasts, how many clients to
pick) and receives the picked clients' :class:`Replies`; at every outer-iteration boundary it
``yield``\ s an :class:`Iterate` so the runner can measure progress. Programs never see an engine:

.. code-block:: python

    def program(problem, x, y, K, key):
        yield Iterate(0, x, y)
        for k in range(K):
            for t in range(T):
                y = y - beta * (yield Round(tasks.grad_y_inner, (x, y), n)).mean()
            ...
            yield Iterate(k + 1, x, y)

A :class:`Task` wraps a pure client function
``fn(payload, client_payload, data, client, key) -> reply`` (a pytree of tensors) that reads only
its arguments: the broadcast ``payload``, its own slice of a per-client ``client_payload`` (or
``None``), the problem's shared ``data``, its id and its random key. That purity is what lets the
engines loop over clients, ``vmap`` them, or ship them to Ray actors and Flower clients with the
same result.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

if TYPE_CHECKING:
    from fedopt.problems.base import AbstractBilevelProblem

__all__ = [
    "DecentralizedAlgorithm",
    "FederatedAlgorithm",
    "Gossip",
    "Iterate",
    "LocalStep",
    "NodeIterate",
    "NodeProgram",
    "Program",
    "Replies",
    "Round",
    "Task",
    "numel",
]

ClientFn = Callable[[Any, Any, dict[str, torch.Tensor], torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True, eq=False)
class Task:
    """A pure client computation and its per-client oracle cost.

    Attributes:
        name: the message type (``"lower_grad"``, ``"hvp"``, ...); also the Flower action name.
        fn: ``fn(payload, client_payload, data, client, key) -> reply``.
        oracle_calls: oracle calls per client per round, by kind: ``grad`` (a gradient of
            :math:`f_i` or :math:`g_i`), ``hvp`` (a Hessian-vector product), ``jvp`` (a cross
            product :math:`\\nabla^2_{xy} g_i v`).
        batched: ``fn`` is batch-polymorphic: called once with the whole cohort's ids and keys
            (``[m]``) and ``client_payload`` rows, it returns the stacked replies that ``vmap(fn)``
            would (the ``vmap`` engine then skips ``torch.func.vmap``; tests hold the two to 1e-12).
    """

    name: str
    fn: ClientFn
    oracle_calls: Mapping[str, int] = field(default_factory=dict)
    batched: bool = False


@dataclass(frozen=True)
class Round:
    """One communication round: broadcast ``payload`` to a cohort, run ``task``, collect replies.

    ``cohort`` is either the number of clients to sample (uniformly, by the runner, from the
    server's random stream; with or without replacement per ``replace``) or an explicit id tensor
    (to reuse the previous round's clients). ``client_payload`` is a pytree whose leaves have one
    row per cohort member (sent to that member only).
    """

    task: Task
    payload: Any
    cohort: int | torch.Tensor
    client_payload: Any = None
    replace: bool = False


@dataclass(frozen=True)
class Replies:
    """The stacked replies of a round (leading axis = cohort order) and who sent them."""

    values: Any
    clients: torch.Tensor

    def mean(self) -> Any:
        """The server's uniform average of the replies."""
        if isinstance(self.values, torch.Tensor):
            return self.values.mean(0)
        return tree_map(lambda t: t.mean(0), self.values)


@dataclass(frozen=True)
class Iterate:
    """An outer-iteration boundary: the server state ``(x, y)`` after ``k`` outer iterations."""

    k: int
    x: torch.Tensor
    y: torch.Tensor


Program = Generator[Round | Iterate, Replies | None, None]


@dataclass(frozen=True)
class FederatedAlgorithm:
    """A federated algorithm: its server program and what the runner must know of it.

    ``program(problem, x0, y0, K, key)`` runs ``K`` outer iterations; ``key`` is the server's own
    random stream (random truncations and the like).
    """

    name: str
    clients_per_round: int | None  # None: every round asks all clients (centralized methods)
    replace: bool
    program: Callable[[AbstractBilevelProblem, torch.Tensor, torch.Tensor, int, torch.Tensor], Program]
    solves: str = "bilevel"  # or "minimax": the kind of problem the program expects


@dataclass(frozen=True)
class LocalStep:
    """Decentralized phase 1: every node runs ``task`` on its own row of the stacked ``state``.

    ``task.fn(payload, node_state, data, node, key)`` sees only its node's slice of ``state`` (a
    pytree of ``[n, ...]`` tensors), the shared ``payload``, the data and its key; the program
    receives the stacked replies (``[n, ...]``)."""

    task: Task
    state: Any
    payload: Any = None


@dataclass(frozen=True)
class Gossip:
    r"""Decentralized phase 2: one gossip round, :math:`X \leftarrow W_t X` for every tensor in
    ``values`` (each ``[n, d]``, one row per node); the program receives the mixed tensors.
    ``names`` label them for the accounting of floats sent over edges."""

    values: tuple[torch.Tensor, ...]
    names: tuple[str, ...]


@dataclass(frozen=True)
class NodeIterate:
    """A decentralized outer-iteration boundary: the stacked node variables after ``k`` iterations.
    ``variables`` must hold ``"x"`` and ``"y"`` (``[n, p]``, ``[n, q]``); every variable gets a
    consensus-error metric and the problem is measured at the network averages."""

    k: int
    variables: dict[str, torch.Tensor]


NodeProgram = Generator[LocalStep | Gossip | NodeIterate, Any, None]


@dataclass(frozen=True)
class DecentralizedAlgorithm:
    """A decentralized bilevel algorithm over the nodes of a gossip graph.

    ``program(problem, x0, y0, K, key, n)`` runs ``K`` outer iterations on ``n`` nodes, all
    starting at ``(x0, y0)``, and yields :class:`LocalStep`, :class:`Gossip` and
    :class:`NodeIterate`.
    """

    name: str
    program: Callable[[AbstractBilevelProblem, torch.Tensor, torch.Tensor, int, torch.Tensor, int], NodeProgram]


def numel(tree: Any) -> int:
    """Number of floats in a pytree of tensors (``None`` counts zero)."""
    if isinstance(tree, torch.Tensor):  # the common cases first, without pytree flattening
        return tree.numel()
    if tree is None:
        return 0
    if type(tree) is tuple and all(type(t) is torch.Tensor for t in tree):
        return sum(t.numel() for t in tree)
    return sum(t.numel() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))
