r"""Bilevel tasks on a real (or labelled-synthetic) classification dataset split over clients.

All three share the data layout of :class:`fedopt.data.FederatedData`: client :math:`i` draws its
lower-level batches from its training part and its upper-level batches from its validation part.
A batch carries per-sample weights ``w`` that sum to one (``1/b`` for a minibatch of ``b``; the
client's full part for ``batch_size=None``), so every loss is a weighted mean.

================================  ===========================  =============================
problem                           upper variable x             lower variable y (L2, SC)
================================  ===========================  =============================
``hyper_cleaning``                one logit per training       linear classifier
                                  sample, weight sigma(x_j)
``regularization_selection``      log L2 strength per input    linear classifier
                                  feature
``hyper_representation``          MLP body (FedNest)           last linear layer
================================  ===========================  =============================

The global objectives are the uniform client averages :math:`f = \frac1M\sum_i f_i`,
:math:`g = \frac1M\sum_i g_i` (each :math:`f_i`, :math:`g_i` a mean over client :math:`i`'s data),
matching the server's uniform averaging of replies. ``metrics`` evaluates them exactly on the
full data.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from fedopt import random as rnd
from fedopt.data import FederatedData
from fedopt.errors import check
from fedopt.problems.base import AbstractBilevelProblem, ProblemContext
from fedopt.registry import PROBLEMS

__all__ = ["HyperCleaning", "HyperRepresentation", "RegularizationSelection"]


def _draw(data, split: str, client, key, batch_size: int | None, max_count: int, packed: bool = False):
    """Client ``client``'s minibatch from ``split`` (indices into the flat arrays, weights).

    ``packed``: features and one-hot labels come from one table ``{split}_xy`` (one gather) and the
    batch holds the labels one-hot and class-first (``onehot``, ``[C, b]``) instead of as ints
    (``y``). Batch-polymorphic: for a cohort (``client`` and ``key`` of shape ``[m]``) every leaf
    gains a leading ``[m]`` axis, as under ``vmap``."""
    offsets, counts, feats = data[f"{split}_off"], data[f"{split}_n"], data[f"{split}_x"]
    if batch_size is None:  # the full local part, padded to the largest client with zero weights
        off, n = offsets[client].unsqueeze(-1), counts[client].unsqueeze(-1)
        pos = torch.arange(max_count, device=off.device)
        idx = off + torch.minimum(pos, n - 1)
        w = (pos < n).to(feats.dtype) / n
    else:
        idx = rnd.randint_rows(key, client, offsets, counts, (batch_size,))
        w = torch.full(idx.shape, 1.0 / batch_size, dtype=feats.dtype, device=idx.device)
    # F.embedding is the fastest row gather under vmap (measured 2.2x faster than x[idx] on CPU)
    if packed:
        rows, d = F.embedding(idx, data[f"{split}_xy"]), feats.shape[-1]
        return {"x": rows[..., :d], "onehot": rows[..., d:].mT, "w": w, "idx": idx}
    return {"x": F.embedding(idx, feats), "y": data[f"{split}_y"][idx], "w": w, "idx": idx}


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` for a vector ``x``; row by row (``x[j, idx[j]]``) for a stack of them."""
    return x[idx] if x.dim() == 1 else torch.take_along_dim(x, idx, -1)


def _weighted_ce(logits: torch.Tensor, batch, w: torch.Tensor) -> torch.Tensor:
    """sum_j w_j CE(logits_j, label_j) as logsumexp - true logit: fewer ops than log_softmax, and
    forward-mode AD works through it without torch's optional decompositions (python -O). The
    true logit comes from the batch's class-first ``onehot`` if it has one (exactly the same
    number: one product by 1, the rest by 0), else from its integer labels ``y``."""
    if "onehot" in batch:
        true = (logits * batch["onehot"].mT).sum(-1)
    else:
        true = torch.gather(logits, -1, batch["y"].unsqueeze(-1)).squeeze(-1)
    return (w * (torch.logsumexp(logits, -1) - true)).sum()


def _ce_parts(y: torch.Tensor, batch, num_classes: int):
    """Weights ``W`` [C, D], features ``A`` [b, D], and, *class-first*, the softmax ``P`` [C, b] and
    residual ``E = P - onehot`` [C, b]. Class-first because reductions over a short trailing axis
    (C = 2) do not vectorise on CPU: softmax over the leading axis measured 0.85 -> 0.1 ms at
    1,024 x 16 samples. Leading (cohort) axes of ``y`` and the batch broadcast."""
    A = batch["x"]
    W = y.unflatten(-1, (num_classes, -1))
    P = torch.softmax(W @ A.mT, -2)
    return W, A, P, P - batch["onehot"]


def _ce_hvp_term(A: torch.Tensor, P: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax-CE Hessian applied to V in logit space, class-first [C, b]:
    P*U - P*<P, U>, U = V A^T."""
    PU = P * (V @ A.mT)
    return PU - P * PU.sum(-2, keepdim=True)


def _per_column(lam: torch.Tensor) -> torch.Tensor:
    """A per-column vector ``[..., D]`` shaped to scale ``[..., C, D]`` weights (as is without
    leading axes, when it broadcasts already)."""
    return lam.unsqueeze(-2) if lam.dim() > 1 else lam


def _per_client(value: torch.Tensor, batch) -> torch.Tensor:
    """``value`` ``[..., k]`` given the batch's leading (cohort) axes when it has none: a reply that
    does not depend on the client's data is still one row per client when a cohort is one call."""
    lead = batch["w"].shape[:-1]
    return value.expand(lead + value.shape[-1:]) if lead and value.dim() == 1 else value


def _ravel_spec(module: nn.Module) -> tuple[list[tuple[str, torch.Size]], torch.Tensor]:
    spec = [(n, p.shape) for n, p in module.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in module.named_parameters()])
    return spec, flat


def _unravel(flat: torch.Tensor, spec: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, shape in spec:
        k = shape.numel()
        out[name] = flat[i : i + k].reshape(shape)
        i += k
    return out


class _ClassificationBilevel(AbstractBilevelProblem):
    """Shared data handling; subclasses define ``_logits``, the losses and ``init``."""

    def __init__(self, fed: FederatedData, *, dtype: torch.dtype, device: torch.device) -> None:
        self.fed = fed
        self.num_clients = fed.num_clients
        self.num_classes = fed.num_classes
        self.num_features = fed.num_features
        self.dtype, self.device = dtype, device

        def t(a: np.ndarray, dt: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(a, dtype=dt, device=device)

        def with_ones(a: np.ndarray) -> np.ndarray:
            """Features with a trailing column of ones: the bias is the last weight column and a
            linear layer is one matmul, with no slice, copy and add for the bias in the forward and
            backward passes (MA-DSBO at 1,024 nodes went from 6.3 to 8-11 iterations/s)."""
            return np.concatenate([a, np.ones((len(a), 1), dtype=a.dtype)], axis=1)

        i64 = torch.int64
        self.data = {}
        for split, xs, ys, offs, counts in (("train", fed.x_train, fed.y_train, fed.train_offsets, fed.train_counts),
                                            ("val", fed.x_val, fed.y_val, fed.val_offsets, fed.val_counts)):
            # one table [N, D + C] of features (with the ones column) and one-hot labels: a minibatch
            # is one gather; the features alone are a view of it
            onehot = np.eye(fed.num_classes, dtype=xs.dtype)[ys]
            xy = t(np.concatenate([with_ones(xs), onehot], axis=1), dtype)
            self.data |= {f"{split}_xy": xy, f"{split}_x": xy[:, : xs.shape[1] + 1], f"{split}_y": t(ys, i64),
                          f"{split}_off": t(offs, i64), f"{split}_n": t(counts, i64)}
        self._max_train = int(fed.train_counts.max())
        self._max_val = int(fed.val_counts.max())
        self.x_test, self.y_test = t(with_ones(fed.x_test), dtype), t(fed.y_test, i64)

        def full(split: str, counts: np.ndarray) -> dict[str, torch.Tensor]:
            w = np.repeat(1.0 / (fed.num_clients * counts), counts)
            n = int(counts.sum())
            d = self.num_features + 1
            return {"x": self.data[f"{split}_x"], "onehot": self.data[f"{split}_xy"][:, d:].T, "w": t(w, dtype),
                    "idx": torch.arange(n, device=device)}

        self.full_train = full("train", fed.train_counts)
        self.full_val = full("val", fed.val_counts)

    def inner_batch(self, data, client, key, batch_size):
        return _draw(data, "train", client, key, batch_size, self._max_train, packed=True)

    def outer_batch(self, data, client, key, batch_size):
        return _draw(data, "val", client, key, batch_size, self._max_val, packed=True)

    def _linear(self, y: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Logits of the linear classifier ``y = vec(W)``, ``W`` of shape ``[C, d + 1]``, on features
        that end with a column of ones (the bias)."""
        return feats @ y.reshape(self.num_classes, -1).T

    def _logits(self, x: torch.Tensor, y: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        del x
        return self._linear(y, inputs)

    def outer_loss(self, x, y, batch):
        return _weighted_ce(self._logits(x, y, batch["x"]), batch, batch["w"])

    def _linear_closed_forms(self, sample_weights, penalty_grad, penalty_hvp, cross, cross_uses_data=True) -> dict:
        """Closed-form oracles of a linear classifier's weighted CE plus a penalty:
        ``sample_weights(x, batch)`` gives the CE weight of every sample, ``penalty_grad(x, W)`` and
        ``penalty_hvp(x, V)`` the penalty's gradient and Hessian product in W, ``cross(x, W, V, batch,
        A, P, E)`` the cross product grad2_xy g v (``P``, ``E`` class-first; ``cross(x, W, V)`` if
        ``cross_uses_data`` is false, and then the batch may be ``None``). The upper loss is the
        validation CE (no x). With ``E = P - onehot``: grad_W = (E * s) A, and the Hessian product
        is (diag(P) - P P^T)(V a) per sample.

        Every function is batch-polymorphic (leading cohort axes of x, y, v and the batch
        broadcast), so a whole cohort is one call (``batched_oracles``)."""
        C = self.num_classes

        def inner_grad_y(x, y, batch):
            W, A, P, E = _ce_parts(y, batch, C)
            return ((E * sample_weights(x, batch).unsqueeze(-2)) @ A + penalty_grad(x, W)).flatten(-2)

        def inner_hvp_yy(x, y, batch, v):
            W, A, P, _ = _ce_parts(y, batch, C)
            V = v.unflatten(-1, (C, -1))
            return ((_ce_hvp_term(A, P, V) * sample_weights(x, batch).unsqueeze(-2)) @ A
                    + penalty_hvp(x, V)).flatten(-2)

        def inner_jvp_xy(x, y, batch, v):
            V = v.unflatten(-1, (C, -1))
            if not cross_uses_data:
                out = cross(x, y.unflatten(-1, (C, -1)), V)
                return out if batch is None else _per_client(out, batch)
            W, A, P, E = _ce_parts(y, batch, C)
            return cross(x, W, V, batch, A, P, E)

        def outer_grad_y(x, y, batch):
            _, A, _, E = _ce_parts(y, batch, C)
            return ((E * batch["w"].unsqueeze(-2)) @ A).flatten(-2)

        def outer_grad_x(x, y, batch):
            return _per_client(x.new_zeros(max(x.shape[:-1], y.shape[:-1], key=len) + x.shape[-1:]), batch)

        return {
            ("inner_loss", "grad_y"): inner_grad_y,
            ("inner_loss", "hvp_yy"): inner_hvp_yy,
            ("inner_loss", "jvp_xy"): inner_jvp_xy,
            ("outer_loss", "grad_y"): outer_grad_y,
            ("outer_loss", "grad_x"): outer_grad_x,
        }

    @torch.no_grad()
    def metrics(self, x, y):
        acc = (self._logits(x, y, self.x_test).argmax(-1) == self.y_test).to(torch.float64).mean()
        gy = grad(self.inner_loss, argnums=1)(x, y, self.full_train)
        return {
            "test_acc": float(acc),
            "outer_loss": float(self.outer_loss(x, y, self.full_val)),
            "inner_loss": float(self.inner_loss(x, y, self.full_train)),
            "inner_grad_norm_sq": float(gy.square().sum()),
        }


class HyperCleaning(_ClassificationBilevel):
    r"""Data hyper-cleaning (Franceschi et al., 2017; federated as in FedNest-style benchmarks).

    A fraction ``corruption`` of the training labels is replaced by a uniformly random *other*
    label. The upper variable holds one logit :math:`x_j` per training sample (all clients'
    samples, client-major); the lower problem is a weighted, L2-regularised linear classifier
    :math:`y = (W, b)`:

    .. math::
        g_i(x, y) = \sum_{j \in \mathcal D_i^{tr}} w_j\, \sigma(x_j)\, \mathrm{CE}(W a_j + b, \tilde b_j)
                    + \tfrac{\rho}{2}\|y\|^2, \qquad
        f_i(x, y) = \sum_{j \in \mathcal D_i^{val}} w_j\, \mathrm{CE}(W a_j + b, b_j)

    with clean validation labels. ``metrics`` adds ``weight_auc``: the probability that a clean
    sample's weight :math:`\sigma(x_j)` exceeds a corrupted one's (0.5 at the uniform start).
    """

    def __init__(self, fed: FederatedData, *, corruption: float, reg: float, seed: int,
                 dtype: torch.dtype, device: torch.device, oracles: str = "closed_form") -> None:
        rng = np.random.default_rng([seed, 0xC1EA])
        n = len(fed.y_train)
        corrupted = np.zeros(n, dtype=bool)
        corrupted[rng.choice(n, size=round(corruption * n), replace=False)] = True
        shift = rng.integers(1, fed.num_classes, size=n)  # a different label, uniformly
        noisy = np.where(corrupted, (fed.y_train + shift) % fed.num_classes, fed.y_train)
        fed = dataclasses.replace(fed, y_train=noisy)
        super().__init__(fed, dtype=dtype, device=device)
        self.corrupted = torch.as_tensor(corrupted)
        self.reg = reg
        self.x_dim = n
        self.y_dim = self.num_classes * (self.num_features + 1)

        def cross(x, W, V, batch, A, P, E):
            # d/dx_j <grad_W g, V> = w_j sigma'(x_j) <E_j, A_j V^T>, scattered to the batch's samples
            idx = batch["idx"]
            sig = torch.sigmoid(_take(x, idx))
            contrib = batch["w"] * sig * (1 - sig) * (E * (V @ A.mT)).sum(-2)
            shape = max(x.shape[:-1], idx.shape[:-1], key=len) + x.shape[-1:]
            return x.new_zeros(shape).scatter_add(-1, idx.expand(shape[:-1] + idx.shape[-1:]), contrib)

        self.closed_form = self._linear_closed_forms(
            sample_weights=lambda x, batch: batch["w"] * torch.sigmoid(_take(x, batch["idx"])),
            penalty_grad=lambda x, W: reg * W,
            penalty_hvp=lambda x, V: reg * V,
            cross=cross,
        ) if oracles == "closed_form" else {}
        self.batched_oracles = bool(self.closed_form)

    def init(self):
        z = torch.zeros
        return z(self.x_dim, dtype=self.dtype, device=self.device), z(self.y_dim, dtype=self.dtype, device=self.device)

    def inner_loss(self, x, y, batch):
        sw = batch["w"] * torch.sigmoid(x[batch["idx"]])
        return _weighted_ce(self._logits(x, y, batch["x"]), batch, sw) + 0.5 * self.reg * y @ y

    def lower_smoothness(self) -> float:
        # CE Hessian <= 1/2 * ||a||^2 per sample (softmax curvature <= 1/2), weights sigma(x) <= 1.
        a2 = float(self.data["train_x"].square().sum(-1).max())  # includes the bias column
        return 0.5 * a2 + self.reg

    def metrics(self, x, y):
        out = super().metrics(x, y)
        wts = torch.sigmoid(x.detach().cpu().to(torch.float64))
        out["weight_auc"] = _auc(wts[~self.corrupted], wts[self.corrupted])
        return out


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(pos > neg) + 0.5 P(pos = neg) (Mann-Whitney), via average ranks."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = torch.cat([pos, neg]).numpy()
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    _, start, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


class RegularizationSelection(_ClassificationBilevel):
    r"""Per-feature L2 regularisation selection for multinomial logistic regression.

    .. math::
        g_i(x, y) = \sum_j w_j\,\mathrm{CE}(W a_j + b, b_j)
                    + \tfrac12 \sum_{k} (\mu_0 + e^{x_k}) \|W_{:,k}\|^2, \qquad
        f_i(x, y) = \text{validation CE}

    with one :math:`x_k` per input feature and one for the bias column; :math:`\mu_0 > 0` keeps
    every :math:`g_i` strongly convex whatever :math:`x`.
    """

    def __init__(self, fed: FederatedData, *, mu0: float, init_log_reg: float,
                 dtype: torch.dtype, device: torch.device, oracles: str = "closed_form") -> None:
        super().__init__(fed, dtype=dtype, device=device)
        self.mu0, self.init_log_reg = mu0, init_log_reg
        self.x_dim = self.num_features + 1
        self.y_dim = self.num_classes * (self.num_features + 1)
        self.closed_form = self._linear_closed_forms(
            sample_weights=lambda x, batch: batch["w"],
            penalty_grad=lambda x, W: _per_column(mu0 + torch.exp(x)) * W,
            penalty_hvp=lambda x, V: _per_column(mu0 + torch.exp(x)) * V,
            # only the regulariser couples x and y: the cross product needs no data
            cross=lambda x, W, V: torch.exp(x) * (W * V).sum(-2),
            cross_uses_data=False,
        ) if oracles == "closed_form" else {}
        self.batched_oracles = bool(self.closed_form)
        self.data_free_oracles = frozenset({("inner_loss", "jvp_xy")}) if self.closed_form else frozenset()

    def init(self):
        x0 = torch.full((self.x_dim,), self.init_log_reg, dtype=self.dtype, device=self.device)
        return x0, torch.zeros(self.y_dim, dtype=self.dtype, device=self.device)

    def inner_loss(self, x, y, batch):
        w = y.reshape(self.num_classes, -1)
        penalty = 0.5 * ((self.mu0 + torch.exp(x)) * w.square().sum(0)).sum()
        return _weighted_ce(self._logits(x, y, batch["x"]), batch, batch["w"]) + penalty


class HyperRepresentation(_ClassificationBilevel):
    r"""Hyper-representation learning (FedNest, Tarzanagh et al., 2022, §5).

    An MLP ``Linear(d, hidden) -> ReLU`` is the representation (upper variable :math:`x`); the
    last layer ``Linear(hidden, C)`` is the lower variable :math:`y`, with an L2 term so that
    every :math:`g_i` is strongly convex. :math:`g_i` is the training cross-entropy,
    :math:`f_i` the validation cross-entropy. Deviations from FedNest's code: no dropout (client
    tasks are deterministic given their key) and a squared L2 penalty
    :math:`\tfrac\rho2\|y\|^2` instead of the sum of Frobenius norms.
    """

    def __init__(self, fed: FederatedData, *, hidden: int, reg: float, seed: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(fed, dtype=dtype, device=device)
        gen = torch.Generator().manual_seed(seed)
        body = nn.Sequential(nn.Linear(self.num_features, hidden), nn.ReLU())
        with torch.no_grad():
            for p in body.parameters():  # torch's default Linear init, drawn from a seeded generator
                bound = 1.0 / self.num_features**0.5
                p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=gen))
        self.body = body.to(device=device, dtype=dtype)
        self._spec, self._x0 = _ravel_spec(self.body)
        self.hidden, self.reg = hidden, reg
        self.x_dim = self._x0.numel()
        self.y_dim = self.num_classes * (hidden + 1)

    def init(self):
        return self._x0.clone(), torch.zeros(self.y_dim, dtype=self.dtype, device=self.device)

    def _logits(self, x, y, inputs):
        feats = functional_call(self.body, _unravel(x, self._spec), (inputs[..., :-1],))
        return self._linear(y, torch.cat([feats, torch.ones_like(feats[..., :1])], -1))

    def inner_loss(self, x, y, batch):
        return _weighted_ce(self._logits(x, y, batch["x"]), batch, batch["w"]) + 0.5 * self.reg * y @ y


def _needs_data(context: ProblemContext, name: str) -> FederatedData:
    check(context.data is not None, f"problem '{name}' needs a [data] table (and optionally [partition])")
    assert context.data is not None
    return context.data


@PROBLEMS.register("hyper_cleaning")
def hyper_cleaning(context: ProblemContext, /, *, corruption: float = 0.4, reg: float = 1e-2,
                   oracles: Literal["closed_form", "autodiff"] = "closed_form") -> HyperCleaning:
    """Data hyper-cleaning (see :class:`HyperCleaning`).

    Args:
        corruption: fraction of training labels replaced by a random other label, in [0, 1).
        reg: L2 strength rho of the lower-level classifier (> 0: strong convexity).
        oracles: ``"closed_form"`` (hand-derived, checked against torch.func to 1e-10) or
            ``"autodiff"``.
    """
    fed = _needs_data(context, "hyper_cleaning")
    check(0 <= corruption < 1, f"problem.params.corruption must be in [0, 1), got {corruption}")
    check(reg > 0, f"problem.params.reg must be > 0, got {reg}")
    return HyperCleaning(fed, corruption=corruption, reg=reg, seed=context.seed, dtype=context.dtype,
                         device=context.device, oracles=oracles)


@PROBLEMS.register("regularization_selection")
def regularization_selection(context: ProblemContext, /, *, mu0: float = 1e-3, init_log_reg: float = -4.0,
                             oracles: Literal["closed_form", "autodiff"] = "closed_form") -> RegularizationSelection:
    """Per-feature L2 selection for logistic regression (see :class:`RegularizationSelection`;
    ``oracles`` as in :func:`hyper_cleaning`)."""
    fed = _needs_data(context, "regularization_selection")
    check(mu0 > 0, f"problem.params.mu0 must be > 0, got {mu0}")
    return RegularizationSelection(fed, mu0=mu0, init_log_reg=init_log_reg, dtype=context.dtype,
                                   device=context.device, oracles=oracles)


@PROBLEMS.register("hyper_representation")
def hyper_representation(context: ProblemContext, /, *, hidden: int = 200, reg: float = 1e-2) -> HyperRepresentation:
    """FedNest's hyper-representation task (see :class:`HyperRepresentation`)."""
    fed = _needs_data(context, "hyper_representation")
    check(hidden >= 1, f"problem.params.hidden must be >= 1, got {hidden}")
    check(reg > 0, f"problem.params.reg must be > 0, got {reg}")
    return HyperRepresentation(fed, hidden=hidden, reg=reg, seed=context.seed, dtype=context.dtype, device=context.device)
