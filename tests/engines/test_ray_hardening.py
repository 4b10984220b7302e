"""Ray as this project starts it: listening on 127.0.0.1 only, started in one place for the ``ray``
engine, the ``flower`` engine and the sweep's ``ray`` executor, never shut down by an engine that did
not start it, and the ray executor's waits bounded (a dead worker and a run past the time limit are
failed runs). Every process is checked by PID, as descendants of this test process (other sessions'
Ray processes on the same machine are not looked at). One Ray start for the whole module."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w
from helpers import quadratic_config

ray = pytest.importorskip("ray")
try:  # importorskip silences flwr's import-time deprecation warnings (not ours), as in the flower tests
    flwr = pytest.importorskip("flwr.simulation")
except pytest.skip.Exception:  # the ray tests run without the flower extra
    flwr = None
pytestmark = pytest.mark.timeout(180)


# ---- processes and their sockets, from /proc ----------------------------------------------------

def descendants(root: int) -> set[int]:
    """PIDs of every live process below ``root``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":  # a zombie has exited; only its parent's wait is missing
            out.add(pid)
    return out


def gone_within(pids, seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def socket_owners(pids) -> dict[int, int]:
    """{socket inode: pid} for every socket the processes hold."""
    owners = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owners[int(target[8:-1])] = pid
    return owners


def listening_sockets() -> list[tuple[str, int, int]]:
    """(address, port, inode) of every TCP socket in LISTEN state (IPv4 and IPv6)."""
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((socket.inet_ntop(family, raw), int(hex_port, 16), int(fields[9])))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_the_proc_readers_see_a_socket_bound_to_all_interfaces():
    """The readers below can fail: a socket on 0.0.0.0 held by this process is found and is not loopback."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        mine = socket_owners({os.getpid()})
        hits = [(a, p) for a, p, inode in listening_sockets() if inode in mine and p == port]
    assert hits == [("0.0.0.0", port)] and not is_loopback("0.0.0.0")
    assert is_loopback("::ffff:127.0.0.1") and is_loopback("::1") and not is_loopback("::")


# ---- one local Ray for the module -----------------------------------------------------------------

@pytest.fixture(scope="module")
def _module_ray():
    assert not ray.is_initialized()
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def local_ray(_module_ray):
    """A local Ray of 2 CPUs, started here once per module (again if a test shut it down)."""
    from fedopt.engines.ray_runtime import start_local

    if not ray.is_initialized():
        start_local(2)
    return ray


@ray.remote(num_cpus=1)
def _worker_pid():
    return os.getpid()


def test_local_ray_listens_on_loopback_only_and_the_probe_knows_its_gcs(local_ray):
    from fedopt.engines.ray_runtime import probe
    from fedopt.errors import ConfigError

    worker_pid = ray.get(_worker_pid.remote(), timeout=90)
    pids = descendants(os.getpid()) | {os.getpid()}
    assert worker_pid in pids
    owners = socket_owners(pids)
    listening = [(addr, port, owners[inode]) for addr, port, inode in listening_sockets() if inode in owners]
    gcs_host, gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    # the GCS, the raylet, the driver's and the worker's core-worker servers, the runtime-env agent
    assert (gcs_host, int(gcs_port)) in {(a.replace("::ffff:", ""), p) for a, p, _ in listening}
    assert {os.getpid(), worker_pid} <= {pid for _, _, pid in listening}
    assert len(listening) >= 5, listening
    exposed = [(a, p, Path(f"/proc/{pid}/cmdline").read_bytes()[:80]) for a, p, pid in listening if not is_loopback(a)]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
    # the address probe: this GCS answers; the same port asked as a Ray Client server does not
    probe(f"{gcs_host}:{gcs_port}", where="engine.params.address")
    with pytest.raises(ConfigError, match="not a Ray Client server"):
        probe(f"ray://{gcs_host}:{gcs_port}", where="engine.params.address")


def test_flower_leaves_a_ray_it_did_not_start_running(local_ray):
    """Flower's backend ends a simulation with ray.shutdown(); during a run the engine keeps it from
    doing so (it shuts down only a Ray it started itself)."""
    if flwr is None:
        pytest.skip("the flower extra is not installed")
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from fedopt.engines.flower_engine import _flower_leaves_ray_running

    original = RayBackend.__dict__["terminate"]
    with _flower_leaves_ray_running():
        RayBackend.terminate(SimpleNamespace(pool=None))  # what Flower calls when a simulation ends
    assert ray.is_initialized() and RayBackend.__dict__["terminate"] is original


def _load(raw):
    from fedopt.config import load_config

    return load_config(raw)


def test_ray_executor_turns_a_dead_worker_and_an_overlong_run_into_failed_runs(local_ray, monkeypatch):
    """Each run's wait is bounded: a worker that dies is a failed run (not an exception, not a hang),
    and with FEDOPT_RAY_RUN_TIMEOUT_S a run that does not finish is stopped and failed. Last in the
    module: the executor shuts Ray down when it ends, and then every Ray process must be gone."""
    from fedopt import sweep

    def fake_run(config, threads, checkpoint):  # travels by value to the worker
        import os as _os
        import time as _time

        if config["seed"] == 0:
            _os._exit(3)
        _time.sleep(120)

    monkeypatch.setattr(sweep, "execute_point", fake_run)
    monkeypatch.setattr("fedopt.engines.ray_runtime.start_local", lambda *a, **k: None)  # the module's Ray
    monkeypatch.setenv("FEDOPT_RAY_RUN_TIMEOUT_S", "4")
    points = sweep.load_sweep({"base": quadratic_config(clients=4, rounds=1), "grid": {"seed": [0, 1]}}).points
    ray_pids = descendants(os.getpid())
    t0 = time.monotonic()
    outcomes = {p.config.seed: out for p, out in sweep._ray(points, 1, 2, None, {})}
    wall = time.monotonic() - t0
    assert outcomes[0]["status"] == "failed" and "Error" in outcomes[0]["error"], outcomes[0]
    assert outcomes[1]["status"] == "failed" and "longer than 4 s" in outcomes[1]["error"], outcomes[1]
    assert wall < 60
    assert not ray.is_initialized()
    assert not gone_within(ray_pids | descendants(os.getpid()), 10)


# ---- every local start goes through start_local -------------------------------------------------

class _Started(Exception):
    pass


def test_every_local_ray_start_goes_through_the_one_loopback_start(monkeypatch):
    """The ray engine, the flower engine and the sweep's ray executor start a local Ray only through
    ``ray_runtime.start_local`` (tested above to bind 127.0.0.1), and nothing else calls ``ray.init``."""
    import importlib

    from fedopt import sweep
    from fedopt.errors import ConfigError

    flower_engine, ray_engine, ray_runtime = (importlib.import_module(f"fedopt.engines.{m}")
                                              for m in ("flower_engine", "ray_engine", "ray_runtime"))
    from fedopt.runner import build

    calls = []

    def start_local(num_cpus, **kw):
        calls.append(num_cpus)
        raise _Started

    for module in (ray_runtime, ray_engine, flower_engine):
        monkeypatch.setattr(module, "start_local", start_local, raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail(f"ray.init called directly: {a} {k}"))
    built = build(_load(quadratic_config(clients=4, rounds=1)))
    with pytest.raises(_Started):
        ray_engine.RayEngine(built.problem, actors=2, num_cpus=1)
    if flwr is not None:
        with pytest.raises(_Started):
            flower_engine.FlowerEngine(built.problem, actors=3).run(built.algorithm, rounds=1, seed=0)
    else:
        calls.append(3)
    with pytest.raises(_Started):
        next(sweep._ray([], 1, 5, None, {}))
    assert calls == [2, 3, 5]
    # inside a Ray worker (a sweep task) the flower engine is refused at build time, before any start
    monkeypatch.setattr(flower_engine, "inside_ray_worker", lambda: True)
    if flwr is not None:
        with pytest.raises(ConfigError, match="engine 'flower' cannot run inside a Ray task or actor"):
            flower_engine.FlowerEngine(built.problem)
    assert calls == [2, 3, 5]
    root = Path(ray_runtime.__file__).parents[1]
    direct = [str(f.relative_to(root)) for f in root.rglob("*.py") if "ray.init(" in f.read_text()
              and f.name != "ray_runtime.py"]
    assert direct == []


# ---- a killed ray-executor sweep ----------------------------------------------------------------

@pytest.mark.slow  # fresh interpreters (torch) and Ray starts: ~30 s idle, a minute on 2 busy cores
def test_sigterm_and_sigkill_on_a_ray_executor_sweep_leave_no_process_and_a_free_folder(tmp_path):
    """Two ray-executor sweeps at once (their start-ups overlap), one sent SIGTERM and one SIGKILL
    while a run is under way in a Ray worker: every process each started (driver's Ray, raylet, GCS,
    workers) is gone within 10 s, SIGTERM exits 143, and each folder is resumable: its lock is free
    and no half-written run folder is left (run folders appear by an atomic rename)."""
    import fcntl

    raw = quadratic_config(clients=4, rounds=200000, eval_every=1000)
    spec = {"base": raw, "grid": {"seed": [0, 1]}}
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        folder = tmp_path / sig.name
        folder.mkdir()
        (folder / "sweep.toml").write_text(tomli_w.dumps(spec))
        procs[sig] = subprocess.Popen([sys.executable, "-m", "fedopt.cli", "sweep", "sweep.toml", "--executor", "ray",
                                       "--workers", "1", "--out", "out", "--quiet"], cwd=folder,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: dict[signal.Signals, set[int]] = {sig: set() for sig in procs}
    try:
        deadline = time.monotonic() + 120
        waiting = set(procs)
        while waiting and time.monotonic() < deadline:  # until a run is under way in a worker of each
            for sig in list(waiting):
                seen[sig] |= descendants(procs[sig].pid)
                if procs[sig].poll() is not None or any(b"execute_point" in _cmdline(pid) for pid in seen[sig]):
                    waiting.discard(sig)
            time.sleep(0.2)
        for sig, proc in procs.items():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            seen[sig] |= descendants(proc.pid)
            assert any(b"raylet" in _cmdline(pid) for pid in seen[sig]) and len(seen[sig]) >= 3, seen[sig]
        for sig, proc in procs.items():
            proc.send_signal(sig)
        for sig, proc in procs.items():
            assert proc.wait(15) == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
            left = gone_within(seen[sig], 10)
            assert not left, (sig.name, [_cmdline(pid)[:80] for pid in left])
            out = tmp_path / sig.name / "out"
            with open(out / ".lock", "a") as f:  # free: a rerun can take it at once
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert [p.name for p in (out / "runs").iterdir() if not p.name.startswith(".")] == []
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            proc.stderr.close()
        for pid in alive(set().union(*seen.values())):  # only if the test failed: clean up what it started
            os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""
