"""Session-wide fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # One intra-op thread: the tests' tensors are tiny, and a second thread only adds synchronisation
    # (measured on 2 busy cores: a fair-classification run 50 s -> 2 s). Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
