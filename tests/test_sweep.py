"""Sweeps: expansion, run identity, executors giving identical tables, resume after a kill, failed
and diverged runs, and bad specs (one line, exit 2, nothing run)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import tomli_w
from helpers import quadratic_config, runtime_processes

from fedopt.cli import main
from fedopt.errors import ConfigError
from fedopt.sweep import load_sweep, run_sweep

REPO = Path(__file__).resolve().parents[1]
FEDMBO = {"name": "fedmbo", "params": {"outer_lr": 0.3, "inner_lr": 0.25, "neumann_lr": 0.25,
                                      "neumann_terms": 5, "inner_steps": 2, "clients_per_round": 2,
                                      "batch_size": 4}}
FEDNEST = {"name": "fednest", "params": {"outer_lr": 0.3, "inner_lr": 0.25, "neumann_lr": 0.25,
                                        "neumann_terms": 5, "clients_per_round": 2, "batch_size": 4}}


def spec(rounds=20, **extra):
    """2 algorithms x 3 step sizes x 4 seeds = 24 runs on a noisy quadratic (sampling and minibatches
    both depend on the seed)."""
    base = quadratic_config(clients=4, rounds=rounds, eval_every=10, problem={"sigma": 0.5})
    return {"base": base, "grid": {"algorithm": [FEDMBO, FEDNEST], "algorithm.params.outer_lr": [0.1, 0.2, 0.3],
                                   "seed": [0, 1, 2, 3]}, **extra}


def sorted_table(path):
    t = pd.read_csv(path)
    return t.sort_values(["run_id", "round", "metric"]).reset_index(drop=True)


def test_expansion_is_the_product_and_zip_moves_keys_together():
    sw = load_sweep(spec())
    assert len(sw.points) == 24 and len({p.run_id for p in sw.points}) == 24
    p = sw.points[-1]
    assert p.config.algorithm.name == "fednest" and p.config.algorithm.params["outer_lr"] == 0.3 and p.config.seed == 3
    z = load_sweep({"base": spec()["base"], "zip": [{"seed": [0, 1, 2], "rounds": [5, 6, 7]}]})
    assert [(q.config.seed, q.config.rounds) for q in z.points] == [(0, 5), (1, 6), (2, 7)]


def test_points_with_the_same_resolved_config_run_once():
    sw = load_sweep({"base": spec()["base"], "grid": {"algorithm.params.outer_lr": [0.5, 0.5, 0.25]}})
    assert len(sw.points) == 2 and sw.duplicates == 1


def test_serial_and_process_executors_give_identical_tables(tmp_path):
    sw = load_sweep(spec())
    a = run_sweep(sw, tmp_path / "serial", executor="serial", progress=False)
    b = run_sweep(sw, tmp_path / "process", executor="process", workers=2, progress=False)
    assert a.finished == b.finished == 24 and not a.failed and not b.failed
    ta, tb = sorted_table(a.table_path), sorted_table(b.table_path)
    pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    assert ta.run_id.nunique() == 24 and not ta.duplicated(["run_id", "round", "metric"]).any()
    for col in ("algorithm.name", "algorithm.params.outer_lr", "seed", "problem.params.sigma", "status"):
        assert col in ta.columns
    # the seeds really differ: a table that ignored them would pass the equality above trivially
    last = ta[(ta.metric == "hypergrad_norm_sq") & (ta["round"] == 20)]
    assert last.groupby(["algorithm.name", "algorithm.params.outer_lr"]).value.nunique().min() == 4


def _ray_processes():
    return list(runtime_processes().values())


def test_ray_executor_gives_the_same_table_and_leaves_no_process(tmp_path):
    pytest.importorskip("ray")
    assert not _ray_processes(), "a Ray cluster is already running here"
    sw = load_sweep(spec())
    a = run_sweep(sw, tmp_path / "serial", executor="serial", progress=False)
    b = run_sweep(sw, tmp_path / "ray", executor="ray", workers=2, progress=False)
    assert b.finished == 24 and not b.failed
    pd.testing.assert_frame_equal(sorted_table(a.table_path), sorted_table(b.table_path), check_exact=True)
    deadline = time.time() + 20
    while _ray_processes() and time.time() < deadline:
        time.sleep(0.2)
    assert not _ray_processes()


def test_rerun_skips_finished_runs_and_reruns_failed_ones(tmp_path):
    sw = load_sweep(spec(rounds=10))
    out = tmp_path / "sw"
    first = run_sweep(sw, out, progress=False)
    victim = out / "runs" / sw.points[5].run_id
    meta = json.loads((victim / "meta.json").read_text())
    (victim / "meta.json").write_text(json.dumps({**meta, "status": "failed"}))
    stamps = {p.run_id: (out / "runs" / p.run_id / "meta.json").stat().st_mtime_ns for p in sw.points}
    second = run_sweep(sw, out, progress=False)
    assert first.finished == 24 and second.skipped == 23 and second.finished == 1
    changed = [rid for rid, t in stamps.items() if (out / "runs" / rid / "meta.json").stat().st_mtime_ns != t]
    assert changed == [sw.points[5].run_id]
    assert sorted_table(second.table_path).equals(sorted_table(first.table_path))


def test_diverged_runs_are_recorded_with_their_round(tmp_path):
    sw = load_sweep({"base": spec(rounds=200)["base"], "grid": {"algorithm.params.outer_lr": [0.1, 1e6]}})
    rep = run_sweep(sw, tmp_path / "sw", progress=False)
    t = pd.read_csv(rep.table_path)
    assert rep.finished == 1 and rep.diverged == 1
    bad = t[t["algorithm.params.outer_lr"] == 1e6]
    assert set(bad.status) == {"diverged"} and bad.diverged_round.notna().all() and bad.diverged_round.iloc[0] >= 1


def test_a_sweep_killed_midway_completes_on_rerun_without_rerunning_or_duplicating(tmp_path):
    sweep_file = tmp_path / "kill.toml"
    sweep_file.write_text(tomli_w.dumps(spec(rounds=60)))  # about 0.4 s per run
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fedopt.cli", "sweep", str(sweep_file), "--out", str(out), "--quiet"]
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "runs").glob("[0-9a-f]*"))) < 4:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = {p.name: (p / "meta.json").stat().st_mtime_ns for p in (out / "runs").glob("[0-9a-f]*")}
    assert 4 <= len(done_before) < 24 and not (out / "results.csv").exists()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{len(done_before)} already done" in r.stdout
    for name, stamp in done_before.items():
        assert (out / "runs" / name / "meta.json").stat().st_mtime_ns == stamp  # not re-run
    t = pd.read_csv(out / "results.csv")
    assert t.run_id.nunique() == 24 and not t.duplicated(["run_id", "round", "metric"]).any()
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]


BAD = {
    "unknown axis key": ({"grid": {"algorithm.params.outer_learning_rate": [0.1]}}, "unknown key algorithm.params.outer_learning_rate"),
    "zip of unequal length": ({"zip": [{"seed": [0, 1], "rounds": [5]}]}, "unequal length: seed (2), rounds (1)"),
    "empty axis": ({"grid": {"seed": []}}, "sweep axis 'seed' is empty"),
    "bad value on an axis": ({"grid": {"rounds": [10, -1]}}, "sweep point (rounds=-1)"),
    "unknown sweep key": ({"grids": {}}, "unknown sweep key 'grids'"),
    "key on two axes": ({"grid": {"seed": [0]}, "zip": [{"seed": [1]}]}, "appears on two axes"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sweep_specs_are_one_line_exit_2_and_run_nothing(case, tmp_path, capsys):
    extra, message = BAD[case]
    raw = {"base": spec()["base"], **extra}
    f = tmp_path / "bad.toml"
    f.write_text(tomli_w.dumps(raw))
    out = tmp_path / "out"
    assert main(["sweep", str(f), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_bad_executor_choices_exit_2(tmp_path, capsys, monkeypatch):
    f = tmp_path / "s.toml"
    f.write_text(tomli_w.dumps({"base": spec()["base"], "grid": {"seed": [0]}}))
    out = tmp_path / "out"
    assert main(["sweep", str(f), "--executor", "dask", "--out", str(out), "--quiet"]) == 2
    assert "unknown executor 'dask'; available: serial, process, ray" in capsys.readouterr().err
    assert main(["sweep", str(f), "--address", "auto", "--out", str(out), "--quiet"]) == 2
    assert "--address is for the ray executor" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert main(["sweep", str(f), "--executor", "ray", "--out", str(out), "--quiet"]) == 2
    assert "pip install 'fedopt[ray]'" in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_holding_another_sweep_is_never_touched(tmp_path, capsys):
    f = tmp_path / "s.toml"
    f.write_text(tomli_w.dumps({"base": spec(rounds=5)["base"], "grid": {"seed": [0]}}))
    out = tmp_path / "out"
    assert main(["sweep", str(f), "--out", str(out), "--quiet"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    f.write_text(tomli_w.dumps({"base": spec(rounds=5)["base"], "grid": {"seed": [1]}}))
    assert main(["sweep", str(f), "--out", str(out), "--quiet"]) == 2
    assert "holds a different sweep" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    assert main(["sweep", str(f), "--out", str(plain), "--quiet"]) == 2
    assert os.listdir(plain) == ["notes.txt"]
