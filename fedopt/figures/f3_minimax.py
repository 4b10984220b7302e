"""F3: FESS-GDA against Local SGDA, SAGDA and Fed-Norm-SGDA on the five synthetic minimax classes,
the class rates drawn over FESS-GDA's curves, its speedup in the sampled clients, and FESS-GDA vs
Local SGDA on a noisy NC-C problem over seeds.

Panels:
  (a)-(e) one per class (configs ``experiments/configs/fess_gda_{pl_pl,nc_sc,nc_pl,simplex,nc_c}.toml``:
      8 heterogeneous clients, full participation, exact oracles, K = 5 local steps). The class's
      measure m_t against communication rounds for every method; for NC-SC, NC-PL, simplex form (2)
      and NC-C also FESS-GDA's running average (1/T) sum_t m_t^2 of the measure m_t
      (||grad Phi||, or the Moreau-envelope gradient for form (2) and NC-C) against communication rounds
      T, with the class rate fitted on FESS-GDA's tail (``fedopt.rates``; all marked unverified), over the
      measure itself for every method. PL-PL:
      the distance to the saddle point with a linear rate rho^T, rho fitted. The baselines use the same
      effective step: Local SGDA (one-sided) takes lr_x * lr_x_global as its local step; SAGDA and
      Fed-Norm-SGDA take FESS-GDA's local and global steps. SAGDA spends two rounds per iteration.
  (f) speedup in m (``fess_gda_speedup.toml``: noisy NC-SC, 64 clients, m sampled with replacement):
      rounds T_eps until the seed-averaged ||grad Phi(x_T)||^2 falls below eps, against m,
      with local steps and the anchor rate beta both proportional to m (at a fixed eps, the theory's
      step sqrt(mK/T) with T ~ 1/(m eps^2) is proportional to m; beta must follow, otherwise the anchor
      z, moving at rate beta, limits progress). Ideal slope -1.
  (g) noisy NC-C (sigma = 0.1 at batch 1, 4 of 8 clients per round): the Moreau-envelope gradient
      against rounds, mean ± std over seeds, FESS-GDA (p = 2l) against Local SGDA at the same
      effective step; the summary holds rounds to eps per seed (mean ± std).

``fedopt reproduce F3 [--quick]`` writes F3.png / F3.pdf and summary.json; quick runs a quarter of
the class budgets and fewer seeds. Runs use one intra-op thread (restored afterwards): the tensors
are tiny and a second thread only adds synchronisation.
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

import fedopt  # noqa: E402
from fedopt import rates  # noqa: E402
from fedopt.figures import base_config  # noqa: E402
from plots.rates import plot_with_rate  # noqa: E402
from plots.speedup import plot_band, plot_speedup  # noqa: E402

CLASSES = {  # panel title -> (config, measure, rate kind)
    "PL-PL": ("fess_gda_pl_pl.toml", "saddle_distance", "pl_pl"),
    "NC-SC": ("fess_gda_nc_sc.toml", "grad_phi_norm", "nc_pl"),
    "NC-PL": ("fess_gda_nc_pl.toml", "grad_phi_norm", "nc_pl"),
    "form (2), simplex": ("fess_gda_simplex.toml", "moreau_grad_norm", "form2"),
    "NC-C": ("fess_gda_nc_c.toml", "moreau_grad_norm", "nc_c"),
}
SPEEDUP_M = [4, 8, 16, 32]
SPEEDUP_EPS = 0.1
NCC_EPS = 0.2


def _run(raw: dict) -> Any:
    df = fedopt.run(copy.deepcopy(raw))
    return df.pivot(index="round", columns="metric", values="value")


def baselines(fess_params: dict) -> dict[str, tuple[str, dict]]:
    """The baselines' parameters at FESS-GDA's effective step (module docstring)."""
    p = fess_params
    gx, gy = p.get("lr_x_global", 1.0), p.get("lr_y_global", 1.0)
    common = {k: p[k] for k in ("local_steps", "clients_per_round", "batch_size", "local_projection", "replace")
              if k in p}
    two_sided = {**common, "lr_x": p["lr_x"], "lr_y": p["lr_y"], "lr_x_global": gx, "lr_y_global": gy}
    return {
        "FESS-GDA": ("fess_gda", dict(p)),
        "Local SGDA": ("local_sgda", {**common, "lr_x": p["lr_x"] * gx, "lr_y": p["lr_y"] * gy}),
        "SAGDA": ("sagda", two_sided),
        "Fed-Norm-SGDA": ("fed_norm_sgda", two_sided),
    }


def rounds_to_eps(T: np.ndarray, running: np.ndarray, eps: float) -> float:
    """The first T whose value is <= eps (NaN if never)."""
    hit = np.flatnonzero(running <= eps)
    return float(T[hit[0]]) if len(hit) else float("nan")


def _class_panel(ax, title: str, quick: bool) -> dict[str, Any]:
    config, measure, kind = CLASSES[title]
    base = base_config(config)
    base["rounds"] = base["rounds"] // 4 if quick else base["rounds"]
    base["eval_every"] = max(1, base["rounds"] // 100)
    out: dict[str, Any] = {}
    for label, (alg, params) in baselines(base["algorithm"]["params"]).items():
        m = _run({**base, "algorithm": {"name": alg, "params": params}})
        T, v = m.comm_rounds.to_numpy(), m[measure].to_numpy()
        keep = T > 0
        (line,) = ax.plot(T[keep], v[keep], label=label, alpha=0.9 if label == "FESS-GDA" else 0.7,
                          lw=2 if label == "FESS-GDA" else 1.2)
        out[label] = {"final_" + measure: float(v[-1]), "comm_rounds": float(T[-1])}
        if label != "FESS-GDA":
            continue
        if kind == "pl_pl":  # linear rate: rho from the log-slope of the descent before the drift floor
            fall, Tk = v[keep], T[keep]
            k = max(int(np.flatnonzero(fall <= 10 * fall.min())[0]), 2)
            rho = min(max(math.exp(np.polyfit(Tk[:k], np.log(fall[:k]), 1)[0]), 1e-12), 1 - 1e-12)
            rate = rates.fess_gda_pl_pl(rho)
            C = rate.fit(Tk[:k], fall[:k], tail=1.0)
            ax.plot(Tk[:k], rate(Tk[:k], C), "--", color="k", alpha=0.7, label=f"theory {rate.label} (unverified)")
            out["rho"] = rho
        else:  # the theorems bound the running mean of the squared measure
            K = base["algorithm"]["params"]["local_steps"]
            m_ = base["algorithm"]["params"]["clients_per_round"]
            rate = {"nc_pl": lambda: rates.fess_gda_nc_pl(m_, K), "form2": lambda: rates.fess_gda_form2(m_, K),
                    "nc_c": rates.fess_gda_nc_c}[kind]()
            running = np.cumsum(v**2) / np.arange(1, len(v) + 1)
            ax.plot(T[keep], running[keep], ":", color=line.get_color(), label=f"FESS-GDA running mean of {measure}$^2$")
            out["rate_constant"] = plot_with_rate(ax, T[keep], running[keep], rate, color="k", show_data=False)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("communication rounds")
    ax.set_ylabel(measure)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6)
    return out


def speedup(seeds: int, eps: float = SPEEDUP_EPS) -> dict[int, float]:
    """Rounds to ``eps`` for every m of ``SPEEDUP_M`` (panel (f)): the first T at which the
    seed-averaged ||grad Phi(x_T)||^2 (an estimate of E||grad Phi(x_T)||^2) is <= eps. The running
    average over t <= T (the theorem's quantity) is dominated for hundreds of rounds by the
    initial ||grad Phi(x_0)||^2 = 14, far above eps."""
    base = base_config("fess_gda_speedup.toml")
    p = base["algorithm"]["params"]
    lr1, beta1, m_ref = p["lr_x"], p["beta"], p["clients_per_round"]
    T_eps = {}
    for m in SPEEDUP_M:
        runs = []
        for s in range(seeds):
            raw = copy.deepcopy(base)
            raw.update(seed=s, rounds=int(base["rounds"] * m_ref / m), eval_every=1)
            raw["algorithm"]["params"].update(clients_per_round=m, lr_x=lr1 * m / m_ref, lr_y=lr1 * m / m_ref,
                                              beta=min(1.0, beta1 * m / m_ref))
            runs.append(_run(raw).grad_phi_norm_sq.to_numpy())
        curve = np.mean(runs, 0)
        T_eps[m] = rounds_to_eps(np.arange(len(curve)), curve, eps)
    return T_eps


def _speedup_panel(ax, quick: bool) -> dict[str, Any]:
    seeds = 3 if quick else 10
    T_eps = speedup(seeds)
    ok = [m for m in SPEEDUP_M if np.isfinite(T_eps[m])]
    slope = plot_speedup(ax, ok, [T_eps[m] for m in ok]) if len(ok) >= 2 else float("nan")
    ax.set_xlabel("clients sampled per round m")
    ax.set_ylabel(r"rounds $T_\varepsilon$")
    ax.set_title(rf"speedup (noisy NC-SC): rounds to $\varepsilon$ = {SPEEDUP_EPS}", fontsize=10)
    ax.legend(fontsize=6)
    return {"rounds_to_eps": {str(m): T_eps[m] for m in SPEEDUP_M}, "eps": SPEEDUP_EPS, "fitted_slope": slope,
            "theory_slope": -1.0, "seeds": seeds}


def _ncc_panel(ax, quick: bool) -> dict[str, Any]:
    base = base_config("fess_gda_nc_c.toml")
    base["problem"]["params"].update(sigma=0.1)
    base.update(rounds=200 if quick else 600, eval_every=10)
    p = {**base["algorithm"]["params"], "clients_per_round": 4, "batch_size": 1}
    methods = {k: v for k, v in baselines(p).items() if k in ("FESS-GDA", "Local SGDA")}
    seeds = range(3 if quick else 5)
    table = {}
    for label, (alg, params) in methods.items():
        curves, hits = [], []
        for s in seeds:
            m = _run({**base, "seed": s, "algorithm": {"name": alg, "params": params}})
            v = m.moreau_grad_norm.to_numpy()
            curves.append(v)
            hits.append(rounds_to_eps(m.comm_rounds.to_numpy(), v, NCC_EPS))
        T = m.comm_rounds.to_numpy()
        plot_band(ax, T[1:], np.stack(curves)[:, 1:], label=f"{label} ({len(seeds)} seeds)")
        finals = [c[len(c) * 3 // 4:].mean() for c in curves]  # mean over the last quarter of the budget
        reached = [h for h in hits if np.isfinite(h)]
        table[label] = {"rounds_to_eps_mean": float(np.mean(reached)) if reached else float("nan"),
                        "rounds_to_eps_std": float(np.std(reached)) if reached else float("nan"),
                        "reached": int(np.isfinite(hits).sum()), "final_mean": float(np.mean(finals)),
                        "final_std": float(np.std(finals)), "rounds_to_eps": hits}
    ax.axhline(NCC_EPS, color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("communication rounds")
    ax.set_ylabel(r"$\|\nabla\Phi_{1/2l}(x_t)\|$")
    ax.set_title("noisy NC-C, 4 of 8 clients: FESS-GDA vs Local SGDA", fontsize=10)
    ax.legend(fontsize=7)
    return {"eps": NCC_EPS, "sigma": 0.1, "clients_per_round": 4, "seeds": len(seeds), "table": table}


def make(out: Path, quick: bool, executor: str) -> dict[str, Any]:
    del executor  # direct runs: the figure is small enough to run serially
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second intra-op thread only adds synchronisation
    try:
        fig, axes = plt.subplots(2, 4, figsize=(20, 9))
        flat = axes.ravel()
        classes = {title: _class_panel(flat[i], title, quick) for i, title in enumerate(CLASSES)}
        speedup = _speedup_panel(flat[5], quick)
        ncc = _ncc_panel(flat[6], quick)
        flat[7].axis("off")
        lines = ["final measure   FESS-GDA  LocalSGDA  SAGDA  FedNorm"]
        lines += [f"{k[:14]:<14} " + " ".join(f"{next(iter(v[a].values())):9.1e}" for a in
                                              ("FESS-GDA", "Local SGDA", "SAGDA", "Fed-Norm-SGDA")) for k, v in classes.items()]
        lines += ["", f"speedup slope {speedup['fitted_slope']:.2f} (ideal -1)", "",
                  f"noisy NC-C, rounds to eps = {NCC_EPS}:"]
        lines += [f"  {k}: {v['rounds_to_eps_mean']:.0f} ± {v['rounds_to_eps_std']:.0f} ({v['reached']} reached),"
                  f" final {v['final_mean']:.3f} ± {v['final_std']:.3f}" for k, v in ncc["table"].items()]
        flat[7].text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=9)
        fig.suptitle("F3: federated minimax on synthetic classes (8 heterogeneous clients, K = 5); "
                     "rates reconstructed, marked unverified", fontsize=11)
        fig.tight_layout()
        for ext in ("png", "pdf"):
            fig.savefig(out / f"F3.{ext}", dpi=110)
        plt.close(fig)
    finally:
        torch.set_num_threads(threads)
    return {"classes": classes, "speedup": speedup, "nc_c_noisy": ncc}
