"""``fedopt.run``: one config in, a metrics table out (and, with ``out=``, a run folder)."""

from __future__ import annotations

import os
import signal
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
    ``diverged_round`` and ``wall_time_s``. A run folder's ``meta.json`` says ``running`` (with
    the ``pid`` and ``host`` of this process) while the run goes on; if the run is interrupted
    (``KeyboardInterrupt``, or SIGTERM under the CLI) it says ``interrupted`` and keeps the
    checkpoint, so :func:`resume` continues it.

    Plug-ins: dotted component names (``"my_module:factory"``) are imported from the config
    file's folder (for a path ``config``) and then the current folder, exactly as ``fedopt run``
    does, so the console script and this function accept the same configs without ``PYTHONPATH``.
    Those folders are at the front of ``sys.path`` only while the call runs (modules it imported
    stay imported). Resolving a plug-in runs its code: a config is trusted input, like a script
    (see :mod:`fedopt.registry`).
    """
    folders = plugin_folders(config) if isinstance(config, str | Path) else plugin_folders()
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
        results.write_meta(out_dir, cfg, status="running", pid=os.getpid(), pid_start=results.process_start(os.getpid()),
                           plugin_folders=_config_folder(config))
    return _execute_into(cfg, built, out_dir, progress=progress, resume=None)


def _config_folder(config: Any) -> list[str]:
    """The config file's folder (absolute), recorded so that ``--resume`` finds its plug-ins."""
    return [str(Path(config).resolve().parent)] if isinstance(config, str | Path) else []


def resume(out: str | Path, *, progress: bool = False) -> pd.DataFrame:
    """Continue the killed (or failed) run of the folder ``out`` from its last checkpoint and return
    the whole run's metrics, exactly as an uninterrupted run would have (bit for bit: every random
    draw is a pure function of seed, round and client). Without a checkpoint yet, the run restarts
    from iteration 0 in the same folder. The folder's ``config.toml`` is the config; a folder whose
    run finished or diverged is an error (nothing to resume), and so is a ``running`` folder whose
    recorded process still runs on this host. A ``running`` folder whose process is gone (killed
    with SIGKILL, or the machine went down), an ``interrupted`` one and a ``failed`` one resume.
    Plug-ins come from the original config file's folder (recorded in ``meta.json``), then the
    current folder."""
    import json

    out_dir = Path(out)
    check(out_dir.is_dir() and (out_dir / "config.toml").is_file(),
          f"--resume {str(out_dir)!r} is not a run folder (no config.toml); give the folder a run wrote")
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        meta = meta if isinstance(meta, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        meta = {}
    status = meta.get("status")
    check(status not in ("finished", "diverged"),
          f"run folder {str(out_dir)!r} has {status} already; nothing to resume (start a new run with --out)")
    check(not (status == "running" and results.run_is_alive(meta) and meta.get("pid") != os.getpid()),
          f"run folder {str(out_dir)!r} is being run by process {meta.get('pid')} on this host; "
          "wait for it or stop it first")
    recorded = _recorded_folders(out_dir)
    with plugin_path(*dict.fromkeys([*recorded, *map(str, plugin_folders())])):
        cfg = load_config(out_dir / "config.toml")
        built = build(cfg)
        path = out_dir / results.CHECKPOINT
        checkpoint = results.read_checkpoint(path, built.problem.device) if path.is_file() else None
        results.write_meta(out_dir, cfg, status="running", pid=os.getpid(), pid_start=results.process_start(os.getpid()),
                           plugin_folders=recorded,
                           resumed_from=checkpoint.k if checkpoint else 0)
        return _execute_into(cfg, built, out_dir, progress=progress, resume=checkpoint)


def _recorded_folders(out_dir: Path) -> list[str]:
    """The plug-in folders ``meta.json`` recorded when the run started (kept across rewrites)."""
    import json

    try:
        folders = json.loads((out_dir / "meta.json").read_text()).get("plugin_folders", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in folders if isinstance(f, str)] if isinstance(folders, list) else []


def _execute_into(cfg: RunConfig, built: Any, out_dir: Path | None, *, progress: bool,
                  resume: Any) -> pd.DataFrame:
    """Run ``built``; with a folder, checkpoint into it while running and write its files at the end."""
    every = cfg.checkpoint_interval() if out_dir is not None else 0
    reached = [resume.k if resume is not None else 0]  # the round the latest checkpoint holds

    def on_checkpoint(checkpoint: Any) -> None:
        assert out_dir is not None
        results.write_checkpoint(out_dir / results.CHECKPOINT, checkpoint)
        reached[0] = checkpoint.k

    try:
        result, wall = execute(cfg, built, progress=progress, checkpoint_every=every,
                               on_checkpoint=on_checkpoint if every else None, resume=resume)
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM under the CLI (results.Interrupted)
        if out_dir is not None:
            signum = getattr(e, "signum", signal.SIGINT)
            results.write_meta(out_dir, cfg, status="interrupted", signal=signal.Signals(signum).name,
                               checkpoint_round=reached[0] if (out_dir / results.CHECKPOINT).is_file() else 0,
                               plugin_folders=_recorded_folders(out_dir))
        raise
    except BaseException as e:
        if out_dir is not None:
            results.write_meta(out_dir, cfg, status="failed", error=f"{type(e).__name__}: {e}",
                               traceback=traceback.format_exc(), plugin_folders=_recorded_folders(out_dir))
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
                           wall_time_s=round(wall, 3), comm_rounds=result.counters.comm_rounds,
                           plugin_folders=_recorded_folders(out_dir), **extra)
        (out_dir / results.CHECKPOINT).unlink(missing_ok=True)  # the run is over
    return df
