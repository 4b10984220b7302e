"""Build the components of a config and run them: :func:`build` validates and constructs the
problem, algorithm, engine and network; :func:`execute` hands them to the engine, which owns the
loop (:meth:`fedopt.engines.base.AbstractEngine.run`; the in-process engines run
:func:`fedopt.simulation.simulate`). The loop itself, its randomness rules and checkpoints are in
:mod:`fedopt.simulation` (re-exported here).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedopt.algorithms.base import DecentralizedAlgorithm, FederatedAlgorithm
from fedopt.config import RunConfig
from fedopt.engines.base import AbstractEngine
from fedopt.errors import ConfigError, check
from fedopt.network import Network, build_network
from fedopt.problems.base import AbstractBilevelProblem, ProblemContext
from fedopt.registry import ALGORITHMS, DATASETS, ENGINES, PARTITIONERS, PROBLEMS
from fedopt.simulation import (
    Checkpoint,
    Counters,
    RunResult,
    Server,
    client_keys,
    cohort_keys,
    sample_clients,
    sample_cohorts,
    simulate,
    simulate_decentralized,
)

__all__ = ["Built", "Checkpoint", "Counters", "RunResult", "Server", "build", "client_keys", "cohort_keys", "execute",
           "records_frame", "sample_clients", "sample_cohorts", "simulate", "simulate_decentralized"]


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
    _made("algorithm", cfg.algorithm.name, algorithm, (FederatedAlgorithm, DecentralizedAlgorithm))
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

    _made("problem", cfg.problem.name, problem, (AbstractBilevelProblem, AbstractMinimaxProblem))
    solves = getattr(algorithm, "solves", "bilevel")
    is_minimax = isinstance(problem, AbstractMinimaxProblem)
    check(is_minimax == (solves == "minimax"),
          f"algorithm {cfg.algorithm.name!r} solves {solves} problems but problem {cfg.problem.name!r} is "
          f"{'minimax' if is_minimax else 'bilevel'}; allowed: "
          + (", ".join(n for n in PROBLEMS.names() if _is_minimax_factory(n) == (solves == "minimax"))))
    engine = ENGINES.get(cfg.engine.name)(problem, **cfg.engine.params)
    _made("engine", cfg.engine.name, engine, (AbstractEngine,))
    reason = engine.refuses(algorithm, network)
    if reason is not None:
        engine.close()
        raise ConfigError(f"engine {cfg.engine.name!r} cannot run algorithm {cfg.algorithm.name!r}: {reason}")
    return Built(problem, algorithm, engine, network)


def _made(kind: str, name: str, made: Any, allowed: tuple[type, ...]) -> None:
    """A factory (a plug-in's, typically) must return what its registry makes: one line if not."""
    check(isinstance(made, allowed), f"{kind} {name!r} returned {type(made).__name__}, not a "
          f"{' or '.join(t.__name__ for t in allowed)}")


def _is_minimax_factory(name: str) -> bool:
    """Whether problem ``name``'s factory returns a minimax problem (from its return annotation)."""
    import typing

    from fedopt.problems.base import AbstractMinimaxProblem

    ret = typing.get_type_hints(PROBLEMS.get(name)).get("return")
    return isinstance(ret, type) and issubclass(ret, AbstractMinimaxProblem)


def execute(cfg: RunConfig, built: Built | None = None, *, progress: bool = False,
            checkpoint_every: int = 0, on_checkpoint: Callable[[Checkpoint], None] | None = None,
            resume: Checkpoint | None = None) -> tuple[RunResult, float]:
    """Build (unless given) and run ``cfg`` on its engine; returns the result and the wall time in
    seconds. ``checkpoint_every`` / ``on_checkpoint`` / ``resume`` as in :func:`simulate`."""
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
            result = built.engine.run(built.algorithm, network=built.network, rounds=cfg.rounds, seed=cfg.seed,
                                      eval_every=cfg.eval_every, on_iterate=tick if progress else None,
                                      checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint,
                                      resume=resume)
        finally:
            built.engine.close()
            torch.set_num_threads(threads)
    return result, time.perf_counter() - t0


def records_frame(records: list[tuple[int, int, str, float]]) -> Any:
    """The long-format metrics table: ``round, comm_round, metric, value``."""
    import pandas as pd

    return pd.DataFrame.from_records(records, columns=["round", "comm_round", "metric", "value"])
