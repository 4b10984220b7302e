"""F4: FESS-GDA against Local SGDA on two minimax applications: fair classification and a small GAN.

Panels:
  (a) fair classification on UCI Adult, groups = sex (``experiments/configs/fess_gda_fair_adult.toml``,
      20 clients, Dirichlet(0.5) label skew, 10 clients per round): worst-group test accuracy against
      communication rounds, mean ± std over seeds.
  (b) class-minimax classification on sklearn digits (``fess_gda_fair_digits.toml``, 20 clients,
      Dirichlet(0.5)): worst-class test accuracy against communication rounds.
  (c), (d) the federated GAN on a ring of 8 Gaussians (``fess_gda_gan.toml``, 8 clients holding 2
      modes each): sliced Wasserstein distance to the true mixture and modes covered against rounds.
  (e), (f) generated samples of seed 0's final generator against the true modes, one panel a method
      (the seed-0 runs are re-run in this process to get the final iterates; the re-run's final
      sliced Wasserstein distance is checked against the sweep's and the check written to the summary).

Methods: FESS-GDA with each config's parameters; Local SGDA with the same local steps, clients,
batches (no p, beta or server step); on the fair problems also balanced ERM, i.e. Local SGDA with
the ascent step 1e-12, so the group weights y stay uniform (to 1e-9): the group-balanced loss
sum_g L_g / G. Where the config gives FESS-GDA a server step other than 1 (Adult: lr_x_global = 0.5,
which Local SGDA lacks), FESS-GDA with p = 0 runs as well, to show the smoothing's own share of the
difference (FESS-GDA at p = 0 is Local SGDA with that server step; with unit server steps it would
be Local SGDA exactly). Nothing is tuned per method. Every method of one seed shares the partition
and the client-sampling stream.

No rate is drawn: fair classification on a linear model is convex-concave (its rate panel is F3's),
and the GAN is nonconvex-nonconcave, where no rate applies.

``summary.json``: for every problem and method, the metrics after the fixed budget (mean over the
last ``LAST`` evaluations of each seed, then mean ± std over seeds), and the paired difference
FESS-GDA minus Local SGDA over seeds with a verdict (a paired t-test at 95%: with 2 seeds only a
very consistent difference counts).

Runtime: ``fedopt.sweep`` runs every point with one torch thread already (and the three configs set
``threads = 1``); :func:`make` also holds ``torch.set_num_threads(1)`` for its own duration (the
seed-0 re-runs, the metrics), restored afterwards -- the tensors are tiny, and on a busy 2-core
machine two threads made one Adult run 3.5x slower (71 s against 20 s).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedopt.figures import base_config  # noqa: E402
from fedopt.sweep import load_sweep, run_sweep  # noqa: E402

FESS, LOCAL, ERM, FESS0 = "FESS-GDA", "Local SGDA", "balanced ERM", "FESS-GDA, p = 0"
ORDER = [FESS, FESS0, LOCAL, ERM]
STYLE = {FESS: ("C0", "-"), FESS0: ("C0", "--"), LOCAL: ("C1", "-"), ERM: ("C2", "-")}  # the same in every panel
ERM_LR_Y = 1e-12  # the ascent step that keeps y uniform: balanced ERM
LAST = 5  # evaluations averaged at the end of every run
NO_RATE = ("no rate is drawn: fair classification on a linear model is convex-concave (its rate panel "
           "belongs to F3) and the GAN is nonconvex-nonconcave, where no rate applies")

# problem -> (config, metrics in the table (first = the panel's), higher is better?, full / quick rounds, eval_every)
PROBLEMS: dict[str, dict[str, Any]] = {
    "adult": {"config": "fess_gda_fair_adult.toml", "metrics": ["worst_group_test_acc", "test_acc"],
              "higher": True, "rounds": (300, 100), "eval_every": (10, 10), "erm": True},
    "digits": {"config": "fess_gda_fair_digits.toml", "metrics": ["worst_group_test_acc", "test_acc"],
               "higher": True, "rounds": (300, 100), "eval_every": (10, 10), "erm": True},
    "gan": {"config": "fess_gda_gan.toml", "metrics": ["sliced_wasserstein", "modes_covered", "high_quality_frac"],
            "higher": False, "rounds": (1500, 400), "eval_every": (50, 25), "erm": False},
}
SEEDS = ([0, 1, 2, 3, 4], [0, 1])  # full, quick


def methods(raw: dict, erm: bool) -> dict[str, dict]:
    """The ``[algorithm]`` table of every method, from the config's FESS-GDA table."""
    fess = copy.deepcopy(raw["algorithm"])
    assert fess["name"] == "fess_gda", fess
    local = {k: v for k, v in fess["params"].items() if k not in ("p", "beta", "lr_x_global", "lr_y_global")}
    out = {FESS: fess}
    if any(fess["params"].get(k, 1.0) != 1.0 for k in ("lr_x_global", "lr_y_global")):
        # a server step Local SGDA lacks: FESS-GDA without smoothing separates the two differences
        out[FESS0] = {"name": "fess_gda", "params": {**fess["params"], "p": 0.0}}
    out[LOCAL] = {"name": "local_sgda", "params": local}
    if erm:
        out[ERM] = {"name": "local_sgda", "params": {**local, "lr_y": ERM_LR_Y}}
    return out


def method_of(name: str, lr_y: float, p: float | None = None) -> str:
    """The method label of a run from its algorithm name, ascent step and smoothing ``p``."""
    if name == "fess_gda":
        return FESS0 if p is not None and float(p) == 0.0 else FESS
    return ERM if float(lr_y) == ERM_LR_Y else LOCAL


def spec(problem: str, quick: bool) -> dict[str, Any]:
    p = PROBLEMS[problem]
    raw = base_config(p["config"])
    base = {**raw, "rounds": p["rounds"][quick], "eval_every": p["eval_every"][quick]}
    return {"base": base, "grid": {"algorithm": list(methods(raw, p["erm"]).values()), "seed": SEEDS[quick]}}


def curves(t, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """method -> (communication rounds, values [seeds, evaluations]) of ``metric`` in a results table
    (runs that stopped early are padded with their last value)."""
    rows = t[t.metric == metric]
    p = rows["algorithm.params.p"] if "algorithm.params.p" in rows else np.full(len(rows), np.nan)
    labels = [method_of(n, lr, None if _missing(q) else q)
              for n, lr, q in zip(rows["algorithm.name"], rows["algorithm.params.lr_y"], p, strict=True)]
    out = {}
    for method, r in rows.groupby(np.array(labels), sort=False):
        comm = np.sort(r.comm_round.unique())
        runs = []
        for _, s in r.groupby("seed"):
            v = s.set_index("comm_round").value.sort_index().reindex(comm).ffill().to_numpy()
            runs.append(v)
        out[method] = (comm, np.stack(runs))
    return dict(sorted(out.items(), key=lambda kv: ORDER.index(kv[0])))


def _missing(v: Any) -> bool:
    """An empty table cell (a method without that parameter)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def verdict(diff: np.ndarray, higher: bool, a: str = FESS, b: str = LOCAL) -> str:
    """``a`` minus ``b``, paired over seeds: a win only where a two-sided paired t-test at 95% rejects
    no difference (|mean| > t_{0.975, n-1} * std / sqrt(n); t = 12.7 for 2 seeds, 2.78 for 5)."""
    from scipy.stats import t as student_t

    n = len(diff)
    if n < 2:
        return "one seed: no verdict"
    mean, se = float(diff.mean()), float(diff.std(ddof=1)) / math.sqrt(n)
    if abs(mean) <= float(student_t.ppf(0.975, n - 1)) * se:
        return "no significant difference (paired t-test, 95%)"
    return f"{a} better" if (mean > 0) == higher else f"{b} better"


def summary_table(t, metrics: list[str], higher: bool, last: int = LAST) -> dict[str, Any]:
    """For every method and metric: the mean of the last ``last`` evaluations of every seed, then its
    mean and std over seeds; and the paired difference of the first metric FESS-GDA minus Local SGDA
    (and, where the p = 0 control ran, FESS-GDA minus FESS-GDA with p = 0: the smoothing's own share)."""
    table: dict[str, Any] = {}
    ends: dict[str, dict[str, np.ndarray]] = {}
    for metric in metrics:
        for method, (comm, runs) in curves(t, metric).items():
            end = runs[:, -last:].mean(1)
            ends.setdefault(method, {})[metric] = end
            row = table.setdefault(method, {"seeds": int(len(runs)), "comm_rounds": int(comm[-1]),
                                            "evaluations_averaged": int(min(last, runs.shape[1]))})
            row[f"{metric}_mean"] = float(end.mean())
            row[f"{metric}_std"] = float(end.std())
    out: dict[str, Any] = {"methods": table}
    key = metrics[0]
    for name, a, b in (("fess_minus_local", FESS, LOCAL), ("fess_minus_fess_p0", FESS, FESS0)):
        if a in ends and b in ends:
            diff = ends[a][key] - ends[b][key]
            n = len(diff)
            sd = float(diff.std(ddof=1)) if n > 1 else 0.0
            out[name] = {"metric": key, "mean": float(diff.mean()), "std": float(diff.std()),
                         "per_seed": [float(v) for v in diff],
                         "t_statistic": float(diff.mean() / (sd / math.sqrt(n))) if sd > 0 else None,
                         "verdict": verdict(diff, higher, a, b)}
    return out


def _band_panel(ax, data: dict[str, tuple[np.ndarray, np.ndarray]], title: str, ylabel: str) -> None:
    from plots.speedup import plot_band

    for method, (comm, runs) in data.items():
        color, ls = STYLE[method]
        what = f"{method}: server step only" if method == FESS0 else method
        label = f"{what} ({len(runs)} seeds)"
        line = plot_band(ax, comm, runs, label=label, color=color)
        line.set_linestyle(ls)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("communication rounds")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plateau(ax, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Zoom on the plateau: the curves start far below it (round 0 is the zero model)."""
    vals = np.concatenate([runs[:, len(comm) // 5:].ravel() for comm, runs in data.values()])
    lo, hi = float(np.percentile(vals, 2)), float(vals.max())
    pad = 0.1 * max(hi - lo, 1e-3)
    ax.set_ylim(lo - pad, min(1.0, hi + pad))


def figure(panels: dict[str, Any], samples: dict[str, Any] | None, path: Path, *, title: str) -> None:
    """Draw F4 from ``panels`` (problem -> metric -> :func:`curves`) and the seed-0 GAN ``samples``
    (method -> {"fake": [n, 2], "centres": [K, 2], "true": [n, 2]}, or None)."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    a = panels["adult"]["worst_group_test_acc"]
    _band_panel(axes[0, 0], a, "(a) Adult, groups = sex: worst-group test accuracy", "worst-group test accuracy")
    _plateau(axes[0, 0], a)
    d = panels["digits"]["worst_group_test_acc"]
    _band_panel(axes[0, 1], d, "(b) digits, class-minimax: worst-class test accuracy", "worst-class test accuracy")
    _plateau(axes[0, 1], d)
    g = panels["gan"]
    _band_panel(axes[0, 2], g["sliced_wasserstein"], "(c) GAN, ring of 8 Gaussians: sliced Wasserstein to the truth",
                "sliced Wasserstein distance")
    axes[0, 2].set_yscale("log")
    _band_panel(axes[1, 0], g["modes_covered"], "(d) GAN: modes covered (of 8)", "modes covered")
    axes[1, 0].set_ylim(-0.3, 8.5)
    for ax, method in zip(axes[1, 1:], [FESS, LOCAL], strict=True):
        s = (samples or {}).get(method)
        if s is None:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no samples drawn", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.scatter(s["true"][:, 0], s["true"][:, 1], s=3, color="0.6", alpha=0.5, label="true samples")
        ax.scatter(s["fake"][:, 0], s["fake"][:, 1], s=3, alpha=0.5, label="generated")
        ax.scatter(s["centres"][:, 0], s["centres"][:, 1], marker="x", s=60, color="k", label="true modes")
        ax.set_aspect("equal")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3.7)
        ax.set_title(f"({'e' if method == FESS else 'f'}) {method}, seed 0, round {s['round']}: "
                     f"SW {s['sliced_wasserstein']:.3f}, modes covered {int(s['modes_covered'])}/8", fontsize=9)
        leg = ax.legend(fontsize=7, loc="upper center", ncol=3)
        for h in leg.legend_handles[:2]:
            h.set_sizes([20])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def gan_samples(quick: bool, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Re-run seed 0 of both GAN methods in this process for their final generators (cached in
    ``out/<run_id>.pt``): generated samples and the final metrics of each."""
    import torch

    from fedopt.runner import build, execute

    samples, finals = {}, {}
    for point in load_sweep(spec("gan", quick)).points:
        if point.config.seed != 0:
            continue
        cfg = point.config
        method = method_of(cfg.algorithm.name, cfg.algorithm.params["lr_y"], cfg.algorithm.params.get("p"))
        built = build(cfg)
        problem = built.problem
        cache = out / f"{point.run_id}.pt"
        if cache.is_file():
            x, y = torch.load(cache)
        else:
            result, _ = execute(cfg, built)
            x, y = result.x, result.y
            out.mkdir(parents=True, exist_ok=True)
            torch.save((x, y), cache)
        metrics = problem.metrics(x, y)
        z = torch.randn((2000, problem.latent_dim), generator=torch.Generator().manual_seed(0)).to(x.dtype)
        with torch.no_grad():
            fake = problem.generate(x, z).double().numpy()
        samples[method] = {"fake": fake, "centres": problem.centres.numpy(), "true": problem.true_sample.numpy(),
                           "round": cfg.rounds, **{k: metrics[k] for k in ("sliced_wasserstein", "modes_covered")}}
        finals[method] = metrics
    return samples, finals


def make(out: Path, quick: bool, executor: str) -> dict[str, Any]:
    import pandas as pd
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        panels: dict[str, Any] = {}
        summary: dict[str, Any] = {"note": NO_RATE, "table": {}, "runs": 0, "failed": []}
        for problem, p in PROBLEMS.items():
            report = run_sweep(load_sweep(spec(problem, quick)), out / "sweep" / problem, executor=executor,
                               progress=False)
            t = pd.read_csv(report.table_path)
            summary["runs"] += report.total
            summary["failed"] += report.failed
            panels[problem] = {m: curves(t, m) for m in p["metrics"]}
            summary["table"][problem] = summary_table(t, p["metrics"], p["higher"])
            summary["table"][problem]["diverged_runs"] = int(t[t.status == "diverged"].run_id.nunique())
        samples, finals = gan_samples(quick, out / "gan_seed0")
        sweep_sw = {m: float(runs[0, -1]) for m, (_, runs) in panels["gan"]["sliced_wasserstein"].items()}
        summary["gan_seed0_rerun"] = {m: {"sliced_wasserstein": finals[m]["sliced_wasserstein"],
                                          "sweep_sliced_wasserstein": sweep_sw[m],
                                          "matches_sweep": bool(abs(finals[m]["sliced_wasserstein"] - sweep_sw[m])
                                                                <= 1e-6 * max(1.0, sweep_sw[m]))}
                                      for m in finals}
        seeds = len(SEEDS[quick])
        title = (f"F4: FESS-GDA vs Local SGDA on minimax applications (mean ± std over {seeds} seeds; "
                 "untuned, each config's steps).\nNo rate drawn: linear fair classification is convex-concave "
                 "(rates in F3); the GAN is nonconvex-nonconcave.")
        for ext in ("png", "pdf"):
            figure(panels, samples, out / f"F4.{ext}", title=title)
        return summary
    finally:
        torch.set_num_threads(threads)
