"""F1: FedMBO's linear speedup in the number of sampled clients (Huang, Zhang and Ji, ICML 2023).

Noisy heterogeneous quadratic (32 clients, sigma = 0.1 at batch 1, delta = 0.5), n clients sampled
per round, outer step alpha_n = 0.02 n (the theory's alpha = Theta(sqrt(n/K)) evaluated at
K_eps ~ 1/n; one fixed step for every n would let the deterministic contraction dominate).
K_eps is the first K whose ergodic average (1/K) sum_{k<K} E||grad Phi(x_k)||^2, averaged over
seeds, is below eps = 0.2 (8x the stationary noise floor); the slope of log K_eps against log n is
-1 for linear speedup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedopt import rates
from fedopt.figures import base_config
from fedopt.sweep import load_sweep, run_sweep

EPS = 0.2
HORIZON = {1: 300, 2: 170, 4: 90, 8: 50, 16: 32}
def spec(quick: bool) -> dict[str, Any]:
    ns = list(HORIZON)
    return {"base": base_config("fedmbo_speedup.toml"), "grid": {"seed": list(range(5 if quick else 20))},
            "zip": [{"algorithm.params.clients_per_round": ns,
                     "algorithm.params.outer_lr": [round(0.02 * n, 10) for n in ns],
                     "rounds": [HORIZON[n] for n in ns]}]}


def k_eps(curve: np.ndarray, eps: float = EPS) -> float:
    """First K with (1/K) sum_{k<K} curve[k] <= eps (NaN if never)."""
    erg = np.cumsum(curve[:-1]) / np.arange(1, len(curve))
    hit = np.flatnonzero(erg <= eps)
    return float(hit[0] + 1) if len(hit) else float("nan")


def make(out: Path, quick: bool, executor: str) -> dict[str, Any]:
    import matplotlib.pyplot as plt
    import pandas as pd

    from plots.rates import plot_with_rate
    from plots.speedup import plot_band, plot_speedup

    report = run_sweep(load_sweep(spec(quick)), out / "sweep", executor=executor, progress=False)
    t = pd.read_csv(report.table_path)
    t = t[t.metric == "hypergrad_norm_sq"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    keps, curves = {}, {}
    for n, group in t.groupby("algorithm.params.clients_per_round"):
        runs = np.stack([g.sort_values("round").value.to_numpy() for _, g in group.groupby("seed")])
        curves[int(n)] = runs.mean(0)
        keps[int(n)] = k_eps(curves[int(n)])
        K = np.arange(1, runs.shape[1])
        ergodic = np.cumsum(runs[:, :-1], axis=1) / K
        line = plot_band(ax0, K, ergodic, label=f"n = {int(n)} ({len(runs)} seeds)")
        if int(n) == 1:
            plot_with_rate(ax0, K, ergodic.mean(0), rates.fedmbo(1), tail=0.5, color=line.get_color(),
                           show_data=False)
    ax0.axhline(EPS, color="gray", ls=":", lw=1)
    ax0.set_xlabel("outer iterations K")
    ax0.set_ylabel(r"$\frac{1}{K}\sum_{k<K}\mathbb{E}\|\nabla\Phi(x_k)\|^2$")
    ax0.set_title("(a) ergodic squared hypergradient, mean ± std over seeds", fontsize=10)
    ax0.legend(fontsize=7)
    ns = sorted(keps)
    ok = [n for n in ns if np.isfinite(keps[n])]
    slope = plot_speedup(ax1, ok, [keps[n] for n in ok])
    ax1.set_title(rf"(b) iterations to $\varepsilon$ = {EPS} against n", fontsize=10)
    ax1.legend(fontsize=8)
    fig.suptitle("FedMBO, noisy heterogeneous quadratic (32 clients), step 0.02 n", fontsize=11)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"F1.{ext}", dpi=120)
    plt.close(fig)
    return {"k_eps": {str(n): keps[n] for n in ns}, "eps": EPS, "fitted_slope": slope,
            "theory_slope": -1.0, "seeds": int(t.seed.nunique()), "runs": report.total}
