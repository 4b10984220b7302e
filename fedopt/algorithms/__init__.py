"""Algorithms: *how* a problem is optimised. Pure tensor code with no engine knowledge."""

from fedopt.algorithms import federated
from fedopt.algorithms.base import FederatedAlgorithm, Iterate, Program, Replies, Round, Task, numel

__all__ = ["FederatedAlgorithm", "Iterate", "Program", "Replies", "Round", "Task", "federated", "numel"]
