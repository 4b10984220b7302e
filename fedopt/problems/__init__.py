"""Federated bilevel and minimax problems: *what* is optimised (see :mod:`fedopt.problems.base`)."""

from fedopt.problems.base import AbstractBilevelProblem, AbstractMinimaxProblem, ProblemContext
from fedopt.problems.classification import (
    HyperCleaning,
    HyperRepresentation,
    RegularizationSelection,
    hyper_cleaning,
    hyper_representation,
    regularization_selection,
)
from fedopt.problems.fair import FairClassification, fair_classification
from fedopt.problems.gan import GanMixture, gan_mixture
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
from fedopt.problems.model import (
    ModelBilevelProblem,
    ModelMinimaxProblem,
    ParamSpec,
    cnn_hyper_representation,
)
from fedopt.problems.quadratic import QuadraticBilevel, quadratic

__all__ = [
    "AbstractBilevelProblem",
    "AbstractMinimaxProblem",
    "FairClassification",
    "GanMixture",
    "HyperCleaning",
    "HyperRepresentation",
    "MinimaxQuadratic",
    "ModelBilevelProblem",
    "ModelMinimaxProblem",
    "NCPLQuadratic",
    "ParamSpec",
    "ProblemContext",
    "QuadraticBilevel",
    "RegularizationSelection",
    "SimplexMinimax",
    "cnn_hyper_representation",
    "fair_classification",
    "gan_mixture",
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
