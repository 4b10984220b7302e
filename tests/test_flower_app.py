"""The example Flower app under ``flwr run`` (a local SuperLink with the simulation runtime):
it reproduces the ``local`` engine bitwise, and the daemons it starts are stopped by PID."""

import json
import os
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import runtime_processes

import fedopt

pytest.importorskip("flwr")
REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "flower_app"


def _stop_daemons_of(flwr_home: Path) -> None:
    """SIGTERM the superlink started with ``flwr_home`` (its command line names it) and every process
    whose ``--parent-pid`` chain leads to it; nothing else is touched."""
    procs = runtime_processes()
    ours = {pid for pid, cmd in procs.items() if str(flwr_home) in cmd}
    changed = True
    while changed:
        changed = False
        for pid, cmd in procs.items():
            parts = cmd.split()
            if pid not in ours and "--parent-pid" in parts:
                i = parts.index("--parent-pid")
                if i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) in ours:
                    ours.add(pid)
                    changed = True
    for pid in ours:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 15
    while time.time() < deadline and ours & set(runtime_processes()):
        time.sleep(0.3)
    for pid in ours & set(runtime_processes()):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flwr_run_of_the_example_app_matches_the_local_engine(tmp_path):
    flwr = shutil.which("flwr")
    if flwr is None:
        pytest.skip("the flwr command is not installed")
    home, out = tmp_path / "flwr_home", tmp_path / "out"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    try:
        r = subprocess.run([flwr, "run", str(APP), "--stream", "--run-config", f"out='{out}'",
                            "--federation-config", "num-supernodes=10"],
                           env=env, capture_output=True, text=True, timeout=240, check=False)
    finally:
        _stop_daemons_of(home)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    got = pd.read_csv(out / "metrics.csv").pivot(index="round", columns="metric", values="value")
    ref = fedopt.run(APP / "fedmbo_quadratic_small.toml", overrides=['engine="local"'])
    ref = ref.pivot(index="round", columns="metric", values="value")
    assert got.shape == ref.shape == (6, ref.shape[1])
    assert np.array_equal(ref.to_numpy(), got[ref.columns].to_numpy())
    assert not {pid for pid, cmd in runtime_processes().items() if str(home) in cmd}
    # the run folder is a fedopt run folder: the engine that ran, meta.json, the plot
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["runtime"] == "flwr run" and meta["comm_rounds"] > 0
    assert tomllib.loads((out / "config.toml").read_text())["engine"]["name"] == "flower"
    assert (out / "convergence.png").stat().st_size > 0
