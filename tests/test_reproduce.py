"""``fedopt reproduce``: the quick figures hold their key claims and write every output."""

import json

import pytest

from fedopt.cli import main


@pytest.mark.slow
def test_f1_quick_linear_speedup_slope(tmp_path, capsys):
    """FedMBO's rate O(1/sqrt(nK) + 1/K + sqrt(n)/K^1.5) (Huang et al., 2023) predicts K_eps ~ 1/n in
    the noise-dominated regime (setting in fedopt/figures/f1_speedup.py: 5 seeds, n = 1..16,
    alpha_n = 0.02 n, eps = 0.2). Measured: K_eps = 220, 124, 61, 33, 20, slope -0.88."""
    out = tmp_path / "F1"
    assert main(["reproduce", "F1", "--quick", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert -1.3 <= s["fitted_slope"] <= -0.7, s["k_eps"]
    k = [s["k_eps"][n] for n in ("1", "2", "4", "8", "16")]
    assert all(a > b for a, b in zip(k, k[1:], strict=False))
    assert (out / "F1.png").stat().st_size > 10_000 and (out / "F1.pdf").is_file()
    assert len(list((out / "sweep" / "runs").iterdir())) == 25


def test_f5_quick_errors_are_ordered_by_spectral_gap(tmp_path):
    out = tmp_path / "F5"
    assert main(["reproduce", "F5", "--quick", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["ordered_by_gap"] and s["order_by_gap"][0] == "complete" and s["order_by_gap"][-1] == "ring"
    errs = [s["final_error"][g] for g in s["order_by_gap"]]
    assert errs[-1] > 1e3 * errs[0]  # not a tie: the ring's floor is far above the complete graph's
    assert (out / "F5.png").is_file() and (out / "F5.pdf").is_file()
    # a second call resumes: nothing is re-run, the summary is the same
    first = {p.name: (p / "meta.json").stat().st_mtime_ns for p in (out / "sweep" / "runs").iterdir()}
    assert main(["reproduce", "F5", "--quick", "--out", str(out)]) == 0
    assert {p.name: (p / "meta.json").stat().st_mtime_ns for p in (out / "sweep" / "runs").iterdir()} == first
    assert json.loads((out / "summary.json").read_text())["final_error"] == s["final_error"]


def test_f2_quick_writes_every_method_and_split(tmp_path):
    """Measured (1 seed): final test accuracy FedMBO 0.911 / 0.956 (Dirichlet 0.1 / i.i.d.), FedNest
    0.878 / 0.947, LFedNest 0.911 / 0.869; FedMBO 3150 rounds, FedNest 3957, LFedNest 1650."""
    out = tmp_path / "F2"
    assert main(["reproduce", "F2", "--quick", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())["final"]
    assert len(s) == 6 and all(v["seeds"] == 1 for v in s.values())
    assert s["fedmbo Dirichlet(0.1)"]["final_test_acc_mean"] >= 0.9 and s["fedmbo i.i.d."]["final_test_acc_mean"] >= 0.9
    assert s["fednest i.i.d."]["comm_rounds"] > s["fedmbo i.i.d."]["comm_rounds"] > s["lfednest i.i.d."]["comm_rounds"]
    assert (out / "F2.png").is_file() and (out / "F2.pdf").is_file()


def test_list_and_bad_ids(capsys):
    assert main(["reproduce", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(f in listing for f in ("F1", "F2", "F3", "F4", "F5", "F6")) and "unverified" in listing
    assert main(["reproduce", "F9"]) == 2
    assert "unknown figure 'F9'; available: F1, F2, F3, F4, F5, F6" in capsys.readouterr().err
    assert main(["reproduce"]) == 2
    assert main(["reproduce", "F1", "--executor", "dask"]) == 2


def test_f6_figure_draws_from_its_numbers(tmp_path):
    """The F6 drawing code on a small table of numbers (the full runs are the TFBO tests' business):
    diverged points, the tuned line and both rate overlays with their fitted constants."""
    import numpy as np

    from fedopt.figures import f6_tfbo

    def rows(values, status=None):
        return [{"s": s, "rounds": 10, "status": (status or {}).get(s, "finished"), "value": v}
                for s, v in zip([1e-3, 1e-2, 1e-1, 1.0, 10.0], values, strict=True)]

    K = [25, 50, 100, 200]
    T = np.unique(np.geomspace(1, 3000, 40).astype(int))
    data = {"quadratic": {"S-TFBO": rows([0.4, 0.3, 1e-10, 1e-30, 1e-30]),
                          "SOBA (fixed)": rows([5e-3, 1e-15, 1e-30, 0.45, 0.45], {1.0: "diverged", 10.0: "diverged"})},
            "hyper_cleaning": {"S-TFBO": rows([0.89, 0.9, 0.91, 0.91, 0.91])},
            "tuned_soba": {"outer_lr": 1000.0, "inner_lr": 1.0, "test_acc": 0.93},
            "rates": {"d_tfbo": {"K": K, "avg_hypergrad_norm_sq": [1.5 / k for k in K]},
                      "s_tfbo": {"T": T.tolist(), "running_avg_hypergrad_norm_sq": (2.0 / T).tolist()}}}
    f6_tfbo.figure(data, tmp_path / "F6.png")
    assert (tmp_path / "F6.png").stat().st_size > 10_000
    assert data["fitted"]["d_tfbo_C"] == pytest.approx(1.5)


def test_f4_summary_table_and_figure_from_a_synthetic_table(tmp_path):
    """F4's quick run takes about 2 minutes (too long here; checked by hand), so this tests its pieces:
    the sweep specs (methods derived from the configs, quick budgets), the end-of-budget table (mean of
    the last 5 evaluations per seed, then mean ± std over seeds; a run that stopped early is padded
    with its last value), the paired verdict, and the drawing."""
    import numpy as np
    import pandas as pd

    from fedopt.figures import f4_minimax_apps as f4
    from fedopt.sweep import load_sweep

    sweep = load_sweep(f4.spec("adult", quick=True))
    algs = {(p.config.algorithm.name, p.config.algorithm.params["lr_y"], p.config.algorithm.params.get("p"))
            for p in sweep.points}
    # Adult's FESS-GDA has a server step 0.5, so the p = 0 control runs too
    assert algs == {("fess_gda", 0.05, 0.02), ("fess_gda", 0.05, 0.0), ("local_sgda", 0.05, None),
                    ("local_sgda", f4.ERM_LR_Y, None)}
    assert len(sweep.points) == 8 and all(p.config.rounds == 100 for p in sweep.points)
    local = next(p.config.algorithm.params for p in sweep.points if p.config.algorithm.name == "local_sgda")
    assert "p" not in local and local["lr_x"] == 1.0 and local["local_steps"] == 10
    gan = load_sweep(f4.spec("gan", quick=False))
    assert len(gan.points) == 10 and {p.config.seed for p in gan.points} == {0, 1, 2, 3, 4}  # no p = 0 control
    assert len(load_sweep(f4.spec("digits", quick=True)).points) == 6

    rounds = np.arange(0, 110, 10)
    rows = []
    for name, lr_y, p, shift in (("fess_gda", 0.05, 0.02, 0.02), ("local_sgda", 0.05, None, 0.0),
                                 ("local_sgda", f4.ERM_LR_Y, None, -0.1), ("fess_gda", 0.05, 0.0, 0.01)):
        for seed in range(3):
            last = 100 if not (p == 0.02 and seed == 2) else 60  # one run stops early: padded
            for r in rounds[rounds <= last]:
                v = 0.5 + 0.3 * r / 100 + shift + 0.001 * seed
                for metric, value in (("worst_group_test_acc", v), ("test_acc", v + 0.1)):
                    rows.append({"run_id": f"{name}{lr_y}{p}{seed}", "status": "finished", "algorithm.name": name,
                                 "algorithm.params.lr_y": lr_y, "algorithm.params.p": p, "seed": seed, "round": r,
                                 "comm_round": r, "metric": metric, "value": value})
    t = pd.DataFrame(rows)
    s = f4.summary_table(t, ["worst_group_test_acc", "test_acc"], higher=True)
    m = s["methods"]
    assert list(m) == ["FESS-GDA", "FESS-GDA, p = 0", "Local SGDA", "balanced ERM"]
    # Local SGDA: last 5 evaluations are rounds 60..100, mean 0.5 + 0.3 * 0.8 = 0.74, plus 0.001 * seed
    assert m["Local SGDA"]["worst_group_test_acc_mean"] == pytest.approx(0.741)
    assert m["Local SGDA"]["worst_group_test_acc_std"] == pytest.approx(0.001 * np.std([0, 1, 2]))
    assert m["Local SGDA"]["test_acc_mean"] == pytest.approx(0.841)
    assert m["balanced ERM"]["worst_group_test_acc_mean"] == pytest.approx(0.641)
    # FESS-GDA seed 2 stopped at round 60 (value 0.68 + 0.02 + 0.002), padded over rounds 70..100
    fess = np.array([0.76, 0.761, 0.702])
    assert m["FESS-GDA"]["worst_group_test_acc_mean"] == pytest.approx(fess.mean())
    assert m["FESS-GDA"]["seeds"] == 3 and m["FESS-GDA"]["comm_rounds"] == 100
    d = s["fess_minus_local"]
    assert d["mean"] == pytest.approx((fess - np.array([0.74, 0.741, 0.742])).mean())
    assert d["per_seed"] == pytest.approx([0.02, 0.02, -0.04])
    assert d["verdict"] == "no significant difference (paired t-test, 95%)"  # seed 2 goes the other way
    assert m["FESS-GDA, p = 0"]["worst_group_test_acc_mean"] == pytest.approx(0.751)
    assert s["fess_minus_fess_p0"]["per_seed"] == pytest.approx([0.01, 0.01, -0.05])
    assert f4.verdict(np.array([0.02, 0.021, 0.019]), higher=True) == "FESS-GDA better"
    assert f4.verdict(np.array([0.02, 0.021, 0.019]), higher=False) == "Local SGDA better"
    assert f4.verdict(np.array([0.02]), higher=True) == "one seed: no verdict"

    panels = {p: {"worst_group_test_acc": f4.curves(t, "worst_group_test_acc")} for p in ("adult", "digits")}
    sw = t.assign(metric=t.metric.map({"worst_group_test_acc": "sliced_wasserstein", "test_acc": "modes_covered"}))
    sw = sw[(sw["algorithm.params.lr_y"] == 0.05) & (sw["algorithm.params.p"] != 0.0)]
    panels["gan"] = {k: f4.curves(sw, k)
                     for k in ("sliced_wasserstein", "modes_covered")}
    assert set(panels["gan"]["modes_covered"]) == {"FESS-GDA", "Local SGDA"}
    rng = np.random.default_rng(0)
    sample = {"fake": rng.normal(size=(500, 2)), "true": rng.normal(size=(500, 2)), "centres": np.eye(2),
              "round": 100, "sliced_wasserstein": 0.2, "modes_covered": 7.0}
    f4.figure(panels, {"FESS-GDA": sample}, tmp_path / "F4.png", title="F4 synthetic")
    assert (tmp_path / "F4.png").stat().st_size > 10_000
