"""Flower's telemetry stays off whatever the import order (Flower reads ``FLWR_TELEMETRY_ENABLED``
once, when ``flwr.supercore.telemetry`` is first imported), and a user's own choice is kept.

One fresh interpreter (real import order; torch is imported once) with the network patched out:
``urllib.request.urlopen`` and any non-loopback ``socket.connect`` are recorded and refused. For
each order, every ``flwr`` and ``fedopt`` module (and the tests' helpers) is dropped from ``sys.modules`` and the variable
unset, the modules are imported in that order, and Flower's telemetry is asked to send an event
(``event(...)``, which posts from a thread, waited for) and a strategy runs one round over an
in-process grid. The last case sets the variable to 1 first: the event is then attempted, which
shows the patch sees telemetry when it is on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.timeout(120)

SCRIPT = r'''
import json, os, socket, sys, urllib.request

calls = []

def urlopen(request, *args, **kwargs):
    calls.append(getattr(request, "full_url", str(request)))
    raise urllib.error.URLError("network patched out")

connect = socket.socket.connect

def guarded(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
        calls.append(f"connect {address}")
        raise OSError("network patched out")
    return connect(self, address)

urllib.request.urlopen = urlopen
socket.socket.connect = guarded
sys.path.insert(0, sys.argv[1])

ORDERS = {
    "flwr first": ["flwr", "flwr.serverapp", "fedopt.flower"],
    "fedopt.flower first": ["fedopt.flower", "flwr"],
    "engine first": ["fedopt.engines.flower_engine", "flwr", "fedopt.flower"],
    "user set 1, flwr first": ["flwr", "fedopt.flower"],
}
out = {}
for name, modules in ORDERS.items():
    for m in [m for m in sys.modules if m.split(".")[0] in ("flwr", "fedopt", "helpers")]:
        del sys.modules[m]
    os.environ.pop("FLWR_TELEMETRY_ENABLED", None)
    if name.startswith("user set 1"):
        os.environ["FLWR_TELEMETRY_ENABLED"] = "1"
    before = len(calls)
    for m in modules:
        __import__(m)
    from flwr.supercore.telemetry import EventType, event

    result = event(EventType.RUN_SUPERLINK_ENTER).result(timeout=30)
    import fedopt.flower as fl
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from helpers import built, quadratic_config

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    b = built(quadratic_config(clients=2, rounds=1))
    app = fl.client_app(b.problem)

    class Grid:
        def get_node_ids(self):
            return [5, 9]

        def send_and_receive(self, messages, *, timeout=None):
            return [app(m, Context(run_id=1, node_id=m.metadata.dst_node_id,
                                   node_config={"partition-id": {5: 0, 9: 1}[m.metadata.dst_node_id]},
                                   state=RecordDict(), run_config={})) for m in messages]

    fl.FedoptStrategy.for_algorithm(b.problem, b.algorithm).start(Grid(), num_rounds=1)
    out[name] = {"calls": calls[before:], "event": result, "env": os.environ.get("FLWR_TELEMETRY_ENABLED")}
print(json.dumps(out))
'''


def test_no_telemetry_on_any_import_order():
    env = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tests)], env=env, capture_output=True, text=True,
                          timeout=100, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for order in ("flwr first", "fedopt.flower first", "engine first"):
        assert out[order] == {"calls": [], "event": "disabled", "env": "0"}, (order, out[order])
    user = out["user set 1, flwr first"]
    assert user["env"] == "1" and user["calls"] == ["https://telemetry.flower.ai/api/v1/event"], user
