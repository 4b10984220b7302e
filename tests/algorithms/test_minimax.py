"""FESS-GDA and the federated minimax baselines: reductions, engines, convergence per class, bad input."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedopt
from fedopt.config import load_config
from fedopt.errors import ConfigError
from fedopt.runner import build, execute

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def mm_config(problem="nc_sc", algorithm="fess_gda", *, clients=6, rounds=5, params=None, problem_params=None,
              seed=0, engine="vmap", eval_every=1):
    alg = {"lr_x": 0.05, "lr_y": 0.05, "local_steps": 3, "clients_per_round": 3}
    alg.update(params or {})
    return {"seed": seed, "clients": clients, "rounds": rounds, "eval_every": eval_every, "dtype": "float64",
            "problem": {"name": problem, "params": {"dim": 4, **(problem_params or {})}},
            "algorithm": {"name": algorithm, "params": alg}, "engine": {"name": engine}}


def metrics(raw):
    return fedopt.run(copy.deepcopy(raw)).pivot(index="round", columns="metric", values="value")


def final(raw):
    df = fedopt.run(copy.deepcopy(raw))
    return df[df["round"] == df["round"].max()].set_index("metric").value


NOISY = {"sigma": 0.5}


# ---- reductions ----------------------------------------------------------------------------

def test_fess_gda_with_p_zero_and_unit_global_steps_is_local_sgda():
    """papers/fess_gda.md §6.4: p = 0 must reproduce Local SGDA exactly (noisy, minibatches, PCP)."""
    common = {"batch_size": 2}
    a = metrics(mm_config(algorithm="fess_gda", params={**common, "p": 0.0}, problem_params=NOISY, rounds=8))
    b = metrics(mm_config(algorithm="local_sgda", params=common, problem_params=NOISY, rounds=8))
    assert float(np.abs(a.to_numpy() - b.to_numpy()).max()) == 0.0
    assert a.grad_phi_norm.iloc[-1] < a.grad_phi_norm.iloc[0]


@pytest.mark.parametrize("smoothing", ["server", "client"])
def test_one_client_one_step_is_centralized_smoothed_gda(smoothing):
    """M = m = K = 1 with unit global steps: x+ = x - eta_x (grad_x f + p (x - z)), y+ = y + eta_y grad_y f,
    z+ = z + beta (x+ - z)."""
    eta, p, beta, T = 0.1, 3.0, 0.2, 30
    raw = mm_config(clients=1, rounds=T, params={"lr_x": eta, "lr_y": eta, "local_steps": 1, "clients_per_round": 1,
                                                  "p": p, "beta": beta, "smoothing": smoothing})
    cfg = load_config(raw)
    b = build(cfg)
    result, _ = execute(cfg, b)
    prob = b.problem
    x, y = prob.init()
    z = x
    batch = prob.batch(prob.data, torch.tensor(0), torch.tensor(0), None)
    for _ in range(T):
        gx, gy = fedopt.oracles.grad_xy(prob.loss, x, y, batch)
        x, y = x - eta * (gx + p * (x - z)), y + eta * gy
        z = z + beta * (x - z)
    assert torch.allclose(result.x, x, atol=1e-12, rtol=0) and torch.allclose(result.y, y, atol=1e-12, rtol=0)


# ---- engines -------------------------------------------------------------------------------

ENGINE_CASES = {
    "fess_gda": ("fess_gda", {"batch_size": 2, "p": 2.0}),
    "fess_gda_client_alternating": ("fess_gda", {"batch_size": 2, "smoothing": "client", "order": "alternating",
                                                 "lr_x_global": 2.0, "lr_y_global": 0.5, "replace": True}),
    "local_sgda_plus": ("local_sgda_plus", {"batch_size": 2, "snapshot_every": 2}),
    "sagda": ("sagda", {"batch_size": 2, "lr_x_global": 1.5}),
    "fed_norm_sgda": ("fed_norm_sgda", {"batch_size": 2, "min_local_steps": 1, "snapshot_every": 3}),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_local_and_vmap_engines_agree(case):
    alg, params = ENGINE_CASES[case]
    raw = mm_config(algorithm=alg, params=params, problem_params=NOISY, rounds=6, clients=7)
    a, b = metrics({**raw, "engine": {"name": "local"}}), metrics(raw)
    assert list(a.columns) == list(b.columns) and a.shape == b.shape
    assert float(np.abs(a.to_numpy() - b.to_numpy()).max()) <= 1e-10
    assert a.grad_phi_norm.iloc[-1] != a.grad_phi_norm.iloc[0]


def test_engines_agree_on_the_simplex_form():
    raw = mm_config(problem="simplex_minimax", params={"batch_size": 1, "p": 1.0}, problem_params={"sigma": 0.3},
                    rounds=4, clients=5)
    raw["problem"]["params"]["groups"] = 3
    a, b = metrics({**raw, "engine": {"name": "local"}}), metrics(raw)
    assert float(np.abs(a.to_numpy() - b.to_numpy()).max()) <= 1e-10


def test_fed_norm_sgda_heterogeneous_steps_change_the_trajectory_and_count_calls():
    base = mm_config(algorithm="fed_norm_sgda", rounds=4)
    a = final(base)
    b = final({**base, "algorithm": {"name": "fed_norm_sgda",
                                     "params": {**base["algorithm"]["params"], "min_local_steps": 1}}})
    assert a.grad_phi_norm != b.grad_phi_norm
    assert a.grad_calls == 4 * 3 * 3  # rounds x clients x local steps (masked steps are still computed)


def test_sagda_control_variates_remove_client_drift():
    """With exact oracles and full participation, SAGDA's corrected local steps have the global
    gradient's fixed point, while Local SGDA's K heterogeneous local steps leave a drift bias."""
    raw = mm_config(problem="pl_pl", clients=4, rounds=400, eval_every=400,
                    params={"local_steps": 5, "clients_per_round": 4}, problem_params={"delta": 0.5})
    sagda = final({**raw, "algorithm": {"name": "sagda", "params": raw["algorithm"]["params"]}})
    local = final({**raw, "algorithm": {"name": "local_sgda", "params": raw["algorithm"]["params"]}})
    assert sagda.saddle_distance < 1e-10 < 1e-4 < local.saddle_distance
    assert sagda.comm_rounds == 2 * local.comm_rounds


# ---- convergence per problem class (noise-free, full participation) -------------------------

CLASS_TARGETS = {  # config -> (measure, bound)
    "fess_gda_pl_pl": ("saddle_distance", 1e-4),
    "fess_gda_nc_sc": ("grad_phi_norm", 1e-3),
    "fess_gda_nc_pl": ("grad_phi_norm", 1e-3),
    "fess_gda_simplex": ("solution_distance", 1e-4),
    "fess_gda_nc_c": ("moreau_grad_norm", 1e-3),
}


@pytest.mark.parametrize("name", list(CLASS_TARGETS))
def test_fess_gda_reaches_each_class_measure(name):
    raw = load_config(CONFIGS / f"{name}.toml").to_dict()
    raw["eval_every"] = raw["rounds"]
    last = final(raw)
    measure, bound = CLASS_TARGETS[name]
    assert last[measure] <= bound
    assert last.stationarity <= 1e-3
    if name == "fess_gda_simplex":
        assert last.phi_gap <= 1e-4 and last.y_distance <= 1e-4


def test_smoothing_does_not_move_the_saddle_point():
    """At a fixed point x = z, so p > 0 still recovers x* (papers/fess_gda.md §6.6)."""
    raw = load_config(CONFIGS / "fess_gda_pl_pl.toml").to_dict()
    raw["eval_every"] = raw["rounds"]
    raw["algorithm"]["params"]["p"] = 4.0
    raw["rounds"] = 1500
    assert final(raw).saddle_distance <= 1e-4


def test_client_drift_bias_scales_with_the_local_step():
    """Kept measurement: K local steps on heterogeneous clients converge to a biased point whose
    distance to the saddle is proportional to the local step (two-sided rates with the same
    effective step lr_x * lr_x_global * K)."""
    dist = []
    for lr, g in ((0.01, 5.0), (0.002, 25.0)):
        raw = load_config(CONFIGS / "fess_gda_pl_pl.toml").to_dict()
        raw.update(rounds=600, eval_every=600)
        raw["algorithm"]["params"].update(lr_x=lr, lr_y=lr, lr_x_global=g, lr_y_global=g)
        dist.append(final(raw).saddle_distance)
    assert 3.5 < dist[0] / dist[1] < 6.5  # 5x smaller local step, about 5x smaller bias


def test_projecting_every_local_step_leaves_a_step_size_independent_bias():
    """Kept measurement (NC-C, y on the simplex, heterogeneous clients): projecting every local
    ascent step stalls at the same Moreau-envelope gradient for a 5x smaller local step, while
    projecting only at the server shrinks the bias about 5x."""
    out = {}
    for local_projection in (True, False):
        for lr, g in ((0.001, 50.0), (0.0002, 250.0)):
            raw = load_config(CONFIGS / "fess_gda_nc_c.toml").to_dict()
            raw.update(rounds=500, eval_every=500)
            raw["algorithm"]["params"].update(lr_x=lr, lr_y=lr, lr_x_global=g, lr_y_global=g,
                                              local_projection=local_projection)
            out[local_projection, lr] = final(raw).moreau_grad_norm
    assert out[True, 0.001] / out[True, 0.0002] < 1.5
    assert out[False, 0.001] / out[False, 0.0002] > 3.0
    assert out[True, 0.0002] > 3 * out[False, 0.0002]


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("params, fragment", [
    ({"p": -1.0}, "p must be >= 0"),
    ({"beta": 0.0}, r"beta must be in \(0, 1\]"),
    ({"beta": 1.5}, r"beta must be in \(0, 1\]"),
    ({"lr_x": 0.0}, "lr_x must be a finite number > 0"),
    ({"local_steps": 0}, "local_steps must be >= 1"),
    ({"smoothing": "both"}, "must be one of 'server', 'client'"),
])
def test_bad_fess_gda_parameters_are_one_line_errors(params, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        build(load_config(mm_config(params=params)))
    assert "\n" not in str(e.value)


def test_problem_kind_mismatch_is_an_error_before_any_run():
    raw = mm_config()
    raw["problem"] = {"name": "quadratic"}
    with pytest.raises(ConfigError, match="solves minimax problems but problem 'quadratic' is bilevel; allowed: .*nc_sc"):
        build(load_config(raw))
    raw = mm_config(algorithm="fedmbo", params={})
    raw["algorithm"]["params"] = {"outer_lr": 0.1, "inner_lr": 0.1, "neumann_lr": 0.1, "clients_per_round": 2}
    with pytest.raises(ConfigError, match="solves bilevel problems but problem 'nc_sc' is minimax"):
        build(load_config(raw))


def test_cli_bad_minimax_input_exits_2_with_one_line(tmp_path):
    out = tmp_path / "run"
    for override, fragment in (("algorithm.params.beta=2", "beta must be in (0, 1]"),
                               ("problem.params.measure=\"duality_gap\"", "does not apply to nc_sc"),
                               ("problem.params.y_bounds=[1.0, 0.0]", "is empty")):
        cmd = [sys.executable, "-m", "fedopt.cli", "run", str(CONFIGS / "fess_gda_nc_sc.toml"), "--set", override,
               "--out", str(out), "--quiet"]
        if "y_bounds" in override:
            cmd += ["--set", "problem.params.y_set=\"box\""]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr
        assert not out.exists()


# ---- partial participation: linear speedup in m ---------------------------------------------

def test_rounds_to_eps_fall_linearly_with_the_sampled_clients():
    """Noisy NC-SC, 64 clients, m in {4, 8, 16, 32} sampled per round, 5 seeds, steps and beta
    proportional to m (the theory's step at a fixed eps; fedopt.figures.f3_minimax): the fitted slope
    of log T_eps against log m lies in [-1.3, -0.5] (measured -1.10: T_eps = 777, 377, 179, 78)."""
    from fedopt.figures.f3_minimax import SPEEDUP_M, speedup

    torch.set_num_threads(1)  # restored by the conftest fixture
    T = speedup(5)
    t = np.array([T[m] for m in SPEEDUP_M])
    assert np.all(np.isfinite(t)) and np.all(np.diff(t) < 0)
    slope = np.polyfit(np.log(SPEEDUP_M), np.log(t), 1)[0]
    assert -1.3 <= slope <= -0.5


@pytest.mark.parametrize("problem", ["fair_digits", "gan"])
def test_engines_agree_on_fair_classification_and_the_gan(problem):
    if problem == "fair_digits":
        raw = {"seed": 1, "clients": 6, "rounds": 3, "dtype": "float64",
               "problem": {"name": "fair_classification", "params": {"groups": "label"}},
               "data": {"name": "digits"}, "partition": {"name": "dirichlet", "params": {"alpha": 0.5}},
               "algorithm": {"name": "fess_gda", "params": {"lr_x": 0.5, "lr_y": 0.05, "p": 0.01, "local_steps": 3,
                                                            "clients_per_round": 3, "batch_size": 8}}}
        key = "worst_group_loss"
    else:
        raw = {"seed": 1, "clients": 4, "rounds": 3, "dtype": "float64",
               "problem": {"name": "gan_mixture", "params": {"modes": 4, "samples_per_client": 50,
                                                             "eval_samples": 200}},
               "algorithm": {"name": "fess_gda", "params": {"lr_x": 0.05, "lr_y": 0.05, "p": 0.1, "local_steps": 3,
                                                            "clients_per_round": 2, "batch_size": 8}}}
        key = "sliced_wasserstein"
    a, b = metrics({**raw, "engine": {"name": "local"}}), metrics(raw)
    assert list(a.columns) == list(b.columns) and a.shape == b.shape
    assert float(np.abs(a.to_numpy() - b.to_numpy()).max()) <= 1e-10
    assert a[key].iloc[-1] != a[key].iloc[0]
