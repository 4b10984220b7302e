r"""The ``ray`` engine: clients sharded over a pool of Ray actors, each running its share batched.

Layout
------
* A pool of ``actors`` actors (never one actor per client: each costs a process, ~175 MB and ~1 s
  to start), each pinned to ``num_cpus`` CPUs and ``num_gpus`` (fractional) GPUs. Actor ``a`` owns
  the contiguous block of client ids ``[a * B, (a + 1) * B)``, ``B = ceil(N / actors)``.
* The problem (its data included) is put in Ray's object store once and every actor keeps its own
  copy resident, on its device, for the whole run. Client tasks travel once per actor, pickled with
  the problem replaced by a reference (:mod:`fedopt.engines.wire`); per round only the payload,
  the cohort's ids, keys and ``client_payload`` rows go out and the replies come back.
* A round groups the cohort by owner: each actor runs its clients in one batched call (``inner =
  "vmap"``, the default) or in a loop (``inner = "local"``: the reference engine's computation,
  so the trajectory is bitwise that of ``local``); the replies are put back in cohort order and
  the server averages them exactly as on the other engines.
* Decentralized gossip (``gossip = "actors"``): node rows are sharded over the actors the same way.
  Every block of rows is put in the object store once; actor ``a`` receives the references of only
  the blocks its rows have neighbours in (``W[a, b] != 0``) and returns its rows of ``W X``. The
  stacked node state itself is owned by the driver's program (the algorithms' arithmetic between
  node steps and gossip runs there), so what an actor fetches per gossip round is its neighbour
  blocks, never the whole network. ``gossip = "driver"`` does the matmul on the driver instead.

Fault tolerance
---------------
Actors are created with ``max_restarts = max_task_retries = retries``. When an actor process dies,
Ray restarts it (its constructor reloads the problem from the object store) and re-runs the
interrupted call with the *same* arguments; client tasks are pure functions of those arguments,
so the trajectory is unchanged (tested by killing an actor mid-run).

Cluster
-------
``address = None`` starts a private local Ray instance with exactly ``actors * num_cpus`` CPUs,
listening on 127.0.0.1 only (:func:`fedopt.engines.ray_runtime.start_local`; never attaches to a
cluster found in Ray's temp folder) and shuts it down in :meth:`RayEngine.close`. ``address =
"auto"``, ``"host:port"`` (a GCS) or ``"ray://host:port"`` (a Ray Client server) joins an existing
cluster once a gRPC probe has had an answer only Ray gives (:func:`~fedopt.engines.ray_runtime.probe`);
``close`` then disconnects and leaves the cluster running. A Ray already initialised in the process
(a test session's, a sweep task's) is used as it is and left running: the engine shuts down only a
Ray it started or joined. An unreachable address, a port where something other than Ray listens,
``num_gpus > 0`` without CUDA, or Ray not installed are :class:`~fedopt.errors.ConfigError`\ s (one
line, exit code 2, within seconds).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

from fedopt.algorithms.base import Task
from fedopt.engines.base import AbstractEngine
from fedopt.engines.ray_runtime import import_ray, join, start_local
from fedopt.engines.wire import TaskCodec, decode_tree, encode_tree, loads_task, ship_plugins_by_value
from fedopt.errors import ConfigError, check
from fedopt.registry import ENGINES

__all__ = ["RayEngine", "ray_engine"]

INNER = ("vmap", "local")
GOSSIP = ("actors", "driver")


class ClientShard:
    """One actor: a resident copy of the problem and an in-process engine over its clients."""

    def __init__(self, inner: str, threads: int) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.inner = inner
        self.problem: Any = None
        self.engine: Any = None
        self.tasks: dict[str, Task] = {}

    def _load(self, problem_ref: list) -> None:
        """Fetch the problem (on the first call, and again after a restart). It is not a constructor
        argument: Ray warns about restartable actors whose constructor arguments live in the
        object store."""
        import ray

        from fedopt.engines.local import LocalEngine
        from fedopt.engines.vmap import VmapEngine

        self.problem = ray.get(problem_ref[0])
        self.engine = VmapEngine(self.problem) if self.inner == "vmap" else LocalEngine(self.problem)

    def run(self, token: str, payload: tuple, client_payload: tuple, clients: np.ndarray, keys: np.ndarray,
            refs: list | None = None) -> tuple | None:
        """This shard's clients of one round; ``None`` when the problem or the task is not loaded yet
        (the driver then repeats the call with ``refs = [problem, task blob]``, still unresolved
        references). Pytrees travel as (numpy arrays, spec): Ray pickles numpy zero-copy."""
        if refs is not None:
            import ray

            if self.problem is None:
                self._load(refs)
            if token not in self.tasks:
                self.tasks[token] = loads_task(ray.get(refs[1]), self.problem)
        task = self.tasks.get(token)
        if task is None:
            return None
        dev = self.problem.device
        out = self.engine.map_clients(task, decode_tree(*payload, dev), decode_tree(*client_payload, dev),
                                      torch.from_numpy(clients).to(dev), torch.from_numpy(keys).to(dev))
        return encode_tree(out)

    def mix(self, w_rows: torch.Tensor, *blocks: torch.Tensor) -> torch.Tensor:
        """This shard's rows of ``W X``: ``w_rows`` holds the columns of the given neighbour blocks."""
        return w_rows @ torch.cat(blocks)

    def pid(self) -> int:
        return os.getpid()


class RayEngine(AbstractEngine):
    """Clients (or decentralized nodes) sharded over a pool of Ray actors."""

    def __init__(self, problem, *, actors: int = 2, num_cpus: float = 1.0, num_gpus: float | None = None,
                 address: str | None = None, inner: str = "vmap", gossip: str = "actors", retries: int = 3,
                 threads: int = 1) -> None:
        super().__init__(problem)
        ray = import_ray("engine 'ray'")
        on_cuda = torch.device(problem.device).type == "cuda"
        if num_gpus is None:
            num_gpus = 1.0 / actors if on_cuda else 0.0
        check(num_gpus == 0 or torch.cuda.is_available(),
              f"engine.params.num_gpus = {num_gpus} but CUDA is not available on this machine; allowed: 0")
        check(not on_cuda or num_gpus > 0,
              f"the problem lives on {problem.device} but engine.params.num_gpus = 0; give each actor a GPU share (> 0)")
        check(num_gpus == 0 or on_cuda, f"engine.params.num_gpus = {num_gpus} needs device = \"cuda\" in the config")
        self.inner, self.gossip_mode, self.retries = inner, gossip, retries
        self.num_actors = min(actors, problem.num_clients)
        self.block = math.ceil(problem.num_clients / self.num_actors)
        self._started_here = False  # whether this engine called ray.init (and so must shut it down)
        self._ray = ray
        self._connect(address, num_cpus)
        total = ray.cluster_resources()
        for res, need in (("CPU", num_cpus), ("GPU", num_gpus)):
            if need and self.num_actors * need > total.get(res, 0) + 1e-9:
                self.close()
                raise ConfigError(f"{self.num_actors} actors x {need} {res} exceed the cluster's {total.get(res, 0):g} "
                                  f"{res}; lower engine.params.actors or num_{res.lower()}s")
        try:
            shard = ray.remote(ClientShard).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=retries,
                                                    max_task_retries=retries)
            ship_plugins_by_value()  # a plug-in problem's code travels with it
            self._problem_ref = [ray.put(problem)]  # wrapped: actors fetch it themselves, once
            self.actors = [shard.remote(inner, threads) for _ in range(self.num_actors)]
            # fail here (not mid-run) if the actors cannot be placed, e.g. too few CPUs on a cluster
            ray.get([a.pid.remote() for a in self.actors], timeout=60)
        except Exception as e:
            self.close()
            if isinstance(e, ray.exceptions.GetTimeoutError):
                raise ConfigError(f"Ray could not place {self.num_actors} actors with num_cpus={num_cpus}, "
                                  f"num_gpus={num_gpus} within 60 s; lower engine.params.actors or the resources") from None
            raise
        self.codec = TaskCodec(problem)
        self._blobs: dict[str, Any] = {}

    def _connect(self, address: str | None, num_cpus: float) -> None:
        if self._ray.is_initialized():  # e.g. a test session's or a sweep's Ray: use it, leave it running
            return
        if address is None:
            start_local(self.num_actors * num_cpus)
        else:
            join(address, where="engine.params.address")
        self._started_here = True

    # ---- federated rounds ------------------------------------------------------------------

    def _blob(self, task: Task) -> tuple[str, Any]:
        token, blob = self.codec.encode(task)
        ref = self._blobs.get(token)
        if ref is None:
            ref = self._blobs[token] = self._ray.put(blob)
        return token, ref

    def map_clients(self, task: Task, payload: Any, client_payload: Any, clients: torch.Tensor,
                    keys: torch.Tensor) -> Any:
        ray = self._ray
        token, blob_ref = self._blob(task)
        owner = torch.div(clients, self.block, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)  # cohort grouped by actor, cohort order kept inside a group
        counts = torch.bincount(owner, minlength=self.num_actors).tolist()
        payload_wire = encode_tree(payload)
        clients_np, keys_np = clients.cpu().numpy(), keys.cpu().numpy()
        order_np = order.cpu().numpy()
        calls, start = [], 0
        for a, c in enumerate(counts):
            if c == 0:
                continue
            idx = order_np[start:start + c]
            start += c
            cp = None if client_payload is None else tree_map(lambda t, idx=idx: t[torch.as_tensor(idx, device=t.device)],
                                                              client_payload)
            calls.append((self.actors[a], (token, payload_wire, encode_tree(cp), clients_np[idx], keys_np[idx])))
        results = ray.get([actor.run.remote(*args) for actor, args in calls])
        refs = [self._problem_ref[0], blob_ref]
        for _ in range(self.retries + 1):  # first use of a task on an actor, or a restarted actor: send the references
            missing = [j for j, r in enumerate(results) if r is None]
            if not missing:
                break
            again = ray.get([calls[j][0].run.remote(*calls[j][1], refs=refs) for j in missing])
            for j, r in zip(missing, again, strict=True):
                results[j] = r
        if any(r is None for r in results):
            raise RuntimeError(f"Ray actors kept losing their state during task {task.name!r}")
        parts = [decode_tree(*wire, clients.device) for wire in results]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return tree_map(lambda *ts: torch.cat(ts)[inverse], *parts)

    # ---- decentralized gossip --------------------------------------------------------------

    def gossip(self, w, w_numpy, values):
        if self.gossip_mode == "driver":
            return super().gossip(w, w_numpy, values)
        ray = self._ray
        n, widths = values[0].shape[0], [v.shape[1] for v in values]
        x = torch.cat(values, dim=1) if len(values) > 1 else values[0]
        w_dense = torch.as_tensor(w_numpy, dtype=x.dtype, device=x.device)
        bounds = self._bounds(n)
        block_refs = [ray.put(x[lo:hi]) for lo, hi in bounds]
        refs = []
        for a, nbrs in enumerate(self.gossip_plan(w_numpy)):
            lo, hi = bounds[a]
            cols = torch.cat([torch.arange(*bounds[b], device=x.device) for b in nbrs])
            refs.append(self.actors[a].mix.remote(w_dense[lo:hi][:, cols], *[block_refs[b] for b in nbrs]))
        mixed = torch.cat(ray.get(refs))
        return tuple(torch.split(mixed, widths, dim=1)) if len(values) > 1 else (mixed,)

    def _bounds(self, n: int) -> list[tuple[int, int]]:
        return [(a * self.block, min(n, (a + 1) * self.block)) for a in range(self.num_actors)]

    def gossip_plan(self, w_numpy) -> list[list[int]]:
        """For every actor, the blocks its rows have a neighbour in (the blocks it is sent)."""
        bounds = self._bounds(w_numpy.shape[0])
        return [[b for b, (blo, bhi) in enumerate(bounds) if (w_numpy[lo:hi, blo:bhi] != 0).any()]
                for lo, hi in bounds]

    # ---- lifecycle ---------------------------------------------------------------------------

    def actor_pids(self) -> list[int]:
        """Process ids of the actors (to watch them, or to kill one in a fault-tolerance test)."""
        return self._ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        ray = getattr(self, "_ray", None)
        if ray is None or not ray.is_initialized():
            return
        for a in getattr(self, "actors", []):
            ray.kill(a, no_restart=True)
        self.actors = []
        if getattr(self, "_started_here", False):  # a private instance stops; a joined cluster is only left
            ray.shutdown()


@ENGINES.register("ray")
def ray_engine(problem, *, actors: int = 2, num_cpus: float = 1.0, num_gpus: float | None = None,
               address: str | None = None, inner: str = "vmap", gossip: str = "actors", retries: int = 3,
               threads: int = 1) -> RayEngine:
    """Clients sharded over a pool of Ray actors (needs ``fedopt[ray]``).

    Args:
        actors: size of the actor pool (each owns a contiguous block of client ids).
        num_cpus: CPUs reserved per actor.
        num_gpus: GPU share per actor (fractional allowed); default: ``1 / actors`` when the
            problem is on CUDA, else 0. Needs CUDA.
        address: ``None`` (a private local Ray on 127.0.0.1, started and stopped with the run),
            ``"auto"``, ``"host:port"`` (a GCS) or ``"ray://host:port"`` (a Ray Client server): join an
            existing cluster (probed first: anything but Ray there is one error line within seconds).
        inner: how an actor runs its clients: ``"vmap"`` (batched) or ``"local"`` (a loop: bitwise
            the ``local`` engine's trajectory).
        gossip: ``"actors"`` (each actor mixes its rows from its neighbour blocks) or ``"driver"``.
        retries: restarts of a dead actor, and re-runs of the interrupted call, before giving up.
        threads: torch intra-op threads inside each actor (0: torch's default).
    """
    check(actors >= 1, f"engine.params.actors must be >= 1, got {actors}")
    check(num_cpus > 0, f"engine.params.num_cpus must be > 0, got {num_cpus}")
    check(num_gpus is None or num_gpus >= 0, f"engine.params.num_gpus must be >= 0, got {num_gpus}")
    check(inner in INNER, f"engine.params.inner = {inner!r}; allowed: {', '.join(INNER)}")
    check(gossip in GOSSIP, f"engine.params.gossip = {gossip!r}; allowed: {', '.join(GOSSIP)}")
    check(retries >= 0, f"engine.params.retries must be >= 0, got {retries}")
    check(threads >= 0, f"engine.params.threads must be >= 0, got {threads}")
    check(address is None or isinstance(address, str), f"engine.params.address must be a string, got {address!r}")
    return RayEngine(problem, actors=actors, num_cpus=num_cpus, num_gpus=num_gpus, address=address, inner=inner,
                     gossip=gossip, retries=retries, threads=threads)
