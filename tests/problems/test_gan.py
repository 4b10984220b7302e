"""The federated GAN on a 2-D Gaussian mixture (``gan_mixture``): vmap-ability, closed-form gradients,
non-i.i.d. data, the metrics' rules, a short training run and input checks."""

import math

import pytest
import torch
from torch.func import grad, vmap

import fedopt
import fedopt.problems.gan  # registers gan_mixture
from fedopt import random as rnd
from fedopt.errors import ConfigError
from fedopt.problems.base import AbstractMinimaxProblem, ProblemContext
from fedopt.problems.gan import GanMixture, gan_mixture, high_quality, sliced_wasserstein
from fedopt.registry import PROBLEMS

F64 = torch.float64


def _ctx(clients: int = 4, seed: int = 0, dtype: torch.dtype = F64) -> ProblemContext:
    return ProblemContext(clients=clients, seed=seed, dtype=dtype, device=torch.device("cpu"))


def _perturbed(p: GanMixture, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A point away from the initialisation, so that no gradient is accidentally tiny."""
    g = torch.Generator().manual_seed(seed)
    x, y = p.init()
    return (x + 0.3 * torch.randn(x.shape, generator=g, dtype=x.dtype),
            y + 0.3 * torch.randn(y.shape, generator=g, dtype=y.dtype))


@pytest.fixture(scope="module")
def prob() -> GanMixture:
    return gan_mixture(_ctx(), modes=6, modes_per_client=3, samples_per_client=60, hidden=16)


def test_registered_and_declared():
    assert "gan_mixture" in PROBLEMS
    p = PROBLEMS.get("gan_mixture")(_ctx(clients=8), samples_per_client=10)
    assert isinstance(p, AbstractMinimaxProblem)
    assert p.problem_class == "NC-NC" and p.smoothness() is None and p.y_set.kind == "none"
    assert p.measure in p.measures
    x, y = p.init()
    assert x.shape == (p.x_dim,) and y.shape == (p.y_dim,)
    assert p.x_dim == 2 * 32 + 32 + 32 * 32 + 32 + 32 * 2 + 2  # latent 2 -> 32 -> 32 -> 2
    assert p.y_dim == 2 * 32 + 32 + 32 * 32 + 32 + 32 + 1  # 2 -> 32 -> 32 -> 1
    again = PROBLEMS.get("gan_mixture")(_ctx(clients=8), samples_per_client=10)
    assert torch.equal(p.data["real"], again.data["real"]) and torch.equal(again.init()[0], x)


@pytest.mark.parametrize("batch_size", [None, 7])
def test_loss_and_gradients_vmap_over_clients_like_a_loop(prob, batch_size):
    M = prob.num_clients
    x, y = _perturbed(prob)
    clients = torch.arange(M)
    keys = rnd.fold_in(rnd.key(5), clients)
    X = x + 0.01 * torch.arange(M, dtype=F64)[:, None]  # per-client iterates, as in local steps

    def f(xi, c, k):
        return prob.loss(xi, y, prob.batch(prob.data, c, k, batch_size))

    def g(xi, c, k):
        return fedopt.oracles.grad_xy(prob.loss, xi, y, prob.batch(prob.data, c, k, batch_size))

    vals = vmap(f)(X, clients, keys)
    gx, gy = vmap(g)(X, clients, keys)
    for i in range(M):
        assert abs(float(vals[i] - f(X[i], clients[i], keys[i]))) <= 1e-10
        lx, ly = g(X[i], clients[i], keys[i])
        assert float((gx[i] - lx).abs().max()) <= 1e-10 and float((gy[i] - ly).abs().max()) <= 1e-10


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_closed_form_gradients_match_torch_func(activation):
    p = gan_mixture(_ctx(), activation=activation, samples_per_client=40, hidden=12, latent_dim=3)
    assert p.closed_form
    for seed, batch_size in ((0, None), (1, 9)):
        x, y = _perturbed(p, seed)
        b = p.batch(p.data, torch.tensor(2), rnd.key(seed), batch_size)
        ax, ay = grad(p.loss, argnums=(0, 1))(x, y, b)
        assert float((p._grad_x(x, y, b) - ax).abs().max()) <= 1e-10
        assert float((p._grad_y(x, y, b) - ay).abs().max()) <= 1e-10
    auto = gan_mixture(_ctx(), activation=activation, samples_per_client=40, hidden=12, latent_dim=3,
                       oracles="autodiff")
    assert not auto.closed_form


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_networks_are_nn_sequential_mlps_on_the_flat_vectors(activation):
    from torch.func import functional_call

    from fedopt.problems.classification import _ravel_spec, _unravel
    from fedopt.problems.gan import _mlp

    p = gan_mixture(_ctx(), activation=activation, samples_per_client=10, hidden=8, latent_dim=3)
    x, y = _perturbed(p)
    z, pts = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    for flat, sizes, inp, mine in ((x, [3, 8, 8, 2], z, p.generate(x, z)),
                                   (y, [2, 8, 8, 1], pts, p.discriminate(y, pts).unsqueeze(-1))):
        net = _mlp(sizes, activation).to(F64)
        spec, _ = _ravel_spec(net)
        assert sum(s.numel() for _, s in spec) == flat.numel()
        ref = functional_call(net, _unravel(flat, spec), (inp,))
        assert float((ref - mine).abs().max()) <= 1e-12


def test_batches(prob):
    n = prob.samples_per_client
    full = prob.batch(prob.data, torch.tensor(1), rnd.key(0), None)
    assert torch.equal(full["real"], prob.data["real"][n : 2 * n])  # client 1's data, fixed latents
    assert torch.equal(full["z"], prob.batch(prob.data, torch.tensor(1), rnd.key(9), None)["z"])
    a = prob.batch(prob.data, torch.tensor(1), rnd.key(3), 5)
    assert torch.equal(a["z"], prob.batch(prob.data, torch.tensor(1), rnd.key(3), 5)["z"])  # pure in the key
    assert not torch.equal(a["z"], prob.batch(prob.data, torch.tensor(1), rnd.key(4), 5)["z"])
    assert a["real"].shape == (5, 2) and a["z"].shape == (5, prob.latent_dim)
    own = prob.data["real"][n : 2 * n]
    assert all(bool((own == r).all(-1).any()) for r in a["real"])  # drawn from client 1's points only


def test_data_is_non_iid_and_every_mode_is_held():
    p = gan_mixture(_ctx(clients=8), modes=8, modes_per_client=2, samples_per_client=100, mode_std=0.05)
    n, centres = p.samples_per_client, p.centres
    held = torch.zeros(p.modes, dtype=torch.int64)
    for i in range(p.num_clients):
        pts = p.data["real"][i * n : (i + 1) * n]
        dist = torch.cdist(pts, centres)
        nearest = dist.argmin(1)
        own = torch.as_tensor(p.client_modes[i])
        assert set(nearest.tolist()) == set(own.tolist())  # near its own modes only, both present
        assert float(dist.min(1).values.max()) < 6 * p.mode_std  # and close to them
        assert torch.bincount(nearest, minlength=p.modes)[own].tolist() == [n // 2, n // 2]
        held[own] += 1
    assert held.tolist() == [2] * 8  # round-robin: every mode held, equally often


def test_sliced_wasserstein_is_zero_on_itself_and_grows_with_a_shift(prob):
    a = prob.true_sample
    assert sliced_wasserstein(a, a) <= 1e-12
    for s in (0.1, 0.5):
        shift = torch.tensor([s, -0.5 * s], dtype=F64)
        # a translation moves every projection by <theta, s>; the mean of cos^2 over the evenly
        # spaced directions is 1/2, so SW_2 = |s| / sqrt(2)
        assert sliced_wasserstein(a, a + shift) == pytest.approx(float(shift.norm()) / math.sqrt(2), abs=1e-12)
    assert sliced_wasserstein(a, 1.3 * a) > 0.1
    assert 0 < prob.sw_floor < 0.05  # two independent true samples


def test_true_mixture_samples_cover_all_modes_with_high_quality(prob):
    hq, counts = high_quality(prob.true_sample, prob.centres, prob.mode_std)
    assert hq == pytest.approx(1 - math.exp(-4.5), abs=0.01)  # P(|N(0, s^2 I_2)| <= 3s)
    share = counts.to(F64) / len(prob.true_sample)
    assert bool((share >= 0.01).all()) and len(counts) == prob.modes
    far = prob.true_sample * 0.5  # all points on the circle of radius 1: no high-quality point
    assert high_quality(far, prob.centres, prob.mode_std)[0] == 0.0


def test_metrics_value_is_the_client_mean_and_stationarity_is_the_gradient_norm(prob):
    x, y = _perturbed(prob)
    m = prob.metrics(x, y)
    assert {"sliced_wasserstein", "high_quality_frac", "modes_covered", "value", "disc_loss", "grad_mapping",
            "stationarity"} <= set(m)
    M = prob.num_clients

    def f(xx, yy):
        return torch.stack([prob.loss(xx, yy, prob.batch(prob.data, torch.tensor(i), rnd.key(0), None))
                            for i in range(M)]).mean()

    assert m["value"] == pytest.approx(float(f(x, y)), abs=1e-10)
    assert m["disc_loss"] == pytest.approx(-(m["value"] + 0.5 * prob.disc_reg * float(y @ y)), abs=1e-10)
    gx, gy = grad(f, argnums=(0, 1))(x, y)
    assert m["stationarity"] == pytest.approx(float(torch.sqrt(gx.square().sum() + gy.square().sum())), abs=1e-10)
    assert m["stationarity"] == m["grad_mapping"]
    m0 = prob.metrics(*prob.init())
    assert m0["modes_covered"] == 0 and m0["high_quality_frac"] == 0  # G starts as a blob near 0


def test_fess_gda_trains_the_generator():
    torch.set_num_threads(1)  # tiny tensors; the conftest fixture restores the setting
    cfg = {"seed": 0, "clients": 4, "rounds": 300, "eval_every": 300, "dtype": "float32",
           "problem": {"name": "gan_mixture", "params": {"modes": 4, "modes_per_client": 2, "samples_per_client": 200}},
           "algorithm": {"name": "fess_gda", "params": {"lr_x": 0.05, "lr_y": 0.05, "local_steps": 5,
                                                        "clients_per_round": 4, "batch_size": 64, "p": 0.1}}}
    df = fedopt.run(cfg)
    assert df.attrs["status"] == "finished"
    v = df.pivot_table(index="round", columns="metric", values="value")
    first, last = v.loc[0], v.loc[300]
    # measured (seed 0): SW 1.38 -> 0.23, modes 0 -> 4 of 4, high-quality 0 -> 0.56
    assert first["sliced_wasserstein"] > 1.2 and last["sliced_wasserstein"] < 0.4
    assert first["modes_covered"] == 0 and last["modes_covered"] >= 3
    assert last["high_quality_frac"] > 0.25


@pytest.mark.parametrize("params, key", [
    ({"modes_per_client": 9}, "modes_per_client"),
    ({"modes_per_client": 0}, "modes_per_client"),
    ({"modes": 0, "modes_per_client": 1}, "modes"),
    ({"mode_std": -0.1}, "mode_std"),
    ({"mode_std": 0.0}, "mode_std"),
    ({"radius": 0.0}, "radius"),
    ({"modes": 8, "modes_per_client": 1}, "modes_per_client"),  # 4 clients x 1 mode leave 4 modes unheld
    ({"samples_per_client": 0}, "samples_per_client"),
    ({"disc_reg": -1.0}, "disc_reg"),
])
def test_bad_parameters_are_config_errors(params, key):
    with pytest.raises(ConfigError, match=rf"problem\.params\.{key}\b"):
        gan_mixture(_ctx(), **params)
