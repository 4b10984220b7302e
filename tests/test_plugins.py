"""Plug-ins in every registry: user code by dotted path and by entry point, run through the real
``fedopt`` command (no ``PYTHONPATH``), and every way of getting one wrong: one line, exit code 2."""

import contextlib
import multiprocessing as mp
import os
import re
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import tomli_w
from helpers import cli_in_process

import topologies
from fedopt.config import check_params, load_config
from fedopt.errors import ConfigError
from fedopt.registry import ALGORITHMS, DATASETS, ENGINES, PARTITIONERS, PROBLEMS, Registry
from topologies.plugins import PluginError, PluginRegistry, active_paths, check_signature, load_path, plugin_path

# ``-P``: the command's own folder is not put on sys.path, so, as with the installed ``fedopt``
# script, only fedopt's --- not Python's --- rules decide where a plug-in is imported from
FEDOPT = [sys.executable, "-P", "-m", "fedopt.cli"]

USER_DATA = """
    import numpy as np

    from fedopt.data import Dataset


    def tiny(*, samples: int = 240, features: int = 6) -> Dataset:
        \"\"\"Three Gaussian blobs, 3/4 train and 1/4 test.\"\"\"
        rng = np.random.default_rng(0)
        y = np.arange(samples) % 3
        x = (rng.normal(size=(samples, features)) * 0.3 + y[:, None]).astype(np.float32)
        cut = samples * 3 // 4
        return Dataset("tiny", x[:cut], y[:cut].astype(np.int64), x[cut:], y[cut:].astype(np.int64), 3)


    def round_robin(*, offset: int = 0):
        \"\"\"Row i goes to client (i + offset) mod M.\"\"\"
        def partition(labels, num_clients, seed):
            idx = np.arange(len(labels))
            return [idx[(idx + offset) % num_clients == c] for c in range(num_clients)]
        return partition
"""

USER_GRAPHS = """
    import networkx as nx


    def ladder(n, *, seed=0):
        return nx.ladder_graph(n // 2)
"""


def _env(pythonpath: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def _fedopt(*args: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDOPT, *args], cwd=cwd, env=_env(pythonpath), capture_output=True, text=True,
                          timeout=300)


def _write(folder: Path, name: str, source: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(textwrap.dedent(source))


def _config(**tables) -> dict:
    """MA-DSBO, 2 rounds, on hyper-cleaning of 6 clients; ``tables`` replace whole tables."""
    raw = {"seed": 0, "clients": 6, "rounds": 2, "eval_every": 2, "threads": 1,
           "problem": {"name": "hyper_cleaning", "params": {"corruption": 0.4, "reg": 0.001}},
           "data": {"name": "digits"}, "partition": {"name": "iid"},
           "algorithm": {"name": "ma_dsbo", "params": {"outer_lr": 1.0, "inner_lr": 0.5, "z_lr": 0.5, "inner_steps": 2,
                                                       "z_steps": 2, "batch_size": 8}},
           "topology": {"name": "ring"}}
    raw.update(tables)
    return raw


def _dump(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(raw))
    return path


def _one_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("fedopt: error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


# ---- (a) user code, no algorithm: a dataset, a partitioner and a topology by dotted path ------------

def test_user_dataset_partitioner_and_topology_run_from_the_config_folder_and_the_cwd(tmp_path, monkeypatch):
    """The dataset and the partitioner live next to the config (conf/), the graph in the current
    folder; neither is on PYTHONPATH. The command and ``fedopt.run`` give the same numbers."""
    # unique module names: fedopt.run below imports them into this process, for good
    mod, graphs = f"user_data_{uuid.uuid4().hex[:8]}", f"user_graphs_{uuid.uuid4().hex[:8]}"
    _write(tmp_path / "conf", f"{mod}.py", USER_DATA)
    _write(tmp_path, f"{graphs}.py", USER_GRAPHS)
    cfg = _dump(tmp_path / "conf" / "run.toml", _config(
        data={"name": f"{mod}:tiny", "params": {"samples": 180}},
        partition={"name": f"{mod}:round_robin", "params": {"offset": 1}},
        topology={"name": f"{graphs}:ladder"}))
    r = _fedopt("run", "conf/run.toml", "--out", "out", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"config.toml", "metrics.csv", "meta.json"}
    saved = (tmp_path / "out" / "config.toml").read_text()
    assert f'name = "{mod}:round_robin"' in saved and f'name = "{graphs}:ladder"' in saved
    cli = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert {"test_acc", "consensus_x"} <= set(cli.metric)

    import fedopt

    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    api = fedopt.run(cfg)
    assert sys.path == before  # the folders were there only during the call
    pd.testing.assert_frame_equal(api.reset_index(drop=True), cli, check_dtype=False)


def test_topology_show_finds_a_graph_in_the_current_folder(tmp_path):
    _write(tmp_path, "user_graphs.py", USER_GRAPHS)
    r = _fedopt("topology", "show", "user_graphs:ladder", "--n", "8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "nodes 8  edges 10" in r.stdout


# ---- (b) broken plug-ins: one line naming the plug-in, exit code 2, nothing written --------------

PLUGS = """
    NOT_CALLABLE = 3


    def problem_without_context(*, k: int = 1):
        return k


    def algo_positional(lr, *, k: int = 1):
        return lr


    def algo_raises(*, k: int = 1):
        raise ZeroDivisionError("the plug-in divided by zero")


    def engine_without_problem(*, k: int = 1):
        return k


    def bad_annotations(*, k: "NoSuchType" = 1):
        return k


    def algo_returns_int(*, k: int = 1):
        return k


    def problem_returns_none(context, /, *, k: int = 1):
        return None


    class Factories:
        pass
"""

BROKEN = {  # case: (table, plug-in name, what the line says)
    "missing module": ("algorithm", "no_such_module_xyz:fedx", "cannot import module 'no_such_module_xyz'"),
    "module raises on import": ("problem", "raises_on_import:make",
                                "importing module 'raises_on_import' raised RuntimeError: plug-in refuses to load$"),
    "syntax error": ("data", "syntax_error:tiny", "importing module 'syntax_error' raised SyntaxError: "),
    "missing dependency": ("data", "needs_dep:tiny",
                           "importing module 'needs_dep' raised ModuleNotFoundError: No module named 'no_such_dep_xyz'"),
    "missing attribute": ("partition", "plugs:nope", "module 'plugs' has no attribute 'nope'"),
    "missing nested attribute": ("partition", "plugs:Factories.iid", "'plugs:Factories' has no attribute 'iid'"),
    "not callable": ("engine", "plugs:NOT_CALLABLE", "is not callable \\(got a value of type 'int'\\)"),
    "path without attribute": ("topology", "plugs:", "is not a valid plug-in path; the attribute part is empty"),
    "path without module": ("algorithm", ":fedmbo", "is not a valid plug-in path; the module part is empty"),
    "path with two colons": ("problem", "a:b:c", "is not a valid plug-in path; expected .*exactly one ':'"),
    "problem without context": ("problem", "plugs:problem_without_context",
                                "cannot be called as factory\\(context, \\*\\*params\\): .*positional"),
    "engine without problem": ("engine", "plugs:engine_without_problem", "cannot be called as factory\\(problem, "),
    "required positional parameter": ("algorithm", "plugs:algo_positional",
                                      "required positional parameter 'lr'; parameters must be keyword-only"),
    "factory raises": ("algorithm", "plugs:algo_raises", "raised ZeroDivisionError: the plug-in divided by zero$"),
    "unreadable annotations": ("algorithm", "plugs:bad_annotations",
                               "cannot read the type annotations of its factory \\(NameError: "),
    "topology module missing": ("topology", "no_such_graphs:ring", "topology 'no_such_graphs:ring': cannot import"),
    "topology module raises": ("topology", "raises_on_import:graph", "raised RuntimeError: plug-in refuses to load$"),
    "algorithm of the wrong type": ("algorithm", "plugs:algo_returns_int",
                                    "returned int, not a FederatedAlgorithm or DecentralizedAlgorithm$"),
    "problem of the wrong type": ("problem", "plugs:problem_returns_none", "returned NoneType, not a AbstractBilevelProblem"),
    "unknown name": ("algorithm", "fedmbo_plus",
                     "unknown algorithm 'fedmbo_plus'; available: .*fedmbo.* \\(or a plug-in 'package.module:factory'\\)"),
    "dotted name without colon": ("data", "plugs.tiny", "unknown dataset .*did you mean 'plugs:tiny'\\?$"),
}


@pytest.fixture(scope="module")
def broken_runs(tmp_path_factory):
    """Every BROKEN case through the command, four at a time (each is a fresh interpreter)."""
    root = tmp_path_factory.mktemp("broken")
    _write(root, "plugs.py", PLUGS)
    _write(root, "raises_on_import.py", 'raise RuntimeError("plug-in refuses to load\\nsecond line")\n')
    _write(root, "syntax_error.py", "def tiny(:\n    pass\n")
    _write(root, "needs_dep.py", "import no_such_dep_xyz\n")

    def args(case):
        table, name, _ = BROKEN[case]
        folder = root / re.sub(r"\W", "_", case)
        _dump(folder / "run.toml", _config(**{table: {"name": name}}))
        return "run", str(folder / "run.toml"), "--out", str(folder / "out"), "--quiet"

    # a few through a fresh interpreter (the installed command's path), the rest through the same
    # ``main`` in this process (a fresh interpreter costs 4-8 s of torch import per case)
    fresh = ["missing module", "module raises on import", "problem without context", "factory raises"]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        runs = dict(zip(fresh, pool.map(lambda c: _fedopt(*args(c), cwd=root), fresh), strict=True))
    for case in BROKEN:
        if case not in fresh:
            runs[case] = cli_in_process(*args(case), cwd=root)
    return root, runs



@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_plugin_is_one_line_exit_2_and_writes_nothing(case, broken_runs):
    root, runs = broken_runs
    r = runs[case]
    _, name, pattern = BROKEN[case]
    assert r.returncode == 2, r.stderr
    err = _one_line(r)
    assert repr(name) in err, err
    assert re.search(pattern, err.rstrip("\n")), err
    assert not (root / re.sub(r"\W", "_", case) / "out").exists()


def test_broken_plugins_span_every_registry():
    assert {table for table, _, _ in BROKEN.values()} == {"algorithm", "problem", "data", "partition", "engine",
                                                         "topology"}
    assert len(BROKEN) >= 10


# ---- (c) entry points of an installed distribution ------------------------------------------------

def _fake_site(tmp_path: Path) -> Path:
    """``site/`` as site-packages would hold an installed ``myplug`` 0.1 with entry points."""
    site = tmp_path / "site"
    _write(site / "myplug", "__init__.py", USER_DATA + USER_GRAPHS)
    dist = site / "myplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""
        [fedopt.datasets]
        myplug_tiny = myplug:tiny
        [fedopt.partitioners]
        myplug_round_robin = myplug:round_robin
        [fedopt.topologies]
        myplug_ladder = myplug:ladder
        [fedopt.algorithms]
        myplug_missing = myplug.missing:algo
        myplug_no_attr = myplug:no_such_factory
    """))
    return site


def test_entry_point_plugins_by_name(tmp_path):
    site = _fake_site(tmp_path)
    _dump(tmp_path / "run.toml", _config(data={"name": "myplug_tiny"}, partition={"name": "myplug_round_robin"},
                                         topology={"name": "myplug_ladder"}))
    r = _fedopt("run", "run.toml", "--out", "out", "--quiet", cwd=tmp_path, pythonpath=site)
    assert r.returncode == 0, r.stderr
    assert 'name = "myplug_round_robin"' in (tmp_path / "out" / "config.toml").read_text()


@pytest.mark.parametrize(("name", "pattern"), [
    ("myplug_missing", "algorithm 'myplug_missing': entry point myplug_missing = myplug.missing:algo in group "
                       "'fedopt.algorithms' of myplug 0.1 failed to load: ModuleNotFoundError: No module named "
                       "'myplug.missing'$"),
    ("myplug_no_attr", "algorithm 'myplug_no_attr': entry point .* failed to load: AttributeError: "),
    ("myplug_nope", "unknown algorithm 'myplug_nope'; available: .*myplug_missing, myplug_no_attr"),
])
def test_a_broken_entry_point_is_one_line(name, pattern, tmp_path):
    site = _fake_site(tmp_path)
    _dump(tmp_path / "run.toml", _config(algorithm={"name": name}))
    r = _fedopt("run", "run.toml", "--out", "out", "--quiet", cwd=tmp_path, pythonpath=site)
    assert r.returncode == 2
    assert re.search(pattern, _one_line(r).rstrip("\n")), r.stderr
    assert not (tmp_path / "out").exists()


# ---- sweeps: spawned processes and Ray workers import plug-ins from the sweep's folders ---------

def _plugin_sweep(tmp_path: Path) -> Path:
    """A sweep in sweep/ over a base config in base/, each folder holding a plug-in module that is
    nowhere else (the current folder is a third one)."""
    data_mod, graph_mod = f"sweep_data_{uuid.uuid4().hex[:8]}", f"sweep_graphs_{uuid.uuid4().hex[:8]}"
    _write(tmp_path / "base", f"{data_mod}.py", USER_DATA)
    _write(tmp_path / "sweep", f"{graph_mod}.py", USER_GRAPHS)
    _dump(tmp_path / "base" / "run.toml", _config(data={"name": f"{data_mod}:tiny"},
                                                  partition={"name": f"{data_mod}:round_robin"},
                                                  topology={"name": f"{graph_mod}:ladder"}))
    spec = tmp_path / "sweep" / "sweep.toml"
    spec.write_text(tomli_w.dumps({"base": "../base/run.toml", "grid": {"seed": [0, 1]}}))
    (tmp_path / "cwd").mkdir()
    return spec


def test_process_sweep_workers_see_the_plugin_folders(tmp_path):
    spec = _plugin_sweep(tmp_path)
    r = _fedopt("sweep", str(spec), "--executor", "process", "--workers", "2", "--out", str(tmp_path / "out"),
                "--quiet", cwd=tmp_path / "cwd")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 finished, 0 diverged, 0 failed" in r.stdout


@pytest.mark.slow
def test_ray_sweep_workers_import_the_plugin_folders(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from fedopt.sweep import load_sweep, run_sweep

    spec = _plugin_sweep(tmp_path)
    monkeypatch.chdir(tmp_path / "cwd")
    sweep = load_sweep(spec)
    root = tmp_path.resolve()
    assert [Path(p) for p in sweep.plugin_paths] == [root / "sweep", root / "base", root / "cwd"]
    report = run_sweep(sweep, tmp_path / "out", executor="ray", workers=2, progress=False)
    assert report.finished == 2 and not report.failed, report.failed


def test_spawned_processes_inherit_the_plugin_path(tmp_path):
    with plugin_path(tmp_path), mp.get_context("spawn").Pool(1) as pool:  # how the process executor starts
        child = pool.apply_async(eval, ("__import__('sys').path",)).get(timeout=120)
    assert str(tmp_path) in child and str(tmp_path) not in sys.path


# ---- (d) the resolver itself ---------------------------------------------------------------------

class _Err(Exception):
    pass


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A uniquely named module in a folder on sys.path: name -> its source."""
    name = f"resolver_{uuid.uuid4().hex[:8]}"
    _write(tmp_path, f"{name}.py", """
        VALUE = 3


        def make(n, *, seed=0):
            return ("made", n, seed)


        class Box:
            @staticmethod
            def factory(*, size: int = 2):
                return size


        def positional_only(a, b, /):
            return a
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _registry(**kw) -> PluginRegistry:
    return PluginRegistry("widget", group="fedopt.widgets", error=_Err, **kw)


def test_registered_names_and_duplicates():
    reg = _registry()

    @reg.register("one")
    def one():
        return 1

    assert reg.get("one") is one and "one" in reg and reg.names() == ["one"] and "two" not in reg
    reg.register("one")(one)  # the same function again is fine
    with pytest.raises(_Err, match="widget 'one' is registered twice"):
        reg.register("one")(lambda: 2)


def test_dotted_paths_plain_and_nested(user_module):
    reg = _registry(positional=("n",))
    assert reg.get(f"{user_module}:make")(4) == ("made", 4, 0)
    assert load_path(f"{user_module}:Box.factory")(size=5) == 5
    assert load_path(f"{user_module}:VALUE") == 3
    assert reg.is_plugin(f"{user_module}:make") and f"{user_module}:make" not in reg.names()


@pytest.mark.parametrize(("path", "message"), [
    ("a:", "the attribute part is empty"),
    (":b", "the module part is empty"),
    ("a:b:c", "exactly one ':'"),
    ("a b:c", "'a b' is not a dotted Python name"),
    ("a:b-c", "'b-c' is not a dotted Python name"),
    (".rel:f", "'.rel' is not a dotted Python name"),
    ("no_such_module_q:f", "cannot import module 'no_such_module_q'"),
])
def test_bad_paths(path, message):
    with pytest.raises(PluginError, match=re.escape(message)):
        load_path(path)
    with pytest.raises(_Err, match=f"^widget {re.escape(repr(path))}: .*{re.escape(message)}"):
        _registry().get(path)


def test_import_failures_name_the_exception_on_one_line(tmp_path, monkeypatch):
    name = f"explodes_{uuid.uuid4().hex[:8]}"
    _write(tmp_path, f"{name}.py", "import sys\nsys.exit('nope')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(_Err, match=f"importing module '{name}' raised SystemExit: nope$"):
        _registry().get(f"{name}:f")
    assert name not in sys.modules


def test_attributes_and_callables(user_module):
    reg = _registry()
    with pytest.raises(_Err, match=f"module '{user_module}' has no attribute 'missing'"):
        reg.get(f"{user_module}:missing")
    with pytest.raises(_Err, match=f"'{user_module}:Box' has no attribute 'nope'"):
        reg.get(f"{user_module}:Box.nope")
    with pytest.raises(_Err, match="is not callable \\(got a value of type 'int'\\); expected a factory called as factory\\(\\*\\*params\\)"):
        reg.get(f"{user_module}:VALUE")


def test_signature_checks(user_module):
    with pytest.raises(_Err, match="cannot be called as factory\\(context, \\*\\*params\\)"):
        _registry(positional=("context",)).get(f"{user_module}:Box.factory")
    with pytest.raises(_Err, match="required positional parameter 'b'"):
        _registry(positional=("a",)).get(f"{user_module}:positional_only")
    assert _registry(positional=("a", "b")).get(f"{user_module}:positional_only")(1, 2) == 1

    def kw_or_pos(n, p, *, seed=0):
        return n

    assert check_signature(kw_or_pos, ("n",), keyword_only=False) is None  # p can be passed by keyword
    assert "required positional parameter 'p'" in check_signature(kw_or_pos, ("n",), keyword_only=True)
    assert check_signature(len, ("x",), keyword_only=True) is None


def test_unknown_names_list_the_available_ones_and_the_path_form():
    reg = _registry()
    reg.register("alpha")(lambda: 1)
    with pytest.raises(_Err, match="^unknown widget 'beta'; available: alpha \\(or a plug-in 'package.module:factory'\\)$"):
        reg.get("beta")
    with pytest.raises(_Err, match="did you mean 'pkg.mod:fn'\\?$"):
        reg.get("pkg.mod.fn")
    with pytest.raises(_Err, match="name must be a non-empty string"):
        reg.get("")


def _entry_point_site(tmp_path, monkeypatch, module: str, lines: str) -> None:
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fedopt.widgets]\n{lines}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_points(user_module, tmp_path, monkeypatch):
    _entry_point_site(tmp_path, monkeypatch, user_module,
                      f"good = {user_module}:make\nnested = {user_module}:Box.factory\n"
                      f"gone = {user_module}:missing\nbare = {user_module}\n")
    reg = _registry(positional=("n",))
    reg.register("builtin")(lambda n: n)
    assert reg.names() == ["bare", "builtin", "gone", "good", "nested"]
    assert "good" in reg and reg.is_plugin("good")
    assert reg.get("good")(3) == ("made", 3, 0)
    assert _registry().get("nested")(size=7) == 7
    with pytest.raises(_Err, match=f"^widget 'gone': entry point gone = {user_module}:missing in group "
                                   f"'fedopt.widgets' of {user_module} 0.1 failed to load: AttributeError: "):
        reg.get("gone")
    with pytest.raises(_Err, match="entry point bare = .* is malformed; expected 'package.module:factory'"):
        reg.get("bare")


def test_plugin_path_is_scoped_and_recorded(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    before = list(sys.path)
    with plugin_path(a, b, a) as added:
        assert sys.path[:2] == [str(a), str(b)] and added == [str(a), str(b)]
        assert active_paths() == [str(a), str(b)]
        with plugin_path(b):
            assert sys.path[0] == str(b)
        assert sys.path[:2] == [str(a), str(b)] and active_paths() == [str(a), str(b)]
    assert sys.path == before and active_paths() == []


# ---- the fedopt registries on top of it ------------------------------------------------------------

def test_fedopt_registries_use_the_shared_resolver():
    for reg, group in [(ALGORITHMS, "fedopt.algorithms"), (PROBLEMS, "fedopt.problems"),
                       (DATASETS, "fedopt.datasets"), (PARTITIONERS, "fedopt.partitioners"),
                       (ENGINES, "fedopt.engines")]:
        assert isinstance(reg, PluginRegistry) and reg.group == group and reg.error is ConfigError
        for name in reg.registered:  # every built-in passes the signature check its plug-ins get
            reg.get(name)
    assert topologies.registry.REGISTRY.group == "fedopt.topologies"
    assert topologies.registry.REGISTRY.error is topologies.TopologyError
    assert "fedmbo" in ALGORITHMS and "fedmbo" in ALGORITHMS.names()


def test_a_plugin_factory_that_raises_is_a_config_error_and_keeps_its_signature(user_module):
    reg: Registry = Registry("gadget")
    wrapped = reg.get(f"{user_module}:Box.factory")
    assert check_params(wrapped, {"size": 3}, "gadget.params", "gadget") == {"size": 3}
    with pytest.raises(ConfigError, match="unknown key gadget.params.colour"):
        check_params(wrapped, {"colour": 3}, "gadget.params", "gadget")
    assert wrapped(size=4) == 4
    with pytest.raises(ConfigError, match=f"^gadget '{user_module}:Box.factory' raised TypeError: "):
        wrapped(size=4, colour=1)


def test_a_config_names_plugins_in_every_table(tmp_path, monkeypatch):
    mod = f"cfg_data_{uuid.uuid4().hex[:8]}"
    _write(tmp_path, f"{mod}.py", USER_DATA + USER_GRAPHS)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(_config(data={"name": f"{mod}:tiny", "params": {"samples": 90}},
                              partition={"name": f"{mod}:round_robin"}, topology={"name": f"{mod}:ladder"}))
    assert cfg.data.params == {"samples": 90} and cfg.partition.name == f"{mod}:round_robin"
    with pytest.raises(ConfigError, match="unknown key data.params.rows for dataset"):
        load_config(_config(data={"name": f"{mod}:tiny", "params": {"rows": 90}}))
    with pytest.raises(ConfigError, match="data.params.samples must be an integer"):
        load_config(_config(data={"name": f"{mod}:tiny", "params": {"samples": "many"}}))


def test_only_plug_in_modules_travel_by_value(tmp_path, monkeypatch):
    """With the checkout itself as a plug-in folder (the current folder of a user working in it),
    fedopt, topologies and plots stay by reference (they are installed); a module that exists only
    in a plug-in folder travels by value."""
    import cloudpickle

    from fedopt.engines.wire import ship_plugins_by_value
    from topologies.plugins import plugin_path

    repo = Path(__file__).resolve().parents[1]
    name = f"lonely_{uuid.uuid4().hex[:8]}"
    _write(tmp_path, f"{name}.py", "def f():\n    return 3\n")
    with plugin_path(str(repo), str(tmp_path)):
        __import__(name)
        try:
            shipped = ship_plugins_by_value()
        finally:
            picklers = [cloudpickle]
            with contextlib.suppress(ImportError):
                import ray.cloudpickle

                picklers.append(ray.cloudpickle)
            for pickler in picklers:
                pickler.unregister_pickle_by_value(sys.modules[name])
            sys.modules.pop(name, None)
    assert name in shipped and not {"fedopt", "topologies", "plots"} & set(shipped)
