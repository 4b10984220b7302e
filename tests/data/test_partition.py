"""Partition properties: disjoint, covering, deterministic by seed, skew ordered by alpha."""

import numpy as np
import pytest

from fedopt.data import digits, dirichlet, federate, iid, label_skew, quantity_skew, shards
from fedopt.errors import ConfigError


@pytest.fixture(scope="module")
def labels():
    return digits().y_train


SCHEMES = {
    "iid": iid(),
    "dirichlet": dirichlet(alpha=0.3),
    "shards": shards(shards_per_client=2),
    "quantity_skew": quantity_skew(beta=0.5),
}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_disjoint_covering_and_deterministic(labels, name):
    parts = SCHEMES[name](labels, 20, 0)
    assert len(parts) == 20
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # disjoint
    if name == "shards":  # Flower's ShardPartitioner drops the last incomplete shard
        assert len(allidx) >= len(labels) - 2 * 20 * 2
    else:
        assert len(allidx) == len(labels)  # covering
    again = SCHEMES[name](labels, 20, 0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = SCHEMES[name](labels, 20, 1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_label_skew_grows_as_alpha_falls(labels):
    skews = [np.mean([label_skew(labels, dirichlet(alpha=a)(labels, 20, s), 10) for s in range(3)])
             for a in (100.0, 1.0, 0.3, 0.1)]
    assert skews == sorted(skews), skews
    assert skews[-1] > 0.5 > 0.1 > skews[0]


def test_shards_give_few_labels_per_client(labels):
    parts = shards(shards_per_client=2)(labels, 20, 0)
    n_labels = [len(np.unique(labels[p])) for p in parts]
    assert np.mean(n_labels) <= 3.0
    assert label_skew(labels, parts, 10) > label_skew(labels, iid()(labels, 20, 0), 10)


def test_quantity_skew_varies_sizes_not_labels(labels):
    parts = quantity_skew(beta=0.3)(labels, 20, 0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 4 * sizes.min()
    assert sizes.min() >= 2


def test_federate_gives_every_client_train_and_validation(labels):
    ds = digits()
    parts = dirichlet(alpha=0.1)(ds.y_train, 20, 0)
    fed = federate(ds, parts, val_fraction=0.2, seed=0)
    assert (fed.train_counts >= 1).all() and (fed.val_counts >= 1).all()
    assert int(fed.train_counts.sum() + fed.val_counts.sum()) == len(ds.y_train)
    i = 7
    rows = fed.x_train[fed.train_offsets[i]: fed.train_offsets[i] + fed.train_counts[i]]
    expected = {tuple(r) for r in ds.x_train[parts[i]]}
    assert all(tuple(r) in expected for r in rows)


@pytest.mark.parametrize("bad", [lambda: dirichlet(alpha=0.0), lambda: dirichlet(alpha=-1.0),
                                 lambda: shards(shards_per_client=0), lambda: quantity_skew(beta=0.0)])
def test_bad_partition_parameters(bad):
    with pytest.raises(ConfigError):
        bad()


def test_infeasible_partition_is_a_config_error(labels):
    with pytest.raises(ConfigError, match="infeasible|needs"):
        quantity_skew(min_partition_size=200)(labels, 20, 0)


@pytest.mark.parametrize("name", ["dirichlet", "shards", "quantity_skew"])
def test_fast_assignment_read_equals_flowers_public_path(labels, name, monkeypatch):
    from fedopt.data import partition as P

    fast = SCHEMES[name](labels, 12, 3)
    slow_run = P._run
    monkeypatch.setattr(P, "_run", lambda p, ds, n: slow_run(p, ds, n, fast=False))
    slow = SCHEMES[name](labels, 12, 3)
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow))


def test_iid_equals_flowers_iid_partitioner(labels):
    from fedopt.data import partition as P

    p = P._partitioners().IidPartitioner(num_partitions=13)
    expected = P._run(p, P._hf_dataset(labels, 5), 13, fast=False)
    got = iid()(labels, 13, 5)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
