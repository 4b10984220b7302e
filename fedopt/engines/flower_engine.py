"""The ``flower`` engine: a config run under Flower's simulation runtime (Ray backend).

:meth:`FlowerEngine.run` starts ``flwr.simulation.run_simulation`` with one virtual SuperNode per
client; its ServerApp builds the algorithm's strategy (:mod:`fedopt.flower`) and calls
``strategy.start(grid, num_rounds=rounds)``; the ClientApp is :func:`fedopt.flower.client_app`.
Set-up, as measured in ``../notes/flower_ray.md``: telemetry and update checks off, a private Ray
instance (``actors * num_cpus`` CPUs, listening on 127.0.0.1 only:
:func:`fedopt.engines.ray_runtime.start_local`), ``num_cpus`` per client actor (Flower's
default of 2 gives one actor on a 2-core machine), a finite per-round ``timeout`` (a crashed
simulation otherwise leaves the ServerApp thread waiting for an hour), and Flower's 0.1 s message
poll lowered to ``pull_interval``. ``run_simulation`` is deprecated in Flower 1.42 but is the only
in-process entry point; it is wrapped here, in one place.

Ray ownership: the engine shuts down only a Ray it started. A Ray the caller initialised (a test
session's, a notebook's) is used and left running: Flower's backend would shut down whatever Ray it
finds when a simulation ends (``RayBackend.terminate``), so during :meth:`FlowerEngine.run` that step
only stops Flower's actors. Inside a Ray worker (a task of ``fedopt sweep --executor ray``, an
actor) the engine is refused at build time in one line: Flower's simulation needs a Ray driver of
its own, and one cannot be started in a process that is already a Ray worker (run such sweeps with
``--executor process``; the sweep refuses the combination before any run).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

from fedopt.engines.base import AbstractEngine
from fedopt.engines.ray_runtime import inside_ray_worker, start_local
from fedopt.errors import ConfigError, check
from fedopt.registry import ENGINES

__all__ = ["FlowerEngine", "flower_engine"]

INSIDE_RAY_WORKER = ("engine 'flower' cannot run inside a Ray task or actor (Flower's simulation needs a Ray "
                     "of its own); with fedopt sweep use --executor process")
_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def _flower():
    try:
        import flwr.simulation  # noqa: F401
    except ImportError:
        raise ConfigError("engine 'flower' needs Flower: pip install 'fedopt[flower]'") from None
    import fedopt.flower

    return fedopt.flower


class FlowerEngine(AbstractEngine):
    """Runs federated algorithms as Flower strategies over virtual SuperNodes."""

    def __init__(self, problem, *, actors: int = 2, num_cpus: int = 1, num_gpus: float | None = None,
                 timeout: float = 60.0, pull_interval: float = 0.005) -> None:
        super().__init__(problem)
        for k, v in _ENV.items():
            os.environ.setdefault(k, v)
        self.flower = _flower()
        check(not inside_ray_worker(), INSIDE_RAY_WORKER)
        on_cuda = torch.device(problem.device).type == "cuda"
        if num_gpus is None:
            num_gpus = 1.0 / actors if on_cuda else 0.0
        check(num_gpus == 0 or torch.cuda.is_available(),
              f"engine.params.num_gpus = {num_gpus} but CUDA is not available on this machine; allowed: 0")
        check(num_gpus == 0 or on_cuda, f"engine.params.num_gpus = {num_gpus} needs device = \"cuda\" in the config")
        self.actors, self.num_cpus, self.num_gpus = actors, num_cpus, num_gpus
        self.timeout, self.pull_interval = timeout, pull_interval

    def map_clients(self, task, payload, client_payload, clients, keys):
        raise RuntimeError("the flower engine runs whole programs (FlowerEngine.run), not single rounds")

    def refuses(self, algorithm: Any, network: Any) -> str | None:
        from fedopt.algorithms.base import FederatedAlgorithm

        if network is not None or not isinstance(algorithm, FederatedAlgorithm):
            return "it runs federated algorithms (server and clients); use vmap, local or ray"
        return None

    def run(self, algorithm: Any, *, network: Any = None, rounds: int, seed: int, eval_every: int = 1,
            on_iterate=None, **loop: Any):
        """Run ``algorithm`` for ``rounds`` outer iterations under Flower; returns fedopt's RunResult.
        ``loop`` (``stop_when``, ``checkpoint_every``, ``on_checkpoint``, ``resume``) goes to the
        strategy's loop, as on every engine."""
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

        assert network is None, "refused at build time"
        fl = self.flower
        strategy = fl.FedoptStrategy.for_algorithm(self.problem, algorithm, seed=seed, eval_every=eval_every,
                                                   timeout=self.timeout, on_iterate=on_iterate, loop=loop)
        server = ServerApp()
        failure: list[BaseException] = []
        pull_interval = self.pull_interval

        @server.main()
        def main(grid, context) -> None:
            del context
            if hasattr(grid, "pull_interval"):
                grid.pull_interval = pull_interval
            try:
                strategy.start(grid, num_rounds=rounds, timeout=self.timeout)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
                failure.append(e)

        import ray

        threads = torch.get_num_threads()
        started_here = not ray.is_initialized()
        if started_here:  # before the simulation, so the problem can be put in the object store first
            start_local(self.actors * self.num_cpus, num_gpus=1 if self.num_gpus else 0)
        try:
            from fedopt.engines.wire import ship_plugins_by_value

            ship_plugins_by_value()  # a plug-in problem's and task's code travel with them
            problem_ref = fl.ProblemRef(ray.put(self.problem))
            backend = {"client_resources": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}
            quiet = _Quiet()
            with quiet, _flower_leaves_ray_running():
                run_simulation(server_app=server, client_app=fl.client_app(problem_ref),
                               num_supernodes=self.problem.num_clients, backend_name="ray", backend_config=backend)
            del problem_ref
        finally:
            if started_here and ray.is_initialized():
                ray.shutdown()
            torch.set_num_threads(threads)
        if failure:
            raise failure[0]
        if strategy.run_result is None:
            raise RuntimeError("the Flower simulation ended before the strategy finished: "
                               + (quiet.last_error or "see Flower's log"))
        return strategy.run_result


@contextlib.contextmanager
def _flower_leaves_ray_running():
    """Flower's Ray backend ends a simulation with ``ray.shutdown()``, whoever started Ray: for the
    duration of a run it only stops its actors, and :meth:`FlowerEngine.run` shuts down the Ray it
    started itself."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    original = RayBackend.__dict__["terminate"]

    def terminate(self) -> None:
        if getattr(self, "pool", None):
            self.pool.terminate_all_actors()

    RayBackend.terminate = terminate
    try:
        yield
    finally:
        RayBackend.terminate = original


class _Quiet:
    """Flower logs every round at INFO; keep warnings and errors (and remember the last error)."""

    def __enter__(self):
        self.logger = logging.getLogger("flwr")
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)
        self.last_error: str | None = None
        quiet = self

        class Keep(logging.Handler):
            def emit(self, record):
                if record.levelno >= logging.ERROR:
                    quiet.last_error = record.getMessage().splitlines()[0]

        self.handler = Keep()
        self.logger.addHandler(self.handler)
        self.drop = _DropDeprecation()
        for h in self.logger.handlers:
            h.addFilter(self.drop)
        return self

    def __exit__(self, *exc):
        for h in self.logger.handlers:
            h.removeFilter(self.drop)
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
        return False


class _DropDeprecation(logging.Filter):
    """``run_simulation``'s deprecation notice (known, and the wrapper above is the one place to change)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage() and "deprecated feature" not in record.getMessage()


@ENGINES.register("flower")
def flower_engine(problem, *, actors: int = 2, num_cpus: int = 1, num_gpus: float | None = None,
                  timeout: float = 60.0, pull_interval: float = 0.005) -> FlowerEngine:
    """Federated algorithms as Flower strategies under Flower's simulation runtime (``fedopt[flower]``).

    Args:
        actors: Ray actors that serve the virtual clients (the simulation starts ``actors *
            num_cpus`` CPUs).
        num_cpus: CPUs per client actor (an integer, as in ``flwr run``'s federation config).
        num_gpus: GPU share per client actor; default ``1 / actors`` when the problem is on CUDA,
            else 0. Needs CUDA.
        timeout: seconds to wait for the replies of one round (and for the nodes to register).
        pull_interval: seconds between the server's polls for replies (Flower's default: 0.1).
    """
    check(actors >= 1, f"engine.params.actors must be >= 1, got {actors}")
    check(num_cpus >= 1, f"engine.params.num_cpus must be an integer >= 1, got {num_cpus}")
    check(num_gpus is None or num_gpus >= 0, f"engine.params.num_gpus must be >= 0, got {num_gpus}")
    check(timeout > 0, f"engine.params.timeout must be > 0 seconds, got {timeout}")
    check(pull_interval > 0, f"engine.params.pull_interval must be > 0 seconds, got {pull_interval}")
    return FlowerEngine(problem, actors=actors, num_cpus=num_cpus, num_gpus=num_gpus, timeout=timeout,
                        pull_interval=pull_interval)
