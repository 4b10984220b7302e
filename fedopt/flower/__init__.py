r"""fedopt's federated algorithms as Flower strategies, on Flower's Message API (``flwr`` 1.42).

Server side: :class:`FedoptStrategy` subclasses ``flwr.serverapp.strategy.Strategy``; one class per
registered federated algorithm (:class:`FedMBOStrategy`, :class:`FedNestStrategy`,
:class:`FESSGDAStrategy`, ...). Its :meth:`~FedoptStrategy.start` drives the algorithm's server
program (the same generator the in-process engines run): every communication round of the program
is one ``grid.send_and_receive`` whose messages have the round's own type ``train.<task>``
(``train.lower_grad``, ``train.neumann``, ``train.cross``, ``train.local_gda``, ...), built by
:meth:`~FedoptStrategy.configure_train` and stacked back in cohort order by
:meth:`~FedoptStrategy.aggregate_train`. The server program itself averages, as on every engine.

Client side: :func:`client_app` returns a ``flwr.clientapp.ClientApp`` with one ``@app.train``
handler per client task name (:data:`TASK_NAMES`) and a ``query.pid`` handler. Each message
carries the task (pickled once by the server with the problem replaced by a reference, see
:mod:`fedopt.engines.wire`; cached per client process by its token), the broadcast payload, the
client's ``client_payload`` row, its client id (= Flower partition id) and its random key.

Determinism (``../notes/flower_ray.md`` §3): Flower's node ids are random, so the server first
learns the partition id of every node with a ``query.pid`` exchange; the cohort is drawn by the
server program's own seeded stream *by partition id*; each client's randomness comes from the key
in its message; replies are put back in cohort order. A Flower run therefore reproduces the
``local`` engine bitwise (same per-client computation, same order of the server's sums).

A real deployment (``flwr run`` against a SuperLink) uses the same classes: see
``examples/flower_app/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fedopt.algorithms.base import FederatedAlgorithm
from fedopt.engines.base import AbstractEngine
from fedopt.engines.wire import TaskCodec, decode_tree, encode_tree, loads_task
from fedopt.registry import ALGORITHMS

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

__all__ = ["STRATEGIES", "TASK_NAMES", "message_type", "FESSGDAStrategy", "FedMBOStrategy", "FedNestStrategy", "FedNormSGDAStrategy",
           "FedoptStrategy", "LFedNestStrategy", "LocalSGDAPlusStrategy", "LocalSGDAStrategy", "ProblemRef",
           "SAGDAStrategy", "client_app"]

#: Every client task name of fedopt's built-in federated and centralized algorithms: one
#: ``@app.train`` handler each (message type ``train.<name>``). A task of any other name (a
#: plug-in algorithm's) travels as plain ``train`` to the default handler, which runs it the same way.
TASK_NAMES = ("lower_grad", "outer_grad", "neumann", "cross", "hvp", "hypergrad", "svrg_inner", "svrg_outer",
              "sgd_inner", "local_outer", "local_gda", "minimax_grad", "joint", "upper_grad_y", "z_grad",
              "jhip_grad", "hypergrad_jhip")


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


def client_app(problem: Any) -> ClientApp:
    """The ClientApp of ``problem``: one handler per task name; node = partition id = client id.

    ``problem`` is a problem object, or a function ``problem(context) -> problem`` (a
    :class:`ProblemRef`, or a deployed ClientApp's builder from the run config) called once per
    run and client process."""
    app = ClientApp()

    def resolve(context: Context) -> Any:
        if _PROCESS["run"] != context.run_id:
            _PROCESS.update(run=context.run_id, problem=problem(context) if callable(problem) else problem, tasks={})
        return _PROCESS["problem"]

    def partition_id(context: Context) -> int:
        return int(context.node_config["partition-id"])

    @app.query("pid")
    def pid(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"meta": MetricRecord({"partition-id": partition_id(context)})}), reply_to=msg)

    def handle(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        client = int(cfg["client"])
        if client != partition_id(context):
            raise ValueError(f"message for client {client} reached partition {partition_id(context)}")
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

    for name in TASK_NAMES:
        app.train(name)(handle)
    app.train()(handle)  # any other task name (message type "train")
    return app


# ---- server side -------------------------------------------------------------------------------

class _GridEngine(AbstractEngine):
    """The engine a strategy hands to the server program: one ``send_and_receive`` per round."""

    def __init__(self, strategy: FedoptStrategy, grid: Grid) -> None:
        super().__init__(strategy.problem)
        self.strategy, self.grid = strategy, grid

    def map_clients(self, task, payload, client_payload, clients, keys):
        s = self.strategy
        s.comm_round += 1
        leaves, spec = encode_tree(payload)
        s._pending = (task, client_payload, clients, keys)
        messages = list(s.configure_train(s.comm_round, ArrayRecord(numpy_ndarrays=leaves, keep_input=True),
                                          ConfigRecord({"payload_spec": spec}), self.grid))
        replies = list(self.grid.send_and_receive(messages, timeout=s.timeout))
        s.aggregate_train(s.comm_round, replies)
        return s._stacked


class FedoptStrategy(Strategy):
    """A fedopt server program as a Flower strategy.

    Args:
        problem: the problem (the server uses it for metrics and to name it in pickled tasks).
        algorithm: a :class:`~fedopt.algorithms.base.FederatedAlgorithm` (subclasses build theirs
            from keyword parameters, e.g. ``FedMBOStrategy(problem, clients_per_round=10)``).
        seed: the run's seed (client sampling and every client's randomness derive from it).
        eval_every: measure the problem's metrics every this many outer iterations.
        timeout: seconds to wait for a round's replies before failing (never hang).
        on_iterate: called with ``k`` after every outer iteration (progress bars).
        loop: further options of fedopt's loop (:func:`fedopt.simulation.simulate`):
            ``stop_when``, ``checkpoint_every``, ``on_checkpoint``, ``resume``.

    After :meth:`start`, ``self.run_result`` holds fedopt's
    :class:`~fedopt.runner.RunResult` (long-format metrics, counters, final state).
    """

    algorithm_name: str | None = None

    def __init__(self, problem: Any, algorithm: FederatedAlgorithm | None = None, *, seed: int = 0,
                 eval_every: int = 1, timeout: float = 60.0, on_iterate: Callable[[int], None] | None = None,
                 loop: dict[str, Any] | None = None, **params: Any) -> None:
        if algorithm is None:
            if self.algorithm_name is None:
                raise TypeError("FedoptStrategy needs an algorithm (or use a subclass such as FedMBOStrategy)")
            from fedopt.config import check_params

            factory = ALGORITHMS.get(self.algorithm_name)
            algorithm = factory(**check_params(factory, params, type(self).__name__, f"algorithm {self.algorithm_name!r}"))
        elif params:
            raise TypeError(f"unexpected parameters {sorted(params)} next to an algorithm object")
        self.problem, self.algorithm = problem, algorithm
        self.seed, self.eval_every, self.timeout, self.on_iterate = seed, eval_every, timeout, on_iterate
        self.loop = dict(loop or {})
        self.codec = TaskCodec(problem)
        self.comm_round = 0
        self.node_of: dict[int, int] = {}
        self.run_result = None
        self._pending: Any = None
        self._stacked: Any = None

    @classmethod
    def for_algorithm(cls, problem: Any, algorithm: FederatedAlgorithm, **kwargs: Any) -> FedoptStrategy:
        """The named strategy class of ``algorithm`` (by its registry name), built around it."""
        return STRATEGIES.get(algorithm.name, cls)(problem, algorithm, **kwargs)

    # -- the Strategy interface -------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per cohort member (message type ``train.<task name>``): the broadcast
        ``arrays`` plus that member's ``client_payload`` row, id, key and slot in the cohort."""
        task, client_payload, clients, keys = self._pending
        token, blob = self.codec.encode(task)
        ids, key_list = clients.tolist(), keys.tolist()
        messages = []
        for slot, (client, key) in enumerate(zip(ids, key_list, strict=True)):
            if client_payload is None:
                cp_leaves, cp_spec = encode_tree(None)
            else:
                cp_leaves, cp_spec = encode_tree(_row(client_payload, slot))
            content = RecordDict({
                "arrays": ArrayRecord(numpy_ndarrays=[*arrays.to_numpy_ndarrays(), *cp_leaves], keep_input=True),
                "config": ConfigRecord({**dict(config), "cp_spec": cp_spec, "n_payload": len(arrays),
                                        "token": token, "blob": blob, "client": client, "key": key, "slot": slot,
                                        "server-round": server_round}),
            })
            messages.append(Message(content, dst_node_id=self.node_of[client], message_type=message_type(task.name),
                                    group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Replies sorted back into cohort order and stacked (the program does the averaging)."""
        replies = list(replies)
        expected = self._pending[2].numel()
        errors = [r.error for r in replies if r.has_error()]
        if errors:
            raise RuntimeError(f"Flower round {server_round}: a client failed: {errors[0]}")
        if len(replies) != expected:
            raise TimeoutError(f"Flower round {server_round}: {len(replies)} of {expected} replies within "
                               f"{self.timeout:g} s")
        replies.sort(key=lambda r: int(r.content["meta"]["slot"]))
        device = self.problem.device
        trees = [decode_tree(r.content["arrays"].to_numpy_ndarrays(), str(r.content["config"]["spec"]), device)
                 for r in replies]
        from torch.utils._pytree import tree_map

        self._stacked = tree_map(lambda *ts: torch.stack(ts), *trees)
        stacked_leaves, _ = encode_tree(self._stacked)
        return ArrayRecord(numpy_ndarrays=stacked_leaves, keep_input=True), MetricRecord({"clients": expected})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self) -> None:
        """One line: the algorithm and the problem (Flower logs it when a run starts)."""
        from flwr.supercore import log

        log(20, "fedopt strategy %s: %s on %s", type(self).__name__, self.algorithm.name, type(self.problem).__name__)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn: Callable | None = None) -> Result:
        """Run ``num_rounds`` *outer iterations* of the algorithm over ``grid``.

        ``initial_arrays`` is ignored (the problem gives ``(x0, y0)``); ``evaluate_fn``,
        ``train_config`` and ``evaluate_config`` are not used (metrics are the problem's exact ones).
        Returns a Flower ``Result`` whose ``arrays`` hold the final ``x`` and ``y`` and whose
        ``evaluate_metrics_serverapp[k]`` holds the metrics at outer iteration ``k``; fedopt's own
        :class:`~fedopt.runner.RunResult` is ``self.run_result``.
        """
        from fedopt.simulation import simulate

        del initial_arrays, train_config, evaluate_config, evaluate_fn
        if timeout is not None:
            self.timeout = timeout
        self.summary()
        self._map_partitions(grid)
        engine = _GridEngine(self, grid)
        self.run_result = simulate(self.problem, self.algorithm, engine, rounds=num_rounds, seed=self.seed,
                                   eval_every=self.eval_every, on_iterate=self.on_iterate, **self.loop)
        result = Result(arrays=ArrayRecord(torch_state_dict={"x": self.run_result.x.detach().cpu(),
                                                             "y": self.run_result.y.detach().cpu()}))
        by_round: dict[int, dict[str, float]] = {}
        for k, _, name, value in self.run_result.records:
            by_round.setdefault(k, {})[name] = float(value)
        result.evaluate_metrics_serverapp = {k: MetricRecord(v) for k, v in by_round.items()}
        return result

    def _map_partitions(self, grid: Grid) -> None:
        """Wait until every client's node has registered, then learn node id <-> partition id."""
        n = self.problem.num_clients
        deadline = time.monotonic() + self.timeout
        nodes = list(grid.get_node_ids())
        while len(nodes) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {n} Flower nodes registered within {self.timeout:g} s")
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
