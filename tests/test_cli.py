"""The `fedopt` command: outputs of a run, and bad input -> one line, exit code 2, nothing changed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
from helpers import quadratic_config

from fedopt.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "quad.toml"
    path.write_text(tomli_w.dumps(quadratic_config(rounds=4, eval_every=2)))
    return path


def test_run_writes_all_outputs(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--set", "algorithm.params.outer_lr=0.25"]) == 0
    assert {p.name for p in out.iterdir()} == {"config.toml", "metrics.csv", "meta.json", "convergence.png"}
    df = pd.read_csv(out / "metrics.csv")
    assert list(df.columns) == ["round", "comm_round", "metric", "value"]
    assert {"hypergrad_norm_sq", "inner_error", "comm_rounds"} <= set(df.metric)
    assert sorted(df["round"].unique()) == [0, 2, 4]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["seed"] == 0 and meta["versions"]["torch"]
    assert "outer_lr = 0.25" in (out / "config.toml").read_text()
    assert "finished" in capsys.readouterr().out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


BAD_ARGS = {
    "unknown key": ["--set", "algorithm.params.colour=red"],
    "wrong type": ["--set", "algorithm.params.inner_steps=abc"],
    "negative step": ["--set", "algorithm.params.outer_lr=-1"],
    "too many sampled": ["--set", "algorithm.params.clients_per_round=99"],
    "unknown algorithm": ["--set", "algorithm.name=nope"],
    "malformed --set": ["--set", "algorithm.params.outer_lr"],
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, config, tmp_path, capsys):
    before = _snapshot(tmp_path)
    out = tmp_path / "never"
    code = main(["run", str(config), "--out", str(out), "--quiet", *BAD_ARGS[case]])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedopt: error: ") and err.count("\n") == 1
    assert not out.exists() and _snapshot(tmp_path) == before


def test_existing_out_folder_is_never_touched(config, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.csv").write_text("precious\n")
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "metrics.csv").read_text() == "precious\n" and len(list(out.iterdir())) == 1


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.toml"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["run"], ["run", "--bogus"], ["sweep"], ["run", "--resume"]])
def test_argument_errors_are_one_line(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedopt: error:")


def test_the_installed_command_exits_2_without_a_traceback(config, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fedopt.cli", "run", str(config), "--set", "rounds=-3", "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr == "fedopt: error: rounds must be >= 0, got -3\n"
    assert not (tmp_path / "runs").exists()


def test_a_diverging_run_is_recorded_with_its_round_and_exit_code_3(config, tmp_path, capsys):
    out = tmp_path / "boom"
    code = main(["run", str(config), "--out", str(out), "--quiet", "--set", "algorithm.params.outer_lr=1e6",
                 "--set", "rounds=40", "--set", "eval_every=1"])
    assert code == 3
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "diverged" and 1 <= meta["diverged_round"] <= 40
    df = pd.read_csv(out / "metrics.csv")
    # rows stop at the diverged round (it keeps its row when x, y were finite but a metric overflowed)
    assert df["round"].max() <= meta["diverged_round"]
    assert not np.isfinite(df[df["round"] == df["round"].max()].value).all() or df["round"].max() < meta["diverged_round"]
    assert "diverged" in capsys.readouterr().out


@pytest.mark.parametrize(("override", "message"), [
    ("partition.params.alpha=0", "partition.params.alpha must be > 0, got 0.0"),
    ("partition.params.alpha=-0.1", "partition.params.alpha must be > 0, got -0.1"),
    ("data.name=cifar10", "unknown dataset 'cifar10'; available: adult, digits, fashion_mnist, mnist5k, synthetic "
                          "(or a plug-in 'package.module:factory')"),
])
def test_bad_data_input_exits_2(override, message, tmp_path, capsys):
    raw = quadratic_config()
    raw["problem"] = {"name": "hyper_cleaning"}
    raw["data"] = {"name": "digits"}
    raw["partition"] = {"name": "dirichlet", "params": {"alpha": 0.5}}
    cfg = tmp_path / "hc.toml"
    cfg.write_text(tomli_w.dumps(raw))
    before = _snapshot(tmp_path)
    assert main(["run", str(cfg), "--out", str(tmp_path / "x"), "--quiet", "--set", override]) == 2
    assert capsys.readouterr().err == f"fedopt: error: {message}\n"
    assert _snapshot(tmp_path) == before
