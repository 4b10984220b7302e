"""Non-i.i.d. partitions of a labelled training set over clients.

Each scheme is a factory (registered in ``PARTITIONERS``) returning
``partition(labels, num_clients, seed) -> list[np.ndarray]`` of disjoint index arrays. The
splitting itself is done by Flower's own partitioners (``flwr-datasets``) run offline on an
in-memory ``datasets.Dataset`` built from the label array, so a fedopt split is the split a Flower
user gets for the same parameters and seed.

==================  ==============================================  =============================
scheme              meaning                                         flwr-datasets partitioner
==================  ==============================================  =============================
``iid``             uniform random equal split                      ``IidPartitioner`` (as sizes)
``dirichlet``       per-class proportions ~ Dirichlet(alpha)        ``DirichletPartitioner``
                    (Hsu et al., 2019); small alpha = more skew
``shards``          sort by label, cut into shards, k per client    ``ShardPartitioner``
                    (McMahan et al., 2017; FedNest's non-i.i.d.)
``quantity_skew``   i.i.d. labels, sizes ~ Dirichlet(beta) * n      ``SizePartitioner``
                    (Li et al., NIID-Bench, 2022)
==================  ==============================================  =============================
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from fedopt.errors import ConfigError, check
from fedopt.registry import PARTITIONERS

__all__ = ["Partition", "dirichlet", "iid", "label_skew", "quantity_skew", "shards"]

Partition = Callable[[np.ndarray, int, int], list[np.ndarray]]


def _hf_dataset(labels: np.ndarray, seed: int | None):
    with warnings.catch_warnings():  # datasets / pyarrow import-time deprecations
        warnings.simplefilter("ignore")
        import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"label": labels.astype(np.int64), "idx": np.arange(len(labels))})
    return ds.shuffle(seed=seed) if seed is not None else ds


def _run(partitioner, ds, num_clients: int, *, fast: bool = True) -> list[np.ndarray]:
    """The ``idx`` column of every partition. Flower materialises each partition with
    ``Dataset.select`` (seconds for 1,000 clients), so when the partitioner has computed its
    partition -> row assignment (``_partition_id_to_indices``, flwr-datasets 0.6) we read it once;
    ``tests/data/test_partition.py`` checks that this equals the public per-partition path."""
    partitioner.dataset = ds.with_format("arrow")  # columns as Arrow arrays: no per-row formatting
    try:
        with warnings.catch_warnings():  # Dirichlet resampling retries warn; failure raises below
            warnings.simplefilter("ignore")
            first = np.asarray(partitioner.load_partition(0)["idx"], dtype=np.int64)
            assignment = getattr(partitioner, "_partition_id_to_indices", None) if fast else None
            if isinstance(assignment, dict) and len(assignment) == num_clients:
                column = np.asarray(partitioner.dataset["idx"], dtype=np.int64)
                return [column[np.asarray(assignment[i], dtype=np.int64)] for i in range(num_clients)]
            rest = [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(1, num_clients)]
            return [first, *rest]
    except ValueError as e:  # flwr-datasets reports infeasible specifications as ValueError
        raise ConfigError(f"partition is infeasible for {num_clients} clients: {str(e).splitlines()[0]}") from None


def _partitioners():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from flwr_datasets import partitioner

    return partitioner


@PARTITIONERS.register("iid")
def iid() -> Partition:
    """Uniformly random, equal-size split: contiguous blocks of the seeded shuffle, the first
    ``n % num_clients`` one row larger. This is exactly Flower's ``IidPartitioner`` (tested), run as
    a ``SizePartitioner`` so the assignment is read in one go."""

    def partition(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        n = len(labels)
        check(n >= num_clients, f"partition iid needs at least one sample per client: {n} samples for {num_clients} clients")
        sizes = [n // num_clients + (i < n % num_clients) for i in range(num_clients)]
        return _run(_partitioners().SizePartitioner(partition_sizes=sizes), _hf_dataset(labels, seed), num_clients)

    return partition


@PARTITIONERS.register("dirichlet")
def dirichlet(*, alpha: float = 0.5, min_partition_size: int = 4, self_balancing: bool = False) -> Partition:
    """Label skew: each class is divided over clients with proportions ~ Dirichlet(alpha · 1).

    Args:
        alpha: concentration; alpha -> 0 gives one class per client, alpha -> inf gives i.i.d.
        min_partition_size: resample (at most 10 times) until every client has at least this many
            samples. Default 4 (Flower's is 10), so that alpha = 0.1 over 20 clients of digits is
            feasible while every client keeps both a train and a validation part.
        self_balancing: Flower's option to stop filling clients above the average size.
    """
    check(alpha > 0, f"partition.params.alpha must be > 0, got {alpha}")
    check(min_partition_size >= 2, f"partition.params.min_partition_size must be >= 2, got {min_partition_size}")

    def partition(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        p = _partitioners().DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            self_balancing=self_balancing,
            shuffle=True,
            seed=seed,
        )
        return _run(p, _hf_dataset(labels, None), num_clients)

    return partition


@PARTITIONERS.register("shards")
def shards(*, shards_per_client: int = 2) -> Partition:
    """Pathological label skew: sort by label, cut into ``num_clients * shards_per_client`` shards,
    give each client ``shards_per_client`` of them (FedNest / McMahan et al.). A last incomplete
    shard is dropped, as in Flower's ``ShardPartitioner``."""
    check(shards_per_client >= 1, f"partition.params.shards_per_client must be >= 1, got {shards_per_client}")

    def partition(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        p = _partitioners().ShardPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_shards_per_partition=shards_per_client,
            shuffle=True,
            seed=seed,
        )
        return _run(p, _hf_dataset(labels, None), num_clients)

    return partition


@PARTITIONERS.register("quantity_skew")
def quantity_skew(*, beta: float = 0.5, min_partition_size: int = 2) -> Partition:
    """Quantity skew: labels i.i.d., client sizes proportional to a Dirichlet(beta) draw."""
    check(beta > 0, f"partition.params.beta must be > 0, got {beta}")
    check(min_partition_size >= 2, f"partition.params.min_partition_size must be >= 2, got {min_partition_size}")

    def partition(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        n = len(labels)
        free = n - num_clients * min_partition_size
        if free < 0:
            raise ConfigError(
                f"partition quantity_skew needs >= {min_partition_size} samples per client: "
                f"{n} samples for {num_clients} clients"
            )
        props = np.random.default_rng([seed, 7]).dirichlet(np.full(num_clients, beta))
        sizes = min_partition_size + np.floor(props * free).astype(np.int64)
        sizes[: free - (sizes.sum() - num_clients * min_partition_size)] += 1  # hand out the remainder
        p = _partitioners().SizePartitioner(partition_sizes=sizes.tolist())
        return _run(p, _hf_dataset(labels, seed), num_clients)

    return partition


def label_skew(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each client's label distribution and the global one
    (0 for perfectly i.i.d. labels, up to 1 - 1/C for one class per client)."""
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tv))
