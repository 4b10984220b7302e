import math

import numpy as np
import pytest
import torch
from torch.func import vmap

from fedopt import random as rnd


def test_draws_are_pure_functions_of_the_key():
    k = rnd.fold_in(rnd.key(3), 7)
    assert torch.equal(rnd.normal(k, (5, 2)), rnd.normal(k, (5, 2)))
    assert not torch.equal(rnd.normal(k, (5, 2)), rnd.normal(rnd.fold_in(k, 1), (5, 2)))


def test_batched_keys_equal_individual_keys_and_vmap():
    ks = rnd.fold_in(rnd.key(0), torch.arange(6))
    batched = rnd.normal(ks, (3, 4))
    for i in range(6):
        assert torch.equal(batched[i], rnd.normal(ks[i], (3, 4)))
    assert torch.equal(vmap(lambda k: rnd.normal(k, (3, 4)))(ks), batched)
    highs = torch.tensor([1, 2, 3, 5, 8, 13])
    ints = vmap(lambda k, h: rnd.randint(k, h, (50,)))(ks, highs)
    assert torch.equal(ints, rnd.randint(ks, highs, (50,)))
    assert bool((ints >= 0).all()) and bool((ints < highs[:, None]).all())


def test_host_twins_are_bit_identical():
    k, kh = rnd.key(11), rnd.key_host(11)
    assert int(k) == int(kh[0])
    ids = np.array([0, 5, 2**40, 12345678901], dtype=np.int64)
    a = rnd.fold_in(rnd.fold_in(k, 9), torch.from_numpy(ids))
    b = rnd.fold_in_host(rnd.fold_in_host(kh, 9), ids)
    assert torch.equal(a, torch.from_numpy(b))
    assert np.array_equal(rnd.uniform_host(b[1], 17), rnd.uniform(a[1], (17,)).numpy())


@pytest.mark.parametrize("seed", [0, 1])
def test_distributions(seed):
    k = rnd.key(seed)
    u = rnd.uniform(k, (200_000,))
    z = rnd.normal(rnd.fold_in(k, 1), (200_000,))
    # 5 standard errors
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12) ** 0.5 / 200_000**0.5
    assert abs(float(z.mean())) < 5 / 200_000**0.5
    assert abs(float(z.var()) - 1) < 5 * 2**0.5 / 200_000**0.5
    assert float(u.min()) > 0 and float(u.max()) < 1
    counts = torch.bincount(rnd.randint(rnd.fold_in(k, 2), 7, (70_000,)), minlength=7).double()
    chi2 = float(((counts - 10_000) ** 2 / 10_000).sum())
    assert chi2 < 30  # chi2 with 6 dof: P(>30) < 1e-4


def test_permutation_is_a_permutation():
    p = rnd.permutation(rnd.key(5), 100)
    assert sorted(p.tolist()) == list(range(100))


@pytest.fixture
def torch_only(monkeypatch):
    """Evaluate a function with the torch ops only (the specification), not the host fast path."""

    def run(fn, *args):
        monkeypatch.setattr(rnd, "HOST_FAST_PATH", False)
        try:
            return fn(*args)
        finally:
            monkeypatch.setattr(rnd, "HOST_FAST_PATH", True)

    return run


OFFSETS, COUNTS = torch.tensor([0, 10, 25, 40, 41]), torch.tensor([10, 15, 15, 1, 9])  # 5 client blocks


def _draws(ks, highs):
    return {
        "randint_rows": rnd.randint_rows(ks, highs % 5, OFFSETS, COUNTS, (4, 3)),
        "fold_int": rnd.fold_in(ks, 7), "fold_neg": rnd.fold_in(ks, -3), "fold_big": rnd.fold_in(ks, 2**62 + 5),
        "fold_tensor": rnd.fold_in(ks, torch.arange(3).reshape((3,) + (1,) * ks.dim()) if ks.dim() else torch.arange(3)),
        "randint": rnd.randint(ks, highs, (4, 3)), "randint_scalar_high": rnd.randint(ks, 1000, (9,)),
        "uniform": rnd.uniform(ks, (2, 5)), "uniform32": rnd.uniform(ks, (3,), torch.float32),
        "normal": rnd.normal(ks, (6,)), "permutation": rnd.permutation(ks, 12),
    }


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_host_fast_path_is_bit_identical_to_the_torch_ops(shape, torch_only):
    ks = rnd.fold_in(rnd.key(4), torch.arange(math.prod(shape)).reshape(shape))
    highs = (torch.arange(math.prod(shape)) * 7 + 1).reshape(shape)
    fast, spec = _draws(ks, highs), torch_only(_draws, ks, highs)
    for name in spec:
        assert fast[name].shape == spec[name].shape and fast[name].dtype == spec[name].dtype, name
        assert torch.equal(fast[name], spec[name]), name


def test_host_fast_path_under_vmap_is_bit_identical(torch_only):
    ks = rnd.fold_in(rnd.key(9), torch.arange(24))
    highs = torch.arange(24) + 1

    def draw(k, h):
        return (rnd.randint(rnd.fold_in(k, 1), h, (5,)), rnd.normal(rnd.fold_in(k, 2), (3,)),
                rnd.fold_in(k, torch.arange(4)), rnd.randint(k, 50, (2,)), rnd.uniform(k, (2, 2)),
                rnd.randint_rows(k, h % 5, OFFSETS, COUNTS, (3,)))

    cases = {
        "vmap": lambda: vmap(draw)(ks, highs),
        "in_dims=1": lambda: vmap(draw, in_dims=(1, 1))(ks.reshape(4, 6), highs.reshape(4, 6)),
        "unbatched key": lambda: vmap(draw, in_dims=(None, 0))(ks[0], highs),
        "unbatched bound": lambda: vmap(draw, in_dims=(0, None))(ks, highs[3]),
        "nested": lambda: vmap(vmap(draw))(ks.reshape(4, 6), highs.reshape(4, 6)),
        "nested, inner unbatched key": lambda: vmap(vmap(draw, in_dims=(None, 0)), in_dims=(0, None))(ks[:4], highs[:6]),
        "chunked": lambda: vmap(draw, chunk_size=5)(ks, highs),
    }
    for name, case in cases.items():
        fast, spec = case(), torch_only(case)
        for a, b in zip(fast, spec, strict=True):
            assert a.shape == b.shape and torch.equal(a, b), name


def test_host_key_derivation_and_cohort_sampling_match_their_plain_definitions():
    from fedopt.runner import client_keys, sample_clients

    stream = rnd.fold_in_host(rnd.key_host(3), 2)
    for r in (0, 1, 77):
        ids = np.array([5, 0, 999, 5, 12, 5], dtype=np.int64)  # repeated ids: occurrences 0, 1, 2
        occurrence = np.array([0, 0, 0, 1, 0, 2])
        spec = rnd.fold_in(rnd.fold_in(rnd.fold_in(torch.from_numpy(stream), r), torch.from_numpy(ids)),
                           torch.from_numpy(occurrence))
        assert np.array_equal(client_keys(stream, r, ids), spec.numpy())
        distinct = ids[[0, 1, 2, 4]]
        assert np.array_equal(client_keys(stream, r, distinct, distinct=True), client_keys(stream, r, distinct))
    for n, m in ((1000, 10), (1000, 500), (50, 49), (50, 50), (7, 1)):
        for r in range(5):
            k = rnd.fold_in_host(stream, r)
            assert np.array_equal(sample_clients(k, n, m, False),
                                  np.argsort(rnd.uniform_host(k, n), kind="stable")[:m])


def test_sampling_breaks_ties_at_the_cut_like_the_stable_argsort(monkeypatch):
    from fedopt import simulation as runner

    u = np.array([0.5, 0.1, 0.3, 0.1, 0.3, 0.9, 0.3])
    monkeypatch.setattr(runner.rnd, "uniform_host", lambda k, n: u[:n])
    for m in range(1, 7):  # m = 3, 4 cut through the tied 0.3s
        assert np.array_equal(runner.sample_clients(np.zeros(1), 7, m, False), np.argsort(u, kind="stable")[:m])


def test_randint_rows_is_the_block_offset_plus_randint():
    ks = rnd.fold_in(rnd.key(1), torch.arange(6))
    clients = torch.tensor([4, 0, 3, 1, 1, 2])
    rows = rnd.randint_rows(ks, clients, OFFSETS, COUNTS, (7,))
    assert torch.equal(rows, OFFSETS[clients, None] + rnd.randint(ks, COUNTS[clients], (7,)))
    lo, hi = OFFSETS[clients, None], (OFFSETS + COUNTS)[clients, None]
    assert bool(((rows >= lo) & (rows < hi)).all())  # every row inside its client's block
    assert torch.equal(rows[2], torch.full((7,), 40))  # a client with one row


def test_block_sampled_cohorts_and_keys_equal_the_round_by_round_ones():
    from fedopt.runner import client_keys, cohort_keys, sample_clients, sample_cohorts

    stream = rnd.fold_in_host(rnd.key_host(5), 1)
    rounds = np.arange(3, 40)
    for n, m in ((1000, 10), (1000, 500), (50, 49), (50, 50), (7, 1)):
        for replace in (False, True):
            block = sample_cohorts(stream, rounds, n, m, replace)
            one_by_one = [sample_clients(rnd.fold_in_host(stream, int(r)), n, m, replace) for r in rounds]
            assert np.array_equal(block, np.stack(one_by_one)), (n, m, replace)
        ids = sample_cohorts(stream, rounds, n, m, False)
        keys = cohort_keys(stream, rounds, ids)
        assert np.array_equal(keys, np.stack([client_keys(stream, int(r), c) for r, c in zip(rounds, ids, strict=True)]))


def test_block_sampling_breaks_ties_at_the_cut_like_the_stable_argsort():
    from fedopt.simulation import _smallest

    u = np.array([[0.5, 0.1, 0.3, 0.1, 0.3, 0.9, 0.3],  # ties across the cut for m = 3, 4
                  [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
                  [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]])
    for m in range(1, 8):
        assert np.array_equal(_smallest(u, m), np.argsort(u, axis=1, kind="stable")[:, :m]), m


def test_the_server_reuses_its_block_only_for_the_rounds_and_cohort_size_it_was_made_for():
    """Rounds that change the cohort size, or skip sampling (an explicit cohort), get the same
    clients and keys as round-by-round sampling would give them."""
    from helpers import built, quadratic_config

    from fedopt.runner import Server, client_keys, sample_clients

    b = built(quadratic_config(clients=30))
    server = Server(b.problem, b.engine, seed=4)
    for r, m in enumerate([3, 3, 3, 5, 5, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 30, 1, 1, 3, 3]):
        if r == 7:
            continue  # a round with an explicit cohort samples nothing
        ids, keys = server._sampled(r, m)
        want = sample_clients(rnd.fold_in_host(server.sample_stream, r), 30, m, False)
        assert np.array_equal(ids.numpy(), want), (r, m)
        assert np.array_equal(keys.numpy(), client_keys(server.client_stream, r, want)), (r, m)
