"""``fedopt.run``: one config in, a metrics table out (and, with ``out=``, a run folder)."""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fedopt import results
from fedopt.config import RunConfig, load_config
from fedopt.runner import build, execute, records_frame

__all__ = ["run"]


def run(
    config: str | Path | Mapping[str, Any] | RunConfig,
    *,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Run one config and return its long-format metrics (``round, comm_round, metric, value``).

    Args:
        config: a TOML path, a raw mapping shaped like the TOML, or a :class:`RunConfig`.
        out: if given, a *new* folder to write ``config.toml``, ``metrics.csv``, ``meta.json`` and
            ``convergence.png`` into (an existing folder is an error, checked before any work).
        overrides: ``"key.path=value"`` strings applied before validation (as ``--set``).
        progress: show a progress bar on stderr.

    The returned frame's ``attrs`` hold ``status`` (``finished`` / ``diverged``),
    ``diverged_round`` and ``wall_time_s``.
    """
    cfg = load_config(config, overrides)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        results.check_free(out_dir)
    built = build(cfg)
    if out_dir is not None:
        results.claim_folder(out_dir)
        results.write_config(out_dir, cfg)
        results.write_meta(out_dir, cfg, status="running")
    try:
        result, wall = execute(cfg, built, progress=progress)
    except BaseException as e:
        if out_dir is not None:
            results.write_meta(out_dir, cfg, status="failed", error=f"{type(e).__name__}: {e}",
                               traceback=traceback.format_exc())
        raise
    df = records_frame(result.records)
    df.attrs.update(status=result.status, diverged_round=result.diverged_round, wall_time_s=wall)
    if out_dir is not None:
        results.atomic_write(out_dir / "metrics.csv", df.to_csv(index=False))
        from plots import plot_run

        title = f"{cfg.algorithm.name} on {cfg.problem.name}" + (f" ({cfg.data.name})" if cfg.data else "")
        plot_run(df, out_dir / "convergence.png", title=title)
        results.write_meta(out_dir, cfg, status=result.status, diverged_round=result.diverged_round,
                           wall_time_s=round(wall, 3), comm_rounds=result.counters.comm_rounds)
    return df
