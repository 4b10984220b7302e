r"""The vocabulary of algorithms: explicit state, client tasks, communication rounds, server programs.

An algorithm is an explicit **state** (a typed pytree: a ``NamedTuple`` of tensors with at least
``x`` and ``y``, plus whatever the method carries: trackers, accumulators, Neumann vectors, momenta)
made by ``init`` and advanced **one outer iteration at a time** by ``step``, a generator that reads
like the paper's pseudo-code. It ``yield``\ s a :class:`Round` (a client task, what the server
broadcasts, how many clients to pick), receives the picked clients' :class:`Replies`, and
``return``\ s the next state. Steps never see an engine, and the runner owns the outer loop,
metrics, ``stop_when`` and checkpoints (a checkpoint is the state plus the round counters, so a
resumed run is bit-identical to an uninterrupted one):

.. code-block:: python

    class MyState(NamedTuple):
        x: torch.Tensor
        y: torch.Tensor

    def setup(problem, K, key):                 # once per run: tasks, constants
        tasks = bilevel_tasks(problem, batch_size=b)

        def init(x0, y0):
            return MyState(x0, y0)

        def step(s, k):                          # outer iteration k -> k + 1
            y = s.y
            for t in range(T):
                y = y - beta * (yield Round(tasks.grad_y_inner, (s.x, y), n)).mean()
            h = yield from phe(tasks, s.x, y, ...)
            return MyState(s.x - alpha * h, y)

        return Steps(init, step)

    algorithm = FederatedAlgorithm("mine", clients_per_round=n, replace=False, setup=setup)

A decentralized algorithm has the same shape over stacked node state (``[n, ...]``), with
:class:`LocalStep` (every node runs a task on its own row) and :class:`Gossip` in place of rounds.

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
from typing import TYPE_CHECKING, Any, NamedTuple

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
    "State",
    "Steps",
    "Task",
    "conformance",
    "node_variables",
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


State = Any  # a NamedTuple (a torch pytree) of tensors with at least the fields ``x`` and ``y``
StepProgram = Generator[Any, Any, State]  # yields rounds / local steps / gossip, returns the next state


class Steps(NamedTuple):
    """An algorithm bound to one run (what ``setup`` returns).

    Attributes:
        init: ``init(x0, y0) -> state``; decentralized: the stacked state of every node, all
            starting at ``(x0, y0)``.
        step: ``step(state, k) -> generator`` carrying out outer iteration ``k`` (``k = 0..K-1``);
            it yields :class:`Round` (federated) or :class:`LocalStep` / :class:`Gossip`
            (decentralized) and returns the state after the iteration.
        variables: decentralized only: ``variables(state) -> {name: [n, d] tensor}``, the stacked
            variables whose consensus error is measured (default ``x`` and ``y``).
        diagnostics: ``diagnostics(state) -> {name: float}``, internal quantities reported with
            the metrics at every evaluation (e.g. a Neumann vector's norm); default none.
    """

    init: Callable[[torch.Tensor, torch.Tensor], State]
    step: Callable[[State, int], StepProgram]
    variables: Callable[[State], dict[str, torch.Tensor]] | None = None
    diagnostics: Callable[[State], dict[str, float]] | None = None


@dataclass(frozen=True)
class FederatedAlgorithm:
    """A federated algorithm: how to set it up for a run and what the runner must know of it.

    ``setup(problem, K, key) -> Steps`` is called once per run of ``K`` outer iterations; ``key``
    is the server's own random stream (random truncations and the like; derive per-iteration keys
    from it with ``fold_in(key, k)`` so that a step is a pure function of ``(state, k)``).
    ``clients_per_round=None`` means every round asks all clients (centralized methods).
    """

    name: str
    clients_per_round: int | None
    replace: bool
    setup: Callable[[AbstractBilevelProblem, int, torch.Tensor], Steps]
    solves: str = "bilevel"  # or "minimax": the kind of problem the steps expect

    def program(self, problem: Any, x0: torch.Tensor, y0: torch.Tensor, K: int, key: torch.Tensor) -> Program:
        """The whole run as one generator (``Iterate`` at every boundary): ``init`` and ``K`` steps."""
        steps = self.setup(problem, K, key)
        state = steps.init(x0, y0)
        yield Iterate(0, state.x, state.y)
        for k in range(K):
            state = yield from steps.step(state, k)
            yield Iterate(k + 1, state.x, state.y)


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

    ``setup(problem, K, key, n) -> Steps`` binds it to a run of ``K`` outer iterations on ``n``
    nodes; its ``init`` stacks ``(x0, y0)`` over the nodes and its ``step`` yields
    :class:`LocalStep` and :class:`Gossip` and returns the next stacked state.
    """

    name: str
    setup: Callable[[AbstractBilevelProblem, int, torch.Tensor, int], Steps]

    def program(self, problem: Any, x0: torch.Tensor, y0: torch.Tensor, K: int, key: torch.Tensor,
                n: int) -> NodeProgram:
        """The whole run as one generator (``NodeIterate`` at every boundary)."""
        steps = self.setup(problem, K, key, n)
        state = steps.init(x0, y0)
        yield NodeIterate(0, node_variables(steps, state))
        for k in range(K):
            state = yield from steps.step(state, k)
            yield NodeIterate(k + 1, node_variables(steps, state))


def node_variables(steps: Steps, state: State) -> dict[str, torch.Tensor]:
    """The stacked variables of a decentralized state whose consensus is measured."""
    return steps.variables(state) if steps.variables is not None else {"x": state.x, "y": state.y}


def conformance(**params: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the parameters the conformance suite (``tests/test_conformance.py``) runs an
    algorithm factory with: small steps that move the suite's problem (the noisy heterogeneous
    quadratic for bilevel methods, noisy NC-SC for minimax ones, a 6-node ring for decentralized
    ones) without diverging in a few outer iterations. The suite runs every registered algorithm and
    fails on one that declares nothing::

        @ALGORITHMS.register("mine")
        @conformance(outer_lr=0.1, clients_per_round=4)
        def mine(*, outer_lr: float, clients_per_round: int = 10) -> FederatedAlgorithm: ...
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.conformance_params = dict(params)  # type: ignore[attr-defined]
        return fn

    return deco


def numel(tree: Any) -> int:
    """Number of floats in a pytree of tensors (``None`` counts zero)."""
    if isinstance(tree, torch.Tensor):  # the common cases first, without pytree flattening
        return tree.numel()
    if tree is None:
        return 0
    if type(tree) is tuple and all(type(t) is torch.Tensor for t in tree):
        return sum(t.numel() for t in tree)
    return sum(t.numel() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))
