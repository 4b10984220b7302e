"""One-command figure reproduction: ``fedopt reproduce ID [--quick] [--out DIR]``.

Each figure of ``experiments/README.md`` is a function ``make(out, quick, executor)`` that runs its
sweep (through :mod:`fedopt.sweep`, so an interrupted reproduction resumes), draws the figure from
the results table (PNG and PDF) and returns the figure's key numbers, written to ``summary.json``.
``--quick`` shrinks seeds and budgets so that each figure takes under 3 minutes on 2 cores; the full
version is the one in ``docs/figures``.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedopt import results
from fedopt.errors import check

__all__ = ["FIGURES", "Figure", "base_config", "reproduce"]

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def base_config(name: str) -> dict[str, Any]:
    """A figure's base config from ``experiments/configs`` (figures are reproduced from a checkout)."""
    from fedopt.config import load_raw

    path = CONFIGS / name
    check(path.is_file(), f"figure config {str(path)!r} is missing: fedopt reproduce runs from a source checkout")
    return load_raw(path)


@dataclass(frozen=True)
class Figure:
    id: str
    title: str
    dataset: str
    unverified: str
    make: Callable[[Path, bool, str], dict[str, Any]]


def _lazy(module: str) -> Callable[[Path, bool, str], dict[str, Any]]:
    """``module``'s ``make``, imported on first use (each figure pulls in matplotlib and its runs)."""

    def make(out: Path, quick: bool, executor: str) -> dict[str, Any]:
        return importlib.import_module(f"fedopt.figures.{module}").make(out, quick, executor)

    return make


FIGURES: dict[str, Figure] = {
    "F1": Figure("F1", "FedMBO: linear speedup in the number of sampled clients",
                 "synthetic noisy heterogeneous quadratic (32 clients)",
                 "the theorem's constants and its step rule alpha ~ sqrt(n/K) (used as alpha_n = 0.02 n)", _lazy("f1_speedup")),
    "F2": Figure("F2", "FedMBO vs FedNest / LFedNest: test accuracy against communication rounds, non-i.i.d. vs i.i.d.",
                 "data hyper-cleaning on sklearn digits (1797 images, 40% labels corrupted), 20 clients",
                 "FedMBO's algorithm boxes (reconstructed); the methods share untuned steps", _lazy("f2_fedmbo_vs_fednest")),
    "F3": Figure("F3", "FESS-GDA vs Local SGDA / SAGDA / Fed-Norm-SGDA on five synthetic minimax classes; "
                       "class rates, speedup in m, noisy NC-C over seeds",
                 "synthetic heterogeneous minimax problems (PL-PL, NC-SC, NC-PL, simplex form (2), NC-C; 8 clients; "
                 "64 for the speedup)",
                 "FESS-GDA's algorithm box and theorems (equations from a third-party reproduction; every rate "
                 "reconstructed); SAGDA's and Fed-Norm-SGDA's exact update rules", _lazy("f3_minimax")),
    "F4": Figure("F4", "FESS-GDA vs Local SGDA on fair classification (worst-group accuracy) and a small GAN; "
                       "no rate applies",
                 "UCI Adult (groups = sex) and sklearn digits (class-minimax), 20 clients; GAN on a ring of 8 "
                 "Gaussians, 8 clients",
                 "FESS-GDA's algorithm box (equations from a third-party reproduction); p is a hyperparameter "
                 "(no smoothness constant for the GAN); the methods share untuned steps", _lazy("f4_minimax_apps")),
    "F5": Figure("F5", "MA-DSBO: final error against the spectral gap of the gossip graph",
                 "synthetic heterogeneous quadratic (16 nodes)",
                 "the (1 - rho) dependence of the rate, so no rate is drawn", _lazy("f5_topology")),
    "F6": Figure("F6", "D-TFBO / S-TFBO vs fixed-step AID / SOBA over initial step sizes; TFBO rates",
                 "noise-free quadratic; data hyper-cleaning on sklearn digits (1797 images, 40% labels corrupted)",
                 "D-TFBO's paper-level form (reconstructed) and the averaged form of both theorems", _lazy("f6_tfbo")),
}


def reproduce(figure_id: str, out: str | Path, *, quick: bool = False, executor: str = "serial") -> dict[str, Any]:
    """Run figure ``figure_id`` into ``out``; returns (and writes) its summary."""
    check(figure_id in FIGURES, f"unknown figure {figure_id!r}; available: {', '.join(FIGURES)}")
    fig = FIGURES[figure_id]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = fig.make(out, quick, executor)
    summary = {"figure": fig.id, "title": fig.title, "dataset": fig.dataset, "unverified": fig.unverified,
               "quick": quick, **summary, "wall_time_s": round(time.perf_counter() - t0, 1)}
    results.atomic_write(out / "summary.json", json.dumps(summary, indent=1, default=float) + "\n")
    return summary
