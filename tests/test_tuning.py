"""The tuning protocol (fedopt.tuning): each method at its own selected setting, chosen by a declared
rule on non-test metrics, with every candidate's score kept."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest

from fedopt.errors import ConfigError
from fedopt.sweep import run_sweep
from fedopt.tuning import Candidate, Rule, TunedSweep, expand_tuned, parse_rule, score_candidates, write_tuning

BASE = {"seed": 0, "clients": 8, "rounds": 60, "eval_every": 10, "dtype": "float64",
        "problem": {"name": "quadratic", "params": {"x_dim": 4, "y_dim": 3, "mu": 1.0, "L": 4.0, "delta": 0.5,
                                                    "sigma": 0.5, "lam": 0.1}},
        "algorithm": {"name": "fedmbo", "params": {"outer_lr": 0.02, "inner_lr": 0.25, "neumann_lr": 0.25,
                                                   "neumann_terms": 5, "inner_steps": 3, "clients_per_round": 4,
                                                   "batch_size": 1}},
        "engine": {"name": "vmap"}}
LRS = [0.02, 0.1]
SPEC = {"base": BASE, "grid": {"seed": [0, 1]},
        "tune": {"metric": "hypergrad_norm_sq", "report": ["inner_error"], "methods": {
            "fedmbo": {"algorithm.name": ["fedmbo"], "algorithm.params.outer_lr": LRS},
            "fednest": {"algorithm.name": ["fednest"], "algorithm.params.outer_lr": LRS,
                        "algorithm.params.outer_local_steps": [3]}}}}


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "sw"
    tuned = expand_tuned(copy.deepcopy(SPEC))
    rep = run_sweep(tuned.sweep, out, progress=False)
    assert rep.finished == 8 and not rep.failed
    return tuned, out, write_tuning(out, tuned, rep.table_path)


def _final(out, run_id, metric="hypergrad_norm_sq"):
    m = pd.read_csv(out / "runs" / run_id / "metrics.csv")
    m = m[m.metric == metric]
    return float(m.sort_values("round").value.iloc[-1])


def test_each_method_gets_its_best_candidate_recomputed_from_the_run_folders(tuned_run):
    tuned, out, summary = tuned_run
    scores = pd.read_csv(out / "tuning.csv")
    assert len(scores) == 4 and set(scores.method) == {"fedmbo", "fednest"}
    for c in tuned.candidates:  # the score is the mean of the runs' final values, read independently
        mine = sum(_final(out, r) for r in c.run_ids) / len(c.run_ids)
        row = scores[(scores.method == c.method) & (scores.candidate == c.index)].iloc[0]
        assert row.score == pytest.approx(mine, rel=1e-12) and row.runs == 2
    for method, d in scores.groupby("method"):
        assert d.selected.sum() == 1 and d[d.selected].score.iloc[0] == d.score.min()
        assert summary["methods"][method]["selected"]["score"] == d.score.min()
    table = pd.read_csv(out / "results.csv")
    assert {"tune.method", "tune.candidate", "tune.score", "tune.selected"} <= set(table.columns)
    assert table.groupby("run_id")["tune.method"].nunique().eq(1).all()
    assert summary["rule"]["metric"] == "hypergrad_norm_sq" and summary["methods"]["fednest"]["grid"][
        "algorithm.params.outer_local_steps"] == [3]
    rep = summary["methods"]["fedmbo"]["selected"]["final"]
    assert set(rep) == {"hypergrad_norm_sq", "inner_error"} and rep["inner_error"]["n"] == 2
    assert (out / "tuned.png").stat().st_size > 10_000


def test_a_bad_shared_default_no_longer_decides_the_comparison(tuned_run):
    """At the shared step 0.02 FedNest looks better than FedMBO; each tuned, FedMBO is better (this
    setting: noisy quadratic, 60 outer iterations, 2 seeds). And the base config's default cannot
    change the tuned comparison: every tuned key is set by the grid, so the runs are the same."""
    tuned, out, summary = tuned_run
    s = pd.read_csv(out / "tuning.csv")
    setting = s.setting.map(json.loads)
    at_default = s[setting.map(lambda d: d["algorithm.params.outer_lr"] == 0.02)].set_index("method").score
    assert at_default["fednest"] < at_default["fedmbo"]
    sel = {m: e["selected"]["score"] for m, e in summary["methods"].items()}
    assert sel["fedmbo"] < sel["fednest"]
    other = copy.deepcopy(SPEC)
    other["base"]["algorithm"]["params"]["outer_lr"] = 5.0
    assert [p.run_id for p in expand_tuned(other).sweep.points] == [p.run_id for p in tuned.sweep.points]


def _table(rows):
    return pd.DataFrame(rows, columns=["run_id", "status", "round", "metric", "value"])


def _tuned(rule, runs):
    cands = [Candidate("a", i, {"lr": i}, r) for i, r in enumerate(runs)]
    return TunedSweep(sweep=None, rule=rule, grids={"a": {"lr": list(range(len(runs)))}}, candidates=cands)


def test_budget_divergence_and_ties():
    t = _table([("r0", "finished", 0, "loss", 5.0), ("r0", "finished", 10, "loss", 1.0), ("r0", "finished", 20, "loss", 0.1),
                ("r1", "finished", 0, "loss", 5.0), ("r1", "finished", 10, "loss", 0.5), ("r1", "finished", 20, "loss", 0.4),
                ("r2", "diverged", 0, "loss", 5.0), ("r2", "diverged", 10, "loss", 0.01),
                ("r3", "finished", 0, "loss", 5.0), ("r3", "finished", 10, "loss", 0.5), ("r3", "finished", 20, "loss", 0.4)])
    last = score_candidates(t, _tuned(Rule("loss"), [["r0"], ["r1"], ["r2"]]))
    assert list(last.score) == [0.1, 0.4, math.inf] and list(last.selected) == [True, False, False]
    budget = score_candidates(t, _tuned(Rule("loss", at=15), [["r0"], ["r1"], ["r2"]]))
    assert list(budget.score) == [1.0, 0.5, math.inf] and list(budget.selected) == [False, True, False]
    tie = score_candidates(t, _tuned(Rule("loss"), [["r1"], ["r3"]]))
    assert list(tie.selected) == [True, False]  # ties go to the first declared
    seeds = score_candidates(t, _tuned(Rule("loss", aggregate="median"), [["r0", "r1", "r3"], ["r0", "r2"]]))
    assert list(seeds.score) == [0.4, math.inf]  # one diverged seed rules a candidate out
    top = score_candidates(t, _tuned(Rule("loss", mode="max"), [["r0"], ["r1"], ["r2"]]))
    assert list(top.selected) == [False, True, False]
    none = score_candidates(t, _tuned(Rule("loss"), [["r2"]]))
    assert not none.selected.any()
    with pytest.raises(ConfigError, match="is not reported"):
        score_candidates(t, _tuned(Rule("acc"), [["r0"]]))


@pytest.mark.parametrize(("tune", "message"), [
    ({"metric": "test_acc", "methods": {"a": {"seed": [1]}}}, "test split"),
    ({"metric": "loss", "mode": "lowest", "methods": {"a": {"seed": [1]}}}, "mode must be"),
    ({"metric": "loss", "at": -1, "methods": {"a": {"seed": [1]}}}, "at must be"),
    ({"metric": "loss", "aggregate": "max", "methods": {"a": {"seed": [1]}}}, "aggregate must be"),
    ({"metric": "loss", "budget": 3, "methods": {"a": {"seed": [1]}}}, "unknown [tune] key"),
    ({"methods": {"a": {"seed": [1]}}}, "needs metric"),
])
def test_bad_rules_are_one_line(tune, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_rule(tune)


@pytest.mark.parametrize(("methods", "message"), [
    ({}, "at least one method"),
    ({"a": {"algorithm.params.outer_lr": 0.1}}, "non-empty list"),
    ({"a": {"seed": [1, 2]}}, "also a shared sweep axis"),
    ({"a": {"algorithm.params.outer_lr": [0.1, -0.1]}}, "outer_lr"),
])
def test_bad_grids_are_refused_before_any_run(methods, message):
    spec = copy.deepcopy(SPEC)
    spec["tune"]["methods"] = methods
    with pytest.raises(ConfigError, match=message):
        expand_tuned(spec)


def test_a_budget_past_the_last_round_is_refused():
    spec = copy.deepcopy(SPEC)
    spec["tune"]["at"] = 61
    with pytest.raises(ConfigError, match="past the run's last round"):
        expand_tuned(spec)


def _sweep_file(folder, tune):
    import tomllib  # noqa: F401  (the file below must parse)

    base = copy.deepcopy(BASE)
    base["rounds"] = 20
    (folder / "base.toml").write_text(_toml(base))
    (folder / "sweep.toml").write_text(f'base = "base.toml"\n[grid]\nseed = [0]\n{tune}')


def _toml(d, prefix=""):
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    for k, v in tables:
        lines.append(f"[{prefix}{k}]")
        lines.append(_toml(v, f"{prefix}{k}."))
    return "\n".join(lines) + "\n"


def test_fedopt_sweep_runs_a_tune_table_and_reports_each_selection(tmp_path):
    from helpers import cli_in_process

    _sweep_file(tmp_path, '[tune]\nmetric = "hypergrad_norm_sq"\n'
                          '[tune.methods.fedmbo]\n"algorithm.params.outer_lr" = [0.02, 0.1]\n'
                          '[tune.methods.fednest]\n"algorithm.name" = ["fednest"]\n'
                          '"algorithm.params.outer_lr" = [0.02, 0.1]\n')
    done = cli_in_process("sweep", "sweep.toml", "--out", "out", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    selected = [line for line in done.stdout.splitlines() if line.startswith("selected ")]
    assert [line.split(":")[0] for line in selected] == ["selected fedmbo", "selected fednest"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["methods"]) == {"fedmbo", "fednest"} and (tmp_path / "out" / "tuned.png").is_file()
    again = cli_in_process("sweep", "sweep.toml", "--out", "out", "--quiet", cwd=tmp_path)  # resumes: nothing to run
    assert again.returncode == 0 and "4 already done" in again.stdout
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_a_tune_table_selecting_on_test_data_is_refused_in_one_line(tmp_path):
    from helpers import refused

    _sweep_file(tmp_path, '[tune]\nmetric = "test_acc"\n[tune.methods.a]\n"algorithm.params.outer_lr" = [0.1]\n')
    refused("sweep", "sweep.toml", "--out", "out", cwd=tmp_path, contains="test split")
