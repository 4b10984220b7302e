"""Checkpoint and resume from the command line: a run killed with SIGKILL at about half its outer
iterations and resumed with ``fedopt run --resume DIR`` writes the same metrics table, byte for
byte, as an uninterrupted run (a federated, a decentralized and a centralized algorithm); a sweep
killed mid-run continues its half-finished runs from their checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cli_in_process
import tomli_w

from fedopt import results

CONFIGS = {
    "federated": {
        "clients": 10, "rounds": 600, "checkpoint_every": 10, "eval_every": 50,
        "problem": {"name": "quadratic", "params": {"x_dim": 4, "y_dim": 3, "sigma": 0.5}},
        "algorithm": {"name": "fedmbo", "params": {"outer_lr": 0.3, "inner_lr": 0.25, "neumann_lr": 0.25,
                                                    "clients_per_round": 4, "batch_size": 2, "neumann_terms": 4,
                                                    "inner_steps": 2}},
        "engine": {"name": "vmap"},
    },
    "decentralized": {
        "clients": 8, "rounds": 600, "checkpoint_every": 20, "eval_every": 50,
        "problem": {"name": "quadratic", "params": {"x_dim": 4, "y_dim": 3, "sigma": 0.3}},
        "algorithm": {"name": "ma_dsbo", "params": {"outer_lr": 0.2, "inner_lr": 0.2, "z_lr": 0.2, "batch_size": 2,
                                                     "inner_steps": 2, "z_steps": 2}},
        "topology": {"name": "ring"},
        "engine": {"name": "vmap"},
    },
    "centralized": {
        "clients": 4, "rounds": 2000, "checkpoint_every": 20, "eval_every": 100,
        "problem": {"name": "quadratic", "params": {"x_dim": 4, "y_dim": 3, "sigma": 0.3}},
        "algorithm": {"name": "s_tfbo", "params": {"batch_size": 2, "alpha0": 3.0, "beta0": 3.0, "gamma0": 3.0}},
        "engine": {"name": "vmap"},
    },
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _fedopt(*args: str, cwd: Path, capsys=None) -> subprocess.CompletedProcess:
    """The command; in this process when ``capsys`` is given (the same ``main``, without paying a new
    interpreter's start-up), else as a subprocess."""
    if capsys is None:
        return subprocess.run([sys.executable, "-m", "fedopt.cli", *args], cwd=cwd, env=_env(), capture_output=True,
                              text=True, timeout=300)
    return cli_in_process(*args, cwd=cwd)


def _kill_at_half(cmd: list[str], cwd: Path, checkpoint: Path, half: int) -> int:
    """Start ``cmd``, SIGKILL it once ``checkpoint`` holds iteration ``>= half``; the iteration."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    k = -1
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}")
            if checkpoint.is_file():
                try:
                    k = results.read_checkpoint(checkpoint).k
                except Exception:  # noqa: BLE001 - caught mid-rename; read again
                    k = -1
                if k >= half:
                    break
            time.sleep(0.01)
        else:
            pytest.fail("no checkpoint reached half the run in 240 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    return k


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_run_killed_at_half_resumes_to_the_same_metrics_table(tmp_path, kind, capsys):
    cfg = CONFIGS[kind]
    (tmp_path / "c.toml").write_text(tomli_w.dumps(cfg))
    full = _fedopt("run", "c.toml", "--out", "full", "--quiet", cwd=tmp_path, capsys=capsys)
    assert full.returncode == 0, full.stderr
    assert not (tmp_path / "full" / results.CHECKPOINT).exists()  # removed once the run is over

    k = _kill_at_half([sys.executable, "-m", "fedopt.cli", "run", "c.toml", "--out", "killed", "--quiet"],
                      tmp_path, tmp_path / "killed" / results.CHECKPOINT, cfg["rounds"] // 2)
    assert cfg["rounds"] // 2 <= k < cfg["rounds"]
    killed = tmp_path / "killed"
    assert not (killed / "metrics.csv").exists()
    assert '"running"' in (killed / "meta.json").read_text()

    resumed = _fedopt("run", "--resume", "killed", "--quiet", cwd=tmp_path, capsys=capsys)
    assert resumed.returncode == 0, resumed.stderr
    assert (killed / "metrics.csv").read_bytes() == (tmp_path / "full" / "metrics.csv").read_bytes()
    assert '"finished"' in (killed / "meta.json").read_text()
    assert not (killed / results.CHECKPOINT).exists()

    again = _fedopt("run", "--resume", "killed", cwd=tmp_path, capsys=capsys)  # nothing left to resume
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "nothing to resume" in again.stderr and "Traceback" not in again.stderr


def test_resume_needs_a_run_folder_and_takes_no_config(tmp_path, capsys):
    (tmp_path / "c.toml").write_text(tomli_w.dumps({**CONFIGS["federated"], "rounds": 3}))
    for args, fragment in ((("run", "--resume", "nowhere"), "not a run folder"),
                           (("run", "c.toml", "--resume", "nowhere"), "takes no CONFIG"),
                           (("run",), "needs a CONFIG")):
        r = _fedopt(*args, cwd=tmp_path, capsys=capsys)
        assert r.returncode == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


def test_a_damaged_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "c.toml").write_text(tomli_w.dumps({**CONFIGS["federated"], "rounds": 3}))
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text((tmp_path / "c.toml").read_text())
    (out / results.CHECKPOINT).write_bytes(b"not a checkpoint")
    r = _fedopt("run", "--resume", "run", cwd=tmp_path, capsys=capsys)
    assert r.returncode == 2 and "cannot be read" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_a_killed_sweep_continues_its_half_finished_run_from_the_checkpoint(tmp_path, capsys):
    base = {**CONFIGS["federated"], "rounds": 800, "checkpoint_every": 10}
    sweep = {"base": base, "grid": {"seed": [0]}}
    (tmp_path / "s.toml").write_text(tomli_w.dumps(sweep))
    ref = _fedopt("sweep", "s.toml", "--out", "ref", "--quiet", cwd=tmp_path, capsys=capsys)
    assert ref.returncode == 0, ref.stderr
    (rid,) = [p.name for p in (tmp_path / "ref" / "runs").iterdir()]
    ck = tmp_path / "killed" / "checkpoints" / f"{rid}.pt"
    k = _kill_at_half([sys.executable, "-m", "fedopt.cli", "sweep", "s.toml", "--out", "killed", "--quiet"],
                      tmp_path, ck, base["rounds"] // 2)
    assert k >= base["rounds"] // 2
    again = _fedopt("sweep", "s.toml", "--out", "killed", "--quiet", cwd=tmp_path, capsys=capsys)
    assert again.returncode == 0, again.stderr
    meta = json.loads((tmp_path / "killed" / "runs" / rid / "meta.json").read_text())
    assert meta["resumed_from"] >= base["rounds"] // 2  # continued, not restarted
    assert ((tmp_path / "killed" / "runs" / rid / "metrics.csv").read_bytes()
            == (tmp_path / "ref" / "runs" / rid / "metrics.csv").read_bytes())
    assert not ck.exists()
