"""Run folders: what a run writes and how.

``DIR/config.toml`` (the resolved config), ``DIR/metrics.csv`` (long format: ``round, comm_round,
metric, value``), ``DIR/meta.json`` (versions, seed, wall time, status: running / finished /
diverged / failed) and ``DIR/convergence.png``. Every file is written atomically (temporary file,
then rename), and a run never writes into a folder that already exists.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w

from fedopt.config import RunConfig
from fedopt.errors import ConfigError

__all__ = ["atomic_write", "claim_folder", "versions", "write_config", "write_meta"]


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_free(out: Path) -> None:
    """Fail (before any work) if ``out`` exists."""
    if out.exists():
        raise ConfigError(f"output folder {str(out)!r} already exists; choose another --out (nothing was written)")


def claim_folder(out: Path) -> None:
    """Create ``out``; an existing folder is an error, never reused."""
    check_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.mkdir()
    except FileExistsError:
        raise ConfigError(f"output folder {str(out)!r} already exists; choose another --out (nothing was written)") from None


def versions() -> dict[str, str]:
    """Versions of the packages that determine a run's numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("fedopt", "torch", "numpy", "flwr-datasets", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_config(out: Path, cfg: RunConfig) -> None:
    atomic_write(out / "config.toml", tomli_w.dumps(cfg.to_dict()))


def write_meta(out: Path, cfg: RunConfig, **fields: Any) -> None:
    meta = {
        "seed": cfg.seed,
        "host": socket.gethostname(),
        "argv": sys.argv,
        "versions": versions(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
    }
    atomic_write(out / "meta.json", json.dumps(meta, indent=2, default=str) + "\n")
