r"""Rounds per second of FedMBO: ``local`` engine vs ``vmap`` engine vs a hand-written reference.

What is measured
----------------
FedMBO (``fedopt.algorithms.federated.fedmbo``, defaults ``truncation="full"``,
``chains="single"``) on the logistic-regression bilevel problem ``regularization_selection``
(per-feature L2 strengths ``x``, linear classifier ``y`` = flattened ``[C, d+1]`` weights, bias
in the last column) over ``synthetic`` data (60,000 samples, 50 features, 2 classes, 10
informative; 48,000 training rows after the fixed test split), split i.i.d. over N = 1000 clients
(38 training + 10 validation rows each). Algorithm: ``batch_size=32, inner_steps=5,
neumann_terms=5, outer_lr=inner_lr=neumann_lr=0.1`` and ``clients_per_round = m`` for
m in {10, 100, 500}. One outer iteration is T + 1 + (Q-1) + 1 = 11 communication rounds.

Three implementations, timed in the same process, one after the other:

1. ``local``: ``fedopt.runner.simulate`` with fedopt's ``local`` engine (a Python loop over the
   picked clients, each one a ``torch.func`` oracle call).
2. ``vmap``: ``fedopt.runner.simulate`` with fedopt's ``vmap`` engine (all picked clients in one
   batched call per round). This problem's oracles are batch-polymorphic closed forms, so the
   engine calls each client task once on the whole cohort (``Task.batched``); column
   ``vmap traced`` is the same engine with ``batched_tasks=False``, every task through
   ``torch.func.vmap``. Both run the full framework: the server program, cohort sampling and
   per-client keys from fedopt's counter-based streams, the task's minibatch draw and the
   communication and oracle accounts.
3. ``reference``: the speed-of-light reference -- the *same* FedMBO rounds written as plain
   batched tensor code (no torch.func, no generators, no pytrees, no Server): per round, sample
   m of N clients (``torch.randperm`` with a ``torch.Generator``), gather the picked clients'
   [m, b, d+1] minibatches in one index, and compute every client's reply in closed form
   (softmax-CE gradient, softmax-CE Hessian-vector product plus the regulariser's diagonal,
   cross product of the regulariser), then average. :func:`check_reference` first proves, in float64, that its
   per-client replies equal ``fedopt.oracles`` on ``problem.inner_loss`` / ``problem.outer_loss``
   (to 1e-8), and that with fedopt's own sampling streams it reproduces ``simulate``'s
   trajectory (to 1e-8).

Rounds per second = communication rounds / wall time. For the two engines: the RunResult's
``counters.comm_rounds`` / wall time of ``simulate(problem, algorithm, engine, rounds=K, seed=0,
eval_every=K)``. That wall time *includes* the two metric evaluations ``simulate`` always does
(at k=0 and k=K, full-data metrics); nothing is subtracted. K is calibrated from an untimed
warm-up run so that one measurement takes about 3 s (so evaluation is a small share; its
measured share is printed below the table and stored in the JSON). The reference does no
evaluation. Each number is the best of ``--repeats`` timed runs (default 3; the median is in the
JSON). The ``local`` engine takes seconds per outer iteration at m=500, so its K there is 1.

Targets
-------
* ``vmap`` >= 10x ``local`` rounds/s at m = 500;
* ``vmap`` within 2x of the reference (reference rounds/s / vmap rounds/s <= 2).

The script prints whether each target is met; it does not fail on a miss.

A second small table compares the FedMBO option ``hvp_mode`` (``"rev"``, the default,
reverse-over-reverse; ``"fwd"``, forward-over-reverse) for the ``vmap`` engine at m = 100 and 500.

How to run
----------
.. code-block:: bash

    python benchmarks/bench_fedmbo.py                  # full run, float32 (a few minutes)
    python benchmarks/bench_fedmbo.py --quick          # smoke run (short timings)
    python benchmarks/bench_fedmbo.py --dtype float64

Results (both tables, machine info, every timing sample) go to
``benchmarks/results/fedmbo_rounds.json`` (``--out`` to change). Timings are CPU wall-clock
timings and move with machine load: run nothing else meanwhile. torch's thread count is left at
its default unless ``--threads`` is given; on a machine shared with other busy processes,
multi-threaded torch ops stall whenever one of their threads is descheduled (single ops then take
milliseconds), so compare ``--threads 1`` numbers there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedopt import oracles
from fedopt import random as rnd
from fedopt.config import parse_config
from fedopt.registry import ALGORITHMS, ENGINES
from fedopt.runner import build, client_keys, sample_clients, simulate

N_CLIENTS = 1000
BATCH = 32
INNER_STEPS = 5
NEUMANN_TERMS = 5
LR = 0.1
FEATURES, CLASSES = 50, 2  # --features / --classes (e.g. 784 and 10 for an MNIST-sized model)
ROUNDS_PER_ITER = INNER_STEPS + 1 + (NEUMANN_TERMS - 1) + 1  # FedMBO, truncation="full"


def config_dict(m: int, dtype: str = "float32", *, engine: str = "vmap", hvp_mode: str = "rev",
                device: str = "cpu") -> dict[str, Any]:
    """The benchmark's run config (TOML-shaped dict) for ``m`` clients per round."""
    return {
        "problem": {"name": "regularization_selection"},
        "data": {"name": "synthetic",
                 "params": {"samples": 60000, "features": FEATURES, "classes": CLASSES, "informative": 10},
                 "val_fraction": 0.2},
        "partition": {"name": "iid"},
        "clients": N_CLIENTS,
        "dtype": dtype,
        "device": device,
        "seed": 0,
        "algorithm": {"name": "fedmbo", "params": {
            "batch_size": BATCH, "inner_steps": INNER_STEPS, "neumann_terms": NEUMANN_TERMS,
            "clients_per_round": m, "outer_lr": LR, "inner_lr": LR, "neumann_lr": LR,
            "hvp_mode": hvp_mode}},
        "engine": {"name": engine},
    }


def make_algorithm(m: int, dtype: str, hvp_mode: str = "rev"):
    """FedMBO for ``m`` clients per round, validated and built exactly as ``build`` does."""
    alg = parse_config(config_dict(m, dtype, hvp_mode=hvp_mode)).algorithm
    return ALGORITHMS.get(alg.name)(**alg.params)


# ---------------------------------------------------------------------------------------------
# The hand-written reference
# ---------------------------------------------------------------------------------------------

class FastSampler:
    """Cohorts by ``torch.randperm`` and minibatch rows by ``torch.rand``, one ``torch.Generator``."""

    def __init__(self, ref: Reference, seed: int = 0) -> None:
        self.ref = ref
        self.gen = torch.Generator(device=ref.device).manual_seed(seed)

    def cohort(self, m: int) -> torch.Tensor:
        return torch.randperm(self.ref.num_clients, generator=self.gen, device=self.ref.device)[:m]

    def rows(self, split: str, ids: torch.Tensor, b: int, salt: int = 0) -> torch.Tensor:
        del salt
        off, n = self.ref.off[split][ids], self.ref.n[split][ids]
        u = torch.rand(ids.numel(), b, generator=self.gen, device=self.ref.device)
        return off.unsqueeze(1) + torch.minimum((u * n.unsqueeze(1)).long(), n.unsqueeze(1) - 1)


class FedoptSampler:
    """fedopt's own streams (``Server.dispatch`` + ``_draw``): used only to check trajectories."""

    def __init__(self, ref: Reference, seed: int = 0) -> None:
        self.ref = ref
        root = rnd.key_host(seed)
        self.sample_stream, self.client_stream = rnd.fold_in_host(root, 1), rnd.fold_in_host(root, 2)
        self.r = -1
        self.keys: torch.Tensor | None = None

    def cohort(self, m: int) -> torch.Tensor:
        self.r += 1
        ids = sample_clients(rnd.fold_in_host(self.sample_stream, self.r), self.ref.num_clients, m, False)
        self.keys = torch.as_tensor(client_keys(self.client_stream, self.r, ids), device=self.ref.device)
        return torch.as_tensor(ids, device=self.ref.device)

    def rows(self, split: str, ids: torch.Tensor, b: int, salt: int = 0) -> torch.Tensor:
        keys = self.keys if salt == 0 else rnd.fold_in(self.keys, salt)
        n = self.ref.n[split][ids]
        return self.ref.off[split][ids].unsqueeze(1) + rnd.randint(keys, n, (b,))


class Reference:
    r"""FedMBO on ``RegularizationSelection`` as plain batched tensor code.

    Notation: ``A = [X, 1]`` (a client's ``[b, D]`` minibatch, D = d+1), ``Y`` its one-hot labels,
    ``W = y.view(C, D)``, ``lam = mu0 + exp(x)`` (``[D]``), ``P = softmax(A W^T)``. Per client
    (minibatch of b rows, weights 1/b):

    * ``grad_W g_i = (P - Y)^T A / b + lam * W``;  ``grad_W f_i = (P - Y)^T A / b`` on validation
      rows; ``grad_x f_i = 0``;
    * ``H_i V = (P*Z - P * sum_c(P*Z))^T A / b + lam * V`` with ``Z = A V^T``;
    * ``grad2_xy g_i p = exp(x) * sum_c W[c, :] * p[c, :]`` (only the regulariser couples x and
      y, so the cross product does not depend on the client's data: computed once per round).

    Layout (for speed; the numbers are the same): a round's ``[m, b, D]`` minibatches are one
    ``index_select`` into a flat ``[m*b, D]`` tensor, and logits / probabilities are kept
    class-major, ``[C, m*b]`` (``W @ A^T``), so the softmax runs over a leading axis (on CPU a
    softmax over a trailing axis of size C=2 is ~30x slower). Per-client replies ``[m, C, D]``
    come from one ``bmm`` over the cohort axis; the server averages them.
    """

    def __init__(self, problem, *, m: int, b: int = BATCH, T: int = INNER_STEPS, Q: int = NEUMANN_TERMS,
                 alpha: float = LR, beta: float = LR, eta: float = LR) -> None:
        d = problem.data
        self.device, self.dtype = problem.device, problem.dtype
        self.num_clients, self.C = problem.num_clients, problem.num_classes
        self.D = problem.num_features + 1
        self.mu0 = float(problem.mu0)
        self.m, self.b, self.T, self.Q = m, b, T, Q
        self.alpha, self.beta, self.eta = alpha, beta, eta
        self.A, self.Yt, self.off, self.n = {}, {}, {}, {}
        for split in ("train", "val"):  # one-time layout: features (the problem's rows already end
            xs = d[f"{split}_x"]        # with the bias column of ones), one-hot labels
            assert bool((xs[:, -1] == 1).all()) and xs.shape[1] == self.D
            self.A[split] = xs
            self.Yt[split] = F.one_hot(d[f"{split}_y"], self.C).to(xs.dtype).T.contiguous()  # [C, N]
            self.off[split], self.n[split] = d[f"{split}_off"], d[f"{split}_n"]

    # -- per-client replies, batched over the cohort axis ----------------------------------
    def gather(self, split: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[m, b]`` -> features ``[m*b, D]`` and one-hot labels ``[C, m*b]``."""
        flat = rows.reshape(-1)
        return self.A[split].index_select(0, flat), self.Yt[split].index_select(1, flat)

    def per_client(self, R: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``R^T A / b`` for every client: ``R`` ``[C, m*b]``, ``A`` ``[m*b, D]`` -> ``[m, C, D]``."""
        b = self.b
        m = A.shape[0] // b
        return torch.bmm(R.view(self.C, m, b).transpose(0, 1), A.view(m, b, self.D)) / b

    def grad_inner(self, x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, Yt: torch.Tensor) -> torch.Tensor:
        W = y.view(self.C, self.D)
        P = torch.softmax(W @ A.T, 0)  # [C, m*b]
        return (self.per_client(P - Yt, A) + (self.mu0 + torch.exp(x)) * W).flatten(1)  # [m, q]

    def grads_outer(self, x: torch.Tensor, y: torch.Tensor, A: torch.Tensor,
                    Yt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        P = torch.softmax(y.view(self.C, self.D) @ A.T, 0)
        gy = self.per_client(P - Yt, A).flatten(1)  # [m, q]
        return gy, x.new_zeros(gy.shape[0], x.numel())  # validation CE does not depend on x

    def hvp(self, x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        C = self.C
        W, V = y.view(C, self.D), v.view(C, self.D)
        LZ = torch.cat([W, V]) @ A.T  # logits and Z = V A^T in one GEMM: [2C, m*b]
        P = torch.softmax(LZ[:C], 0)
        PZ = P * LZ[C:]
        R = PZ - P * PZ.sum(0, keepdim=True)
        return (self.per_client(R, A) + (self.mu0 + torch.exp(x)) * V).flatten(1)  # [m, q]

    def cross(self, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.exp(x) * (y.view(self.C, self.D) * p.view(self.C, self.D)).sum(0)  # [p]

    # -- the server ------------------------------------------------------------------------
    def outer_iteration(self, x: torch.Tensor, y: torch.Tensor, s) -> tuple[torch.Tensor, torch.Tensor]:
        """One FedMBO outer iteration: T + 1 + (Q-1) + 1 rounds, each with a fresh cohort."""
        m, b = self.m, self.b
        for _ in range(self.T):  # lower level
            ids = s.cohort(m)
            A, Yt = self.gather("train", s.rows("train", ids, b))
            y = y - self.beta * self.grad_inner(x, y, A, Yt).mean(0)
        ids = s.cohort(m)  # PHE round 0
        A, Yt = self.gather("val", s.rows("val", ids, b))
        gy, gx = self.grads_outer(x, y, A, Yt)
        v, g_x = gy.mean(0), gx.mean(0)
        acc = v
        for _ in range(1, self.Q):  # Neumann rounds
            ids = s.cohort(m)
            A = self.A["train"].index_select(0, s.rows("train", ids, b).reshape(-1))
            v = (v - self.eta * self.hvp(x, y, A, v)).mean(0)
            acc = acc + v
        p = self.eta * acc
        s.cohort(m)  # cross round: every client's reply is the same closed form
        w = self.cross(x, y, p)
        return x - self.alpha * (g_x - w), y

    def run(self, x: torch.Tensor, y: torch.Tensor, K: int, sampler) -> tuple[torch.Tensor, torch.Tensor, int]:
        for _ in range(K):
            x, y = self.outer_iteration(x, y, sampler)
        return x, y, K * (self.T + self.Q + 1)


# ---------------------------------------------------------------------------------------------
# Check the reference against fedopt (float64)
# ---------------------------------------------------------------------------------------------

def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _require(ok: bool, msg: str) -> None:
    """An assertion that ``python -O`` does not strip."""
    if not ok:
        raise AssertionError(msg)


def check_reference(device: str = "cpu", tol: float = 1e-8, built=None) -> Any:
    """Assert, in float64, that the reference's per-client replies equal ``fedopt.oracles`` on
    ``problem.inner_loss`` / ``problem.outer_loss`` (gradient, HVP in both modes, cross product in
    both modes) for one fixed cohort and minibatch, and that with fedopt's sampling streams the
    reference reproduces ``simulate``'s iterates (on both engines). Returns the float64
    ``Built`` (reusable by a float64 benchmark)."""
    t0 = time.perf_counter()
    if built is None:
        built = build(parse_config(config_dict(8, "float64", device=device)))
    problem = built.problem
    _require(problem.dtype == torch.float64, "check_reference needs a float64 problem")
    m = 8
    ref = Reference(problem, m=m)
    gen = torch.Generator().manual_seed(1234)
    x0, y0 = problem.init()
    x = x0 + 0.5 * torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(problem.device)
    y = 0.3 * torch.randn(y0.shape, generator=gen, dtype=torch.float64).to(problem.device)
    v = torch.randn(y0.shape, generator=gen, dtype=torch.float64).to(problem.device)

    # one fixed cohort, fedopt's own minibatches
    sampler = FedoptSampler(ref, seed=7)
    ids = sampler.cohort(m)
    keys = sampler.keys
    f, g, data = problem.outer_loss, problem.inner_loss, problem.data
    inner = [problem.inner_batch(data, ids[j], keys[j], BATCH) for j in range(m)]
    outer = [problem.outer_batch(data, ids[j], keys[j], BATCH) for j in range(m)]
    rows_tr, rows_va = sampler.rows("train", ids, BATCH), sampler.rows("val", ids, BATCH)
    _require(torch.equal(rows_tr, torch.stack([bt["idx"] for bt in inner])), "training minibatch rows differ")
    _require(torch.equal(rows_va, torch.stack([bt["idx"] for bt in outer])), "validation minibatch rows differ")
    A_tr, Y_tr = ref.gather("train", rows_tr)  # [m*b, D], [C, m*b]
    A_va, Y_va = ref.gather("val", rows_va)

    errs: dict[str, float] = {}

    def stack(fn) -> torch.Tensor:
        return torch.stack([fn(j) for j in range(m)])

    errs["grad_y g_i"] = _max_err(ref.grad_inner(x, y, A_tr, Y_tr), stack(lambda j: oracles.grad_y(g, x, y, inner[j])))
    gy, gx = ref.grads_outer(x, y, A_va, Y_va)
    errs["grad_y f_i"] = _max_err(gy, stack(lambda j: oracles.grad_y(f, x, y, outer[j])))
    errs["grad_x f_i"] = _max_err(gx, stack(lambda j: oracles.grad_x(f, x, y, outer[j])))
    hv = ref.hvp(x, y, A_tr, v)
    skipped = []
    for mode in ("rev", "fwd"):
        try:
            errs[f"hvp_yy g_i ({mode})"] = _max_err(hv, stack(lambda j, mode=mode: oracles.hvp_yy(g, x, y, inner[j], v, mode=mode)))
            errs[f"jvp_xy g_i ({mode})"] = _max_err(
                ref.cross(x, y, v).expand(m, -1), stack(lambda j, mode=mode: oracles.jvp_xy(g, x, y, inner[j], v, mode=mode)))
        except NotImplementedError as e:  # forward AD through log_softmax needs torch's decompositions
            _require(mode == "fwd", str(e))  # (not loaded under `python -O` or PYTORCH_JIT=0)
            skipped.append(f"{mode} mode: {str(e).splitlines()[0]}")
    for name, e in errs.items():
        _require(e <= tol, f"reference {name} differs from fedopt.oracles by {e:.3g} > {tol:g}")

    # the whole outer iteration: same streams => same iterates as fedopt's simulate
    K = 2
    alg = make_algorithm(m, "float64")
    for eng_name, params in (("vmap", {}), ("vmap", {"batched_tasks": False}), ("local", {})):
        res = simulate(problem, alg, ENGINES.get(eng_name)(problem, **params), rounds=K, seed=0, eval_every=K)
        eng_name = eng_name + (" traced" if params else "")
        xr, yr, rounds = ref.run(x0, y0, K, FedoptSampler(ref, seed=0))
        _require(rounds == res.counters.comm_rounds, f"rounds: reference {rounds}, fedopt {res.counters.comm_rounds}")
        errs[f"x after {K} iters ({eng_name})"] = e_x = _max_err(xr, res.x)
        errs[f"y after {K} iters ({eng_name})"] = e_y = _max_err(yr, res.y)
        # x moves little in K steps (~1e-6 here), so also compare its displacement relatively
        errs[f"rel. x step ({eng_name})"] = e_dx = _max_err(xr - x0, res.x - x0) / _max_err(res.x, x0)
        _require(max(e_x, e_y, e_dx) <= tol,
                 f"reference trajectory differs from simulate/{eng_name}: x {e_x:.3g}, y {e_y:.3g}, rel. x step {e_dx:.3g}")
    print(f"check_reference: OK in {time.perf_counter() - t0:.1f}s (float64, every max |diff| <= {tol:g})")
    for name, e in errs.items():
        print(f"    {name:<24s} {e:.2e}")
    for note in skipped:
        print(f"    skipped, fedopt fails: {note}")
    return built


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device) -> tuple[int, float]:
    """``run()`` -> communication rounds; returns (rounds, wall seconds)."""
    _sync(device)
    t0 = time.perf_counter()
    rounds = run()
    _sync(device)
    return rounds, time.perf_counter() - t0


def measure(run_k, device: torch.device, *, target_s: float, repeats: int, k_max: int) -> dict[str, Any]:
    """Untimed warm-up with K=1 (also calibrates), then ``repeats`` timed runs with K chosen so
    that one run takes about ``target_s``. The headline number is the best run (highest rounds/s,
    as ``timeit`` advises: interference from other processes only ever slows a run down); the
    median is kept too."""
    _, warm = timed(lambda: run_k(1), device)
    K = max(1, min(k_max, round(target_s / max(warm, 1e-6))))
    samples = []
    for _ in range(repeats):
        rounds, dt = timed(lambda: run_k(K), device)
        samples.append({"K": K, "rounds": rounds, "wall_s": dt, "rounds_per_s": rounds / dt})
    best = max(samples, key=lambda s: s["rounds_per_s"])
    return {"K": K, "warmup_s": warm, "rounds_per_s": best["rounds_per_s"], "wall_s": best["wall_s"],
            "median_rounds_per_s": statistics.median(s["rounds_per_s"] for s in samples), "samples": samples}


def engine_runner(problem, algorithm, engine):
    def run_k(K: int) -> int:
        return simulate(problem, algorithm, engine, rounds=K, seed=0, eval_every=K).counters.comm_rounds
    return run_k


def reference_runner(problem, m: int, seed: int = 0):
    ref = Reference(problem, m=m)
    sampler = FastSampler(ref, seed)

    def run_k(K: int) -> int:
        x, y = problem.init()
        return ref.run(x, y, K, sampler)[2]
    return run_k


def metrics_time(problem, repeats: int = 3) -> float:
    """Seconds for one ``problem.metrics`` call (simulate makes two per timed run)."""
    x, y = problem.init()
    problem.metrics(x, y)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        problem.metrics(x, y)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def busy_cores(seconds: float = 1.0) -> float | None:
    """CPU cores kept busy by *other* processes (this one sleeps meanwhile), from ``/proc/stat``."""
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def machine_info(args, problem) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(), "num_interop_threads": torch.get_num_interop_threads(),
        "threads_flag": args.threads, "dtype": args.dtype, "device": str(problem.device),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "other_busy_cores_at_start": busy_cores(),
    }


def fmt(v: float) -> str:
    return f"{v:,.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short timings (smoke run): ~0.3 s per measurement, 1 repeat")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--ms", type=int, nargs="+", default=[10, 100, 500], help="clients per round to time")
    ap.add_argument("--hvp-ms", type=int, nargs="*", default=[100, 500], help="m values of the hvp_mode table")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per number (best is reported); default 3, quick 1")
    ap.add_argument("--target-s", type=float, default=None, help="seconds per timed run; default 3, quick 0.3")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--features", type=int, default=50, help="input features d (default 50)")
    ap.add_argument("--classes", type=int, default=2, help="classes C (default 2)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fedmbo_rounds.json"))
    args = ap.parse_args(argv)
    globals().update(FEATURES=args.features, CLASSES=args.classes)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    target = args.target_s or (0.3 if args.quick else 3.0)
    t_start = time.perf_counter()

    built = check_reference(args.device)
    if args.dtype != "float64":
        t0 = time.perf_counter()
        built = build(parse_config(config_dict(max(args.ms), args.dtype, device=args.device)))
        print(f"built the {args.dtype} problem in {time.perf_counter() - t0:.1f}s")
    problem, vmap_engine = built.problem, built.engine  # the config's engine is "vmap"
    local_engine = ENGINES.get("local")(problem)
    traced_engine = ENGINES.get("vmap")(problem, batched_tasks=False)
    device = problem.device
    t_metrics = metrics_time(problem)
    info = machine_info(args, problem)
    print(f"torch {info['torch']}, {info['num_threads']} threads, {args.dtype} on {info['device']}, "
          f"other processes busy on {info['other_busy_cores_at_start'] or 0:.2f} cores; one metrics() call = {t_metrics * 1e3:.1f} ms")
    busy = info["other_busy_cores_at_start"]
    if busy is not None and busy > 0.3:
        print(f"WARNING: other processes keep {busy:.1f} CPU core(s) busy; timings will be low and noisy"
              + (f"; with {torch.get_num_threads()} torch threads an op stalls whenever one of its threads is "
                 "descheduled, so they may be far off (try --threads 1)" if torch.get_num_threads() > 1 else ""))
    print(f"timing: best of {repeats} run(s) of ~{target:g}s each after an untimed warm-up; simulate(eval_every=K) "
          "includes its two metric evaluations\n")

    rows = []
    for m in args.ms:
        alg = make_algorithm(m, args.dtype)
        res = {"m": m}
        res["local"] = measure(engine_runner(problem, alg, local_engine), device, target_s=target, repeats=repeats, k_max=10_000)
        res["vmap"] = measure(engine_runner(problem, alg, vmap_engine), device, target_s=target, repeats=repeats, k_max=10_000)
        res["vmap_traced"] = measure(engine_runner(problem, alg, traced_engine), device, target_s=target, repeats=repeats,
                                     k_max=10_000)
        res["reference"] = measure(reference_runner(problem, m), device, target_s=target, repeats=repeats, k_max=100_000)
        for eng in ("local", "vmap", "vmap_traced"):
            res[eng]["eval_share"] = 2 * t_metrics / res[eng]["wall_s"]
        lo, vm, vt, rf = (res[k]["rounds_per_s"] for k in ("local", "vmap", "vmap_traced", "reference"))
        res["vmap_over_local"], res["reference_over_vmap"] = vm / lo, rf / vm
        res["reference_over_vmap_traced"] = rf / vt
        rows.append(res)
        print(f"  m={m:4d}: local {fmt(lo)} (K={res['local']['K']}), vmap {fmt(vm)} (K={res['vmap']['K']}), "
              f"vmap traced {fmt(vt)}, reference {fmt(rf)} (K={res['reference']['K']}) rounds/s", flush=True)

    hvp_rows = []
    for m in args.hvp_ms:
        r = {"m": m}
        for mode in ("rev", "fwd"):
            try:
                r[mode] = measure(engine_runner(problem, make_algorithm(m, args.dtype, mode), vmap_engine), device,
                                  target_s=target, repeats=repeats, k_max=10_000)
            except NotImplementedError as e:  # fwd under `python -O` / PYTORCH_JIT=0 (see check_reference)
                r[mode] = {"rounds_per_s": float("nan"), "error": str(e).splitlines()[0]}
        r["fwd_over_rev"] = r["fwd"]["rounds_per_s"] / r["rev"]["rounds_per_s"]
        hvp_rows.append(r)

    print(f"\n### FedMBO rounds/s, N={N_CLIENTS}, b={BATCH}, T={INNER_STEPS}, Q={NEUMANN_TERMS}, {args.dtype}, "
          f"{info['num_threads']} threads (engines: simulate with eval_every=K, eval included)\n")
    print("| m | local | vmap | vmap traced | reference | vmap / local | reference / vmap | reference / vmap traced |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['m']} | {fmt(r['local']['rounds_per_s'])} | {fmt(r['vmap']['rounds_per_s'])} | "
              f"{fmt(r['vmap_traced']['rounds_per_s'])} | {fmt(r['reference']['rounds_per_s'])} | "
              f"{r['vmap_over_local']:.1f}x | {r['reference_over_vmap']:.2f}x | {r['reference_over_vmap_traced']:.2f}x |")
    print("\n(reference / vmap = reference rounds/s / vmap rounds/s: how many times slower vmap is.)")
    print("eval share of the timed engine runs (2 metric calls / wall): " + ", ".join(
        f"m={r['m']}: local {100 * r['local']['eval_share']:.1f}%, vmap {100 * r['vmap']['eval_share']:.1f}%, "
        f"vmap traced {100 * r['vmap_traced']['eval_share']:.1f}%" for r in rows))
    if hvp_rows:
        print(f"\n### vmap engine, hvp_mode (FedMBO option), rounds/s, {args.dtype}\n")
        print("| m | vmap rev (default) | vmap fwd | fwd/rev |")
        print("|---:|---:|---:|---:|")
        for r in hvp_rows:
            fwd = "fails (see check_reference)" if "error" in r["fwd"] else fmt(r["fwd"]["rounds_per_s"])
            print(f"| {r['m']} | {fmt(r['rev']['rounds_per_s'])} | {fwd} | {r['fwd_over_rev']:.2f}x |")

    targets = {}
    at500 = next((r for r in rows if r["m"] == 500), None)
    if at500 is not None:
        targets["vmap >= 10x local at m=500"] = at500["vmap_over_local"] >= 10
    if rows:
        targets["vmap within 2x of the reference (all m)"] = all(r["reference_over_vmap"] <= 2 for r in rows)
    print()
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "fedmbo_rounds", "machine": info, "quick": args.quick, "repeats": repeats, "target_s": target,
        "config": config_dict(0, args.dtype, device=args.device) | {"note": "clients_per_round = m"},
        "rounds_per_outer_iteration": ROUNDS_PER_ITER, "metrics_call_s": t_metrics,
        "timing_note": "engines: simulate(rounds=K, eval_every=K), wall time includes the two metric evaluations "
                       "(k=0 and k=K); reference: no evaluation; rounds_per_s = best of the repeats (median also given)",
        "results": rows, "hvp_mode": hvp_rows, "targets": targets,
        "total_s": time.perf_counter() - t_start,
        "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f}s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
