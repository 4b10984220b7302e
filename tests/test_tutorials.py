"""The tutorials in ``docs/tutorials`` run as written.

Each tutorial is read block by block, in order, in a working folder of its own (for
``own_algorithm.md`` a copy of ``examples/my_method``, for the others an empty folder):

* a fenced block preceded by ``<!-- file: PATH -->`` is a file: if ``PATH`` exists in the repository
  the block must equal it character for character (the tutorial shows the real file), otherwise the
  block is written to ``PATH`` in the working folder (a file the reader creates);
* a ``python`` block without a file marker is executed, all of a tutorial's in one namespace, with
  the working folder as the current folder and it and ``examples/my_method`` on ``sys.path``;
* in a ``bash`` block, every ``fedopt ...`` line is run as ``python -m fedopt.cli ...`` in the
  working folder, without ``PYTHONPATH``, and must exit with 0. ``pip install ...`` lines are not
  run (the test does not install packages; ``tests/test_example_plugin.py`` installs the example
  into a separate folder), ``cd examples/my_method`` is where the commands already run, and any
  other line fails the test: a command that is not run belongs in a ``text`` block.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from topologies.plugins import plugin_path

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"
EXAMPLE = ROOT / "examples" / "my_method"
NAMES = ["own_algorithm.md", "own_problem.md", "own_data.md"]

FENCE = re.compile(r"(?:^<!-- file: (?P<path>\S+) -->\n)?^```(?P<lang>\w*)\n(?P<body>.*?)^```[ \t]*$",
                   re.MULTILINE | re.DOTALL)


def blocks(text: str) -> list[tuple[str | None, str, str]]:
    """The fenced blocks of a tutorial in order: ``(file marker or None, language, body)``."""
    fences = [line for line in text.splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0, "a fenced block is not closed"
    found = [(m["path"], m["lang"], m["body"]) for m in FENCE.finditer(text)]
    assert len(found) == len(fences) // 2
    return found


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _shell_line(line: str, cwd: Path, *, in_example: bool) -> bool:
    """Run one line of a bash block; True if it ran a command."""
    line = line.strip()
    if not line or line.startswith("#"):
        return False
    if line.startswith("pip install "):  # not run: see the module docstring
        return False
    if in_example and line == "cd examples/my_method":  # the working folder is a copy of it
        return False
    args = shlex.split(line, comments=True)
    assert args[0] == "fedopt", f"a bash block line that is not run: {line!r} (use a text block)"
    r = subprocess.run([sys.executable, "-m", "fedopt.cli", *args[1:]], cwd=cwd, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"{line!r} exited with {r.returncode}:\n{r.stderr[-2000:]}"
    return True


@pytest.mark.parametrize("name", NAMES)
def test_the_tutorial_runs_as_written(name, tmp_path, monkeypatch):
    if name == "own_algorithm.md":
        work = tmp_path / "my_method"
        shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "runs",
                                                                     "sweeps"))
    else:
        work = tmp_path / "work"
        work.mkdir()
    monkeypatch.chdir(work)
    modules = set(sys.modules)
    namespace: dict = {"__name__": f"tutorial_{Path(name).stem}"}
    compared = written = executed = 0
    try:
        with plugin_path(EXAMPLE, work):
            for i, (path, lang, body) in enumerate(blocks((TUTORIALS / name).read_text())):
                if path is not None:
                    if (ROOT / path).is_file():
                        assert body == (ROOT / path).read_text(), f"{name}: the block of {path} differs from the file"
                        compared += 1
                    else:
                        (work / path).parent.mkdir(parents=True, exist_ok=True)
                        (work / path).write_text(body)
                        written += 1
                elif lang == "python":
                    exec(compile(body, f"{name}, block {i}", "exec"), namespace)  # noqa: S102
                    executed += 1
                elif lang == "bash":
                    for line in body.splitlines():
                        executed += _shell_line(line, work, in_example=name == "own_algorithm.md")
    finally:
        for mod in set(sys.modules) - modules:  # the tutorial's own modules live in tmp_path
            if str(tmp_path) in str(getattr(sys.modules[mod], "__file__", None) or ""):
                del sys.modules[mod]
    assert executed > 0
    if name != "own_data.md":
        assert compared > 0  # the tutorial shows files of examples/my_method
    if name != "own_problem.md":
        assert written > 0
