"""Federated bilevel problems: *what* is optimised (see :mod:`fedopt.problems.base`)."""

from fedopt.problems.base import AbstractBilevelProblem, AbstractMinimaxProblem, ProblemContext
from fedopt.problems.classification import (
    HyperCleaning,
    HyperRepresentation,
    RegularizationSelection,
    hyper_cleaning,
    hyper_representation,
    regularization_selection,
)
from fedopt.problems.minimax import (
    MinimaxQuadratic,
    NCPLQuadratic,
    SimplexMinimax,
    nc_c,
    nc_pl,
    nc_sc,
    pl_pl,
    simplex_minimax,
)
from fedopt.problems.quadratic import QuadraticBilevel, quadratic

__all__ = [
    "AbstractBilevelProblem",
    "AbstractMinimaxProblem",
    "HyperCleaning",
    "HyperRepresentation",
    "MinimaxQuadratic",
    "NCPLQuadratic",
    "ProblemContext",
    "QuadraticBilevel",
    "RegularizationSelection",
    "SimplexMinimax",
    "hyper_cleaning",
    "hyper_representation",
    "nc_c",
    "nc_pl",
    "nc_sc",
    "pl_pl",
    "quadratic",
    "regularization_selection",
    "simplex_minimax",
]
