"""The simulation loop: explicit algorithm state advanced one outer iteration at a time.

:func:`simulate` (federated) and :func:`simulate_decentralized` own the outer loop: they build the
algorithm's state with ``init``, run ``step(state, k)`` for ``k = 0..K-1`` through an engine,
measure at outer-iteration boundaries, ask ``stop_when``, and hand a :class:`Checkpoint` (the state
plus the counters) to ``on_checkpoint`` every ``checkpoint_every`` iterations. ``resume=`` continues
from such a checkpoint; since every random draw is a pure function of (seed, round, client), the
resumed run's records equal an uninterrupted run's bit for bit.

Randomness is engine-independent. From the root key of ``seed``:

* client sampling in communication round ``r`` uses ``fold_in(sample_stream, r)`` (the server's
  generator);
* client ``i``'s minibatches in round ``r`` use ``fold_in(fold_in(fold_in(client_stream, r), i), o)``
  where ``o`` counts earlier occurrences of ``i`` in the same cohort (0 unless sampling with
  replacement picked it twice);
* the algorithm's own server-side draws (random truncations) use a third stream.

So the same config and seed give the same trajectory on every engine.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedopt import random as rnd
from fedopt.algorithms.base import (
    DecentralizedAlgorithm,
    FederatedAlgorithm,
    Gossip,
    LocalStep,
    Program,
    Replies,
    Round,
    Steps,
    Task,
    node_variables,
    numel,
)
from fedopt.errors import ConfigError, check

if TYPE_CHECKING:
    from fedopt.engines.base import AbstractEngine
    from fedopt.network import Network
    from fedopt.problems.base import AbstractBilevelProblem

__all__ = ["Checkpoint", "Counters", "RunResult", "Server", "client_keys", "cohort_keys", "sample_clients",
           "sample_cohorts", "simulate", "simulate_decentralized"]

_SAMPLE, _CLIENT, _SERVER = 1, 2, 3


@dataclass
class Counters:
    """Communication and oracle accounting, accumulated over a run."""

    comm_rounds: int = 0
    floats_up: int = 0
    floats_down: int = 0
    floats_gossiped: int = 0  # decentralized: floats sent over edges (both directions counted)
    local_steps: int = 0  # decentralized: node steps taken (the counter of their keys)
    oracle_calls: dict[str, int] = field(default_factory=lambda: {"grad": 0, "hvp": 0, "jvp": 0})
    decentralized: bool = False

    def add_calls(self, task: Task, times: int) -> None:
        for kind, calls in task.oracle_calls.items():
            self.oracle_calls[kind] = self.oracle_calls.get(kind, 0) + times * calls

    def as_metrics(self) -> dict[str, float]:
        out = {"comm_rounds": float(self.comm_rounds)}
        if self.decentralized:
            out["floats_gossiped"] = float(self.floats_gossiped)
        else:
            out.update(floats_up=float(self.floats_up), floats_down=float(self.floats_down))
        out.update({f"{k}_calls": float(v) for k, v in self.oracle_calls.items()})
        return out


@dataclass
class RunResult:
    """What :func:`simulate` returns: long-format records plus the final state and status."""

    records: list[tuple[int, int, str, float]]
    status: str  # "finished" | "diverged"
    diverged_round: int | None
    x: torch.Tensor
    y: torch.Tensor
    counters: Counters
    variables: dict[str, torch.Tensor] | None = None  # decentralized: the last stacked node variables
    state: Any = None  # the algorithm's state after the last outer iteration run
    k: int = 0  # outer iterations run


@dataclass
class Checkpoint:
    """Everything a run needs to continue exactly: the algorithm's state after ``k`` outer
    iterations, the counters (communication rounds, floats, oracle calls, node steps) and the
    records so far. ``state`` is the algorithm's state object, or a mapping of its fields (as read
    back from disk: :func:`fedopt.results.read_checkpoint`)."""

    k: int
    state: Any
    counters: Counters
    records: list[tuple[int, int, str, float]]


def sample_clients(k: np.ndarray, num_clients: int, m: int, replace: bool) -> np.ndarray:
    """``m`` client ids drawn uniformly (host-side) from the key of one round."""
    u = rnd.uniform_host(k, m if replace else num_clients)
    if replace:
        return np.minimum((u * num_clients).astype(np.int64), num_clients - 1)
    return _smallest(u[None], m)[0].astype(np.int64)  # the stable argsort's first m


def _smallest(u: np.ndarray, m: int) -> np.ndarray:
    """Row by row, the indices of the ``m`` smallest entries of ``u`` ``[R, N]`` in stable-argsort
    order (ties by index): O(N) per row by ``argpartition``, with the full sort only for a row that
    has a tie across the cut."""
    if m >= u.shape[1]:
        return np.argsort(u, axis=1, kind="stable")[:, :m]
    part = np.argpartition(u, m - 1, axis=1)[:, :m]
    vals = np.take_along_axis(u, part, 1)
    out = np.take_along_axis(part, np.lexsort((part, vals), axis=1), 1)
    for i in np.flatnonzero(np.count_nonzero(u <= vals.max(1, keepdims=True), axis=1) != m):
        out[i] = np.argsort(u[i], kind="stable")[:m]
    return out


def sample_cohorts(stream: np.ndarray, rounds: np.ndarray, num_clients: int, m: int, replace: bool) -> np.ndarray:
    """:func:`sample_clients` for many rounds at once: row ``j`` is the cohort of round
    ``rounds[j]`` (key ``fold_in(stream, rounds[j])``), the same numbers in one numpy call."""
    k = rnd.fold_in_host(stream, rounds).view(np.uint64)
    if replace:
        u = rnd._uniform_host(k, (m,))
        return np.minimum((u * num_clients).astype(np.int64), num_clients - 1)
    # the uniforms' 53-bit integers: u = (v + 1/2) 2^-53 exactly, so they order (and tie) alike
    v = rnd._bits_host(k, num_clients)
    v >>= np.uint64(11)
    return _smallest(v, m).astype(np.int64)


def cohort_keys(stream: np.ndarray, rounds: np.ndarray, cohorts: np.ndarray) -> np.ndarray:
    """:func:`client_keys` for many rounds of distinct cohorts (``cohorts`` ``[R, m]``) at once."""
    per_client = rnd.fold_in_host(rnd.fold_in_host(stream, rounds)[:, None], cohorts)
    return rnd.fold_in_host(per_client, 0)


def client_keys(stream: np.ndarray, comm_round: int, clients: np.ndarray, *, distinct: bool = False) -> np.ndarray:
    """One key per cohort member, from (client stream, round, client id, occurrence in cohort).
    ``distinct=True`` promises no repeated ids (sampling without replacement), skipping the scan."""
    per_client = rnd.fold_in_host(rnd.fold_in_host(stream, comm_round), clients)
    if distinct or len(set(clients.tolist())) == len(clients):
        return rnd.fold_in_host(per_client, 0)  # every occurrence is the first
    occurrence = np.zeros_like(clients)
    seen: dict[int, int] = {}
    for j, c in enumerate(clients.tolist()):
        occurrence[j] = seen.get(c, 0)
        seen[c] = occurrence[j] + 1
    return rnd.fold_in_host(per_client, occurrence)


def _finite(metrics: dict[str, float], *tensors: torch.Tensor) -> bool:
    return all(math.isfinite(v) for v in metrics.values()) and all(bool(torch.isfinite(t).all()) for t in tensors)


class _Evaluations:
    """Evaluates at outer-iteration boundaries (every ``eval_every``, the last one, and any
    non-finite state), appends long-format records, and detects divergence."""

    def __init__(self, rounds: int, eval_every: int, counters: Counters,
                 on_iterate: Callable[[int], None] | None,
                 stop_when: Callable[[dict[str, float]], bool] | None = None,
                 records: list[tuple[int, int, str, float]] | None = None) -> None:
        self.rounds, self.eval_every, self.counters, self.on_iterate = rounds, eval_every, counters, on_iterate
        self.stop_when = stop_when
        self.records: list[tuple[int, int, str, float]] = list(records or [])
        self.status, self.diverged_round = "finished", None

    def at(self, k: int, state: list[torch.Tensor], metrics: Callable[[], dict[str, float]]) -> bool:
        """Record iteration ``k``; True when the run diverged or ``stop_when`` holds (stop)."""
        finite = all(bool(torch.isfinite(t).all()) for t in state)
        if k % self.eval_every == 0 or k == self.rounds or not finite:
            values = {**metrics(), **self.counters.as_metrics()} if finite else {}
            self.records += [(k, self.counters.comm_rounds, name, v) for name, v in values.items()]
            if not finite or not _finite(values):
                self.status, self.diverged_round = "diverged", k
                return True
            if self.stop_when is not None and self.stop_when(values):
                return True
        if self.on_iterate is not None:
            self.on_iterate(k)
        return False


def _restore(initial: Any, saved: Any) -> Any:
    """The state to resume from: ``saved`` itself, or, for a mapping of fields read from disk, the
    state type of ``initial`` rebuilt from it (the field names must match)."""
    if not isinstance(saved, Mapping):
        return saved
    fields = getattr(type(initial), "_fields", None)
    if fields is None:
        raise ConfigError(f"cannot resume: the algorithm's state {type(initial).__name__} is not a NamedTuple")
    if set(saved) != set(fields):
        raise ConfigError(f"cannot resume: the checkpoint's state has fields {sorted(saved)}, the algorithm's "
                          f"{type(initial).__name__} has {sorted(fields)} (a different algorithm or version?)")
    return type(initial)(**saved)


def _loop(steps: Steps, state: Any, k0: int, rounds: int, drive: Callable[[Any], Any],
          at: Callable[[int, Any], bool], checkpoint_every: int,
          on_checkpoint: Callable[[int, Any], None] | None) -> tuple[Any, int]:
    """The outer loop shared by both runners: ``state = drive(step(state, k))`` for
    ``k = k0..rounds-1``, a measurement after each (``at`` True stops), a checkpoint every
    ``checkpoint_every`` iterations. Returns the last state and its iteration."""
    k = k0
    while k < rounds:
        state = drive(steps.step(state, k))
        k += 1
        if at(k, state):
            break
        if checkpoint_every and on_checkpoint is not None and k % checkpoint_every == 0 and k < rounds:
            on_checkpoint(k, state)
    return state, k


class Server:
    """Carries out the rounds a server program asks for: samples the cohort, derives the keys,
    calls the engine and keeps the communication and oracle accounts."""

    def __init__(self, problem: AbstractBilevelProblem, engine: AbstractEngine, seed: int) -> None:
        self.problem, self.engine = problem, engine
        root = rnd.key_host(seed)
        self.sample_stream = rnd.fold_in_host(root, _SAMPLE)
        self.client_stream = rnd.fold_in_host(root, _CLIENT)
        self.server_key = torch.as_tensor(rnd.fold_in_host(root, _SERVER)[0], device=problem.device)
        self.counters = Counters()
        self._plan: tuple | None = None  # sampled cohorts and keys of upcoming rounds (see _sampled)
        self._plan_len = 0

    def _sampled(self, r: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Round ``r``'s cohort of ``m`` distinct clients and their keys. Both are pure functions of
        the round, so they are computed for a block of upcoming rounds in one numpy call (the block
        doubles, up to 256 rounds, while the rounds keep asking for ``m``): about 23 us per round at
        N = 1,000 against 60-110 us one round at a time, and the same numbers."""
        plan = self._plan
        if plan is None or plan[0] != m or not plan[1] <= r < plan[1] + self._plan_len:
            grow = plan is not None and plan[0] == m and r == plan[1] + self._plan_len
            self._plan_len = min(2 * self._plan_len, 256) if grow else 4
            rounds = np.arange(r, r + self._plan_len)
            ids = sample_cohorts(self.sample_stream, rounds, self.problem.num_clients, m, False)
            keys = cohort_keys(self.client_stream, rounds, ids)
            device = self.problem.device
            plan = self._plan = (m, r, torch.as_tensor(ids, device=device).unbind(0),
                                 torch.as_tensor(keys, device=device).unbind(0))
        return plan[2][r - plan[1]], plan[3][r - plan[1]]

    def dispatch(self, msg: Round) -> Replies:
        """Run one communication round."""
        r, device, num = self.counters.comm_rounds, self.problem.device, self.problem.num_clients
        if isinstance(msg.cohort, torch.Tensor) or msg.replace:
            if isinstance(msg.cohort, torch.Tensor):
                ids_np = msg.cohort.cpu().numpy()
            else:
                ids_np = sample_clients(rnd.fold_in_host(self.sample_stream, r), num, msg.cohort, True)
            ids = torch.as_tensor(ids_np, device=device)
            keys = torch.as_tensor(client_keys(self.client_stream, r, ids_np), device=device)
        else:
            check(msg.cohort <= num, f"cannot sample {msg.cohort} of {num} clients without replacement")
            ids, keys = self._sampled(r, msg.cohort)
        m = ids.shape[0]
        values = self.engine.map_clients(msg.task, msg.payload, msg.client_payload, ids, keys)
        c = self.counters
        c.comm_rounds += 1
        c.floats_down += m * numel(msg.payload) + numel(msg.client_payload)
        c.floats_up += numel(values)
        c.add_calls(msg.task, m)
        return Replies(values, ids)

    def drive(self, program: Program) -> Any:
        """Run a (sub-)program that yields only rounds; return its return value."""
        try:
            msg = next(program)
            while True:
                check(isinstance(msg, Round), "drive() runs programs that yield rounds only")
                msg = program.send(self.dispatch(msg))
        except StopIteration as stop:
            return stop.value


def simulate(
    problem: AbstractBilevelProblem,
    algorithm: FederatedAlgorithm,
    engine: AbstractEngine,
    *,
    rounds: int,
    seed: int,
    eval_every: int = 1,
    on_iterate: Callable[[int], None] | None = None,
    stop_when: Callable[[dict[str, float]], bool] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    resume: Checkpoint | None = None,
    state_metrics: Callable[[Any], dict[str, float]] | None = None,
) -> RunResult:
    """Run ``algorithm`` for ``rounds`` outer iterations and measure every ``eval_every``.

    ``stop_when(metrics)`` is asked after every measurement; True ends the run there (status
    ``"finished"``, the last records are that iteration's): e.g. iterations to a tolerance,
    ``stop_when=lambda m: m["hypergrad_norm_sq"] <= 1e-8``. ``on_checkpoint(checkpoint)`` is called
    every ``checkpoint_every`` outer iterations (not after the last); ``resume=checkpoint``
    continues from one (the records before it are kept). ``state_metrics(state)`` adds metrics of
    the algorithm's internal state at every evaluation (e.g. ``lambda s: {"acc_x": float(s.acc_x)}``),
    next to the algorithm's own ``diagnostics``."""
    server = Server(problem, engine, seed)
    steps = algorithm.setup(problem, rounds, server.server_key)
    state = steps.init(*problem.init())
    if resume is not None:
        state, k0 = _restore(state, resume.state), resume.k
        server.counters = copy.deepcopy(resume.counters)
    else:
        k0 = 0
    evals = _Evaluations(rounds, eval_every, server.counters, on_iterate, stop_when,
                         resume.records if resume is not None else None)

    def at(k: int, s: Any) -> bool:
        def metrics() -> dict[str, float]:
            return {**problem.metrics(s.x, s.y), **(steps.diagnostics(s) if steps.diagnostics else {}),
                    **(state_metrics(s) if state_metrics else {})}

        return evals.at(k, [s.x, s.y], metrics)

    def checkpoint(k: int, s: Any) -> None:
        assert on_checkpoint is not None
        on_checkpoint(Checkpoint(k, s, copy.deepcopy(server.counters), list(evals.records)))

    stopped = resume is None and at(0, state)
    k = k0
    if not stopped:
        state, k = _loop(steps, state, k0, rounds, server.drive, at, checkpoint_every, checkpoint)
    return RunResult(evals.records, evals.status, evals.diverged_round, state.x, state.y, server.counters,
                     state=state, k=k)


def _consensus(v: torch.Tensor) -> float:
    """(1/n) sum_i ||v_i - mean v||^2."""
    v64 = v.detach().to(torch.float64)
    return float((v64 - v64.mean(0)).square().sum(-1).mean())


def simulate_decentralized(
    problem: AbstractBilevelProblem,
    algorithm: DecentralizedAlgorithm,
    engine: AbstractEngine,
    network: Network,
    *,
    rounds: int,
    seed: int,
    eval_every: int = 1,
    on_iterate: Callable[[int], None] | None = None,
    stop_when: Callable[[dict[str, float]], bool] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    resume: Checkpoint | None = None,
    state_metrics: Callable[[Any], dict[str, float]] | None = None,
) -> RunResult:
    r"""Run a decentralized algorithm on ``network`` (its nodes are the problem's clients).

    Node steps run every node through the engine (node ``i``'s minibatch key from (seed, step, i));
    gossip round ``t`` mixes with the network's ``W_t``. Metrics at each evaluation: the problem's
    metrics at the network averages :math:`(\bar x, \bar y)` and ``consensus_<v>`` =
    (1/n) sum_i ||v_i - v_bar||^2 for every variable the algorithm reports. ``stop_when``,
    checkpoints, ``resume`` and ``state_metrics`` as in :func:`simulate`."""
    n = network.n
    check(n == problem.num_clients, f"the topology has {n} nodes but the problem has {problem.num_clients} clients")
    device = problem.device
    root = rnd.key_host(seed)
    step_stream = rnd.fold_in_host(root, _CLIENT)
    server_key = torch.as_tensor(rnd.fold_in_host(root, _SERVER)[0], device=device)
    nodes_np = np.arange(n, dtype=np.int64)
    nodes = torch.as_tensor(nodes_np, device=device)
    steps = algorithm.setup(problem, rounds, server_key, n)
    state = steps.init(*problem.init())
    if resume is not None:
        state, k0, counters = _restore(state, resume.state), resume.k, copy.deepcopy(resume.counters)
    else:
        k0, counters = 0, Counters(decentralized=True)
    evals = _Evaluations(rounds, eval_every, counters, on_iterate, stop_when,
                         resume.records if resume is not None else None)

    def drive(program: Any) -> Any:
        try:
            msg = next(program)
            while True:
                if isinstance(msg, LocalStep):
                    keys = torch.as_tensor(client_keys(step_stream, counters.local_steps, nodes_np, distinct=True),
                                           device=device)
                    reply: Any = engine.map_clients(msg.task, msg.payload, msg.state, nodes, keys)
                    counters.add_calls(msg.task, n)
                    counters.local_steps += 1
                elif isinstance(msg, Gossip):
                    t = counters.comm_rounds
                    w = network.torch(t, msg.values[0].dtype, device)
                    reply = engine.gossip(w, network.numpy(t), tuple(msg.values))
                    counters.comm_rounds += 1
                    counters.floats_gossiped += network.directed_edges(t) * sum(v[0].numel() for v in msg.values)
                else:
                    raise TypeError(f"a decentralized step yielded {type(msg).__name__}; expected LocalStep or Gossip")
                msg = program.send(reply)
        except StopIteration as stop:
            return stop.value

    def at(k: int, s: Any) -> bool:
        variables = node_variables(steps, s)

        def metrics() -> dict[str, float]:
            x_bar, y_bar = variables["x"].mean(0), variables["y"].mean(0)
            return {**problem.metrics(x_bar, y_bar),
                    **{f"consensus_{name}": _consensus(v) for name, v in variables.items()},
                    **(steps.diagnostics(s) if steps.diagnostics else {}),
                    **(state_metrics(s) if state_metrics else {})}

        return evals.at(k, list(variables.values()), metrics)

    def checkpoint(k: int, s: Any) -> None:
        assert on_checkpoint is not None
        on_checkpoint(Checkpoint(k, s, copy.deepcopy(counters), list(evals.records)))

    stopped = resume is None and at(0, state)
    k = k0
    if not stopped:
        state, k = _loop(steps, state, k0, rounds, drive, at, checkpoint_every, checkpoint)
    variables = node_variables(steps, state)
    return RunResult(evals.records, evals.status, evals.diverged_round, variables["x"].mean(0),
                     variables["y"].mean(0), counters, variables, state=state, k=k)
