r"""Fair (worst-group) classification as a federated minimax problem.

A linear multinomial-logistic classifier :math:`x = \mathrm{vec}(W)`, :math:`W \in \mathbb R^{C\times(d+1)}`
(the last column is the bias: features carry a trailing column of ones, as in
:mod:`fedopt.problems.classification`), plays against a distribution :math:`y \in \Delta_G` over
:math:`G` groups:

.. math::
    \min_x \max_{y \in \Delta_G} f(x, y) = \sum_{g=1}^G y_g L_g(x) + \tfrac{\rho}{2}\|x\|^2
        - \tfrac{\lambda_y}{2}\|y\|^2, \qquad
    \Phi(x) = \max_g L_g(x) + \tfrac{\rho}{2}\|x\|^2 \quad (\lambda_y = 0)

with :math:`L_g` the mean cross-entropy over the training samples of group :math:`g`. Groups are
either the classes (``groups="label"``: class-minimax, e.g. on digits) or a sensitive attribute
the dataset carries per sample (``groups="sensitive"``: sex or race on ``adult``).

**Federated weighting.** Client :math:`i` holds :math:`n_i` training samples :math:`D_i` and

.. math::
    f_i(x, y) = \sum_g \frac{y_g}{\pi_g}\,\frac1{n_i}\sum_{j \in D_i} 1[g_j = g]\,\ell_j(x)
        + \tfrac{\rho}{2}\|x\|^2 - \tfrac{\lambda_y}{2}\|y\|^2,

where :math:`\pi_g` is the *global* fraction of training samples in group :math:`g` (a public
normalizer the server computes once) and :math:`\ell_j` the cross-entropy of sample :math:`j`. So
:math:`\frac1M\sum_i f_i = f` exactly when all clients hold the same number of samples (an i.i.d.
split); with unequal sizes the uniform client average weights client :math:`i`'s samples by
:math:`N / (M n_i)` (the algorithms optimise that average; ``objective`` and ``stationarity``
report it, while ``worst_group_loss`` and ``avg_loss`` are the central, per-sample quantities).
Minibatches come from the client's training part only; the validation part is left unused (held out).

**Structure.** For the linear model, :math:`f` is convex in :math:`x` and concave (linear for
:math:`\lambda_y = 0`) in :math:`y`: ``problem_class = "NC-C"`` — convex-concave for the linear
model; the simplex form (2) of the FESS-GDA paper with :math:`\lambda_y = 0`. With
:math:`\lambda_y > 0` it is strongly concave in :math:`y` and ``problem_class = "NC-SC"``.

``metrics(x, y)``: ``worst_group_loss`` (:math:`\Phi(x)` above, on the full training data),
``avg_loss`` (mean cross-entropy over all training samples, no regulariser), ``objective``
(:math:`\frac1M\sum_i f_i(x, y)` at full batch), ``test_acc``, ``test_acc_g{k}`` (accuracy on the
test samples of group ``k``; groups without test samples are left out), ``worst_group_test_acc``
(their minimum), ``y_g{k}`` (the current group weights), and ``stationarity`` =
``gradient_mapping``, the gradient-mapping norm of Def. 2.1 of the FESS-GDA paper with :math:`\eta = 1`:
:math:`\sqrt{\|\nabla_x f\|^2 + \|(1/\eta)(y - P_Y(y + \eta\nabla_y f))\|^2}` for the federated
:math:`f = \frac1M\sum_i f_i` at full batch.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch.func import grad

from fedopt.data import FederatedData
from fedopt.errors import ConfigError, check
from fedopt.problems.base import AbstractMinimaxProblem, ProblemContext
from fedopt.problems.classification import _draw, _weighted_ce
from fedopt.problems.ysets import make_yset
from fedopt.registry import PROBLEMS

__all__ = ["FairClassification", "fair_classification"]

_P = "problem.params"


def _one_hot(g: torch.Tensor, num: int, dtype: torch.dtype) -> torch.Tensor:
    """``[b, num]`` indicator of ``g`` by comparison (vmap-safe, unlike ``F.one_hot``)."""
    return (g.unsqueeze(-1) == torch.arange(num, device=g.device)).to(dtype)


class FairClassification(AbstractMinimaxProblem):
    """Worst-group linear classification (module docstring)."""

    def __init__(self, fed: FederatedData, *, groups: Literal["label", "sensitive"], reg: float, lam_y: float,
                 dtype: torch.dtype, device: torch.device, oracles: str = "closed_form") -> None:
        self.fed = fed
        self.num_clients = fed.num_clients
        self.num_classes = C = fed.num_classes
        self.num_features = fed.num_features
        self.groups, self.reg, self.lam_y = groups, float(reg), float(lam_y)
        self.dtype, self.device = dtype, device

        if groups == "label":
            g_train, g_test = fed.y_train, fed.y_test
            G = C
            self.group_names = tuple(str(c) for c in range(C))
        else:
            assert fed.g_train is not None and fed.g_test is not None
            g_train, g_test = fed.g_train, fed.g_test
            G = max(len(fed.group_names), int(g_train.max()) + 1, int(g_test.max()) + 1)
            self.group_names = tuple(fed.group_names) or tuple(str(k) for k in range(G))
        self.num_groups = G
        counts = np.bincount(g_train, minlength=G)
        empty = [self.group_names[k] for k in range(G) if counts[k] == 0]
        check(not empty, f"{_P}.groups = {groups!r}: group(s) {', '.join(empty)} have no training samples; "
                         "every group needs at least one (use another partition or merge groups)")
        pi = counts / counts.sum()  # the global training fraction of every group (public normaliser)
        self.pi = pi

        def t(a, dt):
            return torch.as_tensor(a, dtype=dt, device=device)

        def with_ones(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a, np.ones((len(a), 1), dtype=a.dtype)], axis=1)

        i64 = torch.int64
        self.data = {
            "train_x": t(with_ones(fed.x_train), dtype), "train_y": t(fed.y_train, i64),
            "train_g": t(g_train, i64), "train_off": t(fed.train_offsets, i64), "train_n": t(fed.train_counts, i64),
            "inv_pi": t(1.0 / pi, dtype),
        }
        self._max_train = int(fed.train_counts.max())
        self.x_test, self.y_test, self.g_test = t(with_ones(fed.x_test), dtype), t(fed.y_test, i64), t(g_test, i64)

        # the federated objective (1/M) sum_i f_i at full batch: sample j of client i weighs 1 / (M n_i)
        w = np.repeat(1.0 / (fed.num_clients * fed.train_counts), fed.train_counts)
        self.full_train = {"x": self.data["train_x"], "y": self.data["train_y"], "g": self.data["train_g"],
                           "w": t(w, dtype), "inv_pi": self.data["inv_pi"]}
        self._g_counts = t(counts, dtype)

        self.x_dim = C * (self.num_features + 1)
        self.y_dim = G
        self.y_set = make_yset("simplex", G)
        self.problem_class = "NC-SC" if self.lam_y > 0 else "NC-C"
        self.measures = ("gradient_mapping",)
        self.measure = "gradient_mapping"
        self.closed_form = {("loss", "grad_x"): self._grad_x, ("loss", "grad_y"): self._grad_y} \
            if oracles == "closed_form" else {}

    # ----------------------------------------------------------------- client side (pure, vmap-able)
    def init(self):
        x0 = torch.zeros(self.x_dim, dtype=self.dtype, device=self.device)
        y0 = torch.full((self.y_dim,), 1.0 / self.y_dim, dtype=self.dtype, device=self.device)
        return x0, y0

    def batch(self, data, client, key, batch_size):
        b = _draw(data, "train", client, key, batch_size, self._max_train)
        return {"x": b["x"], "y": b["y"], "g": data["train_g"][b["idx"]], "w": b["w"], "inv_pi": data["inv_pi"]}

    def _logits(self, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return feats @ x.reshape(self.num_classes, -1).T

    def _coef(self, y: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The group indicator ``[b, G]`` and every sample's weight ``y_{g_j} / pi_{g_j}``."""
        onehot = _one_hot(batch["g"], self.num_groups, batch["x"].dtype)
        return onehot, onehot @ (y * batch["inv_pi"])

    def loss(self, x, y, batch):
        _, coef = self._coef(y, batch)
        ce = _weighted_ce(self._logits(x, batch["x"]), batch, batch["w"] * coef)
        return ce + 0.5 * self.reg * (x @ x) - 0.5 * self.lam_y * (y @ y)

    # closed-form gradients (checked against torch.func in tests/problems/test_fair.py)
    def _grad_x(self, x, y, batch):
        A = batch["x"]
        _, coef = self._coef(y, batch)
        P = torch.softmax(self._logits(x, A), -1)
        E = P - _one_hot(batch["y"], self.num_classes, A.dtype)
        return ((E * (batch["w"] * coef).unsqueeze(-1)).T @ A).reshape(-1) + self.reg * x

    def _grad_y(self, x, y, batch):
        logits = self._logits(x, batch["x"])
        true = torch.gather(logits, -1, batch["y"].unsqueeze(-1)).squeeze(-1)
        ce = torch.logsumexp(logits, -1) - true
        onehot = _one_hot(batch["g"], self.num_groups, logits.dtype)
        return (batch["w"] * ce) @ onehot * batch["inv_pi"] - self.lam_y * y

    # ----------------------------------------------------------------------------------- server side
    def smoothness(self) -> float:
        r"""An upper bound on the smoothness of every :math:`f_i` in :math:`(x, y)` jointly.

        With :math:`A = \max_j\|a_j\|` (features including the bias 1) and :math:`\pi_{\min} = \min_g \pi_g`:
        the softmax-CE Hessian of one sample is at most :math:`\frac12\|a_j\|^2`, and the sample weights
        :math:`w_j y_{g_j}/\pi_{g_j}` of any batch sum to at most :math:`1/\pi_{\min}`, so
        :math:`\|\nabla^2_{xx} f_i\| \le \frac{A^2}{2\pi_{\min}} + \rho`; :math:`\|\nabla^2_{yy} f_i\| = \lambda_y`;
        :math:`\|\nabla_x\ell_j\| \le \sqrt2\|a_j\|` gives :math:`\|\nabla^2_{xy} f_i\| \le \sqrt2 A/\pi_{\min}`.
        The bound is :math:`\max(\frac{A^2}{2\pi_{\min}} + \rho, \lambda_y) + \sqrt2 A/\pi_{\min}`
        (loose: the 1/pi_min factors are worst cases for a client holding one group only)."""
        a2 = float(self.data["train_x"].square().sum(-1).max())
        pmin = float(self.pi.min())
        return max(0.5 * a2 / pmin + self.reg, self.lam_y) + math.sqrt(2.0 * a2) / pmin

    def group_losses(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`L_g(x)`, the mean cross-entropy of every group on the full training data."""
        logits = self._logits(x, self.data["train_x"])
        ce = torch.logsumexp(logits, -1) - torch.gather(logits, -1, self.data["train_y"].unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(self.num_groups, dtype=ce.dtype, device=ce.device).index_add(0, self.data["train_g"], ce)
        return sums / self._g_counts

    def central_objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_g y_g L_g(x) + \frac\rho2\|x\|^2 - \frac{\lambda_y}2\|y\|^2` (the central form)."""
        return y @ self.group_losses(x) + 0.5 * self.reg * (x @ x) - 0.5 * self.lam_y * (y @ y)

    @torch.no_grad()
    def metrics(self, x, y):
        Lg = self.group_losses(x)
        counts = self._g_counts
        gx, gy = grad(self.loss, argnums=(0, 1))(x, y, self.full_train)
        gmap = y - self.y_set.project(y + gy)  # eta = 1
        pred = self._logits(x, self.x_test).argmax(-1)
        correct = (pred == self.y_test).to(torch.float64)
        out = {
            "worst_group_loss": float(Lg.max() + 0.5 * self.reg * (x @ x)),
            "avg_loss": float((Lg * counts).sum() / counts.sum()),
            "objective": float(self.loss(x, y, self.full_train)),
            "test_acc": float(correct.mean()),
        }
        per_group = []
        for k in range(self.num_groups):
            mask = self.g_test == k
            if bool(mask.any()):
                acc = float(correct[mask].mean())
                out[f"test_acc_g{k}"] = acc
                per_group.append(acc)
        out["worst_group_test_acc"] = min(per_group)
        out.update({f"y_g{k}": float(v) for k, v in enumerate(y.tolist())})
        gm = float(torch.sqrt(gx.square().sum() + gmap.square().sum()))
        out["gradient_mapping"] = gm
        out["stationarity"] = gm
        return out


@PROBLEMS.register("fair_classification")
def fair_classification(context: ProblemContext, /, *, groups: Literal["label", "sensitive"] = "label",
                        reg: float = 1e-3, lam_y: float = 0.0, model: Literal["linear"] = "linear",
                        oracles: Literal["closed_form", "autodiff"] = "closed_form") -> FairClassification:
    """Worst-group classification (see :class:`FairClassification`).

    Args:
        groups: ``"label"`` (the classes are the groups: class-minimax) or ``"sensitive"`` (the
            dataset's per-sample group, e.g. ``adult`` with ``data.params.sensitive = "sex"``).
        reg: L2 strength rho on the classifier, >= 0.
        lam_y: strength of the -lam_y/2 ||y||^2 term, >= 0 (0: the plain simplex form).
        model: ``"linear"`` (multinomial logistic regression with bias), the only model.
        oracles: ``"closed_form"`` gradients (checked against torch.func) or ``"autodiff"``.
    """
    check(context.data is not None, "problem 'fair_classification' needs a [data] table (and optionally [partition])")
    fed = context.data
    assert fed is not None
    check(groups in ("label", "sensitive"),
          f"{_P}.groups = {groups!r} is not a grouping; allowed: 'label', 'sensitive'")
    check(model == "linear", f"{_P}.model = {model!r} is not a model; allowed: 'linear'")
    check(oracles in ("closed_form", "autodiff"), f"{_P}.oracles = {oracles!r}; allowed: 'closed_form', 'autodiff'")
    for name, val in (("reg", reg), ("lam_y", lam_y)):
        if isinstance(val, bool) or not isinstance(val, int | float) or not (math.isfinite(val) and val >= 0):
            raise ConfigError(f"{_P}.{name} must be a finite number >= 0, got {val!r}")
    if groups == "sensitive":
        check(fed.g_train is not None and fed.g_test is not None,
              f"{_P}.groups = 'sensitive' needs a dataset with a sensitive attribute per sample (e.g. adult); "
              f"dataset {fed.name!r} has none; allowed here: 'label'")
    return FairClassification(fed, groups=groups, reg=reg, lam_y=lam_y, dtype=context.dtype, device=context.device,
                              oracles=oracles)
