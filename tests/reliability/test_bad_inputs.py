"""Bad input, every kind a user can give: exactly one line on stderr, exit code 2 (or the API's
``ConfigError``), no traceback, and the folder exactly as it was (nothing written, removed or
changed). Everything runs in this process (``helpers.refused``): no new interpreter per case."""

from __future__ import annotations

import fcntl
import json
import os
import stat

import pandas as pd
import pytest
import tomli_w
from helpers import cli_in_process, dec_config, folder_snapshot, quadratic_config, refused

import fedopt
from fedopt.errors import ConfigError
from fedopt.sweep import load_sweep, run_sweep

FED = {"outer_lr": 0.1, "inner_lr": 0.1}


def _alg(name: str, **params) -> str:
    """``--set algorithm={...}`` for algorithm ``name`` with inline-TOML ``params``."""
    inner = ", ".join(f"{k} = {v}" for k, v in params.items())
    return f"algorithm={{name = \"{name}\", params = {{{inner}}}}}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One working folder for every case (a refused command changes nothing, which each case
    asserts): a federated config ``q.toml``, a decentralized one ``d.toml``, a binary file, a
    regular file, a finished run ``done/``, a finished sweep ``swept/`` and the sweep files of
    :data:`SWEEPS`."""
    tmp_path = tmp_path_factory.mktemp("bad")
    (tmp_path / "q.toml").write_text(tomli_w.dumps(quadratic_config(clients=4, rounds=2)))
    (tmp_path / "d.toml").write_text(tomli_w.dumps(dec_config("ma_dsbo", "ring", n=6, rounds=2)))
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00\x01\x89PNG\r\n\x1a\n")
    (tmp_path / "broken.toml").write_text("seed = = 1\n")
    (tmp_path / "a_file").write_text("not a folder\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("precious\n")
    assert cli_in_process("run", "q.toml", "--out", "done", "--quiet", cwd=tmp_path).returncode == 0
    (tmp_path / "one.toml").write_text(tomli_w.dumps({"base": quadratic_config(clients=4, rounds=2),
                                                       "grid": {"seed": [0]}}))
    assert cli_in_process("sweep", "one.toml", "--out", "swept", "--quiet", cwd=tmp_path).returncode == 0
    for i, (spec, _) in enumerate(SWEEPS.values()):
        (tmp_path / f"sweep{i}.toml").write_text(tomli_w.dumps(spec))
    (tmp_path / "other.toml").write_text(tomli_w.dumps(_sweep(grid={"seed": [5]})))
    return tmp_path


# ---- `fedopt run`: config values (--set on q.toml / d.toml) ----------------------------------

RUN = {
    # key or value not allowed
    "unknown top-level key": (["--set", "colour=1"], "unknown top-level key 'colour'"),
    "unknown algorithm key": (["--set", "algorithm.params.colour=1"], "unknown key algorithm.params.colour"),
    "wrong type": (["--set", "algorithm.params.inner_steps=abc"], "algorithm.params.inner_steps must be an integer"),
    "unknown algorithm": (["--set", "algorithm.name=nope"], "unknown algorithm 'nope'"),
    "unknown problem": (["--set", "problem.name=nope"], "unknown problem 'nope'"),
    "unknown engine": (["--set", "engine.name=nope"], "unknown engine 'nope'"),
    "unknown engine key": (["--set", "engine.params.colour=1"], "unknown key engine.params.colour"),
    "dtype": (["--set", "dtype=\"float16\""], "dtype must be one of"),
    "device": (["--set", "device=\"tpu\""], "device 'tpu'"),
    "negative rounds": (["--set", "rounds=-3"], "rounds must be >= 0"),
    "eval_every 0": (["--set", "eval_every=0"], "eval_every must be >= 1"),
    "negative checkpoint_every": (["--set", "checkpoint_every=-1"], "checkpoint_every must be >= 0"),
    "negative threads": (["--set", "threads=-1"], "threads must be >= 0"),
    "negative seed": (["--set", "seed=-1"], "seed must be >= 0"),
    # huge integers: refused with the allowed range
    "clients 10**30": (["--set", f"clients={10**30}"], "allowed: 1..2147483647"),
    "seed 2**64": (["--set", f"seed={2**64}"], "allowed: 0..9223372036854775807"),
    "batch_size 10**12": (["--set", f"algorithm.params.batch_size={10**12}"],
                          "algorithm.params.batch_size must be in 1..2147483647"),
    "problem int 10**30": (["--set", f"problem.params.x_dim={10**30}"], "does not fit in 64 bits"),
    "float from a huge int": (["--set", f"algorithm.params.outer_lr={10**400}"], "too large for a float"),
    # step sizes
    "negative step": (["--set", "algorithm.params.outer_lr=-1"], "algorithm.params.outer_lr must be > 0"),
    "nan step": (["--set", "algorithm.params.inner_lr=nan"], "algorithm.params.inner_lr must be > 0, got nan"),
    "inf step fedmbo": (["--set", "algorithm.params.outer_lr=inf"], "algorithm.params.outer_lr must be a finite"),
    "inf neumann_lr fedmbo": (["--set", "algorithm.params.neumann_lr=inf"], "algorithm.params.neumann_lr must be a finite"),
    "inf step fednest": (["--set", _alg("fednest", **FED, neumann_lr="inf")], "neumann_lr must be a finite"),
    "inf step lfednest": (["--set", _alg("lfednest", outer_lr="inf", inner_lr=0.1, neumann_lr=0.1)],
                          "outer_lr must be a finite"),
    "inf step aid": (["--set", _alg("aid", outer_lr="inf", inner_lr=0.1, v_lr=0.1)], "outer_lr must be a finite"),
    "inf step soba": (["--set", _alg("soba", outer_lr=0.1, inner_lr=0.1, v_lr="inf")], "v_lr must be a finite"),
    "inf step s_tfbo": (["--set", _alg("s_tfbo", alpha0="inf")], "alpha0 must be a finite"),
    "inf eps s_tfbo": (["--set", _alg("s_tfbo", eps="inf")], "eps must be a finite"),
    "inf step d_tfbo": (["--set", _alg("d_tfbo", gamma0="inf")], "gamma0 must be a finite"),
    "inf tolerance d_tfbo": (["--set", _alg("d_tfbo", tolerance="inf")], "tolerance must be a finite"),
    # the federation
    "clients_per_round > clients": (["--set", "algorithm.params.clients_per_round=99"],
                                    "clients_per_round = 99 exceeds clients = 4"),
    "topology on a federated algorithm": (["--set", "topology.name=\"ring\""], "is federated; remove the [topology]"),
}

DEC = {
    "inf step ma_dsbo": (["--set", "algorithm.params.outer_lr=inf"], "outer_lr must be a finite"),
    "inf step ma_dsbo_gt": (["--set", "algorithm.name=\"ma_dsbo_gt\"", "--set", "algorithm.params.z_lr=inf"],
                            "z_lr must be a finite"),
    "inf step dbo": (["--set", _alg("dbo", **FED, z_lr="inf")], "z_lr must be a finite"),
    "inf step dbo_stochastic": (["--set", _alg("dbo_stochastic", outer_lr="inf", inner_lr=0.1, z_lr=0.1)],
                                "outer_lr must be a finite"),
    "theta 0": (["--set", "algorithm.params.theta=0"], "theta must be in (0, 1]"),
    "no topology": (["--set", "topology=\"\""], "topology.name must be a graph name"),
    "edge_dropout p not a number": (["--set", 'topology.schedule={name = "edge_dropout", params = {p = "abc"}}'],
                                    "topology.schedule.params.p must be a number"),
    "edge_dropout p out of range": (["--set", 'topology.schedule={name = "edge_dropout", params = {p = 1.5}}'],
                                    "topology.schedule.params.p must be a number"),
    "unknown mixing": (["--set", "topology.mixing=\"nope\""], "topology.mixing must be one of"),
    "unknown topology key": (["--set", "topology.colour=1"], "unknown key topology.colour"),
}


@pytest.mark.parametrize("case", list(RUN))
def test_run_refuses_a_bad_federated_config(case, folder):
    argv, message = RUN[case]
    refused("run", "q.toml", "--out", "new", "--quiet", *argv, cwd=folder, contains=message)


@pytest.mark.parametrize("case", list(DEC))
def test_run_refuses_a_bad_decentralized_config(case, folder):
    argv, message = DEC[case]
    refused("run", "d.toml", "--out", "new", "--quiet", *argv, cwd=folder, contains=message)


# ---- `fedopt run`: files, folders and arguments -----------------------------------------------

ARGS = {
    "binary config": (["run", "binary.toml"], "config file 'binary.toml' is not a text (UTF-8) file"),
    "not TOML": (["run", "broken.toml"], "is not valid TOML"),
    "missing config": (["run", "missing.toml"], "config file 'missing.toml' does not exist"),
    "no config": (["run"], "needs a CONFIG file"),
    "malformed --set": (["run", "q.toml", "--set", "algorithm.params.outer_lr"], "--set expects key=value"),
    "--set into a value": (["run", "q.toml", "--set", "seed.x=1"], "'seed' is not a table"),
    "unknown option": (["run", "q.toml", "--bogus"], "unrecognized arguments: --bogus"),
    "existing --out": (["run", "q.toml", "--out", "notes"], "'notes' already exists"),
    "--out is a file": (["run", "q.toml", "--out", "a_file"], "'a_file' already exists"),
    "--out below a file": (["run", "q.toml", "--out", "a_file/run"], "cannot write output folder 'a_file/run'"),
    "--out deeper below a file": (["run", "q.toml", "--out", "a_file/x/run"], "cannot write output folder"),
    "--out unwritable": (["run", "q.toml", "--out", "/proc/fedopt-run"], "cannot write output folder '/proc/fedopt-run'"),
    "--resume with --out": (["run", "--resume", "done", "--out", "x"], "--resume DIR takes no CONFIG"),
    "--resume not a run": (["run", "--resume", "notes"], "is not a run folder"),
    "--resume finished": (["run", "--resume", "done"], "has finished already"),
}


@pytest.mark.parametrize("case", list(ARGS))
def test_run_refuses_bad_files_folders_and_arguments(case, folder):
    argv, message = ARGS[case]
    refused(*argv, "--quiet", cwd=folder, contains=message)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused_for_run_and_sweep(folder):
    ro = folder / "ro"
    ro.mkdir(exist_ok=True)
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        refused("run", "q.toml", "--out", "ro/run", "--quiet", cwd=folder, contains="cannot write output folder")
        refused("sweep", "one.toml", "--out", "ro/sweep", cwd=folder, contains="cannot write output folder")
    finally:
        ro.chmod(0o755)


# ---- `fedopt sweep` -----------------------------------------------------------------------------

def _sweep(base=None, **spec) -> dict:
    return {"base": base or quadratic_config(clients=4, rounds=2), **spec}


def _with(**params) -> dict:
    raw = quadratic_config(clients=4, rounds=2)
    raw["algorithm"]["params"].update(params)
    return raw


SWEEPS = {
    # a bad point among good ones: refused before the first run, naming the point
    "negative step on an axis": (_sweep(grid={"algorithm.params.outer_lr": [0.1, -0.1]}),
                                 "sweep point (algorithm.params.outer_lr=-0.1): algorithm.params.outer_lr must be > 0"),
    "clients 4 x clients_per_round 8": (_sweep(_with(clients_per_round=8), grid={"seed": [0, 1]}),
                                        "sweep point (seed=0): algorithm.params.clients_per_round = 8 exceeds clients = 4"),
    "clients axis below clients_per_round": (_sweep(grid={"clients": [4, 2]}),
                                             "sweep point (clients=2): algorithm.params.clients_per_round = 4 exceeds"),
    "inf step on an axis": (_sweep(grid={"algorithm.params.inner_lr": [0.1, float("inf")]}),
                            "sweep point (algorithm.params.inner_lr=inf)"),
    "huge seed on an axis": (_sweep(grid={"seed": [0, 2**64 - 1]}), "allowed: 0..9223372036854775807"),
    "bad decentralized point": (_sweep(dec_config("ma_dsbo", "ring", n=6, rounds=2),
                                       grid={"algorithm.params.theta": [0.5, 2.0]}),
                                "sweep point (algorithm.params.theta=2.0): algorithm.params.theta must be in (0, 1]"),
    "edge_dropout p on an axis": (_sweep(dec_config("ma_dsbo", "ring", n=6, rounds=2),
                                         grid={"topology.schedule": [{"name": "edge_dropout", "params": {"p": "abc"}}]}),
                                  "topology.schedule.params.p must be a number"),
    # the spec itself
    "unknown axis key": (_sweep(grid={"algorithm.params.outer_learning_rate": [0.1]}), "unknown key"),
    "zip of unequal length": (_sweep(zip=[{"seed": [0, 1], "rounds": [5]}]), "unequal length"),
    "empty axis": (_sweep(grid={"seed": []}), "sweep axis 'seed' is empty"),
    "axis not a list": (_sweep(grid={"seed": 3}), "must be a list of values"),
    "unknown sweep key": (_sweep(grids={}), "unknown sweep key 'grids'"),
    "key on two axes": (_sweep(grid={"seed": [0]}, zip=[{"seed": [1]}]), "appears on two axes"),
    "threads 0": (_sweep(threads=0), "sweep threads must be an integer >= 1"),
    "no base": ({"grid": {"seed": [0]}}, "the sweep has no base config"),
    "missing base file": ({"base": "nowhere.toml"}, "does not exist"),
    "binary base file": ({"base": "binary.toml"}, "is not a text (UTF-8) file"),
}


@pytest.mark.parametrize("case", list(SWEEPS))
def test_sweep_refuses_a_bad_spec_before_any_run(case, folder):
    message = SWEEPS[case][1]
    name = f"sweep{list(SWEEPS).index(case)}.toml"
    refused("sweep", name, "--out", "new", cwd=folder, contains=message)  # not --quiet: still one line


SWEEP_ARGS = {
    "binary sweep file": (["sweep", "binary.toml"], "sweep file 'binary.toml' is not a text (UTF-8) file"),
    "not TOML": (["sweep", "broken.toml"], "is not valid TOML"),
    "missing sweep file": (["sweep", "missing.toml"], "sweep file 'missing.toml' does not exist"),
    "--workers 0": (["sweep", "one.toml", "--out", "new", "--workers", "0"], "--workers must be an integer >= 1"),
    "--workers negative": (["sweep", "one.toml", "--out", "new", "--workers", "-2"], "--workers must be an integer >= 1"),
    "--workers not a number": (["sweep", "one.toml", "--workers", "two"], "invalid int value: 'two'"),
    "unknown executor": (["sweep", "one.toml", "--out", "new", "--executor", "dask"], "unknown executor 'dask'"),
    "--address without ray": (["sweep", "one.toml", "--out", "new", "--address", "auto"], "--address is for the ray"),
    "--out below a file": (["sweep", "one.toml", "--out", "a_file/sw"], "cannot write output folder 'a_file/sw'"),
    "--out is a file": (["sweep", "one.toml", "--out", "a_file"], "exists and is not a sweep folder"),
    "--out unwritable": (["sweep", "one.toml", "--out", "/proc/fedopt-sweep"], "cannot write output folder"),
    "--out not a sweep folder": (["sweep", "one.toml", "--out", "notes"], "exists and is not a sweep folder"),
}


@pytest.mark.parametrize("case", list(SWEEP_ARGS))
def test_sweep_refuses_bad_files_folders_and_arguments(case, folder):
    argv, message = SWEEP_ARGS[case]
    refused(*argv, cwd=folder, contains=message)


def test_sweep_refuses_a_folder_holding_another_sweep(folder):
    refused("sweep", "other.toml", "--out", "swept", cwd=folder, contains="holds a different sweep")


def test_sweep_refuses_a_folder_another_sweep_holds(folder):
    fd = os.open(folder / "swept" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused("sweep", "one.toml", "--out", "swept", cwd=folder, contains="is in use by another fedopt sweep")
    finally:
        os.close(fd)


# ---- the Python API ------------------------------------------------------------------------------

API = {
    "run: inf step": lambda f: fedopt.run(_with(outer_lr=float("inf"))),
    "run: binary path": lambda f: fedopt.run(f / "binary.toml"),
    "run: huge clients": lambda f: fedopt.run({**quadratic_config(), "clients": 10**30}),
    "run: out below a file": lambda f: fedopt.run(f / "q.toml", out=f / "a_file" / "run"),
    "resume: not a run folder": lambda f: fedopt.resume(f / "notes"),
    "load_sweep: bad point": lambda f: load_sweep(_sweep(grid={"algorithm.params.outer_lr": [0.1, -0.1]})),
    "load_sweep: binary file": lambda f: load_sweep(f / "binary.toml"),
    "run_sweep: workers 0": lambda f: run_sweep(load_sweep(f / "one.toml"), f / "new", workers=0, progress=False),
    "run_sweep: out below a file": lambda f: run_sweep(load_sweep(f / "one.toml"), f / "a_file" / "x", progress=False),
}


@pytest.mark.parametrize("case", list(API))
def test_api_raises_config_error_and_writes_nothing(case, folder):
    before = folder_snapshot(folder)
    with pytest.raises(ConfigError) as e:
        API[case](folder)
    assert len(str(e.value).splitlines()) == 1
    assert folder_snapshot(folder) == before


# ---- what is written: modes as a plain open() gives them ------------------------------------------

def test_run_and_sweep_files_respect_the_umask(tmp_path):
    folder = tmp_path
    (folder / "q.toml").write_text(tomli_w.dumps(quadratic_config(clients=4, rounds=2)))
    (folder / "one.toml").write_text(tomli_w.dumps(_sweep(grid={"seed": [0]})))
    old = os.umask(0o022)
    try:
        assert cli_in_process("run", "q.toml", "--out", "r", "--quiet", cwd=folder).returncode == 0
        assert cli_in_process("sweep", "one.toml", "--out", "s", "--quiet", cwd=folder).returncode == 0
    finally:
        os.umask(old)
    paths = [p for p in [*(folder / "r").rglob("*"), *(folder / "s").rglob("*")] if not p.name.startswith(".lock")]
    modes = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert {m for p, m in modes.items() if (folder / p).is_file()} == {0o644}, modes
    assert {m for p, m in modes.items() if (folder / p).is_dir()} == {0o755}, modes
    assert json.loads((folder / "r" / "meta.json").read_text())["status"] == "finished"
    assert len(pd.read_csv(folder / "s" / "results.csv"))


# ---- plug-ins: the console script and the API search the same folders ---------------------------

def _plugin_config(module: str) -> dict:
    raw = quadratic_config(clients=4, rounds=2)
    raw["algorithm"]["name"] = f"{module}:factory"
    return raw


def test_plugins_resolve_from_the_same_folders_in_the_cli_and_the_api(tmp_path, monkeypatch):
    """The config's folder, then the current folder; a module anywhere else is one error line."""
    plugin = "from fedopt.algorithms.federated.fedmbo import fedmbo as factory\n"
    sub, elsewhere = tmp_path / "configs", tmp_path / "elsewhere"
    sub.mkdir()
    elsewhere.mkdir()
    (sub / "plug_in_config_dir.py").write_text(plugin)
    (tmp_path / "plug_in_cwd.py").write_text(plugin)
    (elsewhere / "plug_in_elsewhere.py").write_text(plugin)
    for module in ("plug_in_config_dir", "plug_in_cwd", "plug_in_elsewhere"):
        (sub / f"{module}.toml").write_text(tomli_w.dumps(_plugin_config(module)))
    for module in ("plug_in_config_dir", "plug_in_cwd"):  # the console script, then the API
        done = cli_in_process("run", f"configs/{module}.toml", "--out", f"out-{module}", "--quiet", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    monkeypatch.chdir(tmp_path)
    for module in ("plug_in_config_dir", "plug_in_cwd"):
        assert fedopt.run(sub / f"{module}.toml").attrs["status"] == "finished"
    assert fedopt.run(_plugin_config("plug_in_cwd")).attrs["status"] == "finished"  # a mapping: the current folder
    assert len(load_sweep({"base": _plugin_config("plug_in_cwd")}).points) == 1
    refused("run", "configs/plug_in_elsewhere.toml", "--out", "x", "--quiet", cwd=tmp_path,
            contains="cannot import module 'plug_in_elsewhere'")
    with pytest.raises(ConfigError, match="cannot import module 'plug_in_elsewhere'"):
        fedopt.run(sub / "plug_in_elsewhere.toml")
