"""fedopt: a federated and decentralized optimization simulator.

>>> import fedopt
>>> df = fedopt.run("experiments/configs/fedmbo_quadratic.toml")  # doctest: +SKIP
"""

from fedopt import algorithms, data, engines, linsolve, oracles, problems, random
from fedopt.api import resume, run
from fedopt.config import RunConfig, load_config
from fedopt.errors import ConfigError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "RunConfig",
    "algorithms",
    "data",
    "engines",
    "linsolve",
    "load_config",
    "oracles",
    "problems",
    "random",
    "resume",
    "run",
]
