"""Bad Ray inputs, as a user meets them: an address where something other than Ray listens (a typo,
the dashboard's HTTP port, a silent port), given as ``engine.params.address`` (``host:port`` and
``ray://host:port``) or as the sweep's ``--address``; a flower-engine sweep on the ray executor; a bad
``FEDOPT_RAY_RUN_TIMEOUT_S``. Each is one line on stderr, exit code 2, no traceback, nothing written
(``helpers.refused``), within the README's 30 s, and leaves no process behind (checked by PID: this
test process's children). No Ray starts in this module."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
from helpers import quadratic_config, refused

ray = pytest.importorskip("ray")
try:  # importorskip silences flwr's import-time deprecation warnings (not ours), as in the flower tests
    flwr = pytest.importorskip("flwr.simulation")
except pytest.skip.Exception:
    flwr = None
needs_flower = pytest.mark.skipif(flwr is None, reason="the flower extra is not installed")
pytestmark = pytest.mark.timeout(120)
PROMISE_S = 30  # README: a bad address is one line in under 30 s


def _children(root: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        kids.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.fixture(scope="module")
def silent_port():
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def http_port():
    """An HTTP/1.1 server, as Ray's dashboard (8265) is."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def no_ray():
    assert not ray.is_initialized(), "a Ray is running in this process: the engine would use it"
    import os

    before = _children(os.getpid())
    yield
    assert not ray.is_initialized()
    assert _children(os.getpid()) <= before, "a process was left behind"


def _write(folder: Path, engine: dict, *, sweep: bool = False) -> str:
    raw = quadratic_config(clients=4, rounds=2)
    raw["engine"] = engine
    if not sweep:
        (folder / "c.toml").write_text(tomli_w.dumps(raw))
        return "c.toml"
    (folder / "s.toml").write_text(tomli_w.dumps({"base": raw, "grid": {"seed": [0, 1]}}))
    return "s.toml"


def _timed_refusal(*argv, cwd, contains):
    t0 = time.monotonic()
    line = refused(*argv, cwd=cwd, contains=contains)
    wall = time.monotonic() - t0
    assert wall < PROMISE_S, (wall, line)
    return line, wall


@pytest.mark.parametrize(("server", "scheme", "fragment"), [
    ("silent", "", "something listens there but it is not a Ray GCS"),
    ("http", "", "something listens there but it is not a Ray GCS"),
    ("http", "ray://", "something listens there but it is not a Ray Client server"),
])
def test_engine_address_where_no_ray_listens_is_one_line(tmp_path, no_ray, silent_port, http_port, server, scheme,
                                                         fragment):
    port = silent_port if server == "silent" else http_port
    address = f"{scheme}127.0.0.1:{port}"
    cfg = _write(tmp_path, {"name": "ray", "params": {"address": address}})
    line, wall = _timed_refusal("run", cfg, "--out", "out", "--quiet", cwd=tmp_path,
                                contains=(fragment, f"engine.params.address = {address!r}"))
    if server == "http":
        assert wall < 10, wall  # an HTTP answer is a refusal at once, not after the probe's deadline


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_sweep_address_where_no_ray_listens_is_one_line(tmp_path, no_ray, http_port, scheme):
    address = f"{scheme}127.0.0.1:{http_port}"
    sw = _write(tmp_path, {"name": "vmap"}, sweep=True)
    _timed_refusal("sweep", sw, "--executor", "ray", "--address", address, "--out", "out", "--quiet", cwd=tmp_path,
                   contains=(f"--address = {address!r}", "something listens there but it is not a Ray"))


@needs_flower
def test_a_flower_engine_sweep_finishes_on_the_ray_executor(tmp_path):
    """A flower-engine run inside the ray executor runs in a process of its own (a Ray task cannot
    start Flower's Ray): it finishes, with the local engine's numbers (the flower engine matches
    local bit for bit on FedMBO, tests/engines/test_flower_engine.py), and leaves no process."""
    from fedopt.sweep import load_sweep, run_sweep
    from helpers import runtime_processes

    raw = quadratic_config(clients=4, rounds=2)
    raw["engine"] = {"name": "flower"}
    rep = run_sweep(load_sweep({"base": raw, "grid": {"seed": [0]}}), tmp_path / "ray", executor="ray", workers=1,
                    progress=False)
    assert rep.finished == 1 and not rep.failed, rep.failed
    raw["engine"] = {"name": "local"}
    ref = run_sweep(load_sweep({"base": raw, "grid": {"seed": [0]}}), tmp_path / "local", progress=False)
    a, b = (pd.read_csv(r.table_path).sort_values(["round", "metric"]) for r in (rep, ref))
    assert list(a.metric) == list(b.metric) and np.allclose(a.value, b.value, rtol=0, atol=1e-12)
    deadline = time.time() + 10
    while runtime_processes() and time.time() < deadline:
        time.sleep(0.2)
    assert not runtime_processes()


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf"])
def test_bad_run_timeout_is_one_line(tmp_path, no_ray, monkeypatch, value):
    monkeypatch.setenv("FEDOPT_RAY_RUN_TIMEOUT_S", value)
    sw = _write(tmp_path, {"name": "vmap"}, sweep=True)
    _timed_refusal("sweep", sw, "--executor", "ray", "--out", "out", "--quiet", cwd=tmp_path,
                   contains=f"FEDOPT_RAY_RUN_TIMEOUT_S must be a number of seconds > 0, got {value!r}")


def test_engine_address_where_no_ray_listens_is_a_config_error_from_the_api(tmp_path, no_ray, http_port):
    import fedopt
    from fedopt.errors import ConfigError

    raw = quadratic_config(clients=4, rounds=2)
    raw["engine"] = {"name": "ray", "params": {"address": f"ray://127.0.0.1:{http_port}"}}
    with pytest.raises(ConfigError, match="not a Ray Client server"):
        fedopt.run(raw)
