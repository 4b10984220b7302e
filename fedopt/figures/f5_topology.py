"""F5: MA-DSBO's error against the spectral gap of the gossip graph (16 nodes, heterogeneous
noise-free quadratic, no tracking, 300 iterations). Without gradient tracking the heterogeneity
leaves a floor that grows as the gap shrinks; standard decentralized analysis predicts the ordering,
but the papers' exact (1 - rho) dependence could not be read, so no rate is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedopt.figures import base_config
from fedopt.sweep import load_sweep, run_sweep

GRAPHS = {"complete": {}, "exponential": {}, "torus": {}, "erdos_renyi": {"p": 0.3}, "ring": {}}
def spec(quick: bool) -> dict[str, Any]:
    topo = [{"name": g, "mixing": "metropolis_hastings", **({"params": p} if p else {})} for g, p in GRAPHS.items()]
    base = base_config("ma_dsbo_quadratic.toml")
    return {"base": {**base, "rounds": 150 if quick else 300}, "grid": {"topology": topo, "seed": [0] if quick else [0, 1, 2]}}


def make(out: Path, quick: bool, executor: str) -> dict[str, Any]:
    import matplotlib.pyplot as plt
    import pandas as pd

    import topologies
    from plots.speedup import plot_band

    report = run_sweep(load_sweep(spec(quick)), out / "sweep", executor=executor, progress=False)
    t = pd.read_csv(report.table_path)
    t = t[t.metric == "hypergrad_norm_sq"]
    gaps, finals = {}, {}
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for g, params in GRAPHS.items():
        gaps[g] = topologies.spectral_gap(topologies.mixing_matrix(topologies.build_graph(g, 16, seed=0, **params)))
        rows = t[t["topology.name"] == g]
        runs = np.stack([s.sort_values("round").value.to_numpy() for _, s in rows.groupby("seed")])
        rounds = np.sort(rows["round"].unique())
        plot_band(ax0, rounds, runs, label=f"{g} (gap {gaps[g]:.3f})")
        finals[g] = float(np.exp(np.log(np.maximum(runs[:, -1], 1e-300)).mean()))
    order = sorted(GRAPHS, key=lambda g: -gaps[g])
    ax0.set_yscale("log")
    ax0.set_xlabel("iterations k")
    ax0.set_ylabel(r"$\|\nabla\Phi(\bar x_k)\|^2$")
    ax0.set_title("(a) error against iterations (mean ± std over seeds)", fontsize=10)
    ax0.legend(fontsize=7)
    for g in order:
        ax1.plot(gaps[g], finals[g], "o", ms=7)
        ax1.annotate(g, (gaps[g], finals[g]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel(r"spectral gap $1 - \rho$ (Metropolis-Hastings)")
    ax1.set_ylabel(r"final $\|\nabla\Phi(\bar x)\|^2$ (geometric mean)")
    ax1.set_title("(b) final error against the gap (no rate: its (1 - rho) form is unverified)", fontsize=9)
    ax1.grid(alpha=0.3, which="both")
    fig.suptitle(f"MA-DSBO, heterogeneous quadratic, 16 nodes, {int(t['round'].max())} iterations", fontsize=11)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"F5.{ext}", dpi=120)
    plt.close(fig)
    errs = [finals[g] for g in order]
    return {"spectral_gap": gaps, "final_error": finals, "order_by_gap": order,
            "ordered_by_gap": bool(all(a <= b for a, b in zip(errs, errs[1:], strict=False))),
            "seeds": int(t.seed.nunique()), "runs": report.total}
