"""The conformance suite: every registered algorithm, on every engine that can run it.

Parametrised from the registries themselves (``ALGORITHMS.names()``, ``ENGINES.names()``), so an
algorithm registered tomorrow is covered without editing this file; it only has to declare its
small-step parameters with :func:`fedopt.algorithms.base.conformance`. For each algorithm:

* **determinism**: the same config and seed give the same metrics table, bit for bit;
* **engine agreement**: ``local`` and ``vmap`` to 1e-10 (float64) on every metric, counters equal;
  ``ray`` bitwise equal to ``local`` (``inner = "local"``: the same per-client computation); the
  Flower strategy and ClientApp bitwise equal to ``local``: messages built by the strategy,
  routed by Flower's ``ClientApp`` to fedopt's handlers, delivered in this process by a grid that
  honours Flower's ``Grid`` contract (the Flower *runtime*, with its ~10 s start-up, runs in
  ``tests/engines/test_flower_engine.py``); an engine that cannot run the algorithm refuses it when
  the run is built, in one line;
* **exact accounting**: oracle calls counted by instrumenting ``fedopt.oracles`` during a
  ``local`` run (each call inside a ``vmap`` counted once per batch row) equal the run's
  ``grad_calls`` / ``hvp_calls`` / ``jvp_calls``; communication rounds and floats recounted from
  what the engine actually received (decentralized: edges read off the mixing matrices);
* **no mutation**: no task changes its payload, its client payload or the problem's data;
* **checkpoint / resume**: resuming from a mid-run checkpoint (the state object, or its fields as
  read back from disk) gives the uninterrupted run's records and final state bit for bit, on
  ``local`` and ``vmap``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import built
from torch.utils._pytree import tree_leaves

import fedopt
from fedopt import oracles
from fedopt.algorithms.base import DecentralizedAlgorithm, numel
from fedopt.engines.local import LocalEngine
from fedopt.errors import ConfigError
from fedopt.registry import ALGORITHMS, ENGINES
from fedopt.simulation import Checkpoint, simulate, simulate_decentralized
from topologies.plugins import plugin_path

# the registered algorithms, plus the example plug-in package's algorithm by dotted path
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_method"
NAMES = [*ALGORITHMS.names(), "my_method.algorithm:fed_soba"]
ROUNDS = 4


@pytest.fixture(scope="module", autouse=True)
def example_plugin_path():
    with plugin_path(EXAMPLE):
        yield


def _algorithm(name: str):
    factory = ALGORITHMS.get(name)
    params = getattr(factory, "conformance_params", None)
    return factory, params


def config(name: str, engine: str = "local", *, rounds: int = ROUNDS, seed: int = 3) -> dict:
    """The suite's small float64 config for algorithm ``name``, chosen by what the algorithm is."""
    factory, params = _algorithm(name)
    assert params is not None, f"algorithm {name!r} declares no @conformance(...) parameters"
    algorithm = factory(**params)
    raw = {"seed": seed, "rounds": rounds, "eval_every": 1, "dtype": "float64",
           "algorithm": {"name": name, "params": dict(params)}, "engine": {"name": engine}}
    if isinstance(algorithm, DecentralizedAlgorithm):
        raw.update(clients=6, topology={"name": "ring"},
                   problem={"name": "quadratic", "params": {"x_dim": 4, "y_dim": 3, "delta": 1.0, "sigma": 0.3}})
    elif algorithm.solves == "minimax":
        raw.update(clients=7, problem={"name": "nc_sc", "params": {"dim": 4, "sigma": 0.5}})
    else:
        raw.update(clients=8, problem={"name": "quadratic", "params": {"x_dim": 4, "y_dim": 3, "delta": 0.5,
                                                                        "sigma": 0.5}})
    return raw


def run(raw: dict, engine=None, *, b=None, **loop):
    """Build ``raw`` (unless ``b``, its built components, is given) and run it on its engine (or
    on ``engine``, an engine object)."""
    b = b or built(raw)
    engine = engine or b.engine
    common = dict(rounds=raw["rounds"], seed=raw["seed"], eval_every=raw["eval_every"], **loop)
    try:
        if b.network is not None:
            return simulate_decentralized(b.problem, b.algorithm, engine, b.network, **common)
        return simulate(b.problem, b.algorithm, engine, **common)
    finally:
        b.engine.close()


def frame(result) -> np.ndarray:
    df = fedopt.runner.records_frame(result.records)
    return df.pivot(index="round", columns="metric", values="value")


def test_every_registered_algorithm_declares_its_conformance_parameters():
    missing = [n for n in NAMES if _algorithm(n)[1] is None]
    assert not missing, f"add @conformance(...) to: {missing}"
    assert len(ALGORITHMS.names()) >= 16


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_table_and_the_run_moves(name):
    a, b = run(config(name, "vmap")), run(config(name, "vmap"))
    assert a.records == b.records
    fa = frame(a)
    assert fa.shape[0] == ROUNDS + 1 and a.status == "finished"
    moved = fa.drop(columns=[c for c in fa.columns if c.endswith("_calls") or c.startswith(("comm", "floats"))])
    assert not np.allclose(moved.iloc[0].to_numpy(), moved.iloc[-1].to_numpy())
    c = run(config(name, "vmap", seed=4))
    assert c.records != a.records  # the seed matters


def check_local_and_vmap_agree(name: str) -> None:
    a, b = run(config(name, "local")), run(config(name, "vmap"))
    fa, fb = frame(a), frame(b)
    assert list(fa.columns) == list(fb.columns) and fa.shape == fb.shape
    assert float(np.abs(fa.to_numpy() - fb.to_numpy()).max()) <= 1e-10
    assert a.counters == b.counters


@pytest.mark.parametrize("name", NAMES)
def test_local_and_vmap_agree(name):
    check_local_and_vmap_agree(name)


# ---- accounting and purity ---------------------------------------------------------------------


def _rows(t) -> int:
    """How many calls a tensor argument stands for: 1, or the batch sizes of the vmap levels it
    carries (a call inside ``vmap`` over ``b`` rows is ``b`` oracle calls)."""
    ft = torch._C._functorch
    n = 1
    while isinstance(t, torch.Tensor) and ft.is_batchedtensor(t):
        bdim = ft.maybe_get_bdim(t)
        t = ft.get_unwrapped(t)
        n *= t.shape[bdim]
    return n


@contextlib.contextmanager
def counted_oracles():
    """Count the oracle calls actually made: grad_x / grad_y / grad_xy one gradient each,
    hvp_yy one HVP, jvp_xy one cross product, hvp_and_jvp one of each."""
    counts = {"grad": 0, "hvp": 0, "jvp": 0}
    kinds = {"grad_x": {"grad": 1}, "grad_y": {"grad": 1}, "grad_xy": {"grad": 1}, "hvp_yy": {"hvp": 1},
             "jvp_xy": {"jvp": 1}, "hvp_and_jvp": {"hvp": 1, "jvp": 1}}
    saved = {name: getattr(oracles, name) for name in kinds}

    depth = [0]  # grad_xy and hvp_and_jvp may call the others: count the outermost call only

    def wrap(name, fn):
        def counted(*args, **kwargs):
            if depth[0] == 0:
                rows = max(_rows(a) for a in args[1:] if isinstance(a, torch.Tensor))
                for kind, times in kinds[name].items():
                    counts[kind] += times * rows
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return counted

    for name, fn in saved.items():
        setattr(oracles, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(oracles, name, fn)


class AuditEngine(LocalEngine):
    """The local engine, recounting rounds and floats from what it receives and checking that no
    task mutates its inputs."""

    def __init__(self, problem):
        super().__init__(problem)
        self.rounds = self.gossips = self.down = self.up = self.gossiped = 0

    def map_clients(self, task, payload, client_payload, clients, keys):
        before = [t.clone() for t in tree_leaves((payload, client_payload)) if isinstance(t, torch.Tensor)]
        replies = super().map_clients(task, payload, client_payload, clients, keys)
        after = [t for t in tree_leaves((payload, client_payload)) if isinstance(t, torch.Tensor)]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), f"task {task.name} mutated its inputs"
        m = clients.numel()
        self.rounds += 1
        self.down += m * numel(payload) + numel(client_payload)
        self.up += sum(t.numel() for t in tree_leaves(replies) if isinstance(t, torch.Tensor))
        return replies

    def gossip(self, w, w_numpy, values):
        self.gossips += 1
        edges = int(np.count_nonzero(w_numpy)) - int(np.count_nonzero(np.diag(w_numpy)))
        self.gossiped += edges * sum(v.shape[1] for v in values)
        return super().gossip(w, w_numpy, values)


@pytest.mark.parametrize("name", NAMES)
def test_accounting_counts_the_calls_made_and_no_task_mutates_its_inputs(name):
    check_accounting_and_purity(name)


def check_accounting_and_purity(name: str) -> None:
    raw = config(name, "local")
    b = built(raw)
    data_before = {k: v.clone() for k, v in b.problem.data.items()}
    audit = AuditEngine(b.problem)
    with counted_oracles() as made:
        if b.network is not None:
            result = simulate_decentralized(b.problem, b.algorithm, audit, b.network, rounds=ROUNDS, seed=3)
        else:
            result = simulate(b.problem, b.algorithm, audit, rounds=ROUNDS, seed=3)
    c = result.counters
    assert made["grad"] + made["hvp"] + made["jvp"] > 0
    assert c.oracle_calls == made, f"declared {c.oracle_calls} but made {made}"
    if b.network is not None:
        assert c.comm_rounds == audit.gossips and c.floats_gossiped == audit.gossiped
    else:
        assert (c.comm_rounds, c.floats_down, c.floats_up) == (audit.rounds, audit.down, audit.up)
    assert all(torch.equal(data_before[k], v) for k, v in b.problem.data.items())


# ---- checkpoint and resume ---------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["local", "vmap"])
@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_checkpoint_is_bit_identical(name, engine):
    raw = config(name, engine, rounds=5)
    checkpoints: list[Checkpoint] = []
    full = run(raw, checkpoint_every=2, on_checkpoint=checkpoints.append)
    assert [ck.k for ck in checkpoints] == [2, 4]
    first = checkpoints[0]
    for ck in (first, Checkpoint(first.k, first.state._asdict(), first.counters, first.records)):
        resumed = run(raw, resume=copy.deepcopy(ck))
        assert resumed.records == full.records
        for a, b in zip(tree_leaves(tuple(resumed.state)), tree_leaves(tuple(full.state)), strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


# ---- the other engines -------------------------------------------------------------------------

OTHER_ENGINES = [e for e in ENGINES.names() if e not in ("local", "vmap")]


@pytest.fixture(scope="module")
def ray_engines():
    """One Ray session and one ``ray`` engine per suite problem (actors start once, not per test):
    ``engine_for(raw) -> (built components, engine)``."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    engines: dict[str, tuple] = {}

    def engine_for(raw: dict):
        key = repr({k: raw.get(k) for k in ("problem", "clients", "topology", "seed", "dtype")})
        if key not in engines:
            b = built(raw)
            engines[key] = (b, b.engine)
        b, engine = engines[key]
        return built({**raw, "engine": {"name": "local"}}), engine

    yield engine_for
    for _, engine in engines.values():
        engine.close()
    ray.shutdown()


class _InProcessGrid:
    """Flower's ``Grid`` contract (``get_node_ids``, ``send_and_receive``) delivering every message
    to the ClientApp in this process; node ids are arbitrary numbers, as Flower's are."""

    runs = itertools.count(1)

    def __init__(self, app, n: int) -> None:
        self.app, self.node_of = app, {1000 + 7 * i: i for i in range(n)}
        self.run_id = next(self.runs)  # a new Flower run: client processes reload the problem

    def get_node_ids(self):
        return list(self.node_of)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Context, RecordDict

        del timeout
        return [self.app(m, Context(run_id=self.run_id, node_id=m.metadata.dst_node_id,
                                    node_config={"partition-id": self.node_of[m.metadata.dst_node_id]},
                                    state=RecordDict(), run_config={}))
                for m in messages]


@contextlib.contextmanager
def _flower_identity():
    """Flower stamps messages with the running task's identity; set one for the in-process grid."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _flower_records(raw: dict):
    from fedopt.flower import FedoptStrategy, client_app

    b = built({**raw, "engine": {"name": "local"}})
    strategy = FedoptStrategy.for_algorithm(b.problem, b.algorithm, seed=raw["seed"], eval_every=1)
    with _flower_identity():
        strategy.start(_InProcessGrid(client_app(b.problem), b.problem.num_clients), num_rounds=raw["rounds"])
    return strategy.run_result


@pytest.mark.parametrize("engine", OTHER_ENGINES)
@pytest.mark.parametrize("name", NAMES)
def test_every_other_engine_runs_it_bitwise_like_local_or_refuses_it_at_build(name, engine, request):
    raw = config(name, engine, rounds=2)
    if engine == "ray":
        engine_for = request.getfixturevalue("ray_engines")
        # a third of a CPU per actor: the suite's three engines (one per problem) stay up together
        raw["engine"]["params"] = {"inner": "local", "actors": 2, "num_cpus": 0.3}
    elif engine == "flower":
        pytest.importorskip("flwr")
    try:
        b, ray_engine = engine_for(raw) if engine == "ray" else (built(raw), None)
    except ConfigError as e:
        message = str(e)
        assert "cannot run" in message and "\n" not in message
        assert isinstance(_algorithm(name)[0](**_algorithm(name)[1]), DecentralizedAlgorithm), message
        return
    reference = run({**raw, "engine": {"name": "local"}})
    if engine == "flower":
        b.engine.close()
        other = _flower_records(raw)
    else:
        reason = ray_engine.refuses(b.algorithm, b.network)  # the shared engine: ask it as build() would
        if reason is not None:
            pytest.fail(f"ray refuses {name}: {reason}")
        other = run(raw, ray_engine, b=b)
    assert other.records == reference.records


# ---- the suite can fail ----------------------------------------------------------------------


BROKEN = """
import torch

from fedopt import oracles
from fedopt import random as rnd
from fedopt.algorithms.base import FederatedAlgorithm, Round, Steps, Task, conformance
from my_method.algorithm import FedSOBAState


def _soba(name, *, declared, noise, mutate):
    @conformance(lr=0.2)
    def factory(*, lr: float) -> FederatedAlgorithm:
        def setup(problem, K, key):
            f, g = problem.outer_loss, problem.inner_loss
            calls = []

            def directions(payload, client_payload, data, client, key):
                x, y, v = payload
                zeta = problem.inner_batch(data, client, rnd.fold_in(key, 0), 2)
                xi = problem.outer_batch(data, client, rnd.fold_in(key, 1), 2)
                hv, jv = oracles.hvp_and_jvp(g, x, y, zeta, v)
                fx, fy = oracles.grad_xy(f, x, y, xi)
                if mutate:
                    x.add_(0.0 * x + 1e-3)  # writes into the broadcast payload
                calls.append(1)  # hidden state: a task's calls differ between a loop and one batched call
                d_x = fx - jv + (1e-3 * len(calls) if noise else 0.0)
                return oracles.grad_y(g, x, y, zeta), hv - fy, d_x

            task = Task(name, directions, declared)

            def step(s, k):
                d_y, d_v, d_x = (yield Round(task, (s.x.clone(), s.y, s.v), 4)).mean()
                return FedSOBAState(s.x - lr * d_x, s.y - lr * d_y, s.v - lr * d_v)

            return Steps(lambda x0, y0: FedSOBAState(x0, y0, torch.zeros_like(y0)), step)

        return FederatedAlgorithm(name, 4, False, setup)

    return factory


undercounted = _soba("undercounted", declared={"grad": 1, "hvp": 1, "jvp": 1}, noise=False, mutate=False)
noisy = _soba("noisy", declared={"grad": 2, "hvp": 1, "jvp": 1}, noise=True, mutate=False)
mutating = _soba("mutating", declared={"grad": 2, "hvp": 1, "jvp": 1}, noise=False, mutate=True)
"""


@pytest.mark.parametrize("broken, check, expected", [
    ("undercounted", check_accounting_and_purity, "declared"),
    ("mutating", check_accounting_and_purity, "mutated its inputs"),
    ("noisy", check_local_and_vmap_agree, None),
])
def test_the_suite_rejects_a_broken_algorithm(tmp_path, broken, check, expected):
    (tmp_path / "broken_algorithms.py").write_text(BROKEN)
    with plugin_path(tmp_path):
        name = f"broken_algorithms:{broken}"
        run(config(name, "local"))  # it runs: only the suite's checks can tell
        with pytest.raises(AssertionError, match=expected):
            check(name)
