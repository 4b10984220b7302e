r"""fedopt's federated algorithms as Flower strategies, on Flower's Message API (``flwr`` 1.42).

Server side: :class:`FedoptStrategy` subclasses ``flwr.serverapp.strategy.Strategy``; one class per
registered federated algorithm (:class:`FedMBOStrategy`, :class:`FedNestStrategy`,
:class:`FESSGDAStrategy`, ...). It is used as Flower's own strategies are:

* **A Flower round is one outer iteration** of the algorithm. ``arrays`` (what Flower's loop passes
  from round to round) hold the model ``x`` and ``y`` (keys ``"x"``, ``"y"``;
  :meth:`~FedoptStrategy.initial_arrays` gives the problem's starting point); the rest of the
  algorithm's state (trackers, accumulators, a smoothing anchor) is server-side optimizer state
  kept by the strategy, as Flower's ``FedAdam`` keeps its moments. The ``arrays`` a round receives
  are authoritative for ``x`` and ``y``: a wrapper that changes them (noise) changes the run.
* :meth:`~FedoptStrategy.configure_train` starts the outer iteration and returns the messages of
  its first communication round (message type ``train.<task>``: ``train.lower_grad``,
  ``train.local_gda``, ...); :meth:`~FedoptStrategy.aggregate_train` feeds that round's replies to
  the algorithm's server program, exchanges the iteration's further rounds itself over the same
  grid (each bounded by ``timeout``), and returns the new ``x``, ``y`` and the communication
  counters. The server program averages, as on every engine. So Flower's ``Strategy.start`` loop,
  and wrappers such as ``DifferentialPrivacyServerSideFixedClipping``, drive these strategies; a
  wrapper's clipping acts on the replies of the first round, which are client models (``x_i``,
  ``y_i``) for FESS-GDA and Local SGDA, but gradients or Neumann terms for FedMBO and FedNest,
  whose leaves do not match the model's (the wrapper then fails in its own clipping).
* :meth:`~FedoptStrategy.start` is that loop plus fedopt's measurements: ``evaluate_fn``,
  ``initial_arrays``, ``train_config`` (added to every train message's config), ``evaluate_config``
  and client-side evaluation (``evaluate_clients``) are honoured as in Flower, and
  ``self.run_result`` holds fedopt's :class:`~fedopt.simulation.RunResult`.

Client side: :func:`client_app` returns a ``flwr.clientapp.ClientApp`` (with Flower ``mods``) with
one ``@app.train`` handler per client task name (:data:`TASK_NAMES`), an ``@app.evaluate`` handler
(the client's exact losses at the received ``x``, ``y``) and a ``query.pid`` handler. Each train
message carries the task (pickled once by the server with the problem replaced by a reference, see
:mod:`fedopt.engines.wire`; cached per client process by its token), the broadcast payload, the
client's ``client_payload`` row, its client id (= Flower partition id) and its random key.

Determinism (``../notes/flower_ray.md`` §3): Flower's node ids are random, so the server first
learns the partition id of every node with a ``query.pid`` exchange; the cohort is drawn by the
server program's own seeded stream *by partition id*; each client's randomness comes from the key
in its message; replies are put back in cohort order. A Flower run therefore reproduces the
``local`` engine bitwise (same per-client computation, same order of the server's sums).

Failures: a client that raises, or does not reply within ``timeout``, ends the run with one line
naming the round, the task, the client and its error. With ``accept_failures=True`` the round goes
on with the replies received (at least one): the server program averages over the clients that
replied, each with weight :math:`1/m'` for :math:`m'` replies instead of :math:`1/m` (uniform
re-weighting over the survivors, an unbiased estimate only if failures are independent of the
clients' data), and the communication counters count only what arrived. A round that reuses the
previous round's cohort (FedNest's FedSVRG, SAGDA) then asks only the survivors.

Telemetry: importing this module sets ``FLWR_TELEMETRY_ENABLED=0`` in the environment unless it is
already set (so Flower processes started afterwards inherit it), and turns Flower's telemetry off
in this process even if ``flwr`` was imported first; a value the user set is kept.

A real deployment (``flwr run`` against a SuperLink) uses the same classes: see
``examples/flower_app/``.
"""

from __future__ import annotations

import os

_TELEMETRY = "FLWR_TELEMETRY_ENABLED"
_USER_TELEMETRY = os.environ.get(_TELEMETRY)  # None: the user did not choose, so fedopt turns it off
os.environ.setdefault(_TELEMETRY, "0")  # before flwr is imported here; inherited by Flower's processes

import copy  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedopt import random as rnd  # noqa: E402
from fedopt.algorithms.base import FederatedAlgorithm, Replies, Round  # noqa: E402
from fedopt.engines.base import AbstractEngine  # noqa: E402
from fedopt.engines.wire import TaskCodec, decode_tree, encode_tree, loads_task  # noqa: E402
from fedopt.registry import ALGORITHMS  # noqa: E402

try:
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result, Strategy
except ImportError as e:  # pragma: no cover - exercised by the missing-extra test through the engine
    raise ImportError("fedopt.flower needs Flower: pip install 'fedopt[flower]'") from e


def _telemetry_off() -> None:
    """Flower reads ``FLWR_TELEMETRY_ENABLED`` once, when ``flwr.supercore.telemetry`` is imported:
    if that happened before this module set the variable, set Flower's copy too (unless the user
    chose a value)."""
    if _USER_TELEMETRY is None:
        import flwr.supercore.telemetry as telemetry

        telemetry.FLWR_TELEMETRY_ENABLED = "0"


_telemetry_off()

__all__ = ["STRATEGIES", "TASK_NAMES", "message_type", "FESSGDAStrategy", "FedMBOStrategy", "FedNestStrategy", "FedNormSGDAStrategy",
           "FedoptStrategy", "LFedNestStrategy", "LocalSGDAPlusStrategy", "LocalSGDAStrategy", "ProblemRef",
           "SAGDAStrategy", "client_app"]

#: Every client task name of fedopt's built-in federated and centralized algorithms: one
#: ``@app.train`` handler each (message type ``train.<name>``). A task of any other name (a
#: plug-in algorithm's) travels as plain ``train`` to the default handler, which runs it the same way.
TASK_NAMES = ("lower_grad", "outer_grad", "neumann", "cross", "hvp", "hypergrad", "svrg_inner", "svrg_outer",
              "sgd_inner", "local_outer", "local_gda", "minimax_grad", "joint", "upper_grad_y", "z_grad",
              "jhip_grad", "hypergrad_jhip")

_FLOWER_PULL_INTERVAL = 0.1  # Flower's InMemoryGrid default (seconds between polls for replies)
_EVAL_STREAM = 4  # a fourth stream of the run's root key (fedopt.simulation uses 1-3): evaluation cohorts


def message_type(task_name: str) -> str:
    """The Flower message type of a round of ``task_name``."""
    return f"train.{task_name}" if task_name in TASK_NAMES else "train"


# ---- client side -------------------------------------------------------------------------------

# Per client process (a Flower simulation actor serves many virtual clients): the problem and the
# decoded tasks of the current run. Module-level on purpose: Flower's Ray backend pickles the
# ClientApp with every message, so anything held by the ClientApp's closures would be rebuilt per
# message (measured: 47 ms per client update when the problem's data travelled with the app).
_PROCESS: dict[str, Any] = {"run": None, "problem": None, "tasks": {}}


class ProblemRef:
    """A problem put in Ray's object store once; every client process fetches it on first use.
    This is what :class:`~fedopt.engines.flower_engine.FlowerEngine` gives :func:`client_app`, so
    that a message carries a reference instead of the data."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def __call__(self, context: Context) -> Any:
        import ray

        return ray.get(self.ref)


def client_app(problem: Any, *, mods: list | None = None) -> ClientApp:
    """The ClientApp of ``problem``: one handler per task name; node = partition id = client id.

    ``problem`` is a problem object, or a function ``problem(context) -> problem`` (a
    :class:`ProblemRef`, or a deployed ClientApp's builder from the run config) called once per
    run and client process. ``mods`` are Flower mods wrapped around every handler, as in
    ``ClientApp(mods=...)`` (e.g. ``fixedclipping_mod``, ``message_size_mod``)."""
    app = ClientApp(mods=mods)

    def resolve(context: Context) -> Any:
        if _PROCESS["run"] != context.run_id:
            _PROCESS.update(run=context.run_id, problem=problem(context) if callable(problem) else problem, tasks={})
        return _PROCESS["problem"]

    def partition_id(context: Context) -> int:
        return int(context.node_config["partition-id"])

    def check_client(cfg: Any, context: Context) -> int:
        client = int(cfg["client"])
        if client != partition_id(context):
            raise ValueError(f"message for client {client} reached partition {partition_id(context)}")
        return client

    @app.query("pid")
    def pid(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"meta": MetricRecord({"partition-id": partition_id(context)})}), reply_to=msg)

    def handle(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        client = check_client(cfg, context)
        problem_ = resolve(context)
        tasks, token = _PROCESS["tasks"], str(cfg["token"])
        task = tasks.get(token)
        if task is None:
            task = tasks[token] = loads_task(bytes(cfg["blob"]), problem_)
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        n_payload = int(cfg["n_payload"])
        device = problem_.device
        payload = decode_tree(arrays[:n_payload], str(cfg["payload_spec"]), device)
        cp = decode_tree(arrays[n_payload:], str(cfg["cp_spec"]), device)
        reply = task.fn(payload, cp, problem_.data, torch.tensor(client, dtype=torch.int64, device=device),
                        torch.tensor(int(cfg["key"]), dtype=torch.int64, device=device))
        leaves, spec = encode_tree(reply)
        return Message(RecordDict({"arrays": ArrayRecord(numpy_ndarrays=leaves, keep_input=True),
                                   "config": ConfigRecord({"spec": spec}),
                                   "meta": MetricRecord({"slot": int(cfg["slot"]), "partition-id": client})}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """The client's exact (noise-free, full-data) losses at the received ``x``, ``y``."""
        cfg = msg.content["config"]
        client = check_client(cfg, context)
        problem_ = resolve(context)
        device = problem_.device
        xy = msg.content["arrays"].to_torch_state_dict()
        x, y = xy["x"].to(device), xy["y"].to(device)
        c = torch.tensor(client, dtype=torch.int64, device=device)
        key = torch.tensor(int(cfg["key"]), dtype=torch.int64, device=device)
        with torch.no_grad():
            if hasattr(problem_, "inner_loss"):
                metrics = {"outer_loss": float(problem_.outer_loss(x, y, problem_.outer_batch(problem_.data, c, key, None))),
                           "inner_loss": float(problem_.inner_loss(x, y, problem_.inner_batch(problem_.data, c, key, None)))}
            else:
                metrics = {"loss": float(problem_.loss(x, y, problem_.batch(problem_.data, c, key, None)))}
        return Message(RecordDict({"metrics": MetricRecord({**metrics, "num-examples": 1})}), reply_to=msg)

    for name in TASK_NAMES:
        app.train(name)(handle)
    app.train()(handle)  # any other task name (message type "train")
    return app


# ---- server side -------------------------------------------------------------------------------

class _Captured(Exception):  # noqa: N818 - control flow, never escapes
    def __init__(self, clients: torch.Tensor, keys: torch.Tensor) -> None:
        super().__init__()
        self.clients, self.keys = clients, keys


class _Cohorts(AbstractEngine):
    """Hands fedopt's :class:`~fedopt.simulation.Server` the cohort and keys it draws for a round
    (the same code as on every engine) and stops it there: the exchange itself goes over the grid."""

    def map_clients(self, task, payload, client_payload, clients, keys):
        raise _Captured(clients, keys)


@dataclasses.dataclass
class _Pending:
    """A communication round whose messages were built: the round, its cohort and keys."""

    round: Round
    clients: torch.Tensor
    keys: torch.Tensor


@dataclasses.dataclass
class _Run:
    """The strategy's server-side state for one Flower run (one loop over rounds)."""

    server: Any  # fedopt.simulation.Server: cohorts, keys and counters
    steps: Any
    state: Any
    k: int
    grid: Any
    program: Any = None
    pending: dict[int, Any] = dataclasses.field(default_factory=dict)
    config: Any = None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_WRAPPED = re.compile(r"<class '([\w.]+)'>:<'(.*)'>", re.DOTALL)  # how Flower wraps a client's exception
_EXC_LINE = re.compile(r"([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))(?::\s*(.*))?$")
_MESSAGE = re.compile(r"occurred\. Message: (.*)$")  # ClientAppException's own text


def short_error(reason: str, limit: int = 200) -> str:
    """One short line from a Flower error reason (``<class 'X'>:<'message'>``, where the message
    may hold a Ray traceback with colour codes): the innermost ``SomeError: message``."""
    text = _ANSI.sub("", str(reason)).strip()
    wrapped = _WRAPPED.fullmatch(text)
    kind = None
    if wrapped:
        kind, text = wrapped.group(1).rsplit(".", 1)[-1], wrapped.group(2)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = None
    for ln in lines:  # the last exception line of a traceback, skipping Flower's own wrapper
        m = _EXC_LINE.match(ln)
        if m and not m.group(1).endswith("ClientAppException") and not ln.startswith("The above"):
            found = m.group(1).rsplit(".", 1)[-1] + (f": {m.group(2)}" if m.group(2) else "")
    if found is None:
        message = next((m.group(1) for ln in reversed(lines) if (m := _MESSAGE.search(ln))), None)
        message = message if message is not None else (lines[-1] if lines else "unknown error")
        found = f"{kind}: {message}" if kind and kind != "ClientAppException" else message
    return found if len(found) <= limit else found[: limit - 3] + "..."


class FedoptStrategy(Strategy):
    """A fedopt server program as a Flower strategy (see the module docstring for the mapping).

    Args:
        problem: the problem (the server uses it for metrics and to name it in pickled tasks).
        algorithm: a :class:`~fedopt.algorithms.base.FederatedAlgorithm` (subclasses build theirs
            from keyword parameters, e.g. ``FedMBOStrategy(problem, clients_per_round=10)``).
        seed: the run's seed (client sampling and every client's randomness derive from it).
        eval_every: measure the problem's metrics every this many outer iterations.
        timeout: seconds to wait for a round's replies (and for the nodes to register); never more.
        num_rounds: the run's length in outer iterations when Flower's own loop drives the
            strategy (some step sizes depend on it); :meth:`start` takes it from its argument.
        accept_failures: go on without a failed or late client's reply (module docstring: the
            average is then over the replies received); default: one-line error.
        evaluate_clients: clients asked, every round, for their exact losses at the new ``x``,
            ``y`` (Flower's client-side evaluation; drawn from the run's seed; default 0: none,
            the server measures the problem's exact metrics itself).
        pull_interval: seconds between a grid's polls for replies, replacing Flower's default of
            0.1 s on a grid that has it (a value set on the grid, e.g. by the ``flower`` engine, is
            kept); ``None`` leaves the grid alone.
        on_iterate: called with ``k`` after every outer iteration (progress bars).
        loop: further options of fedopt's loop (as in :func:`fedopt.simulation.simulate`):
            ``stop_when``, ``checkpoint_every``, ``on_checkpoint``, ``resume``.

    After :meth:`start`, ``self.run_result`` holds fedopt's
    :class:`~fedopt.runner.RunResult` (long-format metrics, counters, final state).
    """

    algorithm_name: str | None = None

    def __init__(self, problem: Any, algorithm: FederatedAlgorithm | None = None, *, seed: int = 0,
                 eval_every: int = 1, timeout: float = 60.0, num_rounds: int | None = None,
                 accept_failures: bool = False, evaluate_clients: int = 0, pull_interval: float | None = 0.005,
                 on_iterate: Callable[[int], None] | None = None, loop: dict[str, Any] | None = None,
                 **params: Any) -> None:
        if algorithm is None:
            if self.algorithm_name is None:
                raise TypeError("FedoptStrategy needs an algorithm (or use a subclass such as FedMBOStrategy)")
            from fedopt.config import check_params

            factory = ALGORITHMS.get(self.algorithm_name)
            algorithm = factory(**check_params(factory, params, type(self).__name__, f"algorithm {self.algorithm_name!r}"))
        elif params:
            raise TypeError(f"unexpected parameters {sorted(params)} next to an algorithm object")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if evaluate_clients < 0:
            raise ValueError(f"evaluate_clients must be >= 0, got {evaluate_clients}")
        self.problem, self.algorithm = problem, algorithm
        self.seed, self.eval_every, self.timeout, self.on_iterate = seed, eval_every, timeout, on_iterate
        self.num_rounds, self.accept_failures, self.evaluate_clients = num_rounds, accept_failures, evaluate_clients
        self.pull_interval = pull_interval
        self.loop = dict(loop or {})
        self.codec = TaskCodec(problem)
        self.node_of: dict[int, int] = {}
        self.run_result = None
        self._run: _Run | None = None

    @classmethod
    def for_algorithm(cls, problem: Any, algorithm: FederatedAlgorithm, **kwargs: Any) -> FedoptStrategy:
        """The named strategy class of ``algorithm`` (by its registry name), built around it."""
        return STRATEGIES.get(algorithm.name, cls)(problem, algorithm, **kwargs)

    def initial_arrays(self) -> ArrayRecord:
        """The problem's starting point ``(x0, y0)`` as Flower arrays (keys ``"x"``, ``"y"``)."""
        x0, y0 = self.problem.init()
        return _xy_arrays(x0, y0)

    # -- the Strategy interface -------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Start outer iteration ``server_round - 1 -> server_round`` at the ``x``, ``y`` in
        ``arrays``; return the messages of its first communication round (one per cohort member:
        the broadcast payload plus that member's ``client_payload`` row, id, key and slot)."""
        run = self._run
        if server_round == 1 and (run is None or run.k != 0 or run.grid is not grid or run.pending):
            if self.num_rounds is None:
                raise ValueError("pass num_rounds=... to the strategy to drive it with Flower's loop "
                                 "(the algorithm's step sizes may depend on the run's length)")
            run = self._begin(grid, self.num_rounds, arrays)
        if run is None or server_round != run.k + 1:
            done = "no round" if run is None else f"round {run.k}"
            raise ValueError(f"configure_train(server_round={server_round}) after {done}: Flower rounds are the "
                             "algorithm's outer iterations and must come in order, starting at 1")
        x, y = _xy_from(arrays, self.problem.device)
        run.state = _with_xy(run.state, x, y)
        run.config = ConfigRecord(dict(config)) if config is not None else ConfigRecord()
        run.program = run.steps.step(run.state, run.k)
        try:
            msg = next(run.program)
        except StopIteration as stop:  # an iteration without communication
            run.pending[server_round] = stop.value
            return []
        pending = self._prepare(run, msg)
        run.pending[server_round] = pending
        return self._messages(pending, server_round, run.config)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Feed the first round's replies (sorted into cohort order and stacked) to the server
        program, exchange the iteration's further rounds over the grid, and return the new ``x``,
        ``y`` and the run's communication and oracle counters."""
        run = self._run
        if run is None or server_round not in run.pending:
            raise ValueError(f"aggregate_train(server_round={server_round}) without its configure_train")
        pending = run.pending.pop(server_round)
        if isinstance(pending, _Pending):
            try:
                reply = self._collect(run, pending, list(replies), server_round)
                while True:
                    msg = run.program.send(reply)
                    pending = self._prepare(run, msg)
                    got = run.grid.send_and_receive(self._messages(pending, server_round, run.config),
                                                    timeout=self.timeout)
                    reply = self._collect(run, pending, list(got), server_round)
            except StopIteration as stop:
                state = stop.value
        else:
            state = pending
        run.program, run.state, run.k = None, state, server_round
        return _xy_arrays(state.x, state.y), MetricRecord(run.server.counters.as_metrics())

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """``evaluate_clients`` clients (drawn from the run's seed and the round) get ``x``, ``y``;
        none by default."""
        m = min(self.evaluate_clients, self.problem.num_clients)
        if m == 0:
            return []
        if not self.node_of:
            self._map_partitions(grid)
        from fedopt.simulation import sample_clients

        stream = rnd.fold_in_host(rnd.fold_in_host(rnd.key_host(self.seed), _EVAL_STREAM), server_round)
        clients = sample_clients(stream, self.problem.num_clients, m, False).tolist()
        keys = rnd.fold_in_host(stream, np.asarray(clients, dtype=np.int64)).tolist()
        xy = {k: arrays[k] for k in ("x", "y")}
        return [Message(RecordDict({"arrays": ArrayRecord(xy),
                                    "config": ConfigRecord({**dict(config or {}), "client": c, "key": key,
                                                            "server-round": server_round})}),
                        dst_node_id=self.node_of[c], message_type="evaluate", group_id=str(server_round))
                for c, key in zip(clients, keys, strict=True)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The uniform mean of the clients' losses (the problem's objective weighs clients equally)."""
        replies = list(replies)
        good = [r for r in replies if not r.has_error()]
        if len(good) < len(replies) and not self.accept_failures:
            bad = next(r for r in replies if r.has_error())
            raise RuntimeError(f"Flower evaluation round {server_round}: {self._who(bad)} failed: "
                               f"{short_error(bad.error.reason)}")
        if not good:
            return None
        records = [dict(r.content["metrics"]) for r in good]
        names = [k for k in records[0] if k != "num-examples"]
        return MetricRecord({**{k: float(np.mean([rec[k] for rec in records])) for k in names},
                             "clients": len(good)})

    def summary(self) -> None:
        """One line: the algorithm and the problem (Flower logs it when a run starts)."""
        from flwr.supercore import log

        log(20, "fedopt strategy %s: %s on %s", type(self).__name__, self.algorithm.name, type(self.problem).__name__)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn: Callable | None = None) -> Result:
        """Flower's loop (train, client-side evaluation, ``evaluate_fn``) over ``num_rounds`` outer
        iterations, with fedopt's measurements, ``eval_every``, ``stop_when``, checkpoints and
        divergence detection.

        ``initial_arrays`` (keys ``"x"``, ``"y"``) replaces the problem's starting point;
        ``evaluate_fn(k, arrays)`` is called before the first round (``k = 0``) and after every
        round, and what it returns is merged into ``evaluate_metrics_serverapp[k]`` next to fedopt's
        exact metrics. Returns a Flower ``Result``; fedopt's
        :class:`~fedopt.simulation.RunResult` is ``self.run_result``.
        """
        from fedopt.simulation import Checkpoint, RunResult, _Evaluations

        if timeout is not None:
            self.timeout = timeout
        _telemetry_off()
        self.summary()
        loop = self.loop
        resume, stop_when = loop.get("resume"), loop.get("stop_when")
        checkpoint_every, on_checkpoint = loop.get("checkpoint_every", 0), loop.get("on_checkpoint")
        run = self._begin(grid, num_rounds, initial_arrays, resume=resume)
        counters = run.server.counters
        evals = _Evaluations(num_rounds, self.eval_every, counters, self.on_iterate, stop_when,
                             resume.records if resume is not None else None)
        result = Result()
        user_metrics: dict[int, dict[str, Any]] = {}

        def at(k: int, state: Any, arrays: ArrayRecord) -> bool:
            steps = run.steps

            def metrics() -> dict[str, float]:
                return {**self.problem.metrics(state.x, state.y),
                        **(steps.diagnostics(state) if steps.diagnostics else {})}

            stop = evals.at(k, [state.x, state.y], metrics)
            if evaluate_fn is not None:
                res = evaluate_fn(k, arrays)
                if res is not None:
                    user_metrics[k] = dict(res)
            return stop

        arrays = _xy_arrays(run.state.x, run.state.y)
        stopped = resume is None and at(0, run.state, arrays)
        while not stopped and run.k < num_rounds:
            r = run.k + 1
            messages = list(self.configure_train(r, arrays, train_config or ConfigRecord(), grid))
            replies = grid.send_and_receive(messages, timeout=self.timeout) if messages else []
            arrays, train_metrics = self.aggregate_train(r, replies)
            result.train_metrics_clientapp[r] = train_metrics
            eval_messages = list(self.configure_evaluate(r, arrays, evaluate_config or ConfigRecord(), grid))
            if eval_messages:
                agg = self.aggregate_evaluate(r, grid.send_and_receive(eval_messages, timeout=self.timeout))
                if agg is not None:
                    result.evaluate_metrics_clientapp[r] = agg
            stopped = at(r, run.state, arrays)
            if (not stopped and checkpoint_every and on_checkpoint is not None and r % checkpoint_every == 0
                    and r < num_rounds):
                on_checkpoint(Checkpoint(r, run.state, copy.deepcopy(counters), list(evals.records)))
        state = run.state
        self.run_result = RunResult(evals.records, evals.status, evals.diverged_round, state.x, state.y, counters,
                                    state=state, k=run.k)
        result.arrays = arrays
        by_round: dict[int, dict[str, Any]] = {}
        for k, _, name, value in self.run_result.records:
            by_round.setdefault(k, {})[name] = float(value)
        for k, values in user_metrics.items():
            by_round.setdefault(k, {}).update(values)
        result.evaluate_metrics_serverapp = {k: MetricRecord(v) for k, v in sorted(by_round.items())}
        return result

    # -- internals ---------------------------------------------------------------------------

    def _begin(self, grid: Grid, rounds: int, arrays: ArrayRecord | None, resume: Any = None) -> _Run:
        """A new run over ``grid``: fedopt's server (cohorts, keys, counters), the algorithm set up
        for ``rounds`` outer iterations, its state at ``arrays`` (or the problem's start)."""
        from fedopt.simulation import Server, _restore

        if self.pull_interval is not None and getattr(grid, "pull_interval", None) == _FLOWER_PULL_INTERVAL:
            grid.pull_interval = self.pull_interval  # Flower's default only: a value set on the grid is kept
        self._map_partitions(grid)
        server = Server(self.problem, _Cohorts(self.problem), self.seed)
        steps = self.algorithm.setup(self.problem, rounds, server.server_key)
        x0, y0 = _xy_from(arrays, self.problem.device) if arrays is not None else self.problem.init()
        state, k0 = steps.init(x0, y0), 0
        if resume is not None:
            state, k0 = _restore(state, resume.state), resume.k
            server.counters = copy.deepcopy(resume.counters)
        self._run = _Run(server, steps, state, k0, grid)
        return self._run

    def _prepare(self, run: _Run, msg: Any) -> _Pending:
        """The cohort and keys of the program's next round, drawn by fedopt's server."""
        if not isinstance(msg, Round):
            raise TypeError(f"a federated step must yield Round, got {type(msg).__name__}")
        try:
            run.server.dispatch(msg)
        except _Captured as c:
            return _Pending(msg, c.clients, c.keys)
        raise AssertionError("unreachable: the cohort engine always stops the server")

    def _messages(self, p: _Pending, server_round: int, config: ConfigRecord) -> list[Message]:
        task, client_payload = p.round.task, p.round.client_payload
        ids, key_list = p.clients.tolist(), p.keys.tolist()
        if client_payload is not None:
            rows = {int(t.shape[0]) for t in torch.utils._pytree.tree_leaves(client_payload)}
            if rows != {len(ids)}:
                raise RuntimeError(f"round of {task.name}: client_payload has {sorted(rows)} rows for {len(ids)} "
                                   "clients (a per-client chain lost a client: accept_failures cannot drop it)")
        token, blob = self.codec.encode(task)
        leaves, spec = encode_tree(p.round.payload)
        messages = []
        for slot, (client, key) in enumerate(zip(ids, key_list, strict=True)):
            cp_leaves, cp_spec = encode_tree(None if client_payload is None else _row(client_payload, slot))
            content = RecordDict({
                "arrays": ArrayRecord(numpy_ndarrays=[*leaves, *cp_leaves], keep_input=True),
                "config": ConfigRecord({**dict(config), "payload_spec": spec, "cp_spec": cp_spec,
                                        "n_payload": len(leaves), "token": token, "blob": blob, "client": client,
                                        "key": key, "slot": slot, "server-round": server_round}),
            })
            messages.append(Message(content, dst_node_id=self.node_of[client], message_type=message_type(task.name),
                                    group_id=str(server_round)))
        return messages

    def _who(self, reply: Message) -> str:
        partition = {node: pid for pid, node in self.node_of.items()}.get(reply.metadata.src_node_id)
        return f"client {partition}" if partition is not None else f"node {reply.metadata.src_node_id}"

    def _collect(self, run: _Run, p: _Pending, replies: list[Message], server_round: int) -> Replies:
        """The replies in cohort order, stacked (failed or missing ones dropped under
        ``accept_failures``, else one-line errors); the round's counters."""
        expected = p.clients.numel()
        where = f"Flower round {server_round} ({p.round.task.name})"
        good, failed = [], []
        for r in replies:
            (failed if r.has_error() else good).append(r)
        if failed and not self.accept_failures:
            raise RuntimeError(f"{where}: {self._who(failed[0])} failed: {short_error(failed[0].error.reason)}"
                               + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
        good.sort(key=lambda r: int(r.content["meta"]["slot"]))
        if len(good) + len(failed) < expected and not self.accept_failures:
            got = {int(r.content["meta"]["slot"]) for r in good}
            late = [c for j, c in enumerate(p.clients.tolist()) if j not in got]
            raise TimeoutError(f"{where}: {len(replies)} of {expected} replies within {self.timeout:g} s "
                               f"(no reply from client(s) {late[:5]})")
        if not good:
            raise RuntimeError(f"{where}: none of {expected} clients replied within {self.timeout:g} s "
                               f"({len(failed)} failed)")
        device = self.problem.device
        slots = [int(r.content["meta"]["slot"]) for r in good]
        trees = [decode_tree(r.content["arrays"].to_numpy_ndarrays(), str(r.content["config"]["spec"]), device)
                 for r in good]
        from torch.utils._pytree import tree_map

        from fedopt.algorithms.base import numel

        values = tree_map(lambda *ts: torch.stack(ts), *trees)
        clients = p.clients[torch.as_tensor(slots, device=p.clients.device)] if len(slots) < expected else p.clients
        c, m, msg = run.server.counters, len(slots), p.round
        c.comm_rounds += 1
        c.floats_down += expected * numel(msg.payload) + numel(msg.client_payload)
        c.floats_up += numel(values)
        c.add_calls(msg.task, m)
        return Replies(values, clients)

    def _map_partitions(self, grid: Grid) -> None:
        """Wait until every client's node has registered, then learn node id <-> partition id."""
        n = self.problem.num_clients
        deadline = time.monotonic() + self.timeout
        nodes = list(grid.get_node_ids())
        while len(nodes) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {n} Flower nodes registered within {self.timeout:g} s "
                                   f"(the problem has {n} clients: start one SuperNode per client)")
            time.sleep(0.05)
            nodes = list(grid.get_node_ids())
        queries = [Message(RecordDict(), dst_node_id=node, message_type="query.pid") for node in nodes]
        replies = list(grid.send_and_receive(queries, timeout=self.timeout))
        if len(replies) != len(nodes) or any(r.has_error() for r in replies):
            raise TimeoutError(f"the partition-id query reached {len(replies)} of {len(nodes)} Flower nodes")
        self.node_of = {int(r.content["meta"]["partition-id"]): r.metadata.src_node_id for r in replies}
        missing = sorted(set(range(n)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"no Flower node holds partition(s) {missing[:5]}")


def _xy_arrays(x: torch.Tensor, y: torch.Tensor) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={"x": x.detach().cpu(), "y": y.detach().cpu()})


def _xy_from(arrays: ArrayRecord, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if arrays is None or "x" not in arrays or "y" not in arrays:
        have = [] if arrays is None else sorted(arrays)
        raise ValueError(f"a fedopt strategy's arrays hold 'x' and 'y' (see initial_arrays()); got {have}")
    return (torch.from_numpy(np.array(arrays["x"].numpy())).to(device),
            torch.from_numpy(np.array(arrays["y"].numpy())).to(device))


def _with_xy(state: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    if hasattr(state, "_replace"):
        return state._replace(x=x, y=y)
    return dataclasses.replace(state, x=x, y=y)


def _row(tree: Any, j: int) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t[j], tree)


def _strategy_class(name: str, algorithm_name: str) -> type[FedoptStrategy]:
    factory = ALGORITHMS.get(algorithm_name)
    doc = (f"Flower strategy of fedopt's ``{algorithm_name}``: ``{name}(problem, **params)`` with the "
           f"parameters of :func:`{factory.__module__}.{factory.__name__}`.\n\n"
           + (factory.__doc__ or "").split("\n\n")[0])
    return type(name, (FedoptStrategy,), {"algorithm_name": algorithm_name, "__doc__": doc, "__module__": __name__})


#: Named strategy classes, by algorithm registry name.
_CLASS_NAMES = {"fedmbo": "FedMBOStrategy", "fednest": "FedNestStrategy", "lfednest": "LFedNestStrategy",
                "fess_gda": "FESSGDAStrategy", "local_sgda": "LocalSGDAStrategy",
                "local_sgda_plus": "LocalSGDAPlusStrategy", "sagda": "SAGDAStrategy",
                "fed_norm_sgda": "FedNormSGDAStrategy"}
STRATEGIES: dict[str, type[FedoptStrategy]] = {alg: _strategy_class(cls, alg) for alg, cls in _CLASS_NAMES.items()}

FedMBOStrategy = STRATEGIES["fedmbo"]
FedNestStrategy = STRATEGIES["fednest"]
LFedNestStrategy = STRATEGIES["lfednest"]
FESSGDAStrategy = STRATEGIES["fess_gda"]
LocalSGDAStrategy = STRATEGIES["local_sgda"]
LocalSGDAPlusStrategy = STRATEGIES["local_sgda_plus"]
SAGDAStrategy = STRATEGIES["sagda"]
FedNormSGDAStrategy = STRATEGIES["fed_norm_sgda"]
