"""A dataset split over clients, stored flat with per-client offsets.

Client ``i``'s training samples are rows ``train_offsets[i] : train_offsets[i] + train_counts[i]``
of ``x_train`` (likewise for validation). Flat storage (no padding) lets a batched engine draw the
minibatches of all picked clients with one gather, whatever the clients' sizes. A dataset's
per-sample groups (if any) travel in the same row order as ``g_train`` / ``g_val`` (and ``g_test``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedopt.data.datasets import Dataset
from fedopt.errors import check

__all__ = ["FederatedData", "federate"]


@dataclass(frozen=True)
class FederatedData:
    """Per-client train / validation parts (flat, client-major) and a server-side test set."""

    name: str
    num_clients: int
    num_classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    train_offsets: np.ndarray
    train_counts: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    val_offsets: np.ndarray
    val_counts: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    g_train: np.ndarray | None = None  # per-row group, same order as x_train (None: no groups)
    g_val: np.ndarray | None = None
    g_test: np.ndarray | None = None
    group_names: tuple[str, ...] = ()

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    def client_of_train(self) -> np.ndarray:
        """The client id of every training row."""
        return np.repeat(np.arange(self.num_clients), self.train_counts)


def federate(dataset: Dataset, parts: list[np.ndarray], *, val_fraction: float, seed: int) -> FederatedData:
    """Split every client's part into train and validation (at least one sample each)."""
    check(0 < val_fraction < 1, f"data.params.val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng([seed, 11])
    tr, va = [], []
    for i, p in enumerate(parts):
        check(len(p) >= 2, f"client {i} received {len(p)} samples; every client needs >= 2 (train + validation)")
        p = rng.permutation(p)
        n_val = min(len(p) - 1, max(1, round(val_fraction * len(p))))
        va.append(p[:n_val])
        tr.append(p[n_val:])

    def flat(idx_lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        counts = np.array([len(i) for i in idx_lists], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        idx = np.concatenate(idx_lists)
        return dataset.x_train[idx], dataset.y_train[idx], offsets, counts, idx

    xtr, ytr, otr, ctr, itr = flat(tr)
    xva, yva, ova, cva, iva = flat(va)
    g = getattr(dataset, "g_train", None)
    return FederatedData(
        dataset.name, len(parts), dataset.num_classes, xtr, ytr, otr, ctr, xva, yva, ova, cva,
        dataset.x_test, dataset.y_test,
        g_train=None if g is None else g[itr], g_val=None if g is None else g[iva],
        g_test=getattr(dataset, "g_test", None), group_names=tuple(getattr(dataset, "group_names", ())),
    )
