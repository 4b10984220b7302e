r"""The tuning protocol: every method of a comparison at its own selected setting.

A comparison of optimizers is only as fair as the step sizes each one gets. A sweep with a
``[tune]`` table declares, per method, a grid of candidate settings and one selection rule; every
candidate runs on every point of the sweep's shared axes (typically the seeds), each candidate gets a
score, and each method is reported, plotted and compared at its own best candidate, never at a
shared default. The protocol follows benchopt's: the grid is declared before anything runs, the
selection uses no test data, and every candidate's score is kept::

    base = "fedmbo_quadratic.toml"
    [grid]
    seed = [0, 1, 2]                      # shared axes: every candidate runs on each

    [tune]
    metric = "outer_loss"                 # the selection metric: never a test-split one
    mode = "min"                          # "min" or "max"
    at = "last"                           # "last" evaluation, or a budget: a round (outer iteration)
    aggregate = "mean"                    # over the shared axes: "mean" or "median"
    report = ["test_acc"]                 # more metrics to report at the selected settings

    [tune.methods.fedmbo]                 # a method: a label and its grid; every value is a list
    "algorithm.name" = ["fedmbo"]
    "algorithm.params.outer_lr" = [0.03, 0.1, 0.3, 1.0]

    [tune.methods.fednest]
    "algorithm.name" = ["fednest"]
    "algorithm.params.outer_lr" = [0.03, 0.1, 0.3, 1.0]
    "algorithm.params.local_steps" = [1, 3]

**Score of a candidate.** For each of its runs, the value of ``metric`` at the last evaluation at or
before the budget (``at = "last"``: the run's last evaluation); a run that diverged or failed, or whose
value is not finite, scores the worst possible value (:math:`+\infty` for ``min``). The candidate's
score aggregates its runs over the shared axes (``mean`` or ``median``; one bad seed makes the mean
infinite: a setting that diverges on some seed is not selected over one that never does). The
selected candidate has the best score; ties go to the first declared. A method none of whose
candidates has a finite score has no selection (reported as such, not plotted).

**Split.** Selection must not see test data. fedopt's problems name every metric computed on the
test split ``test_*`` (``test_acc``, ``worst_group_test_acc``, ...), and a ``[tune]`` whose metric is
one of them is refused; report metrics may be anything.

**Outputs** (besides the sweep's own ``runs/`` and ``results.csv``): ``tuning.csv`` (one row per
candidate: method, candidate index, its setting, score, number of runs, diverged and failed runs,
``selected``), ``summary.json`` (the rule, each method's grid, every candidate's score and the
selected setting with its report metrics: mean, std, min and max over the shared axes) and
``tuned.png`` (each method's selected candidate, mean over the shared axes with its min-max band).
``results.csv`` gains the columns ``tune.method``, ``tune.candidate``, ``tune.score`` and
``tune.selected``; a run that two methods share (the same resolved config) appears once per method.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedopt import results
from fedopt.errors import check

__all__ = ["TUNE_KEYS", "Candidate", "Rule", "TunedSweep", "describe", "expand_tuned", "parse_rule", "run_scores",
           "score_candidates", "write_tuning"]

TUNE_KEYS = ("metric", "mode", "at", "aggregate", "report", "methods")
MODES = ("min", "max")
AGGREGATES = ("mean", "median")


@dataclass(frozen=True)
class Rule:
    """How a candidate is scored and the best one chosen (see the module docstring)."""

    metric: str
    mode: str = "min"
    at: str | int = "last"
    aggregate: str = "mean"
    report: tuple[str, ...] = ()

    @property
    def worst(self) -> float:
        return math.inf if self.mode == "min" else -math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "at": self.at, "aggregate": self.aggregate,
                "report": list(self.report), "split": "not test (the metric is not a test_* metric)"}


@dataclass
class Candidate:
    """One setting of one method: its grid assignment and the runs (one per shared-axis point)."""

    method: str
    index: int
    setting: dict[str, Any]
    run_ids: list[str] = field(default_factory=list)


@dataclass
class TunedSweep:
    """A sweep expanded over every method's candidates; ``sweep`` runs each distinct config once."""

    sweep: Any  # fedopt.sweep.Sweep
    rule: Rule
    grids: dict[str, dict[str, list[Any]]]
    candidates: list[Candidate]


def parse_rule(tune: Any) -> Rule:
    """The ``[tune]`` table's rule, checked (one :class:`ConfigError` line per problem)."""
    check(isinstance(tune, Mapping), "sweep [tune] must be a table (metric, mode, at, aggregate, report, methods)")
    for k in tune:
        check(k in TUNE_KEYS, f"unknown [tune] key {k!r}; allowed: {', '.join(TUNE_KEYS)}")
    metric = tune.get("metric")
    check(isinstance(metric, str) and metric != "", "[tune] needs metric = \"<name>\": the selection metric "
          "(e.g. outer_loss)")
    check(not metric.startswith("test_"),
          f"[tune] metric {metric!r} is measured on the test split; select on a training or validation "
          "metric (e.g. outer_loss) and report test metrics with report = [...]")
    mode = tune.get("mode", "min")
    check(mode in MODES, f"[tune] mode must be one of {', '.join(MODES)}, got {mode!r}")
    at = tune.get("at", "last")
    check(at == "last" or (isinstance(at, int) and not isinstance(at, bool) and at >= 0),
          f"[tune] at must be \"last\" or a round (an integer >= 0), got {at!r}")
    aggregate = tune.get("aggregate", "mean")
    check(aggregate in AGGREGATES, f"[tune] aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    report = tune.get("report", [])
    check(isinstance(report, list) and all(isinstance(m, str) and m for m in report),
          f"[tune] report must be a list of metric names, got {report!r}")
    return Rule(metric, mode, at, aggregate, tuple(dict.fromkeys(report)))


def _grids(tune: Mapping[str, Any], shared_keys: set[str]) -> dict[str, dict[str, list[Any]]]:
    methods = tune.get("methods")
    check(isinstance(methods, Mapping) and len(methods) > 0,
          "[tune] needs at least one method: [tune.methods.<label>] with its grid of candidate values")
    grids: dict[str, dict[str, list[Any]]] = {}
    for label, grid in methods.items():
        check(isinstance(grid, Mapping) and len(grid) > 0,
              f"[tune.methods.{label}] must be a table of key = [candidate values]")
        for key, values in grid.items():
            check(isinstance(values, list) and len(values) > 0,
                  f"[tune.methods.{label}] {key!r} must be a non-empty list of candidate values, got {values!r}")
            check(key not in shared_keys,
                  f"[tune.methods.{label}] {key!r} is also a shared sweep axis; a key is either tuned or shared")
        grids[str(label)] = {str(k): list(v) for k, v in grid.items()}
    return grids


def expand_tuned(spec: Mapping[str, Any], *, base_dir: Path | None = None) -> TunedSweep:
    """Expand a sweep spec with a ``[tune]`` table: one sub-sweep per method (its grid times the
    shared axes), every point validated (:func:`fedopt.sweep.load_sweep`), merged into one sweep
    that runs each distinct resolved config once."""
    from fedopt.config import load_raw
    from fedopt.sweep import Sweep, load_sweep

    spec = dict(spec)
    tune = spec.pop("tune")
    rule = parse_rule(tune)
    shared = {k for k in spec.get("grid", {}) or {}}
    for group in spec.get("zip", []) or []:
        if isinstance(group, Mapping):
            shared |= set(group)
    grids = _grids(tune, shared)
    base = spec.get("base")
    if isinstance(base, str):  # read once, relative to the sweep file
        spec["base"] = load_raw(Path(base) if Path(base).is_absolute() else (base_dir or Path.cwd()) / base)
    if rule.at != "last":
        rounds = spec["base"].get("rounds") if isinstance(spec.get("base"), Mapping) else None
        check(not isinstance(rounds, int) or rule.at <= rounds,
              f"[tune] at = {rule.at} is past the run's last round ({rounds})")

    points, candidates, seen = [], [], {}
    for label, grid in grids.items():
        sub = load_sweep({**spec, "grid": {**(spec.get("grid") or {}), **grid}}, base_dir=base_dir)
        keys = list(grid)
        by_setting: dict[tuple, Candidate] = {}
        for values in itertools.product(*grid.values()):  # the declared order
            setting = dict(zip(keys, values))
            by_setting[_key(setting)] = c = Candidate(label, len(by_setting), setting)
            candidates.append(c)
        for p in sub.points:
            c = by_setting[_key({k: p.assignments[k] for k in keys})]
            c.run_ids.append(p.run_id)
            if p.run_id not in seen:
                seen[p.run_id] = True
                points.append(replace(p, index=len(points), assignments={"tune.method": label, **p.assignments}))
    sweep = Sweep(spec={**spec, "tune": dict(tune)}, points=points, threads=sub.threads,
                  duplicates=sum(len(c.run_ids) for c in candidates) - len(points), plugin_paths=sub.plugin_paths)
    return TunedSweep(sweep, rule, grids, candidates)


def _key(setting: Mapping[str, Any]) -> tuple:
    return tuple((k, json.dumps(v, sort_keys=True, default=str)) for k, v in setting.items())


def run_scores(table: Any, rule: Rule, run_ids: list[str]) -> dict[str, float]:
    """Each run's score under ``rule`` from a sweep's results table (worst when it diverged, failed,
    has no evaluation of the metric by the budget, or a value that is not finite)."""
    d = table[table.run_id.isin(run_ids)]
    status = d.groupby("run_id").status.first().to_dict()
    d = d[d.metric == rule.metric]
    if rule.at != "last":
        d = d[d["round"] <= rule.at]
    last = d.sort_values("round").groupby("run_id").value.last().to_dict()
    out = {}
    for rid in run_ids:
        v = last.get(rid)
        ok = status.get(rid) == "finished" and v is not None and math.isfinite(v)
        out[rid] = float(v) if ok else rule.worst
    return out


def score_candidates(table: Any, tuned: TunedSweep) -> Any:
    """One row per candidate: ``method, candidate, setting, score, runs, diverged, failed, selected``."""
    import numpy as np
    import pandas as pd

    rule = tuned.rule
    check(rule.metric in set(table.metric),
          f"[tune] metric {rule.metric!r} is not reported by these runs; they report: "
          f"{', '.join(sorted(set(table.metric)))}")
    status = table.groupby("run_id").status.first().to_dict()
    rows = []
    for c in tuned.candidates:
        s = run_scores(table, rule, c.run_ids)
        vals = np.array([s[r] for r in c.run_ids], dtype=float)
        if np.isinf(vals).any():
            score = rule.worst
        else:
            score = float(np.mean(vals) if rule.aggregate == "mean" else np.median(vals))
        rows.append({"method": c.method, "candidate": c.index, "setting": json.dumps(c.setting, default=str),
                     "score": score, "runs": len(c.run_ids),
                     "diverged": sum(status.get(r) == "diverged" for r in c.run_ids),
                     "failed": sum(status.get(r, "failed") == "failed" for r in c.run_ids), "selected": False})
    frame = pd.DataFrame(rows)
    for method, d in frame.groupby("method", sort=False):
        finite = d[np.isfinite(d.score)]
        if len(finite):
            best = finite.score.idxmin() if rule.mode == "min" else finite.score.idxmax()  # first on ties
            frame.loc[best, "selected"] = True
    return frame


def _stats(values: Any) -> dict[str, float]:
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}


def write_tuning(out: str | Path, tuned: TunedSweep, table_path: str | Path) -> dict[str, Any]:
    """Score every candidate from the sweep's ``results.csv`` and write ``tuning.csv``,
    ``summary.json``, ``tuned.png`` and the ``tune.*`` columns of ``results.csv``; returns the
    summary."""
    import pandas as pd

    out = Path(out)
    table = pd.read_csv(table_path)
    scores = score_candidates(table, tuned)
    results.atomic_write(out / "tuning.csv", scores.to_csv(index=False))

    members = pd.DataFrame([{"run_id": r, "tune.method": c.method, "tune.candidate": c.index}
                            for c in tuned.candidates for r in c.run_ids]).drop_duplicates()
    keyed = scores.rename(columns={"method": "tune.method", "candidate": "tune.candidate", "score": "tune.score",
                                   "selected": "tune.selected"})[["tune.method", "tune.candidate", "tune.score",
                                                                  "tune.selected"]]
    plain = table.drop(columns=[c for c in table.columns if c.startswith("tune.")])
    tagged = plain.merge(members.merge(keyed, on=["tune.method", "tune.candidate"]), on="run_id", how="left")
    results.atomic_write(Path(table_path), tagged.to_csv(index=False))

    summary: dict[str, Any] = {"rule": tuned.rule.to_dict(), "methods": {}}
    for method, grid in tuned.grids.items():
        d = scores[scores.method == method]
        entry: dict[str, Any] = {
            "grid": grid,
            "candidates": [{"candidate": int(r.candidate), "setting": json.loads(r.setting), "score": r.score,
                            "runs": int(r.runs), "diverged": int(r.diverged), "failed": int(r.failed)}
                           for r in d.itertuples()],
            "selected": None}
        sel = d[d.selected]
        if len(sel):
            r = sel.iloc[0]
            cand = tuned.candidates[[i for i, c in enumerate(tuned.candidates)
                                     if c.method == method and c.index == r.candidate][0]]
            rep = {}
            for m in (tuned.rule.metric, *tuned.rule.report):
                finals = run_scores(table, replace(tuned.rule, metric=m, at="last"), cand.run_ids)
                if all(math.isfinite(v) for v in finals.values()) and m in set(table.metric):
                    rep[m] = _stats(list(finals.values()))
            entry["selected"] = {"candidate": int(r.candidate), "setting": cand.setting, "score": r.score,
                                 "final": rep}
        summary["methods"][method] = entry
    results.atomic_write(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    plot_tuned(table, tuned, scores, out / "tuned.png")
    return summary


def plot_tuned(table: Any, tuned: TunedSweep, scores: Any, path: Path) -> Path:
    """Each method's selected candidate: the mean over its runs per round, with the min-max band,
    one panel per metric (the selection metric, then the report metrics). Drawn on a
    :class:`matplotlib.figure.Figure` (no pyplot: the caller's backend is left alone)."""
    import numpy as np
    from matplotlib.figure import Figure

    metrics = [m for m in (tuned.rule.metric, *tuned.rule.report) if m in set(table.metric)]
    fig = Figure(figsize=(4.4 * max(1, len(metrics)), 3.5))
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    for ax, m in zip(axes, metrics):
        for r in scores[scores.selected].itertuples():
            cand = next(c for c in tuned.candidates if c.method == r.method and c.index == r.candidate)
            d = table[(table.metric == m) & table.run_id.isin(cand.run_ids)]
            g = d.groupby("round").value
            mean, lo, hi = g.mean(), g.min(), g.max()
            setting = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in cand.setting.items()
                                if not k.endswith(".name"))
            ax.plot(mean.index, mean.values, label=f"{r.method} ({setting})")
            ax.fill_between(mean.index, lo.values, hi.values, alpha=0.2)
        with np.errstate(invalid="ignore"):
            if (table[table.metric == m].value > 0).all():
                ax.set_yscale("log")
        title = f"{m} (selection, {tuned.rule.mode} at {tuned.rule.at})" if m == tuned.rule.metric else m
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("outer iteration k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"each method at its own selected setting ({tuned.rule.aggregate} over "
                 f"{max(len(c.run_ids) for c in tuned.candidates)} runs, min-max band)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path


def describe(summary: Mapping[str, Any]) -> list[str]:
    """One line per method: its selected setting and score, or why it has none."""
    rule = summary["rule"]
    lines = []
    for method, e in summary["methods"].items():
        n = len(e["candidates"])
        if e["selected"] is None:
            lines.append(f"{method}: no candidate has a finite score ({n} candidates; all diverged or failed)")
            continue
        s = e["selected"]
        setting = ", ".join(f"{k}={v}" for k, v in s["setting"].items())
        lines.append(f"{method}: {setting} ({rule['metric']} {rule['aggregate']} at {rule['at']} = "
                     f"{s['score']:.4g}; best of {n} candidates)")
    return lines
