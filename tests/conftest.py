"""Session-wide fixtures."""

import os
import time
import uuid

import pytest
import torch
from helpers import SESSION_ENV, runtime_processes


def pytest_configure(config):
    # A token unique to this pytest process (each xdist worker runs its own): the Ray and Flower
    # processes its tests start inherit it, which is how runtime_processes() tells them apart from
    # another session's running concurrently on the same machine.
    os.environ[SESSION_ENV] = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # One intra-op thread: the tests' tensors are tiny, and a second thread only adds synchronisation
    # (measured on 2 busy cores: a fair-classification run 50 s -> 2 s). Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _no_runtime_process_survives():
    """At the end of the session no Ray or Flower process started during it may still run
    (raylet, gcs_server, workers, flower-superlink, ...); processes of other sessions, or already
    running before this one, are not ours and are ignored."""
    before = set(runtime_processes())
    yield
    deadline = time.time() + 30
    left = {}
    while time.time() < deadline:
        left = {pid: cmd for pid, cmd in runtime_processes().items() if pid not in before}
        if not left:
            return
        time.sleep(0.5)
    pytest.fail(f"Ray/Flower processes survived the test session: {sorted(c[:100] for c in left.values())}")
