"""Federated bilevel problems: *what* is optimised (see :mod:`fedopt.problems.base`)."""

from fedopt.problems.base import AbstractBilevelProblem, ProblemContext
from fedopt.problems.classification import (
    HyperCleaning,
    HyperRepresentation,
    RegularizationSelection,
    hyper_cleaning,
    hyper_representation,
    regularization_selection,
)
from fedopt.problems.quadratic import QuadraticBilevel, quadratic

__all__ = [
    "AbstractBilevelProblem",
    "HyperCleaning",
    "HyperRepresentation",
    "ProblemContext",
    "QuadraticBilevel",
    "RegularizationSelection",
    "hyper_cleaning",
    "hyper_representation",
    "quadratic",
    "regularization_selection",
]
