"""Starting, joining and leaving Ray: the one place the ``ray`` engine, the ``flower`` engine and the
sweep's ``ray`` executor do it.

* :func:`start_local` starts a private Ray (``address="local"``: never a cluster found in Ray's temp
  folder) with explicit CPUs, no dashboard, and every server bound to the loopback interface. On
  Linux Ray otherwise takes the machine's routable address as the node address and its GCS, raylet,
  object manager and core-worker gRPC servers listen on all interfaces (``::``); a simulation on one
  machine has nobody to talk to there. Ray binds to loopback when the node address is a loopback
  one, and it picks one only where "clusters" are disabled (its Windows / macOS default), so the
  start-up runs with that switch (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``) off; the
  switch is put back as soon as ``ray.init`` returns and changes nothing else (joining a cluster
  afterwards is unaffected). Its processes stop within seconds of the driver being killed
  (:data:`_LOCAL_ENV`). Tested in ``tests/engines/test_ray_hardening.py`` from the sockets the
  Ray processes hold (``/proc/net/tcp*``).
* :func:`join` joins an existing cluster (``"auto"``, ``"host:port"`` of a GCS, ``"ray://host:port"``
  of a Ray Client server) after :func:`probe` has asked the server, over gRPC with a deadline, the
  one question only a Ray GCS (``GetClusterId``) or a Ray Client server (``ClusterInfo``) answers:
  a closed port, a silent one, an HTTP server (the dashboard), any other service, is a one-line
  :class:`~fedopt.errors.ConfigError` within :data:`PROBE_TIMEOUT_S` seconds, before ``ray.init``
  (which retries such an address for minutes, printing warnings, and does not yield to SIGTERM).
* :func:`inside_ray_worker` tells whether this process is a Ray worker (a sweep task, an actor).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

from fedopt.errors import ConfigError, check

__all__ = ["PROBE_TIMEOUT_S", "QUIET", "import_ray", "inside_ray_worker", "join", "probe", "start_local"]

PROBE_TIMEOUT_S = 5.0
QUIET = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
LOOPBACK = "127.0.0.1"
# A private Ray's GCS does not come back once gone (no fault tolerance without Redis): its clients
# (Ray's dashboard and runtime-env agents among them) give up after 5 s instead of Ray's 60. Without
# this the agents outlive a SIGKILLed driver by over a minute (measured); with it, ~6 s.
_LOCAL_ENV = {"RAY_gcs_rpc_server_reconnect_timeout_s": "5"}


def import_ray(needed_by: str):
    """``ray``, or a one-line ConfigError naming what needs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"{needed_by} needs Ray: pip install 'fedopt[ray]'") from None
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning otherwise
    return ray


def inside_ray_worker() -> bool:
    """Whether this process is a Ray worker (runs a task or an actor), not a driver."""
    import sys

    ray = sys.modules.get("ray")
    # a module another thread is still importing (Flower's simulation imports Ray in a thread) has
    # no is_initialized yet: it is not initialized
    if ray is None or not getattr(ray, "is_initialized", lambda: False)():
        return False
    from ray._private.worker import global_worker

    return global_worker.mode == ray.WORKER_MODE


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Keep a Python SIGTERM handler across ``ray.init``, which replaces it with ``sys.exit`` (and
    Ray's core worker with a C++ handler that logs and aborts): the CLI's handler ends a run or a
    sweep cleanly (status ``interrupted``, workers stopped, exit 143). Without a Python handler
    (SIG_DFL, e.g. in a user's script) Ray's own handling is left as it is."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(saved):
            signal.signal(signal.SIGTERM, saved)


def start_local(num_cpus: float, *, num_gpus: float | None = None, **extra: Any) -> None:
    """Start a private Ray on this machine, listening on 127.0.0.1 only."""
    ray = import_ray("a local Ray")
    from ray._private import ray_constants

    kwargs = {**QUIET, **extra, "address": "local", "num_cpus": max(1, math.ceil(num_cpus)),
              "_node_ip_address": LOOPBACK}
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # Ray then keeps the loopback node address (see above)
    saved_env = {k: os.environ.get(k) for k in _LOCAL_ENV}
    for k, v in _LOCAL_ENV.items():  # inherited by the processes ray.init starts; a user's own value wins
        os.environ.setdefault(k, v)
    try:
        with _keep_sigterm_handler():
            ray.init(**kwargs)
    except Exception as e:  # noqa: BLE001 - no Ray is bad input / environment here, in one line
        if ray.is_initialized():  # half started: stop what did start
            ray.shutdown()
        raise ConfigError(f"cannot start a local Ray: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def join(address: str, *, where: str) -> None:
    """Join the cluster at ``address`` (probed first); ``where`` names the setting in errors."""
    ray = import_ray(f"{where} = {address!r}")

    probe(address, where=where)
    # a join that fails later would print Ray's C++ retry lines above our one line
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        with _keep_sigterm_handler():
            ray.init(address=address, **QUIET)
    except Exception as e:  # noqa: BLE001 - any failure to reach Ray is bad input here
        if ray.is_initialized():
            ray.shutdown()
        raise ConfigError(f"cannot join Ray at {where} = {address!r}: {type(e).__name__}: {_first_line(e)}") from None


def probe(address: str, *, where: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail in one line, within about ``timeout`` seconds, unless a Ray GCS (``host:port``) or Ray
    Client server (``ray://host:port``) answers at ``address``. ``"auto"`` is left to ``ray.init``,
    which fails at once when no cluster is recorded on this machine."""
    if address == "auto":
        return
    client = address.startswith("ray://")
    hostport = address[len("ray://"):] if client else address
    host, _, port = hostport.rpartition(":")
    check("://" not in hostport and bool(host) and port.isdigit() and 0 < int(port) < 65536,
          f"{where} = {address!r} is not 'auto', 'ray://host:port' or 'host:port'")
    import socket

    try:  # a closed port or an unknown host: the plain error, without waiting for gRPC's back-off
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"cannot reach Ray at {where} = {address!r}: {e.strerror or e}") from None
    what = "a Ray Client server (ray://)" if client else "a Ray GCS"
    answer = _ask(hostport, client, timeout)
    if answer is not None:
        raise ConfigError(f"{where} = {address!r}: something listens there but it is not {what} ({answer}); "
                          "check the host and port" + ("" if client else " (a GCS port, 6379 by default, not the "
                                                                          "dashboard's)"))


def _ask(hostport: str, client: bool, timeout: float) -> str | None:
    """``None`` when the server answers the Ray question (any reply but "no such method"), else why not."""
    import grpc

    channel = grpc.insecure_channel(hostport)
    try:
        if client:
            from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

            call = ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo
            request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
        else:
            from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

            call = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId
            request = gcs_service_pb2.GetClusterIdRequest()
        try:
            call(request, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                return f"no gRPC answer: {code.name}" if code is not None else "no gRPC answer"
            return None  # e.g. UNAUTHENTICATED: a Ray server that wants a token answered
        return None
    finally:
        channel.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
