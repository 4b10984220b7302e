"""A model-based bilevel problem: an MLP body (upper level, x) and a linear head (lower level, y)
trained on each client's data, the representation selected on its validation part (FedNest's
hyper-representation task, Tarzanagh et al., ICML 2022), built from plain ``torch.nn`` modules."""

from torch import nn

from fedopt.problems.base import ProblemContext
from fedopt.problems.model import ModelBilevelProblem, seeded


def mlp_hyper_representation(context: ProblemContext, /, *, hidden: int = 16,
                             reg: float = 1e-2) -> ModelBilevelProblem:
    features = context.data.x_train.shape[1]
    classes = int(context.data.num_classes)
    with seeded(context.seed):  # the modules' initial weights: deterministic given the run's seed
        body = nn.Sequential(nn.Linear(features, hidden), nn.Tanh())
        head = nn.Linear(hidden, classes)
    return ModelBilevelProblem(context.data, body, head, reg=reg, dtype=context.dtype, device=context.device)
