"""Algorithms: *how* a problem is optimised. Pure tensor code with no engine knowledge."""

from fedopt.algorithms import centralized, decentralized, federated
from fedopt.algorithms.base import (
    DecentralizedAlgorithm,
    FederatedAlgorithm,
    Gossip,
    Iterate,
    LocalStep,
    NodeIterate,
    Program,
    Replies,
    Round,
    Task,
    numel,
)

__all__ = [
    "DecentralizedAlgorithm",
    "FederatedAlgorithm",
    "Gossip",
    "Iterate",
    "LocalStep",
    "NodeIterate",
    "Program",
    "Replies",
    "Round",
    "Task",
    "centralized",
    "decentralized",
    "federated",
    "numel",
]
