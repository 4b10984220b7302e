"""Offline datasets, non-i.i.d. partitions and their per-client train/validation layout."""

from fedopt.data.datasets import Dataset, digits, fashion_mnist, mnist5k, synthetic
from fedopt.data.federated import FederatedData, federate
from fedopt.data.partition import dirichlet, iid, label_skew, quantity_skew, shards

__all__ = [
    "Dataset",
    "FederatedData",
    "digits",
    "dirichlet",
    "fashion_mnist",
    "federate",
    "iid",
    "label_skew",
    "mnist5k",
    "quantity_skew",
    "shards",
    "synthetic",
]
