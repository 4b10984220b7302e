"""Session-wide fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Keep numerics independent of the runner's load; restores the setting afterwards.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
