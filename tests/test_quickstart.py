"""The README's main job, run exactly as a user runs it, and the hyper-cleaning claims it makes."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedopt.config import load_config
from fedopt.runner import build

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "configs" / "quickstart.toml"


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    r = subprocess.run([sys.executable, "-m", "fedopt.cli", "run", str(QUICKSTART), "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return out


def test_quickstart_writes_every_output(quickstart_run):
    assert {p.name for p in quickstart_run.iterdir()} == {"config.toml", "metrics.csv", "meta.json", "convergence.png"}
    meta = json.loads((quickstart_run / "meta.json").read_text())
    assert meta["status"] == "finished"
    assert (quickstart_run / "convergence.png").stat().st_size > 10_000


def _uniform_weights_baseline(seed: int) -> float:
    """Test accuracy of the classifier trained to convergence on the corrupted data, uniform weights
    (the lower-level solution y*(x0) at the uniform start, by L-BFGS on the full federated objective)."""
    p = build(load_config(QUICKSTART, [f"seed={seed}", "dtype='float64'"])).problem
    x0, _ = p.init()
    y = torch.zeros(p.y_dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([y], max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = p.inner_loss(x0, y, p.full_train)
        loss.backward()
        return loss

    opt.step(closure)
    m = p.metrics(x0, y.detach())
    assert m["inner_grad_norm_sq"] < 1e-12
    return m["test_acc"]


def test_fedmbo_hyper_cleaning_beats_uniform_weights_and_finds_the_corrupted_labels(quickstart_run):
    """digits, 20 clients, Dirichlet alpha = 0.1, 40% of training labels corrupted (quickstart.toml)."""
    df = pd.read_csv(quickstart_run / "metrics.csv")
    final = df[df["round"] == df["round"].max()].set_index("metric").value
    baseline = _uniform_weights_baseline(seed=0)
    print(f"FedMBO test_acc={final.test_acc:.4f} weight_auc={final.weight_auc:.4f}; uniform weights {baseline:.4f}")
    assert final.test_acc > baseline
    assert final.weight_auc > 0.8
