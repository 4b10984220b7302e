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
