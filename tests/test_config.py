"""The config schema: parsing, overrides, and one clear error per kind of bad input."""

import pytest
from helpers import quadratic_config

from fedopt.config import RunConfig, apply_overrides, load_config, parse_config
from fedopt.errors import ConfigError
from fedopt.runner import build


def test_round_trip_and_defaults():
    cfg = parse_config(quadratic_config())
    assert isinstance(cfg, RunConfig) and cfg.engine.name == "vmap"
    assert parse_config(cfg.to_dict()) == cfg
    assert cfg.algorithm.params["outer_lr"] == 0.5


def test_overrides_parse_toml_values():
    raw = apply_overrides(quadratic_config(), ["algorithm.params.outer_lr=0.05", "engine.name=local",
                                               "algorithm.params.truncation=random", "rounds=7"])
    cfg = parse_config(raw)
    assert cfg.algorithm.params["outer_lr"] == 0.05 and cfg.engine.name == "local" and cfg.rounds == 7
    assert cfg.algorithm.params["truncation"] == "random"


def test_int_is_widened_to_float_but_not_bool():
    cfg = load_config(quadratic_config(), ["algorithm.params.outer_lr=1"])
    assert isinstance(cfg.algorithm.params["outer_lr"], float)
    with pytest.raises(ConfigError, match="outer_lr must be a number"):
        load_config(quadratic_config(), ["algorithm.params.outer_lr=true"])


BAD = {
    "unknown top-level key": (["colour=1"], "unknown top-level key 'colour'"),
    "unknown param": (["algorithm.params.learning_rate=0.1"], "unknown key algorithm.params.learning_rate.*allowed:.*outer_lr"),
    "wrong type": (["algorithm.params.neumann_terms=2.5"], "algorithm.params.neumann_terms must be an integer, got 2.5"),
    "wrong literal": (["algorithm.params.truncation=sometimes"], "must be one of 'full', 'random'"),
    "negative step": (["algorithm.params.inner_lr=-0.1"], "algorithm.params.inner_lr must be > 0, got -0.1"),
    "too many sampled": (["algorithm.params.clients_per_round=9"], "clients_per_round = 9 exceeds clients = 8; allowed: 1..8"),
    "unknown algorithm": (["algorithm.name=fedavgx"], "unknown algorithm 'fedavgx'; available: aid, d_tfbo, dbo, dbo_stochastic, fed_norm_sgda, fedmbo, fednest, fess_gda, lfednest, local_sgda, local_sgda_plus, ma_dsbo, ma_dsbo_gt, s_tfbo, sagda, soba"),
    "unknown problem": (["problem.name=cubic"], "unknown problem 'cubic'; available:"),
    "unknown engine": (["engine.name=gpu"], "unknown engine 'gpu'; available: flower, local, ray, vmap"),
    "bad dtype": (["dtype=float16"], "dtype must be one of float32, float64"),
    "negative rounds": (["rounds=-1"], "rounds must be >= 0"),
    "cuda without cuda": (["device=cuda"], "CUDA is not available|needs"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(case):
    overrides, pattern = BAD[case]
    if case == "cuda without cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=pattern) as e:
        build(load_config(quadratic_config(), overrides))
    assert "\n" not in str(e.value)


def _digits(**partition):
    raw = quadratic_config()
    raw["problem"] = {"name": "hyper_cleaning"}
    raw["data"] = {"name": "digits"}
    raw["partition"] = {"name": "dirichlet", "params": partition}
    return raw


@pytest.mark.parametrize("alpha", [0.0, -0.5])
def test_non_positive_alpha(alpha):
    with pytest.raises(ConfigError, match=f"partition.params.alpha must be > 0, got {alpha}"):
        build(load_config(_digits(alpha=alpha)))


def test_unknown_dataset_lists_the_available_ones():
    raw = _digits(alpha=0.5)
    raw["data"]["name"] = "cifar10"
    with pytest.raises(ConfigError, match="unknown dataset 'cifar10'; available: adult, digits, fashion_mnist, mnist5k, synthetic"):
        load_config(raw)


def test_data_table_for_a_synthetic_problem_is_rejected():
    raw = quadratic_config()
    raw["data"] = {"name": "digits"}
    with pytest.raises(ConfigError, match="takes no \\[data\\]"):
        build(load_config(raw))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [1,\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_every_shipped_config_loads_and_builds():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].joinpath("experiments", "configs").glob("*.toml"))
    assert configs
    for c in configs:
        build(load_config(c))
