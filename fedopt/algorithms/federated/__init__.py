"""Federated (server + clients) algorithms: bilevel (FedMBO, FedNest, LFedNest) and minimax
(FESS-GDA, Local SGDA(+), SAGDA, Fed-Norm-SGDA(+))."""

from fedopt.algorithms.federated.fedmbo import fedmbo, neumann_vector, phe
from fedopt.algorithms.federated.fednest import fednest, lfednest
from fedopt.algorithms.federated.minimax import fed_norm_sgda, fess_gda, local_sgda, local_sgda_plus, sagda

__all__ = ["fed_norm_sgda", "fedmbo", "fednest", "fess_gda", "lfednest", "local_sgda", "local_sgda_plus",
           "neumann_vector", "phe", "sagda"]
