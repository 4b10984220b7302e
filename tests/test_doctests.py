"""The examples in docstrings run and hold."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["fedopt.random", "fedopt.rates", "fedopt.algorithms.federated.fedmbo"])
def test_docstring_examples(name):
    module = importlib.import_module(name)  # the package re-exports `fedmbo` the function under the same name
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
