"""Small configs and builders shared by the tests (importable: pytest puts tests/ on the path)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fedopt.config import load_config
from fedopt.runner import Built, build


def quadratic_config(*, clients: int = 8, rounds: int = 20, seed: int = 0, problem: dict | None = None,
                     algorithm: str = "fedmbo", params: dict | None = None, engine: str = "vmap",
                     eval_every: int = 1) -> dict[str, Any]:
    """A float64 FedMBO-on-quadratic config; ``problem`` / ``params`` update the defaults."""
    prob = {"x_dim": 4, "y_dim": 3, "mu": 1.0, "L": 4.0, "delta": 0.5, "sigma": 0.0, "lam": 0.1}
    prob.update(problem or {})
    alg = {"outer_lr": 0.5, "inner_lr": 0.25, "neumann_lr": 0.25, "neumann_terms": 10, "inner_steps": 3,
           "clients_per_round": clients}
    alg.update(params or {})
    return {"seed": seed, "clients": clients, "rounds": rounds, "eval_every": eval_every, "dtype": "float64",
            "problem": {"name": "quadratic", "params": prob},
            "algorithm": {"name": algorithm, "params": alg}, "engine": {"name": engine}}


def dec_config(algorithm="ma_dsbo", topology="complete", *, n=16, rounds=200, params=None, problem=None,
               eval_every=None, mixing="metropolis_hastings") -> dict[str, Any]:
    """A float64 decentralized config on the heterogeneous quadratic over ``topology`` with ``n`` nodes."""
    prob = {"x_dim": 4, "y_dim": 3, "mu": 1.0, "L": 4.0, "delta": 1.0, "sigma": 0.0, "lam": 0.1}
    prob.update(problem or {})
    alg = {"outer_lr": 0.3, "inner_lr": 0.2, "z_lr": 0.2}
    if algorithm.startswith("ma_dsbo"):
        alg["theta"] = 0.8
    alg.update(params or {})
    return {"seed": 0, "clients": n, "rounds": rounds, "eval_every": eval_every or rounds, "dtype": "float64",
            "problem": {"name": "quadratic", "params": prob}, "algorithm": {"name": algorithm, "params": alg},
            "topology": {"name": topology, "mixing": mixing}}


def built(raw: dict[str, Any]) -> Built:
    return build(load_config(copy.deepcopy(raw)))




# process names of a Ray or Flower runtime (raylet, GCS, workers, the Flower daemons)
RUNTIME_PROCESS_NAMES = ("raylet", "gcs_server", "ray::", "default_worker.py", "flower-superlink", "flower-superexec",
                         "flwr-simulation")
# Set by tests/conftest.py at start-up to a value unique to this pytest process (one per xdist worker).
# Every process started by the tests inherits it (Ray's GCS, raylet and workers, Flower's daemons),
# so a test sees its own runtime processes and never another session's.
SESSION_ENV = "FEDOPT_TEST_SESSION"


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def runtime_processes(*, everyone: bool = False) -> dict[int, str]:
    """Running Ray / Flower runtime processes started by this test session: ``{pid: command line}``
    (``everyone=True``: every such process on the machine, whoever started it)."""
    import os

    token = os.environ.get(SESSION_ENV)
    mark = b"\0" + f"{SESSION_ENV}={token}".encode() + b"\0" if token and not everyone else None
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(name in text for name in RUNTIME_PROCESS_NAMES):
            pid = int(cmdline.parent.name)
            if mark is None or mark in b"\0" + _environ(pid) + b"\0":
                found[pid] = text
    return found


def engine_metrics(raw: dict[str, Any], engine: str, **params: Any):
    """``raw`` run on ``engine`` (with engine ``params``): metrics as a round x metric frame."""
    import fedopt

    raw = copy.deepcopy(raw)
    raw["engine"] = {"name": engine, "params": params}
    return fedopt.run(raw).pivot(index="round", columns="metric", values="value")


def cli_in_process(*argv: str, cwd):
    """``fedopt.cli.main(argv)`` run in folder ``cwd`` in this process, as a ``CompletedProcess``
    (return code, captured stdout and stderr). ``main`` resolves plug-ins from the config's folder
    and the current folder exactly as the installed script does, without paying a new interpreter's
    start-up (4-8 s of torch import)."""
    import contextlib
    import io
    import os
    import subprocess
    from pathlib import Path

    from fedopt.cli import main

    out, err, here = io.StringIO(), io.StringIO(), Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(list(argv))
            except SystemExit as e:  # argparse's own errors
                code = e.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def folder_snapshot(folder) -> dict[str, tuple[int, int, bytes]]:
    """Every path under ``folder`` with its mode, size and content (folders: empty content)."""
    from pathlib import Path

    snap = {}
    for p in sorted(Path(folder).rglob("*")):
        st = p.lstat()
        snap[str(p.relative_to(folder))] = (st.st_mode, st.st_size, p.read_bytes() if p.is_file() else b"")
    return snap


def refused(*argv: str, cwd, contains: str | tuple[str, ...] = ()) -> str:
    """Run ``fedopt argv`` in-process in ``cwd`` and assert the bad-input contract: exit code 2,
    exactly one line on stderr and nothing on stdout, no traceback, and ``cwd`` unchanged (no file
    written, removed or modified). Returns the line; ``contains`` are substrings it must name."""
    before = folder_snapshot(cwd)
    done = cli_in_process(*argv, cwd=cwd)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert len(lines) == 1 and not done.stdout.strip(), (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert folder_snapshot(cwd) == before, "a refused command changed its folder"
    for part in (contains,) if isinstance(contains, str) else contains:
        assert part in lines[0], (part, lines[0])
    return lines[0]
