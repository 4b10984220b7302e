"""F2: FedMBO against FedNest and LFedNest on data hyper-cleaning, non-i.i.d. against i.i.d.

sklearn digits (1,797 8x8 images, bundled) over 20 clients, 40% of training labels corrupted, a
linear classifier, 10 clients sampled per round, minibatch 32, 150 outer iterations; the split is
Dirichlet(0.1) label skew or i.i.d. The three methods share the quickstart's parameters (outer step
300, inner and Neumann steps 1, 10 lower-level steps, 10 Neumann terms; FedNest and LFedNest keep
their defaults for the rest, one local step each); none is tuned per method. Test accuracy is drawn against communication rounds, because
the methods spend different numbers of rounds per outer iteration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedopt.figures import base_config
from fedopt.sweep import load_sweep, run_sweep

PARTITIONS = {"Dirichlet(0.1)": {"name": "dirichlet", "params": {"alpha": 0.1}}, "i.i.d.": {"name": "iid"}}
ALGORITHMS = ["fedmbo", "fednest", "lfednest"]


def spec(quick: bool) -> dict[str, Any]:
    return {"base": base_config("quickstart.toml"),
            "grid": {"algorithm.name": ALGORITHMS, "partition": list(PARTITIONS.values()),
                     "seed": [0] if quick else [0, 1, 2, 3, 4]}}


def make(out: Path, quick: bool, executor: str) -> dict[str, Any]:
    import matplotlib.pyplot as plt
    import pandas as pd

    from plots.speedup import plot_band

    report = run_sweep(load_sweep(spec(quick)), out / "sweep", executor=executor, progress=False)
    t = pd.read_csv(report.table_path)
    fig, axes = plt.subplots(1, len(PARTITIONS), figsize=(11, 4), sharey=True)
    summary: dict[str, Any] = {}
    for ax, (label, part) in zip(axes, PARTITIONS.items(), strict=True):
        rows = t[(t["partition.name"] == part["name"]) & (t.metric == "test_acc")]
        for alg in ALGORITHMS:
            r = rows[rows["algorithm.name"] == alg]
            runs = np.stack([s.sort_values("round").value.to_numpy() for _, s in r.groupby("seed")])
            comm = r[r.seed == r.seed.min()].sort_values("round").comm_round.to_numpy()
            plot_band(ax, comm, runs, label=alg)
            summary[f"{alg} {label}"] = {"final_test_acc_mean": float(runs[:, -1].mean()),
                                         "final_test_acc_std": float(runs[:, -1].std()),
                                         "comm_rounds": int(comm[-1]), "seeds": int(len(runs))}
        ax.set_ylim(0.7, 1.0)  # the plateau; every curve starts near 0.1 at round 0
        ax.set_title(f"{label} split over 20 clients", fontsize=10)
        ax.set_xlabel("communication rounds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    fig.suptitle("Hyper-cleaning, sklearn digits, 40% corrupted labels, 150 outer iterations", fontsize=11)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(out / f"F2.{ext}", dpi=120)
    plt.close(fig)
    return {"final": summary, "runs": report.total}
