r"""Bring your own model: ``torch.nn.Module``\ s and loss functions as federated problems.

Algorithms, engines, gossip and float accounting work on flat vectors ``x``, ``y``; a model
problem keeps the models' *named, shaped* parameters next to them. A :class:`ParamSpec` maps a
flat vector to a dict of views (``unravel``) and back (``ravel``), and every loss runs the
modules through :func:`torch.func.functional_call` on those dicts. So a problem built here runs
under every engine (``local``, ``vmap``, ``ray``, ``flower``) with the exact gradients, Hessian-
and Jacobian-vector products of :mod:`fedopt.oracles` (``torch.func``, no closed forms needed).

=============================  ===============================================================
class                          what it is
=============================  ===============================================================
:class:`ParamSpec`             names, shapes, dtypes; ``ravel(dict) -> flat``,
                               ``unravel(flat) -> dict``
:class:`ModelBilevelProblem`   upper parameters x, lower parameters y, a forward pass and two
                               losses over a :class:`~fedopt.data.FederatedData` split
:class:`ModelMinimaxProblem`   parameters x (descend), y (ascend, in a set Y) and one loss
``cnn_hyper_representation``   the registered worked example: a small CNN body (x) and a
                               linear head (y) on 28 x 28 images
=============================  ===============================================================

Data layout and minibatches are those of :mod:`fedopt.problems.classification` (the same
:func:`~fedopt.problems.classification._draw`): client :math:`i` draws lower-level batches from
its training part and upper-level batches from its validation part (a minimax problem uses the
training part). A batch is a dict with

==========  ===============================================================================
key         value
==========  ===============================================================================
``x``       inputs ``[b, *input_shape]`` (the flat features reshaped, e.g. to ``[b, 1, 28, 28]``)
``y``       integer labels ``[b]``
``w``       sample weights ``[b]`` summing to one (``1/b``; zero-padded for the full local part)
``idx``     the samples' rows in the flat, client-major training (or validation) table
``client``  the client of every sample ``[b]``
==========  ===============================================================================

and every loss is a weighted sum over it, so :math:`f = \frac1M\sum_i f_i` at full batch is what
``metrics`` reports. Modules are copied, cast to the problem's dtype and device and put in eval
mode (client tasks must be pure: no dropout noise, no batch-norm statistics updated in place).
Only parameters with ``requires_grad`` enter ``x`` / ``y``; frozen parameters and buffers stay
constants of the module.

To run a problem of your own through :func:`fedopt.run`, register a factory the way the problems
here are registered (the config's ``problem.params`` are the factory's keyword arguments)::

    @PROBLEMS.register("my_hyper_representation")
    def my_hyper_representation(context: ProblemContext, /, *, reg: float = 1e-2) -> ModelBilevelProblem:
        with seeded(context.seed):
            body = nn.Sequential(nn.Linear(64, 32), nn.Tanh())
            head = nn.Linear(32, 10)
        return ModelBilevelProblem(context.data, body, head, reg=reg, dtype=context.dtype,
                                   device=context.device)
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from fedopt.data import FederatedData
from fedopt.errors import check
from fedopt.problems.base import AbstractBilevelProblem, AbstractMinimaxProblem, Batch, ProblemContext
from fedopt.problems.classification import _draw, _needs_data, _weighted_ce
from fedopt.problems.ysets import YSet, make_yset
from fedopt.registry import PROBLEMS

__all__ = [
    "ModelBilevelProblem",
    "ModelMinimaxProblem",
    "ParamSpec",
    "cnn_hyper_representation",
    "seeded",
    "trainable",
    "weighted_cross_entropy",
]

Params = dict[str, torch.Tensor]
#: ``loss(x_params, y_params, batch) -> scalar``
ModelLoss = Callable[[Params, Params, Batch], torch.Tensor]
#: ``forward(x_params, y_params, inputs) -> logits``
Forward = Callable[[Params, Params, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and dtypes of a set of parameters laid out one after another in a flat vector.

    ``unravel`` splits the flat vector with one :func:`torch.split` and views every piece in its
    shape. Per-parameter slicing gives the same numbers, but the backward of every slice
    zero-fills a gradient the size of the whole vector, k full-size buffers for k tensors
    (measured, 1 CPU thread: per-client gradients of an 8-layer, 526k-parameter MLP for 5 clients
    under ``vmap``, 35-38 ms with ``torch.split`` against 182-191 ms with slicing; no difference
    measurable on the 6-tensor CNN of ``cnn_hyper_representation``, where the convolutions
    dominate). Both directions accept leading (batch) axes and work under :func:`torch.func.vmap`.

    Example:
        >>> spec = ParamSpec.of(nn.Linear(3, 2))
        >>> spec.names, spec.numel
        (('weight', 'bias'), 8)
        >>> flat = torch.arange(8.0)
        >>> spec.unravel(flat)["bias"]
        tensor([6., 7.])
        >>> bool((spec.ravel(spec.unravel(flat)) == flat).all())
        True
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]

    def __post_init__(self) -> None:
        check(len(self.names) == len(self.shapes) == len(self.dtypes),
              "ParamSpec: names, shapes and dtypes must have the same length")
        check(len(set(self.names)) == len(self.names), f"ParamSpec: duplicate parameter names in {self.names}")

    @classmethod
    def of(cls, params: nn.Module | Mapping[str, torch.Tensor]) -> ParamSpec:
        """The spec of a module's trainable parameters (``requires_grad``, in ``named_parameters``
        order) or of a dict of tensors (in its order)."""
        named = trainable(params)
        return cls(tuple(named), tuple(p.shape for p in named.values()), tuple(p.dtype for p in named.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        """The number of entries of every parameter."""
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        """The length of the flat vector."""
        return sum(self.sizes)

    def ravel(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The flat vector ``[..., numel]`` of ``params`` (leading axes, if any, shared by all)."""
        check(set(params) == set(self.names),
              f"ParamSpec.ravel: got parameters {sorted(params)}, expected {sorted(self.names)}")
        first, shape = params[self.names[0]], self.shapes[0]
        lead = first.shape[: first.dim() - len(shape)]
        return torch.cat([params[n].reshape(*lead, k) for n, k in zip(self.names, self.sizes, strict=True)], -1)

    def unravel(self, flat: torch.Tensor) -> Params:
        """Views of ``flat`` (``[..., numel]``) as named parameters ``[..., *shape]``; a parameter
        whose spec dtype differs from ``flat``'s is cast (a copy), every other one is a view."""
        lead = flat.shape[:-1]
        pieces = torch.split(flat, self.sizes, dim=-1)
        return {n: p.view(*lead, *s).to(dt)
                for n, p, s, dt in zip(self.names, pieces, self.shapes, self.dtypes, strict=True)}


def trainable(params: nn.Module | Mapping[str, torch.Tensor]) -> Params:
    """A module's parameters with ``requires_grad`` (by name), or the dict itself."""
    if isinstance(params, nn.Module):
        return {n: p for n, p in params.named_parameters() if p.requires_grad}
    return dict(params)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build modules under ``torch.manual_seed(seed)`` without moving the global RNG outside.

    Modules initialise from the global generator; forking it makes a problem's ``init``
    deterministic given its seed and leaves the caller's stream untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def weighted_cross_entropy(logits: torch.Tensor, batch: Batch, weights: torch.Tensor | None = None) -> torch.Tensor:
    r""":math:`\sum_j w_j\,\mathrm{CE}(\mathrm{logits}_j, y_j)` with the batch's labels ``y`` and
    weights ``w`` (or ``weights``); the default data term of the model problems."""
    return _weighted_ce(logits, batch, batch["w"] if weights is None else weights)


def _prepare(params: nn.Module | Mapping[str, torch.Tensor], dtype: torch.dtype,
             device: torch.device) -> nn.Module | Params:
    """A copy of ``params`` on the problem's dtype and device (a module in eval mode)."""
    if isinstance(params, nn.Module):
        return copy.deepcopy(params).to(device=device, dtype=dtype).eval()
    check(all(isinstance(v, torch.Tensor) for v in params.values()),
          "model parameters must be an nn.Module or a dict of tensors")
    return {n: v.detach().to(device=device, dtype=dtype).clone() for n, v in params.items()}


class _ModelData:
    """The data tables, minibatches and full batches shared by the two model problems."""

    fed: FederatedData
    num_clients: int
    data: dict[str, torch.Tensor]
    dtype: torch.dtype
    device: torch.device

    def _setup_data(self, fed: FederatedData, splits: tuple[str, ...], input_shape: tuple[int, ...] | None,
                    eval_batch: int, dtype: torch.dtype, device: torch.device) -> None:
        self.fed, self.num_clients = fed, fed.num_clients
        self.num_classes, self.num_features = fed.num_classes, fed.num_features
        self.dtype, self.device = dtype, torch.device(device)
        self.input_shape = tuple(input_shape) if input_shape else (fed.num_features,)
        check(math.prod(self.input_shape) == fed.num_features,
              f"input_shape {self.input_shape} does not hold the dataset's {fed.num_features} features")
        check(eval_batch >= 1, f"eval_batch must be >= 1, got {eval_batch}")
        self.eval_batch = eval_batch

        def t(a: np.ndarray, dt: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(a, dtype=dt, device=self.device)

        i64 = torch.int64
        self.data, self._max, self._full = {}, {}, {}
        for split in splits:
            xs, ys = getattr(fed, f"x_{split}"), getattr(fed, f"y_{split}")
            offs, counts = getattr(fed, f"{split}_offsets"), getattr(fed, f"{split}_counts")
            client = np.repeat(np.arange(fed.num_clients), counts)
            self.data |= {f"{split}_x": t(xs, dtype), f"{split}_y": t(ys, i64), f"{split}_off": t(offs, i64),
                          f"{split}_n": t(counts, i64), f"{split}_client": t(client, i64)}
            self._max[split] = int(counts.max())
            # the uniform client average of the clients' means: sample j of client i weighs 1 / (M n_i)
            w = np.repeat(1.0 / (fed.num_clients * counts), counts)
            self._full[split] = {"x": self._shape(self.data[f"{split}_x"]), "y": self.data[f"{split}_y"],
                                 "w": t(w, dtype), "idx": torch.arange(len(ys), device=self.device),
                                 "client": self.data[f"{split}_client"]}
        self.x_test, self.y_test = self._shape(t(fed.x_test, dtype)), t(fed.y_test, i64)

    def _shape(self, feats: torch.Tensor) -> torch.Tensor:
        return feats.unflatten(-1, self.input_shape) if len(self.input_shape) > 1 else feats

    def _batch(self, data: dict[str, torch.Tensor], split: str, client: torch.Tensor, key: torch.Tensor,
               batch_size: int | None) -> Batch:
        b = _draw(data, split, client, key, batch_size, self._max[split])
        b["x"] = self._shape(b["x"])
        b["client"] = data[f"{split}_client"][b["idx"]]
        return b

    def _chunks(self, batch: Batch) -> list[Batch]:
        """``batch`` in pieces of at most ``eval_batch`` samples (bounds the memory of metrics)."""
        n = len(batch["y"])
        return [{k: v[s : s + self.eval_batch] for k, v in batch.items()} for s in range(0, n, self.eval_batch)]

    def _accuracy(self, logits_of: Callable[[torch.Tensor], torch.Tensor]) -> float:
        correct = sum(int((logits_of(self.x_test[s : s + self.eval_batch]).argmax(-1)
                           == self.y_test[s : s + self.eval_batch]).sum())
                      for s in range(0, len(self.y_test), self.eval_batch))
        return correct / len(self.y_test)


class ModelBilevelProblem(_ModelData, AbstractBilevelProblem):
    r"""A federated bilevel problem from two parameter sets, a forward pass and two losses.

    .. math::
        \min_x \Phi(x) = \frac1M\sum_{i=1}^M f_i(x, y^*(x)), \qquad
        y^*(x) = \arg\min_y \frac1M\sum_{i=1}^M g_i(x, y),

    with, by default (the hyper-representation split of FedNest, Tarzanagh, Li, Thrampoulidis
    and Oymak, ICML 2022, §5: a shared representation learned at the upper level, a head at the
    lower level),

    .. math::
        f_i(x, y) = \sum_{j \in \mathcal D_i^{val}} w_j\,\mathrm{CE}(h_y(\phi_x(a_j)), b_j), \qquad
        g_i(x, y) = \sum_{j \in \mathcal D_i^{tr}} w_j\,\mathrm{CE}(h_y(\phi_x(a_j)), b_j)
                    + \tfrac\rho2\|y\|^2 .

    For a linear head :math:`h_y`, :math:`g_i` is :math:`\rho`-strongly convex in :math:`y`.

    ======================  ==========================  =====================================
    symbol                  code                        meaning
    ======================  ==========================  =====================================
    :math:`x`               ``x`` / ``x_spec``          ``upper``'s trainable parameters, flat
    :math:`y`               ``y`` / ``y_spec``          ``lower``'s trainable parameters, flat
    :math:`\phi_x`          ``upper``                   the representation (a module)
    :math:`h_y`             ``lower``                   the head (a module)
    :math:`h_y(\phi_x(a))`  ``forward(px, py, a)``      logits; default ``lower(upper(a))``
    :math:`a_j, b_j, w_j`   ``batch["x"/"y"/"w"]``      input, label, weight (module docstring)
    :math:`\rho`            ``reg``                     L2 strength of the default :math:`g_i`
    ======================  ==========================  =====================================

    **The reverse split** (upper = per-sample weights or regularisation strengths, lower = a
    network) comes from ``outer_loss(px, py, batch)`` / ``inner_loss(px, py, batch)`` callables
    that receive the unraveled dicts; given, they *are* :math:`f_i` / :math:`g_i` (``reg`` is
    then not added). ``upper`` / ``lower`` may be a dict of tensors instead of a module (their
    initial values); ``forward`` is then required for ``test_acc`` and the default losses.
    Hyper-cleaning, for instance::

        weights = {"logit": torch.zeros(len(fed.y_train))}   # x: one logit per training sample
        net = nn.Linear(fed.num_features, fed.num_classes)   # y

        def forward(px, py, a):
            return functional_call(net, py, (a,))

        def inner(px, py, batch):
            s = torch.sigmoid(px["logit"][batch["idx"]])
            return weighted_cross_entropy(forward(px, py, batch["x"]), batch, batch["w"] * s) + 5e-3 * sum(
                (p * p).sum() for p in py.values())

        problem = ModelBilevelProblem(fed, weights, net, forward=forward, inner_loss=inner)

    Args:
        fed: the federated data (see :func:`fedopt.data.federate`).
        upper: module or dict of tensors whose trainable parameters are ``x`` (initial values = ``init``).
        lower: module or dict of tensors whose trainable parameters are ``y``.
        forward: ``forward(px, py, inputs) -> logits``; default ``lower(upper(inputs))``.
        outer_loss: :math:`f_i` as ``outer_loss(px, py, batch)``; default the weighted CE.
        inner_loss: :math:`g_i` as ``inner_loss(px, py, batch)``; default the weighted CE +
            :math:`\frac\rho2\|y\|^2`.
        reg: :math:`\rho \ge 0` of the default inner loss.
        input_shape: the shape of one input (e.g. ``(1, 28, 28)``); default the flat features.
        eval_batch: samples per chunk when ``metrics`` evaluates the default losses and accuracy.
        lower_smoothness: a bound on the smoothness of every :math:`g_i` in :math:`y`, if known.
        dtype, device: of the parameters and the data.

    ``metrics``: ``outer_loss`` :math:`f(x, y)` and ``inner_loss`` :math:`g(x, y)` (full data),
    ``inner_grad_norm_sq`` :math:`\|\nabla_y g(x, y)\|^2` (the lower-level stationarity, named as
    for the other classification problems) and ``test_acc`` (argmax of ``forward`` on the test set).
    """

    def __init__(self, fed: FederatedData, upper: nn.Module | Mapping[str, torch.Tensor],
                 lower: nn.Module | Mapping[str, torch.Tensor], *, forward: Forward | None = None,
                 outer_loss: ModelLoss | None = None, inner_loss: ModelLoss | None = None, reg: float = 1e-2,
                 input_shape: tuple[int, ...] | None = None, eval_batch: int = 4096,
                 lower_smoothness: float | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self._setup_data(fed, ("train", "val"), input_shape, eval_batch, dtype, torch.device(device))
        check(reg >= 0, f"reg must be >= 0, got {reg}")
        self.upper, self.lower = _prepare(upper, dtype, self.device), _prepare(lower, dtype, self.device)
        self.x_spec, self.y_spec = ParamSpec.of(self.upper), ParamSpec.of(self.lower)
        self._x0 = self.x_spec.ravel(trainable(self.upper)).detach().clone()
        self._y0 = self.y_spec.ravel(trainable(self.lower)).detach().clone()
        self.x_dim, self.y_dim = self.x_spec.numel, self.y_spec.numel
        # without a forward pass (upper or lower is a dict of tensors) only custom losses can run
        self._has_forward = forward is not None or (isinstance(self.upper, nn.Module)
                                                    and isinstance(self.lower, nn.Module))
        check(self._has_forward or (outer_loss is not None and inner_loss is not None),
              "ModelBilevelProblem: upper or lower is not a module; pass forward= or both losses")
        self._forward, self._outer, self._inner, self.reg = forward, outer_loss, inner_loss, float(reg)
        self._lower_smoothness = lower_smoothness

    # ----------------------------------------------------------------- client side (pure, vmap-able)
    def init(self):
        return self._x0.clone(), self._y0.clone()

    def inner_batch(self, data, client, key, batch_size):
        return self._batch(data, "train", client, key, batch_size)

    def outer_batch(self, data, client, key, batch_size):
        return self._batch(data, "val", client, key, batch_size)

    def forward(self, px: Params, py: Params, inputs: torch.Tensor) -> torch.Tensor:
        """Logits :math:`h_y(\\phi_x(a))` from unraveled parameters."""
        if self._forward is not None:
            return self._forward(px, py, inputs)
        assert isinstance(self.upper, nn.Module) and isinstance(self.lower, nn.Module)
        return functional_call(self.lower, py, (functional_call(self.upper, px, (inputs,)),))

    def cross_entropy(self, px: Params, py: Params, batch: Batch) -> torch.Tensor:
        """The weighted cross-entropy of ``forward`` on ``batch`` (the default losses' data term)."""
        return weighted_cross_entropy(self.forward(px, py, batch["x"]), batch)

    def outer_loss(self, x, y, batch):
        px, py = self.x_spec.unravel(x), self.y_spec.unravel(y)
        return self.cross_entropy(px, py, batch) if self._outer is None else self._outer(px, py, batch)

    def inner_loss(self, x, y, batch):
        px, py = self.x_spec.unravel(x), self.y_spec.unravel(y)
        if self._inner is None:
            return self.cross_entropy(px, py, batch) + 0.5 * self.reg * (y @ y)
        return self._inner(px, py, batch)

    # ----------------------------------------------------------------------------------- server side
    def lower_smoothness(self) -> float | None:
        return self._lower_smoothness

    def _ce_full(self, x: torch.Tensor, y: torch.Tensor, split: str) -> torch.Tensor:
        """The default data term on the full ``split``, summed over chunks (it is a weighted sum)."""
        px, py = self.x_spec.unravel(x), self.y_spec.unravel(y)
        return sum((self.cross_entropy(px, py, c) for c in self._chunks(self._full[split])), x.new_zeros(()))

    @torch.no_grad()
    def metrics(self, x, y):
        px, py = self.x_spec.unravel(x), self.y_spec.unravel(y)
        full_train, full_val = self._full["train"], self._full["val"]
        outer = self._ce_full(x, y, "val") if self._outer is None else self.outer_loss(x, y, full_val)
        if self._inner is None:  # chunked: the data term is a sum over samples, the penalty added once
            inner = self._ce_full(x, y, "train") + 0.5 * self.reg * (y @ y)
            gy = grad(self._ce_full, argnums=1)(x, y, "train") + self.reg * y
        else:
            inner = self.inner_loss(x, y, full_train)
            gy = grad(self.inner_loss, argnums=1)(x, y, full_train)
        out = {"outer_loss": float(outer), "inner_loss": float(inner), "inner_grad_norm_sq": float(gy.square().sum())}
        if self._has_forward:
            out["test_acc"] = self._accuracy(lambda a: self.forward(px, py, a))
        return out


class ModelMinimaxProblem(_ModelData, AbstractMinimaxProblem):
    r"""A federated minimax problem from two parameter sets and a loss.

    .. math::
        \min_x \max_{y \in Y} f(x, y) = \frac1M\sum_{i=1}^M f_i(x, y), \qquad
        f_i(x, y) = \mathrm{loss}(x, y; \xi), \ \xi \sim \mathcal D_i^{tr}

    ==================  ========================  ==============================================
    symbol              code                      meaning
    ==================  ========================  ==============================================
    :math:`x`           ``x`` / ``x_spec``        ``x_params``' trainable parameters (descend)
    :math:`y`           ``y`` / ``y_spec``        ``y_params``' trainable parameters (ascend)
    :math:`Y`           ``y_set``                 where ``y`` lives (projected by the algorithms)
    :math:`f_i`         ``loss(px, py, batch)``   on client :math:`i`'s training minibatch
    ==================  ========================  ==============================================

    Example (distributionally robust learning over the clients, the agnostic federated learning
    of Mohri, Sivek and Suresh, ICML 2019): :math:`y \in \Delta_M` weighs the clients and
    :math:`f_i(x, y) = M\,y_i L_i(x)`, so :math:`f = \sum_i y_i L_i(x)` and
    :math:`\max_y f = \max_i L_i(x)`, the worst client's loss:

        >>> from fedopt.data import digits, federate, iid
        >>> ds = digits()
        >>> fed = federate(ds, iid()(ds.y_train, 4, 0), val_fraction=0.2, seed=0)
        >>> with seeded(0):
        ...     clf = nn.Linear(64, 10)
        >>> def loss(px, py, batch):
        ...     weight = fed.num_clients * py["p"][batch["client"]]  # M y_i for every sample
        ...     logits = functional_call(clf, px, (batch["x"],))
        ...     return weighted_cross_entropy(logits, batch, batch["w"] * weight)
        >>> pb = ModelMinimaxProblem(fed, clf, {"p": torch.full((4,), 0.25)}, loss, y_set="simplex",
        ...                          problem_class="NC-C", dtype=torch.float64)
        >>> x, y = pb.init()
        >>> (pb.x_dim, pb.y_dim), pb.x_spec.names
        ((650, 4), ('weight', 'bias'))
        >>> sorted(pb.metrics(x, y))
        ['gradient_mapping', 'objective', 'stationarity', 'test_acc']

    (``problem_class = "NC-C"``: convex-concave for the linear classifier, nonconvex in ``x`` for
    a network.)

    Args:
        fed: the federated data; minibatches come from the clients' training parts.
        x_params: module or dict of tensors whose trainable parameters are ``x``.
        y_params: module or dict of tensors whose trainable parameters are ``y``; ``init``
            projects their values onto ``y_set``.
        loss: ``loss(px, py, batch)``, :math:`f_i` on a batch (module docstring).
        y_set: ``"none"``, ``"simplex"`` or a :class:`~fedopt.problems.ysets.YSet` of dimension ``y_dim``.
        problem_class: the structure the theory may assume (``"NC-SC"``, ``"NC-C"``, ``"NC-NC"``, ...).
        smoothness: the smoothness constant :math:`l` if known (FESS-GDA's default ``p = 2l``).
        forward: ``forward(px, inputs) -> logits`` for ``test_acc``; default ``x_params(inputs)``
            when ``x_params`` is a module (no ``test_acc`` otherwise).
        input_shape, eval_batch, dtype, device: as for :class:`ModelBilevelProblem`.

    ``metrics``: ``objective`` :math:`f(x, y)` on the full training data, ``gradient_mapping`` =
    ``stationarity`` :math:`\sqrt{\|\nabla_x f\|^2 + \|y - P_Y(y + \nabla_y f)\|^2}` (the gradient
    mapping with step 1, as in :mod:`fedopt.problems.fair`), and ``test_acc``.
    """

    def __init__(self, fed: FederatedData, x_params: nn.Module | Mapping[str, torch.Tensor],
                 y_params: nn.Module | Mapping[str, torch.Tensor], loss: ModelLoss, *, y_set: str | YSet = "none",
                 problem_class: str = "NC-NC", smoothness: float | None = None,
                 forward: Callable[[Params, torch.Tensor], torch.Tensor] | None = None,
                 input_shape: tuple[int, ...] | None = None, eval_batch: int = 4096,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self._setup_data(fed, ("train",), input_shape, eval_batch, dtype, torch.device(device))
        self.x_module, self.y_module = _prepare(x_params, dtype, self.device), _prepare(y_params, dtype, self.device)
        self.x_spec, self.y_spec = ParamSpec.of(self.x_module), ParamSpec.of(self.y_module)
        self.x_dim, self.y_dim = self.x_spec.numel, self.y_spec.numel
        self.y_set = y_set if isinstance(y_set, YSet) else make_yset(y_set, self.y_dim, where="y_set")
        check(self.y_set.dim == self.y_dim, f"y_set has dimension {self.y_set.dim}, y has {self.y_dim}")
        self._x0 = self.x_spec.ravel(trainable(self.x_module)).detach().clone()
        self._y0 = self.y_set.project(self.y_spec.ravel(trainable(self.y_module)).detach()).clone()
        self._loss, self._forward, self._smoothness = loss, forward, smoothness
        self.problem_class = problem_class
        self.measures = ("gradient_mapping",)
        self.measure = "gradient_mapping"

    def init(self):
        return self._x0.clone(), self._y0.clone()

    def batch(self, data, client, key, batch_size):
        return self._batch(data, "train", client, key, batch_size)

    def loss(self, x, y, batch):
        return self._loss(self.x_spec.unravel(x), self.y_spec.unravel(y), batch)

    def smoothness(self) -> float | None:
        return self._smoothness

    @torch.no_grad()
    def metrics(self, x, y):
        full = self._full["train"]
        gx, gy = grad(self.loss, argnums=(0, 1))(x, y, full)
        gmap = y - self.y_set.project(y + gy)  # step 1
        gm = float(torch.sqrt(gx.square().sum() + gmap.square().sum()))
        out = {"objective": float(self.loss(x, y, full)), "gradient_mapping": gm, "stationarity": gm}
        px = self.x_spec.unravel(x)
        if self._forward is not None:
            out["test_acc"] = self._accuracy(lambda a: self._forward(px, a))  # type: ignore[misc]
        elif isinstance(self.x_module, nn.Module):
            module = self.x_module
            out["test_acc"] = self._accuracy(lambda a: functional_call(module, px, (a,)))
        return out


class _SmallCNN(nn.Module):
    """conv k x k -> ReLU -> maxpool 2 -> conv k x k -> ReLU -> maxpool 2 -> flatten -> linear -> ReLU
    -> scaled to unit length.

    Why unit length: it bounds the curvature of the head's loss whatever the body, so fixed inner
    and Neumann steps stay stable (see :func:`cnn_hyper_representation`). Measured without it
    (FedMBO on MNIST-5k, 5 of 10 clients, batch 32): the features grew and the runs went to NaN
    within 30 outer iterations even at outer_lr 0.15 / inner_lr 0.5; with it, 150 iterations at
    outer_lr 2 / inner_lr 1 are stable."""

    def __init__(self, side: int, conv1: int, conv2: int, kernel: int, hidden: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, conv1, kernel), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(conv1, conv2, kernel), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(-3),
        )
        flat = self.features(torch.zeros(1, 1, side, side)).shape[-1]
        self.project = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU())

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.features(a)), dim=-1)


def _cnn_side(side: int, kernel: int) -> int:
    """The side of :class:`_SmallCNN`'s last feature map (< 1: the image is too small)."""
    for _ in range(2):
        side = (side - kernel + 1) // 2
    return side


@PROBLEMS.register("cnn_hyper_representation")
def cnn_hyper_representation(context: ProblemContext, /, *, hidden: int = 32, conv1: int = 8, conv2: int = 16,
                             kernel: int = 5, reg: float = 1e-2) -> ModelBilevelProblem:
    r"""Hyper-representation with a small CNN body (x) and a linear head (y) on square images.

    The body :math:`\phi_x` is ``conv(1 -> conv1, kernel) -> ReLU -> maxpool 2 -> conv(conv1 ->
    conv2, kernel) -> ReLU -> maxpool 2 -> flatten -> Linear(., hidden) -> ReLU``, scaled to unit
    length; the head is ``Linear(hidden, C)``. The losses are :class:`ModelBilevelProblem`'s
    defaults (validation CE; training CE + :math:`\frac\rho2\|y\|^2`). Both start from torch's
    default initialisation under the run's seed. On 28 x 28 images (``mnist5k``,
    ``fashion_mnist``) with the defaults: 11,648 upper and 330 lower parameters.

    With :math:`\|\phi_x(a)\| = 1`, every :math:`g_i` is :math:`\rho`-strongly convex and
    :math:`(1 + \rho)`-smooth in :math:`y` for *every* :math:`x` (the per-sample softmax-CE
    Hessian is at most :math:`\frac12\|(\phi, 1)\|^2 = 1`), so ``lower_smoothness`` is
    :math:`1 + \rho` and inner / Neumann steps up to :math:`1/(1 + \rho)` are safe.

    Args:
        hidden: width of the representation.
        conv1, conv2: channels of the two convolutions.
        kernel: side of the convolution kernels (the image must survive two conv + pool stages).
        reg: L2 strength :math:`\rho > 0` of the head (strong convexity of every :math:`g_i`).
    """
    fed = _needs_data(context, "cnn_hyper_representation")
    for name, val in (("hidden", hidden), ("conv1", conv1), ("conv2", conv2), ("kernel", kernel)):
        check(val >= 1, f"problem.params.{name} must be >= 1, got {val}")
    check(reg > 0, f"problem.params.reg must be > 0, got {reg}")
    side = math.isqrt(fed.num_features)
    check(side * side == fed.num_features,
          f"problem 'cnn_hyper_representation' needs square images; dataset {fed.name!r} has "
          f"{fed.num_features} features")
    largest = max((k for k in range(1, side + 1) if _cnn_side(side, k) >= 1), default=0)
    check(kernel <= largest, f"problem.params.kernel = {kernel} is too large for {side} x {side} images "
                             f"(two conv + pool stages); allowed: 1..{largest}")
    with seeded(context.seed):
        body = _SmallCNN(side, conv1, conv2, kernel, hidden)
        head = nn.Linear(hidden, fed.num_classes)
    return ModelBilevelProblem(fed, body, head, reg=reg, input_shape=(1, side, side), lower_smoothness=1.0 + reg,
                               dtype=context.dtype, device=context.device)
