"""fedopt's strategies used as Flower's own: driven by Flower's ``Strategy.start`` loop, wrapped in
Flower's ``DifferentialPrivacyServerSideFixedClipping``, with ``evaluate_fn``, client-side
evaluation and ClientApp mods; a failing or hanging client. All in process, over a grid that
delivers every message to the ClientApp in this process (no simulation engine, no Ray): the
whole file runs in a few seconds.

Tolerances: Flower's loop and ``evaluate_fn`` see exactly the ``local`` engine's computation (the
same per-client code, replies summed in cohort order, float64 arrays copied without conversion),
so they are compared bitwise. The DP wrapper with noise 0 and a clipping norm far above every
update re-forms each reply as ``current + (reply - current)``, which in float64 is the reply up to
one rounding (relative 1e-16 per round); over 3 rounds the trajectory is held to 1e-12."""

import concurrent.futures
import contextlib
import itertools
import threading

import numpy as np
import pytest
from helpers import built, quadratic_config

from fedopt.engines.local import LocalEngine
from fedopt.simulation import simulate

flwr = pytest.importorskip("flwr")
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy  # noqa: E402

from fedopt.flower import FedoptStrategy, client_app, short_error  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ROUNDS = 3
FEDMBO = quadratic_config(clients=4, rounds=ROUNDS, problem={"sigma": 0.5},
                          params={"clients_per_round": 3, "batch_size": 2, "neumann_terms": 2, "inner_steps": 2})
FESS = {"seed": 1, "clients": 4, "rounds": ROUNDS, "dtype": "float64",
        "problem": {"name": "nc_sc", "params": {"dim": 3, "sigma": 0.3}},
        "algorithm": {"name": "fess_gda", "params": {"lr_x": 0.05, "lr_y": 0.05, "local_steps": 2,
                                                     "clients_per_round": 3}}}


class LocalGrid:
    """Flower's ``Grid`` contract (``get_node_ids``, ``send_and_receive``) in this process: every
    message goes to the ClientApp (its mods included) on a thread of its own; a client that raises
    gets the error reply Flower's simulation builds (``<class ...>:<'...'>``); a reply not back
    within ``timeout`` is missing, as on a real grid. Node ids are arbitrary numbers, as Flower's."""

    runs = itertools.count(1)

    def __init__(self, app, n: int) -> None:
        self.app, self.node_of = app, {1000 + 7 * i: i for i in range(n)}
        self.run_id = next(self.runs)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
        self.rounds = 0

    def get_node_ids(self):
        return list(self.node_of)

    def _call(self, m):
        ctx = Context(run_id=self.run_id, node_id=m.metadata.dst_node_id,
                      node_config={"partition-id": self.node_of[m.metadata.dst_node_id]}, state=RecordDict(),
                      run_config={})
        try:
            return self.app(m, ctx)
        except Exception as ex:  # noqa: BLE001 - what Flower's simulation does with it
            return Message(Error(code=3, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=m)

    def send_and_receive(self, messages, *, timeout=None):
        self.rounds += bool(messages)  # exchanges that sent something
        futures = [self.pool.submit(self._call, m) for m in messages]
        done, _ = concurrent.futures.wait(futures, timeout=timeout)
        return [f.result() for f in futures if f in done]


@pytest.fixture(autouse=True, scope="module")
def flower_identity():
    """Flower stamps messages with the running task's identity; set one for the in-process grid."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _local_trajectory(raw):
    """The ``local`` engine's (x_k, y_k), k = 0..K, and its records."""
    b = built(raw)
    xs = []
    result = simulate(b.problem, b.algorithm, LocalEngine(b.problem), rounds=raw["rounds"], seed=raw["seed"],
                      state_metrics=lambda s: xs.append((s.x.clone(), s.y.clone())) or {})
    return xs, result


@pytest.fixture(scope="module")
def local_fedmbo():
    return _local_trajectory(FEDMBO)


@pytest.fixture(scope="module")
def local_fess():
    return _local_trajectory(FESS)


def _strategy(raw, **kwargs):
    b = built(raw)
    s = FedoptStrategy.for_algorithm(b.problem, b.algorithm, seed=raw["seed"], num_rounds=raw["rounds"], **kwargs)
    return b, s


def _xy(arrays):
    return arrays["x"].numpy(), arrays["y"].numpy()


def _collector():
    seen = []

    def evaluate_fn(k, arrays):
        seen.append((k, *_xy(arrays)))
        return MetricRecord({"seen": float(k)})

    return seen, evaluate_fn


def test_flowers_own_loop_reproduces_local_bitwise(local_fedmbo):
    xs, _ = local_fedmbo
    b, s = _strategy(FEDMBO)
    grid = LocalGrid(client_app(b.problem), b.problem.num_clients)
    seen, evaluate_fn = _collector()
    result = Strategy.start(s, grid, initial_arrays=s.initial_arrays(), num_rounds=ROUNDS, timeout=30,
                            evaluate_fn=evaluate_fn)
    assert [k for k, *_ in seen] == list(range(ROUNDS + 1))
    for k, x, y in seen:
        assert np.array_equal(x, xs[k][0].numpy()) and np.array_equal(y, xs[k][1].numpy()), k
    assert not np.array_equal(seen[0][1], seen[-1][1])  # the run moved
    assert np.array_equal(_xy(result.arrays)[0], xs[-1][0].numpy())
    # one Flower round = one outer iteration: T + 1 + (Q - 1) + 1 communication rounds of FedMBO
    per_iteration = 2 + 1 + 1 + 1
    assert result.train_metrics_clientapp[ROUNDS]["comm_rounds"] == ROUNDS * per_iteration
    assert grid.rounds == 1 + ROUNDS * per_iteration  # + the partition-id query; no evaluation rounds


def test_start_honours_evaluate_fn_initial_arrays_and_train_config(local_fedmbo):
    xs, reference = local_fedmbo
    b, s = _strategy(FEDMBO)
    seen_config = []

    def spy(msg, context, call_next):
        if msg.metadata.message_type.startswith("train"):
            seen_config.append(msg.content["config"]["note"])
        return call_next(msg, context)

    grid = LocalGrid(client_app(b.problem, mods=[spy]), b.problem.num_clients)
    seen, evaluate_fn = _collector()
    from flwr.app import ConfigRecord

    result = s.start(grid, num_rounds=ROUNDS, timeout=30, evaluate_fn=evaluate_fn,
                     train_config=ConfigRecord({"note": "hello"}))
    assert s.run_result.records == reference.records  # fedopt's metrics, bitwise
    assert [k for k, *_ in seen] == list(range(ROUNDS + 1))
    for k, x, y in seen:
        assert np.array_equal(x, xs[k][0].numpy()) and np.array_equal(y, xs[k][1].numpy()), k
    assert result.evaluate_metrics_serverapp[2]["seen"] == 2.0  # merged next to fedopt's metrics
    assert "hypergrad_norm_sq" in result.evaluate_metrics_serverapp[2]
    assert seen_config and set(seen_config) == {"hello"}  # the mod ran on every train message

    # initial_arrays is the starting point: start at local's x_1, y_1 and run 2 rounds
    b2, s2 = _strategy(FEDMBO)
    start = ArrayRecord(torch_state_dict={"x": xs[1][0], "y": xs[1][1]})
    seen2, evaluate_fn2 = _collector()
    s2.start(LocalGrid(client_app(b2.problem), 4), initial_arrays=start, num_rounds=1, evaluate_fn=evaluate_fn2)
    assert np.array_equal(seen2[0][1], xs[1][0].numpy())
    assert not np.array_equal(seen2[1][1], xs[1][0].numpy())


def test_client_side_evaluation_is_the_mean_of_the_clients_exact_losses(local_fedmbo):
    xs, _ = local_fedmbo
    b, s = _strategy(FEDMBO, evaluate_clients=4)
    result = s.start(LocalGrid(client_app(b.problem), 4), num_rounds=1)
    got = result.evaluate_metrics_clientapp[1]
    import torch

    x, y = xs[1]
    p = b.problem
    with torch.no_grad():
        want = np.mean([float(p.outer_loss(x, y, p.outer_batch(p.data, torch.tensor(i), torch.tensor(0), None)))
                        for i in range(4)])
    assert got["clients"] == 4
    assert got["outer_loss"] == pytest.approx(want, rel=1e-12)  # same sum, another order: rounding only


def test_a_dp_wrapper_with_zero_noise_and_a_large_clipping_norm_keeps_the_trajectory(local_fess):
    xs, _ = local_fess
    b, s = _strategy(FESS)
    dp = DifferentialPrivacyServerSideFixedClipping(s, noise_multiplier=0.0, clipping_norm=1e6,
                                                    num_sampled_clients=3)
    seen, evaluate_fn = _collector()
    dp.start(LocalGrid(client_app(b.problem), 4), initial_arrays=s.initial_arrays(), num_rounds=ROUNDS,
             timeout=30, evaluate_fn=evaluate_fn)
    for k, x, y in seen:
        np.testing.assert_allclose(x, xs[k][0].numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(y, xs[k][1].numpy(), rtol=0, atol=1e-12)
    assert not np.allclose(seen[0][1], seen[-1][1])


def test_a_dp_wrapper_clips_the_client_models_as_flower_defines_it(local_fess):
    """With a tiny clipping norm every client's model update is scaled to that norm: round 1's
    result is x0 + mean_i clip(x_i - x0) (FESS-GDA's round 1 with global steps 1 is that average: its
    smoothing term is p (x_0 - z_0) = 0)."""
    xs, _ = local_fess
    b, s = _strategy(FESS)
    c = 1e-3
    dp = DifferentialPrivacyServerSideFixedClipping(s, noise_multiplier=0.0, clipping_norm=c, num_sampled_clients=3)
    seen, evaluate_fn = _collector()
    dp.start(LocalGrid(client_app(b.problem), 4), initial_arrays=s.initial_arrays(), num_rounds=1,
             evaluate_fn=evaluate_fn)
    x0, y0 = xs[0][0].numpy(), xs[0][1].numpy()
    step = np.concatenate([seen[1][1] - x0, seen[1][2] - y0])
    assert 0 < np.linalg.norm(step) <= c * (1 + 1e-9)  # a mean of updates of norm c
    assert np.linalg.norm(xs[1][0].numpy() - x0) > 10 * c  # unclipped, the step is much larger


def test_flowers_loop_needs_num_rounds_and_rounds_in_order():
    b = built(FEDMBO)
    s = FedoptStrategy.for_algorithm(b.problem, b.algorithm)
    grid = LocalGrid(client_app(b.problem), 4)
    with pytest.raises(ValueError, match="pass num_rounds="):
        s.configure_train(1, s.initial_arrays(), flwr.app.ConfigRecord(), grid)
    s.num_rounds = 2
    with pytest.raises(ValueError, match=r"configure_train\(server_round=2\) after no round"):
        s.configure_train(2, s.initial_arrays(), flwr.app.ConfigRecord(), grid)


def _failing(client, *, hang=None):
    """A mod: client ``client`` raises ValueError (or, with ``hang``, waits for that event)."""
    def mod(msg, context, call_next):
        if msg.metadata.message_type.startswith("train") and int(context.node_config["partition-id"]) == client:
            if hang is not None:
                hang.wait(20)
            else:
                raise ValueError("boom on purpose")
        return call_next(msg, context)

    return mod


RAY_REASON = ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
              "(pid=4242, ip=127.0.0.1, actor_id=ab12)\n  File \"/x/ray_actor.py\", line 56, in run\n    out = app(msg)\n"
              "ValueError: boom on purpose\n\nThe above exception was the direct cause of the following exception:\n\n"
              "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=4242)\n  File \"/x/ray_actor.py\", line 65, in run\n"
              "    raise ClientAppException(str(ex)) from ex\nflwr.clientapp.client_app.ClientAppException: \n"
              "Exception ClientAppException occurred. Message: boom on purpose'>")


def test_short_error_of_a_ray_traceback():
    assert short_error(RAY_REASON) == "ValueError: boom on purpose"
    assert short_error("x" * 1000).endswith("...") and len(short_error("x" * 1000)) == 200


def test_a_failing_client_ends_the_run_with_one_short_line():
    b, s = _strategy(FEDMBO)
    with pytest.raises(RuntimeError) as e:
        s.start(LocalGrid(client_app(b.problem, mods=[_failing(2)]), 4), num_rounds=1, timeout=10)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 200 and "\x1b" not in msg, msg
    assert msg.startswith("Flower round 1 (lower_grad): client 2 failed: ValueError: boom on purpose"), msg


def test_accept_failures_averages_over_the_replies_received():
    """FESS-GDA's round 1 with client 2 failing equals the mean over the other cohort members:
    the server program averages the replies it received (uniform weights 1/m')."""
    b, s = _strategy(FESS, accept_failures=True)
    grid = LocalGrid(client_app(b.problem, mods=[_failing(2)]), 4)
    arrays = s.initial_arrays()
    messages = list(s.configure_train(1, arrays, flwr.app.ConfigRecord(), grid))
    cohort = [int(m.content["config"]["client"]) for m in messages]
    assert 2 in cohort, cohort  # the seed puts the failing client in the cohort
    replies = grid.send_and_receive(messages, timeout=10)
    good = [r for r in replies if not r.has_error()]
    out, metrics = s.aggregate_train(1, replies)
    survivors = np.stack([r.content["arrays"].to_numpy_ndarrays()[0] for r in good])
    # FESS-GDA's round 1 with global steps 1 (z_0 = x_0): x_1 = x_0 + (mean of the models received - x_0)
    np.testing.assert_allclose(out["x"].numpy(), survivors.mean(0), rtol=0, atol=1e-14)
    assert metrics["comm_rounds"] == 1 and len(good) == len(cohort) - 1


def test_a_hanging_client_does_not_block_past_the_timeout():
    import time

    hang = threading.Event()
    try:
        b, s = _strategy(FESS)
        t = time.monotonic()
        with pytest.raises(TimeoutError, match=r"2 of 3 replies within 0.5 s \(no reply from client\(s\) \[2\]\)"):
            s.start(LocalGrid(client_app(b.problem, mods=[_failing(2, hang=hang)]), 4), num_rounds=1, timeout=0.5)
        assert time.monotonic() - t < 5
        b, s = _strategy(FESS, accept_failures=True)
        s.start(LocalGrid(client_app(b.problem, mods=[_failing(2, hang=hang)]), 4), num_rounds=1, timeout=0.5)
        assert s.run_result.counters.comm_rounds == 1
    finally:
        hang.set()
