"""The run loop: build the components of a config, drive the server program, measure progress.

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

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedopt import random as rnd
from fedopt.algorithms.base import (
    DecentralizedAlgorithm,
    FederatedAlgorithm,
    Gossip,
    Iterate,
    LocalStep,
    NodeIterate,
    NodeProgram,
    Program,
    Replies,
    Round,
    Task,
    numel,
)
from fedopt.config import RunConfig
from fedopt.engines.base import AbstractEngine
from fedopt.errors import ConfigError, check
from fedopt.network import Network, build_network
from fedopt.problems.base import AbstractBilevelProblem, ProblemContext
from fedopt.registry import ALGORITHMS, DATASETS, ENGINES, PARTITIONERS, PROBLEMS

__all__ = ["Built", "Counters", "RunResult", "Server", "build", "client_keys", "cohort_keys", "execute", "records_frame",
           "sample_clients", "sample_cohorts", "simulate", "simulate_decentralized"]

_SAMPLE, _CLIENT, _SERVER = 1, 2, 3


@dataclass
class Counters:
    """Communication and oracle accounting, accumulated over a run."""

    comm_rounds: int = 0
    floats_up: int = 0
    floats_down: int = 0
    floats_gossiped: int = 0  # decentralized: floats sent over edges (both directions counted)
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
                 stop_when: Callable[[dict[str, float]], bool] | None = None) -> None:
        self.rounds, self.eval_every, self.counters, self.on_iterate = rounds, eval_every, counters, on_iterate
        self.stop_when = stop_when
        self.records: list[tuple[int, int, str, float]] = []
        self.status, self.diverged_round = "finished", None

    def at(self, k: int, state: list[torch.Tensor], metrics: Callable[[], dict[str, float]]) -> bool:
        """Record iteration ``k``; True when the run diverged and must stop."""
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
) -> RunResult:
    """Run ``algorithm`` for ``rounds`` outer iterations and measure every ``eval_every``.

    ``stop_when(metrics)`` is asked after every measurement; True ends the run there (status
    ``"finished"``, the last records are that iteration's): e.g. iterations to a tolerance,
    ``stop_when=lambda m: m["hypergrad_norm_sq"] <= 1e-8``."""
    server = Server(problem, engine, seed)
    evals = _Evaluations(rounds, eval_every, server.counters, on_iterate, stop_when)
    x, y = problem.init()
    program = algorithm.program(problem, x, y, rounds, server.server_key)
    try:
        msg = next(program)
    except StopIteration:
        msg = None
    while msg is not None:
        if isinstance(msg, Round):
            reply: Replies | None = server.dispatch(msg)
        elif isinstance(msg, Iterate):
            reply = None
            x, y = msg.x, msg.y
            if evals.at(msg.k, [x, y], lambda: problem.metrics(x, y)):
                break
        else:
            raise TypeError(f"a server program yielded {type(msg).__name__}; expected Round or Iterate")
        try:
            msg = program.send(reply)
        except StopIteration:
            msg = None
    program.close()
    return RunResult(evals.records, evals.status, evals.diverged_round, x, y, server.counters)


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
) -> RunResult:
    """Run a decentralized algorithm on ``network`` (its nodes are the problem's clients).

    Node steps run every node through the engine (node ``i``'s minibatch key from (seed, step, i));
    gossip round ``t`` mixes with the network's ``W_t``. Metrics at each evaluation: the problem's
    metrics at the network averages :math:`(\bar x, \bar y)` and ``consensus_<v>`` =
    (1/n) sum_i ||v_i - v_bar||^2 for every variable the program reports. ``stop_when`` as in
    :func:`simulate`."""
    n = network.n
    check(n == problem.num_clients, f"the topology has {n} nodes but the problem has {problem.num_clients} clients")
    device = problem.device
    root = rnd.key_host(seed)
    step_stream = rnd.fold_in_host(root, _CLIENT)
    server_key = torch.as_tensor(rnd.fold_in_host(root, _SERVER)[0], device=device)
    nodes_np = np.arange(n, dtype=np.int64)
    nodes = torch.as_tensor(nodes_np, device=device)
    counters = Counters(decentralized=True)
    evals = _Evaluations(rounds, eval_every, counters, on_iterate, stop_when)
    steps = 0
    x0, y0 = problem.init()
    program: NodeProgram = algorithm.program(problem, x0, y0, rounds, server_key, n)
    x_bar, y_bar = x0, y0
    variables: dict[str, torch.Tensor] = {}
    try:
        msg = next(program)
    except StopIteration:
        msg = None
    while msg is not None:
        if isinstance(msg, LocalStep):
            keys = torch.as_tensor(client_keys(step_stream, steps, nodes_np, distinct=True), device=device)
            reply: Any = engine.map_clients(msg.task, msg.payload, msg.state, nodes, keys)
            counters.add_calls(msg.task, n)
            steps += 1
        elif isinstance(msg, Gossip):
            t = counters.comm_rounds
            w = network.torch(t, msg.values[0].dtype, device)
            reply = engine.gossip(w, network.numpy(t), tuple(msg.values))
            counters.comm_rounds += 1
            counters.floats_gossiped += network.directed_edges(t) * sum(v[0].numel() for v in msg.values)
        elif isinstance(msg, NodeIterate):
            reply = None
            variables = msg.variables
            x_bar, y_bar = variables["x"].mean(0), variables["y"].mean(0)

            def metrics() -> dict[str, float]:
                return {**problem.metrics(x_bar, y_bar),
                        **{f"consensus_{name}": _consensus(v) for name, v in variables.items()}}

            if evals.at(msg.k, list(variables.values()), metrics):
                break
        else:
            raise TypeError(f"a decentralized program yielded {type(msg).__name__}")
        try:
            msg = program.send(reply)
        except StopIteration:
            msg = None
    program.close()
    return RunResult(evals.records, evals.status, evals.diverged_round, x_bar, y_bar, counters, variables)


@dataclass
class Built:
    """The components of a config, built and validated."""

    problem: AbstractBilevelProblem
    algorithm: FederatedAlgorithm | DecentralizedAlgorithm
    engine: AbstractEngine
    network: Network | None = None


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device; use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda":
        check(torch.cuda.is_available(), f"device {name!r} asked for, but CUDA is not available on this machine; use 'cpu'")
        check(dev.index is None or dev.index < torch.cuda.device_count(),
              f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    else:
        check(dev.type == "cpu", f"device {name!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return dev


def build(cfg: RunConfig) -> Built:
    """Build problem, algorithm and engine; every value check happens here, before any run."""
    from fedopt.data import federate

    device = _device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    algorithm = ALGORITHMS.get(cfg.algorithm.name)(**cfg.algorithm.params)
    network = None
    if isinstance(algorithm, DecentralizedAlgorithm):
        check(cfg.topology is not None,
              f"algorithm {cfg.algorithm.name!r} is decentralized and needs a [topology] table (e.g. name = \"ring\")")
        assert cfg.topology is not None
        network = build_network(cfg.topology.name, cfg.clients, seed=cfg.seed, params=dict(cfg.topology.params),
                                mixing=cfg.topology.mixing, schedule=cfg.topology.schedule,
                                sparse=cfg.topology.sparse)
    else:
        check(cfg.topology is None, f"algorithm {cfg.algorithm.name!r} is federated; remove the [topology] table")
        check(algorithm.replace or algorithm.clients_per_round is None or algorithm.clients_per_round <= cfg.clients,
              f"algorithm.params.clients_per_round = {algorithm.clients_per_round} exceeds clients = {cfg.clients}; "
              f"allowed: 1..{cfg.clients} (or replace = true)")
    data = None
    if cfg.data is not None:
        part_cfg = cfg.partition
        partition = PARTITIONERS.get(part_cfg.name)(**part_cfg.params) if part_cfg else PARTITIONERS.get("iid")()
        dataset = DATASETS.get(cfg.data.name)(**cfg.data.params)
        parts = partition(dataset.y_train, cfg.clients, cfg.seed)
        data = federate(dataset, parts, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
    context = ProblemContext(clients=cfg.clients, seed=cfg.seed, dtype=dtype, device=device, data=data)
    problem = PROBLEMS.get(cfg.problem.name)(context, **cfg.problem.params)
    from fedopt.problems.base import AbstractMinimaxProblem

    solves = getattr(algorithm, "solves", "bilevel")
    is_minimax = isinstance(problem, AbstractMinimaxProblem)
    check(is_minimax == (solves == "minimax"),
          f"algorithm {cfg.algorithm.name!r} solves {solves} problems but problem {cfg.problem.name!r} is "
          f"{'minimax' if is_minimax else 'bilevel'}; allowed: "
          + (", ".join(n for n in PROBLEMS.names() if _is_minimax_factory(n) == (solves == "minimax"))))
    check(network is None or cfg.engine.name != "flower",
          f"engine 'flower' runs federated algorithms; {cfg.algorithm.name!r} is decentralized: use vmap, local or ray")
    engine = ENGINES.get(cfg.engine.name)(problem, **cfg.engine.params)
    return Built(problem, algorithm, engine, network)


def _is_minimax_factory(name: str) -> bool:
    """Whether problem ``name``'s factory returns a minimax problem (from its return annotation)."""
    import typing

    from fedopt.problems.base import AbstractMinimaxProblem

    ret = typing.get_type_hints(PROBLEMS.get(name)).get("return")
    return isinstance(ret, type) and issubclass(ret, AbstractMinimaxProblem)


def execute(cfg: RunConfig, built: Built | None = None, *, progress: bool = False) -> tuple[RunResult, float]:
    """Build (unless given) and simulate ``cfg``; returns the result and the wall time in seconds."""
    from tqdm.auto import tqdm

    built = built or build(cfg)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    with tqdm(total=cfg.rounds, disable=not progress, unit="it", desc=cfg.algorithm.name, leave=False) as bar:
        def tick(k: int) -> None:
            bar.n = k
            bar.refresh()

        try:
            common = dict(rounds=cfg.rounds, seed=cfg.seed, eval_every=cfg.eval_every,
                          on_iterate=tick if progress else None)
            from fedopt.engines.flower_engine import FlowerEngine

            if isinstance(built.engine, FlowerEngine):  # Flower drives the program from its ServerApp
                result = built.engine.run(built.algorithm, **common)
            elif built.network is not None:
                result = simulate_decentralized(built.problem, built.algorithm, built.engine, built.network, **common)
            else:
                result = simulate(built.problem, built.algorithm, built.engine, **common)
        finally:
            built.engine.close()
            torch.set_num_threads(threads)
    return result, time.perf_counter() - t0


def records_frame(records: list[tuple[int, int, str, float]]) -> Any:
    """The long-format metrics table: ``round, comm_round, metric, value``."""
    import pandas as pd

    return pd.DataFrame.from_records(records, columns=["round", "comm_round", "metric", "value"])
