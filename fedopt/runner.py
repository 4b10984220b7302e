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
from fedopt.algorithms.base import FederatedAlgorithm, Iterate, Program, Replies, Round, numel
from fedopt.config import RunConfig
from fedopt.engines.base import AbstractEngine
from fedopt.errors import ConfigError, check
from fedopt.problems.base import AbstractBilevelProblem, ProblemContext
from fedopt.registry import ALGORITHMS, DATASETS, ENGINES, PARTITIONERS, PROBLEMS

__all__ = ["Built", "Counters", "RunResult", "Server", "build", "client_keys", "execute", "records_frame", "sample_clients", "simulate"]

_SAMPLE, _CLIENT, _SERVER = 1, 2, 3


@dataclass
class Counters:
    """Communication and oracle accounting, accumulated over a run."""

    comm_rounds: int = 0
    floats_up: int = 0
    floats_down: int = 0
    oracle_calls: dict[str, int] = field(default_factory=lambda: {"grad": 0, "hvp": 0, "jvp": 0})

    def as_metrics(self) -> dict[str, float]:
        out = {"comm_rounds": float(self.comm_rounds), "floats_up": float(self.floats_up),
               "floats_down": float(self.floats_down)}
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


def sample_clients(k: np.ndarray, num_clients: int, m: int, replace: bool) -> np.ndarray:
    """``m`` client ids drawn uniformly (host-side) from the key of one round."""
    u = rnd.uniform_host(k, m if replace else num_clients)
    if replace:
        return np.minimum((u * num_clients).astype(np.int64), num_clients - 1)
    return np.argsort(u, kind="stable")[:m].astype(np.int64)


def client_keys(stream: np.ndarray, comm_round: int, clients: np.ndarray) -> np.ndarray:
    """One key per cohort member, from (client stream, round, client id, occurrence in cohort)."""
    occurrence = np.zeros_like(clients)
    if len(np.unique(clients)) < len(clients):
        seen: dict[int, int] = {}
        for j, c in enumerate(clients.tolist()):
            occurrence[j] = seen.get(c, 0)
            seen[c] = occurrence[j] + 1
    return rnd.fold_in_host(rnd.fold_in_host(rnd.fold_in_host(stream, comm_round), clients), occurrence)


def _finite(metrics: dict[str, float], *tensors: torch.Tensor) -> bool:
    return all(math.isfinite(v) for v in metrics.values()) and all(bool(torch.isfinite(t).all()) for t in tensors)


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

    def dispatch(self, msg: Round) -> Replies:
        """Run one communication round."""
        r, device, num = self.counters.comm_rounds, self.problem.device, self.problem.num_clients
        if isinstance(msg.cohort, torch.Tensor):
            ids_np = msg.cohort.cpu().numpy()
        else:
            check(msg.replace or msg.cohort <= num, f"cannot sample {msg.cohort} of {num} clients without replacement")
            ids_np = sample_clients(rnd.fold_in_host(self.sample_stream, r), num, msg.cohort, msg.replace)
        ids = torch.as_tensor(ids_np, device=device)
        keys = torch.as_tensor(client_keys(self.client_stream, r, ids_np), device=device)
        values = self.engine.map_clients(msg.task, msg.payload, msg.client_payload, ids, keys)
        c = self.counters
        c.comm_rounds += 1
        c.floats_down += len(ids_np) * numel(msg.payload) + numel(msg.client_payload)
        c.floats_up += numel(values)
        for kind, calls in msg.task.oracle_calls.items():
            c.oracle_calls[kind] = c.oracle_calls.get(kind, 0) + len(ids_np) * calls
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
) -> RunResult:
    """Run ``algorithm`` for ``rounds`` outer iterations and measure every ``eval_every``."""
    server = Server(problem, engine, seed)
    records: list[tuple[int, int, str, float]] = []
    x, y = problem.init()
    program = algorithm.program(problem, x, y, rounds, server.server_key)
    status, diverged_round = "finished", None
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
            finite = bool(torch.isfinite(x).all() and torch.isfinite(y).all())
            if msg.k % eval_every == 0 or msg.k == rounds or not finite:
                metrics = {**problem.metrics(x, y), **server.counters.as_metrics()} if finite else {}
                records += [(msg.k, server.counters.comm_rounds, k, v) for k, v in metrics.items()]
                if not finite or not _finite(metrics):
                    status, diverged_round = "diverged", msg.k
                    break
            if on_iterate is not None:
                on_iterate(msg.k)
        else:
            raise TypeError(f"a server program yielded {type(msg).__name__}; expected Round or Iterate")
        try:
            msg = program.send(reply)
        except StopIteration:
            msg = None
    program.close()
    return RunResult(records, status, diverged_round, x, y, server.counters)


@dataclass
class Built:
    """The components of a config, built and validated."""

    problem: AbstractBilevelProblem
    algorithm: FederatedAlgorithm
    engine: AbstractEngine


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
    check(algorithm.replace or algorithm.clients_per_round <= cfg.clients,
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
    engine = ENGINES.get(cfg.engine.name)(problem, **cfg.engine.params)
    return Built(problem, algorithm, engine)


def execute(cfg: RunConfig, built: Built | None = None, *, progress: bool = False) -> tuple[RunResult, float]:
    """Build (unless given) and simulate ``cfg``; returns the result and the wall time in seconds."""
    from tqdm.auto import tqdm

    built = built or build(cfg)
    t0 = time.perf_counter()
    with tqdm(total=cfg.rounds, disable=not progress, unit="it", desc=cfg.algorithm.name, leave=False) as bar:
        def tick(k: int) -> None:
            bar.n = k
            bar.refresh()

        try:
            result = simulate(built.problem, built.algorithm, built.engine, rounds=cfg.rounds, seed=cfg.seed,
                              eval_every=cfg.eval_every, on_iterate=tick if progress else None)
        finally:
            built.engine.close()
    return result, time.perf_counter() - t0


def records_frame(records: list[tuple[int, int, str, float]]) -> Any:
    """The long-format metrics table: ``round, comm_round, metric, value``."""
    import pandas as pd

    return pd.DataFrame.from_records(records, columns=["round", "comm_round", "metric", "value"])
