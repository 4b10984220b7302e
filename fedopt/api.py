"""``fedopt.run``: one config in, a metrics table out (and, with ``out=``, a run folder)."""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fedopt import results
from fedopt.config import RunConfig, load_config, plugin_folders
from fedopt.errors import check
from fedopt.runner import build, execute, records_frame
from topologies.plugins import plugin_path

__all__ = ["resume", "run"]


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

    Plug-ins: for a path ``config``, dotted component names (``"my_module:factory"``) are imported
    from the config file's folder and the current folder first, exactly as ``fedopt run`` does,
    so the console script and this function accept the same files without ``PYTHONPATH``. Those
    folders are on ``sys.path`` only while the call runs (modules it imported stay imported). A
    mapping or :class:`RunConfig` uses ``sys.path`` as it is. Resolving a plug-in runs its code:
    a config file is trusted input (see :mod:`fedopt.registry`).
    """
    folders = plugin_folders(config) if isinstance(config, str | Path) else []
    with plugin_path(*folders):
        return _run(config, out=out, overrides=overrides, progress=progress)


def _run(
    config: str | Path | Mapping[str, Any] | RunConfig,
    *,
    out: str | Path | None,
    overrides: list[str] | None,
    progress: bool,
) -> pd.DataFrame:
    cfg = load_config(config, overrides)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        results.check_free(out_dir)
    built = build(cfg)
    if out_dir is not None:
        results.claim_folder(out_dir)
        results.write_config(out_dir, cfg)
        results.write_meta(out_dir, cfg, status="running")
    return _execute_into(cfg, built, out_dir, progress=progress, resume=None)


def resume(out: str | Path, *, progress: bool = False) -> pd.DataFrame:
    """Continue the killed (or failed) run of the folder ``out`` from its last checkpoint and return
    the whole run's metrics, exactly as an uninterrupted run would have (bit for bit: every random
    draw is a pure function of seed, round and client). Without a checkpoint yet, the run restarts
    from iteration 0 in the same folder. The folder's ``config.toml`` is the config; a folder whose
    run finished or diverged is an error (nothing to resume)."""
    import json

    out_dir = Path(out)
    check(out_dir.is_dir() and (out_dir / "config.toml").is_file(),
          f"--resume {str(out_dir)!r} is not a run folder (no config.toml); give the folder a run wrote")
    try:
        status = json.loads((out_dir / "meta.json").read_text()).get("status")
    except (OSError, ValueError):
        status = None
    check(status not in ("finished", "diverged"),
          f"run folder {str(out_dir)!r} has {status} already; nothing to resume (start a new run with --out)")
    with plugin_path(*plugin_folders(out_dir / "config.toml")):
        cfg = load_config(out_dir / "config.toml")
        built = build(cfg)
        path = out_dir / results.CHECKPOINT
        checkpoint = results.read_checkpoint(path, built.problem.device) if path.is_file() else None
        results.write_meta(out_dir, cfg, status="running", resumed_from=checkpoint.k if checkpoint else 0)
        return _execute_into(cfg, built, out_dir, progress=progress, resume=checkpoint)


def _execute_into(cfg: RunConfig, built: Any, out_dir: Path | None, *, progress: bool,
                  resume: Any) -> pd.DataFrame:
    """Run ``built``; with a folder, checkpoint into it while running and write its files at the end."""
    every = cfg.checkpoint_interval() if out_dir is not None else 0

    def on_checkpoint(checkpoint: Any) -> None:
        assert out_dir is not None
        results.write_checkpoint(out_dir / results.CHECKPOINT, checkpoint)

    try:
        result, wall = execute(cfg, built, progress=progress, checkpoint_every=every,
                               on_checkpoint=on_checkpoint if every else None, resume=resume)
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
        extra = {"resumed_from": resume.k if resume is not None else 0} if resume is not None else {}
        results.write_meta(out_dir, cfg, status=result.status, diverged_round=result.diverged_round,
                           wall_time_s=round(wall, 3), comm_rounds=result.counters.comm_rounds, **extra)
        (out_dir / results.CHECKPOINT).unlink(missing_ok=True)  # the run is over
    return df
