"""Federated (server + clients) bilevel algorithms."""

from fedopt.algorithms.federated.fedmbo import fedmbo, neumann_vector, phe
from fedopt.algorithms.federated.fednest import fednest, lfednest

__all__ = ["fedmbo", "fednest", "lfednest", "neumann_vector", "phe"]
