"""Killing `fedopt run` and `fedopt sweep`: no process left behind, a documented and resumable state.

SIGTERM is delivered in-process where the command runs in this process (``run`` and the serial
sweep: the CLI's handler turns it into an interrupt), and to a fresh ``fedopt`` process where only a
separate process can show it (SIGKILL, and the process pool, whose resource tracker belongs to the
process that made the pool). Every process a command started is found by PID (the descendants of
the command's process, read from /proc) before the kill and must be gone within 10 s after it.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import tomli_w
from helpers import cli_in_process, quadratic_config, refused

from fedopt.results import process_start
from fedopt.sweep import load_sweep, run_sweep

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

ROUNDS = 300  # about 2 s of FedMBO on a 4-client quadratic: long enough to be killed mid-run


def _config(rounds: int = ROUNDS) -> dict:
    raw = quadratic_config(clients=4, rounds=rounds, eval_every=50, params={"neumann_terms": 3, "inner_steps": 1})
    raw["checkpoint_every"] = 5
    return raw


def _sweep_file(folder: Path, seeds=(0, 1)) -> Path:
    f = folder / "sweep.toml"
    f.write_text(tomli_w.dumps({"base": _config(), "grid": {"seed": list(seeds)}}))
    return f


# ---- processes, by PID ----------------------------------------------------------------------

def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for kid in _children(todo.pop()):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return found


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie runs nothing; its parent reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _assert_gone(pids: set[int], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (left := {p for p in pids if _running(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    cmds = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for p in left if _running(p)}
    assert not left, f"processes left behind after {within} s: {cmds}"


def _fedopt(*argv: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedopt.cli", *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


# Commands killed by a signal from outside, all started at once (each pays a new interpreter's
# torch import, so they overlap): name -> (argv, signal, how many descendants to wait for).
OUTSIDE = {
    "run SIGKILL": (["run", "c.toml", "--out", "out"], signal.SIGKILL, 0),
    "serial sweep SIGKILL": (["sweep", "sweep.toml", "--out", "out"], signal.SIGKILL, 0),
    # two pool workers and multiprocessing's resource tracker
    "process sweep SIGTERM": (["sweep", "sweep.toml", "--executor", "process", "--workers", "2", "--out", "out"],
                              signal.SIGTERM, 3),
    "process sweep SIGKILL": (["sweep", "sweep.toml", "--executor", "process", "--workers", "2", "--out", "out"],
                              signal.SIGKILL, 3),
}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Start every :data:`OUTSIDE` command, signal each once it has a checkpoint (and its worker
    processes), and record ``{name: (folder, pid, descendants before the signal, exit code)}``."""
    started = {}
    try:
        for name, (argv, sig, family) in OUTSIDE.items():
            folder = tmp_path_factory.mktemp(name.replace(" ", "-"))
            (folder / "c.toml").write_text(tomli_w.dumps(_config()))
            _sweep_file(folder)
            started[name] = (folder, _fedopt(*argv, "--quiet", cwd=folder))
        signalled = {}
        deadline = time.monotonic() + 300  # generous: a busy machine imports torch slowly
        while len(signalled) < len(started):  # never blocks on one command while the others run
            assert time.monotonic() < deadline, f"timed out; still waiting for {sorted(set(started) - set(signalled))}"
            for name, (folder, proc) in started.items():
                if name in signalled:
                    continue
                assert proc.poll() is None, f"{name}: the command ended (code {proc.returncode}) before the signal"
                sig, need = OUTSIDE[name][1], OUTSIDE[name][2]
                family = _descendants(proc.pid)
                if any((folder / "out").glob("**/*.pt")) and len(family) >= need:
                    proc.send_signal(sig)
                    signalled[name] = family
            time.sleep(0.02)
        yield {name: (folder, proc.pid, signalled[name], proc.wait(timeout=60))
               for name, (folder, proc) in started.items()}
    finally:
        for _, proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def sigterm_self():
    """``arm(condition)``: a thread sends SIGTERM to this process once ``condition()`` holds (at
    most 60 s). Meant to land inside ``main``, whose handler turns it into an interrupt; one that
    lands outside (a test that failed early) is recorded and ignored, never ends pytest, and the
    thread is stopped when the test ends."""
    stop, threads, seen = threading.Event(), [], []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append(a[0]))

    def arm(condition) -> None:
        def watch() -> None:
            deadline = time.monotonic() + 60
            while not condition() and time.monotonic() < deadline:
                if stop.wait(0.01):
                    return
            os.kill(os.getpid(), signal.SIGTERM)

        threads.append(threading.Thread(target=watch, daemon=True))
        threads[-1].start()

    yield arm
    stop.set()
    for t in threads:
        t.join()
    signal.signal(signal.SIGTERM, previous)


def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


# ---- fedopt run -----------------------------------------------------------------------------

def test_sigterm_marks_the_run_interrupted_and_resume_finishes_it(tmp_path, sigterm_self):
    (tmp_path / "c.toml").write_text(tomli_w.dumps(_config()))
    out = tmp_path / "run"
    sigterm_self(lambda: (out / "checkpoint.pt").is_file())
    done = cli_in_process("run", "c.toml", "--out", "run", "--quiet", cwd=tmp_path)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stderr.strip().splitlines() == ["fedopt: interrupted (SIGTERM)"]
    meta = _meta(out)
    assert meta["status"] == "interrupted" and meta["signal"] == "SIGTERM"
    assert 5 <= meta["checkpoint_round"] < ROUNDS and (out / "checkpoint.pt").is_file()
    resumed = cli_in_process("run", "--resume", "run", "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _meta(out)["status"] == "finished" and _meta(out)["resumed_from"] == meta["checkpoint_round"]
    assert pd.read_csv(out / "metrics.csv")["round"].max() == ROUNDS and not (out / "checkpoint.pt").exists()


def test_sigkill_leaves_a_running_folder_with_its_dead_pid_that_resumes(killed):
    folder, pid, family, code = killed["run SIGKILL"]
    assert code == -signal.SIGKILL
    _assert_gone(family | {pid})
    out = folder / "out"
    meta = _meta(out)
    assert meta["status"] == "running" and meta["pid"] == pid and meta["host"] == os.uname().nodename
    resumed = cli_in_process("run", "--resume", "out", "--quiet", cwd=folder)
    assert resumed.returncode == 0, resumed.stderr
    assert _meta(out)["status"] == "finished" and _meta(out)["resumed_from"] >= 5
    assert pd.read_csv(out / "metrics.csv")["round"].max() == ROUNDS


def test_resume_refuses_a_folder_whose_run_is_alive(tmp_path):
    (tmp_path / "c.toml").write_text(tomli_w.dumps(_config(rounds=2)))
    assert cli_in_process("run", "c.toml", "--out", "run", "--quiet", cwd=tmp_path).returncode == 0
    meta = _meta(tmp_path / "run")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        live = {**meta, "status": "running", "pid": sleeper.pid, "pid_start": process_start(sleeper.pid)}
        (tmp_path / "run" / "meta.json").write_text(json.dumps(live))
        refused("run", "--resume", "run", "--quiet", cwd=tmp_path, contains=f"being run by process {sleeper.pid}")
        # the same pid, started later than the recorded run: a reused pid, the run itself is gone
        (tmp_path / "run" / "meta.json").write_text(json.dumps({**live, "pid_start": live["pid_start"] - 1}))
        assert cli_in_process("run", "--resume", "run", "--quiet", cwd=tmp_path).returncode == 0
        assert _meta(tmp_path / "run")["status"] == "finished"
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- fedopt sweep ---------------------------------------------------------------------------

def _finish_and_check(tmp_path: Path, out: Path, total: int) -> None:
    """The killed sweep's folder resumes (in this process) to a complete table."""
    report = run_sweep(load_sweep(tmp_path / "sweep.toml"), out, progress=False)
    assert report.finished == total and not report.failed
    t = pd.read_csv(out / "results.csv")
    assert t.run_id.nunique() == total and t["round"].max() == ROUNDS
    assert not t.duplicated(["run_id", "round", "metric"]).any()
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]
    assert not list((out / "checkpoints").glob("*"))


def test_sigterm_stops_a_serial_sweep_that_then_resumes(tmp_path, sigterm_self):
    _sweep_file(tmp_path)
    out = tmp_path / "out"
    sigterm_self(lambda: any((out / "checkpoints").glob("*.pt")))
    done = cli_in_process("sweep", "sweep.toml", "--out", "out", "--quiet", cwd=tmp_path)
    assert done.returncode == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in done.stderr
    assert not (out / "results.csv").exists() and list((out / "checkpoints").glob("*.pt"))
    _finish_and_check(tmp_path, out, 2)


@pytest.mark.parametrize("name", [n for n in OUTSIDE if "sweep" in n])
def test_killed_sweep_leaves_no_process_and_resumes(name, killed):
    folder, pid, family, code = killed[name]
    sig, need = OUTSIDE[name][1], OUTSIDE[name][2]
    assert len(family) >= need
    assert code == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
    _assert_gone(family | {pid})  # the workers and the resource tracker too
    _finish_and_check(folder, folder / "out", 2)


# ---- one sweep per folder -------------------------------------------------------------------

def test_a_second_sweep_on_a_locked_folder_is_refused_and_a_stale_lock_is_not(tmp_path):
    (tmp_path / "sweep.toml").write_text(tomli_w.dumps({"base": _config(rounds=4), "grid": {"seed": [0]}}))
    out = tmp_path / "out"
    assert cli_in_process("sweep", "sweep.toml", "--out", "out", "--quiet", cwd=tmp_path).returncode == 0
    (out / "runs" / next(p.name for p in (out / "runs").iterdir()) / "meta.json").unlink()  # one run to redo
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live sweep holds it
        os.pwrite(fd, b"4242 somehost\n", 0)
        refused("sweep", "sweep.toml", "--out", "out", "--quiet", cwd=tmp_path,
                contains=("'out' is in use by another fedopt sweep", "pid 4242 on somehost"))
    finally:
        os.close(fd)
    # the lock file of a process that is gone (the OS released its lock) does not block
    done = cli_in_process("sweep", "sweep.toml", "--out", "out", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "0 already done, 1 finished" in done.stdout
    assert (out / ".lock").read_text().split()[0] == str(os.getpid())
