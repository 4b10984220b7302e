"""Run folders: what a run writes and how.

``DIR/config.toml`` (the resolved config), ``DIR/metrics.csv`` (long format: ``round, comm_round,
metric, value``), ``DIR/meta.json`` (versions, seed, wall time, status), ``DIR/convergence.png`` and,
while the run is not over, ``DIR/checkpoint.pt`` (:func:`write_checkpoint`). Every file is written
atomically (temporary file, then rename), and a new run never writes into a folder that already
exists; ``fedopt run --resume DIR`` continues the run of an existing folder from its checkpoint.

Status values in ``meta.json``:

* ``running``: the run has started and not ended; if no process is running it, it was killed
  (``fedopt run --resume DIR`` continues it from its last checkpoint);
* ``finished``: all outer iterations ran, or ``stop_when`` ended the run;
* ``diverged``: a metric or the state became NaN/inf (``diverged_round`` says when);
* ``failed``: an exception ended the run (``error`` and ``traceback`` say which);
* ``interrupted``: SIGINT or SIGTERM stopped the run (``signal`` says which, ``checkpoint_round``
  the outer iteration ``--resume`` continues from); the checkpoint is kept.

While a run is ``running``, ``meta.json`` also holds the ``pid`` and ``host`` of its process (and,
on Linux, ``pid_start``, when that process started), so a reader can tell a live run from a killed
one (SIGKILL leaves no chance to write anything): :func:`run_is_alive`.

Files are created with the mode a plain ``open()`` would give them (``0o666`` less the umask),
folders ``0o777`` less the umask.
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

__all__ = ["CHECKPOINT", "Interrupted", "atomic_write", "cannot_create", "claim_folder", "default_mode", "process_start",
           "read_checkpoint", "run_is_alive", "versions", "write_checkpoint", "write_config", "write_meta"]

CHECKPOINT = "checkpoint.pt"


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGTERM) turned into an exception, so the run or sweep stops the way
    SIGINT stops it: files closed, workers ended, the run folder marked ``interrupted``. The CLI
    raises it from its SIGTERM handler; ``signum`` is the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _umask() -> int:
    """This process's umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read (set and restore at once)
    os.umask(mask)
    return mask


def default_mode(folder: bool = False) -> int:
    """The mode ``open()`` (``0o666``) or ``mkdir()`` (``0o777``) would give a new file or folder."""
    return (0o777 if folder else 0o666) & ~_umask()


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_mode())  # mkstemp makes 0o600; a run's files are as readable as open()'s
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
    """Create ``out``; an existing folder is an error, never reused, and a folder that cannot be
    created (read-only, below a regular file) is a :class:`ConfigError`."""
    check_free(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.mkdir()
    except FileExistsError:
        if out.parent.is_dir():
            raise ConfigError(f"output folder {str(out)!r} already exists; choose another --out "
                              "(nothing was written)") from None
        raise ConfigError(cannot_create(out, FileExistsError("a parent is not a folder"))) from None
    except OSError as e:
        raise ConfigError(cannot_create(out, e)) from None


def cannot_create(out: Path, e: OSError) -> str:
    """The one line for an output folder that cannot be created or written."""
    reason = e.strerror or str(e) or type(e).__name__
    return f"cannot write output folder {str(out)!r}: {reason}; choose another --out"


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux); ``None`` if unknown."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def run_is_alive(meta: dict[str, Any]) -> bool | None:
    """Whether the process recorded in a ``running`` run's ``meta.json`` (``pid``, ``host`` and,
    on Linux, ``pid_start``) still runs: ``True`` / ``False`` on this host, ``None`` when the run is
    on another host or recorded no pid. A pid reused by a later process does not count."""
    pid = meta.get("pid")
    if not isinstance(pid, int) or meta.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # some other user's process has that pid
        pass
    started = meta.get("pid_start")
    return not (isinstance(started, int) and process_start(pid) not in (None, started))


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


def write_checkpoint(path: Path, checkpoint: Any) -> None:
    """Write a :class:`fedopt.simulation.Checkpoint` atomically: the state's fields, the counters and
    the records so far (plain tensors, numbers and strings: loadable with ``weights_only=True``)."""
    import dataclasses
    import io

    import torch

    state = checkpoint.state
    fields = state._asdict() if hasattr(state, "_asdict") else dict(state)
    payload = {"format": 1, "k": checkpoint.k, "state": fields, "state_type": type(state).__name__,
               "counters": dataclasses.asdict(checkpoint.counters), "records": list(checkpoint.records)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(path, buf.getvalue())


def read_checkpoint(path: Path, device: Any = "cpu") -> Any:
    """The :class:`fedopt.simulation.Checkpoint` written by :func:`write_checkpoint` (its ``state`` a
    mapping of fields, rebuilt into the algorithm's state type on resume)."""
    import torch

    from fedopt.simulation import Checkpoint, Counters

    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        counters = Counters(**payload["counters"])
        return Checkpoint(int(payload["k"]), dict(payload["state"]), counters,
                          [tuple(r) for r in payload["records"]])
    except Exception as e:  # noqa: BLE001 - a damaged file is bad input
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}); "
                          "delete it to restart the run from the beginning") from None
