"""The ``ray`` engine: same trajectories as the in-process engines, survives a killed actor, fails fast
on bad input. One private Ray instance (2 CPUs) serves the whole module and is shut down after it."""

import copy
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tomli_w
import torch
from helpers import dec_config, quadratic_config
from helpers import engine_metrics as metrics

import fedopt
from fedopt.config import load_config
from fedopt.runner import build, simulate

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def mm_config(**kw):
    raw = {"seed": 1, "clients": 6, "rounds": 4, "dtype": "float64",
           "problem": {"name": "nc_sc", "params": {"dim": 4, "sigma": 0.3}},
           "algorithm": {"name": "fess_gda", "params": {"lr_x": 0.05, "lr_y": 0.05, "local_steps": 3,
                                                         "clients_per_round": 3}}}
    raw.update(kw)
    return raw


FEDERATED = {
    "fedmbo": quadratic_config(algorithm="fedmbo", clients=10, rounds=4, problem={"sigma": 0.5},
                               params={"clients_per_round": 4, "batch_size": 2}),
    "fednest": quadratic_config(algorithm="fednest", clients=10, rounds=3, problem={"sigma": 0.5},
                                params={"clients_per_round": 4, "batch_size": 2, "inner_local_steps": 2,
                                        "outer_local_steps": 2, "outer_lr": 0.1}),
    "fess_gda": mm_config(),
}


@pytest.mark.parametrize("case", list(FEDERATED))
def test_ray_reproduces_local_bitwise_and_vmap_to_1e10(case):
    raw = FEDERATED[case]
    local, vmap = metrics(raw, "local"), metrics(raw, "vmap")
    ray_loop = metrics(raw, "ray", inner="local", actors=2)
    ray_vmap = metrics(raw, "ray", inner="vmap", actors=2)
    assert local.shape == ray_loop.shape == ray_vmap.shape and local.shape[0] >= 4
    assert np.array_equal(local.to_numpy(), ray_loop.to_numpy())  # the same computation: bitwise
    assert float(np.abs(vmap.to_numpy() - ray_vmap.to_numpy()).max()) <= 1e-10
    assert float(np.abs(local.to_numpy() - ray_vmap.to_numpy()).max()) <= 1e-10
    assert local.iloc[-1].to_dict() != local.iloc[0].to_dict()  # the run moved


def test_ma_dsbo_on_ray_matches_vmap_with_gossip_on_the_actors():
    raw = dec_config("ma_dsbo", "ring", n=8, rounds=6, problem={"sigma": 0.2})
    vmap = metrics(raw, "vmap")
    on_actors = metrics(raw, "ray", actors=2, gossip="actors")
    via_driver = metrics(raw, "ray", actors=3, num_cpus=0.5, gossip="driver")
    assert vmap.shape == on_actors.shape
    assert float(np.abs(vmap.to_numpy() - on_actors.to_numpy()).max()) <= 1e-10
    assert float(np.abs(vmap.to_numpy() - via_driver.to_numpy()).max()) <= 1e-10
    assert vmap.consensus_x.iloc[-1] > 0  # a ring does not reach consensus in 6 steps: gossip was exercised


def test_gossip_on_actors_sends_each_actor_only_its_neighbour_blocks():
    from fedopt.engines.ray_engine import RayEngine

    raw = dec_config("ma_dsbo", "ring", n=12, rounds=1)
    built = build(load_config(raw))
    engine = RayEngine(built.problem, actors=4, num_cpus=0.5)
    try:
        w = built.network.numpy(0)
        x = torch.randn(12, 3, dtype=torch.float64)
        # 4 actors own blocks of 3 ring nodes: each is sent its own block and its two neighbours'
        assert engine.gossip_plan(w) == [[0, 1, 3], [0, 1, 2], [1, 2, 3], [0, 2, 3]]
        (mixed,) = engine.gossip(torch.as_tensor(w), w, (x,))
        assert torch.allclose(mixed, torch.as_tensor(w) @ x, atol=1e-14, rtol=0)
    finally:
        engine.close()


def test_killing_an_actor_mid_run_does_not_change_the_final_metrics():
    raw = copy.deepcopy(FEDERATED["fedmbo"])
    raw["rounds"] = 6
    reference = metrics(raw, "local")
    raw["engine"] = {"name": "ray", "params": {"actors": 2, "inner": "local"}}
    built = build(load_config(raw))
    engine = built.engine
    pids_before = engine.actor_pids()
    killed = []

    def kill_one(k):
        if k == 2 and not killed:
            os.kill(pids_before[1], signal.SIGKILL)
            killed.append(k)

    try:
        result = simulate(built.problem, built.algorithm, engine, rounds=6, seed=raw["seed"], on_iterate=kill_one)
        pids_after = engine.actor_pids()
    finally:
        engine.close()
    assert killed and pids_after[1] != pids_before[1] and pids_after[0] == pids_before[0]  # restarted
    got = fedopt.runner.records_frame(result.records).pivot(index="round", columns="metric", values="value")
    assert np.array_equal(reference.to_numpy(), got.to_numpy())


def _run_cli(tmp_path, engine_params, env=None):
    raw = quadratic_config(clients=4, rounds=2)
    raw["engine"] = {"name": "ray", "params": engine_params}
    cfg = tmp_path / "c.toml"
    cfg.write_text(tomli_w.dumps(raw))
    out = tmp_path / "out"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "fedopt.cli", "run", str(cfg), "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **(env or {})})
    return r, time.time() - t0, out


@pytest.mark.parametrize(("params", "fragment"), [
    ({"num_gpus": 0.5}, "CUDA is not available on this machine; allowed: 0"),
    ({"address": "ray://127.0.0.1:1"}, "cannot reach Ray at engine.params.address = 'ray://127.0.0.1:1'"),
    ({"address": "nowhere"}, "is not 'auto', 'ray://host:port' or 'host:port'"),
    ({"inner": "dask"}, "engine.params.inner = 'dask'; allowed: vmap, local"),
])
def test_bad_ray_input_is_one_line_exit_2_within_30_s(tmp_path, params, fragment):
    if "num_gpus" in params and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r, wall, out = _run_cli(tmp_path, params)
    assert r.returncode == 2, r.stderr
    assert wall < 30
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [lines[-1]] and fragment in lines[-1] and "Traceback" not in r.stderr
    assert not out.exists()


def test_missing_ray_extra_is_one_line(tmp_path, capsys, monkeypatch):
    from fedopt.cli import main

    raw = quadratic_config(clients=4, rounds=2)
    raw["engine"] = {"name": "ray"}
    cfg = tmp_path / "c.toml"
    cfg.write_text(tomli_w.dumps(raw))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "engine 'ray' needs Ray: pip install 'fedopt[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vmap_ray_and_flower_on_gpu_match_cpu():
    raw = copy.deepcopy(FEDERATED["fedmbo"])
    cpu = metrics(raw, "vmap")
    raw["device"] = "cuda"
    t0 = time.perf_counter()
    gpu_vmap = metrics(raw, "vmap")
    t1 = time.perf_counter()
    gpu_ray = metrics(raw, "ray", actors=2, num_gpus=0.5)
    t2 = time.perf_counter()
    print(f"GPU timings: vmap {t1 - t0:.2f} s, ray (2 actors, 0.5 GPU each) {t2 - t1:.2f} s")
    assert float(np.abs(cpu.to_numpy() - gpu_vmap.to_numpy()).max()) <= 1e-10
    assert float(np.abs(gpu_vmap.to_numpy() - gpu_ray.to_numpy()).max()) <= 1e-10
    try:
        import flwr  # noqa: F401
    except ImportError:
        return  # the flower extra is not installed
    ray.shutdown()  # Flower's backend shuts Ray down when it ends: give it its own, restore the module's after
    try:
        gpu_flower = metrics(raw, "flower", actors=2, num_gpus=0.5)
    finally:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    assert float(np.abs(gpu_vmap.to_numpy() - gpu_flower.to_numpy()).max()) <= 1e-10
