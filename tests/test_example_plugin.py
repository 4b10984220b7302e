"""The example plug-in package ``examples/my_method`` (an algorithm and a model-based problem written
outside fedopt) runs from a fresh shell with no ``PYTHONPATH``: by dotted path with ``fedopt run``
and ``fedopt sweep --executor process``, on every engine with the agreements of the conformance
suite, and, once installed, by its entry-point names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import cli_in_process

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_method"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def _fedopt(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "fedopt.cli", *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)



@pytest.fixture
def example(tmp_path) -> Path:
    """A copy of the example package (its runs write nowhere in the checkout)."""
    dst = tmp_path / "my_method"
    shutil.copytree(EXAMPLE, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    return dst


def _metrics(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "metrics.csv").pivot(index="round", columns="metric", values="value")


SHORT = ("--set", "rounds=4", "--set", "eval_every=1", "--quiet")


@pytest.mark.slow
def test_dotted_paths_run_on_every_engine_with_the_engines_agreements(example):
    runs = {}
    for engine in ("local", "vmap", "ray", "flower"):  # fresh shells for local and flower, main() for the others
        command = _fedopt if engine in ("local", "flower") else cli_in_process
        r = command("run", "fed_soba_digits.toml", "--out", f"runs/{engine}", "--set", f"engine.name={engine}",
                    *SHORT, cwd=example)
        assert r.returncode == 0, r.stderr
        runs[engine] = _metrics(example / "runs" / engine)
    local = runs["local"]
    assert local.shape[0] == 5 and local.test_acc.iloc[-1] != local.test_acc.iloc[0]
    assert float(np.abs(local.to_numpy() - runs["vmap"].to_numpy()).max()) <= 1e-10
    assert np.array_equal(runs["ray"].to_numpy(), runs["vmap"].to_numpy())  # actors batch with vmap: the same calls
    assert np.array_equal(runs["flower"].to_numpy(), local.to_numpy())  # one message per client: local's calls


def test_a_process_sweep_runs_the_plugins_by_dotted_path(example):
    r = _fedopt("sweep", "sweep.toml", "--executor", "process", "--workers", "2", "--out", "sw", "--quiet",
                cwd=example)
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(example / "sw" / "results.csv")
    assert set(table["status"]) == {"finished"} and table.run_id.nunique() == 4
    assert set(table["algorithm.name"]) == {"my_method.algorithm:fed_soba", "fedmbo"}


def test_installed_the_plugins_are_found_by_their_entry_point_names(example, tmp_path):
    site = tmp_path / "site"  # stands for site-packages: the package installed by pip, not its source folder
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(example)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    config = (example / "fed_soba_digits.toml").read_text()
    config = config.replace('"my_method.algorithm:fed_soba"', '"fed_soba"')
    config = config.replace('"my_method.problem:mlp_hyper_representation"', '"mlp_hyper_representation"')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "c.toml").write_text(config)
    r = _fedopt("run", "c.toml", "--out", "ep", *SHORT, cwd=elsewhere, env=_env(PYTHONPATH=str(site)))
    assert r.returncode == 0, r.stderr
    by_name = _metrics(elsewhere / "ep")
    r = cli_in_process("run", "fed_soba_digits.toml", "--out", "dotted", "--set", "engine.name=vmap", *SHORT,
                       cwd=example)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(by_name.to_numpy(), _metrics(example / "dotted").to_numpy())


def test_without_the_package_on_the_path_the_dotted_name_is_one_line(tmp_path):
    (tmp_path / "c.toml").write_text((EXAMPLE / "fed_soba_digits.toml").read_text())
    r = _fedopt("run", "c.toml", "--out", "x", "--quiet", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "my_method" in r.stderr and not (tmp_path / "x").exists()
