r"""A small federated GAN: a 2-D Gaussian mixture split non-i.i.d. over clients (``gan_mixture``).

The true distribution is the mixture of ``modes`` equally weighted Gaussians
:math:`N(c_k, s^2 I_2)`, :math:`c_k = R(\cos\frac{2\pi k}{K}, \sin\frac{2\pi k}{K})` (``radius`` R,
``mode_std`` s). Client :math:`i` holds ``samples_per_client`` real points from only
``modes_per_client`` of the modes, assigned round-robin: client :math:`i` holds modes
:math:`(i\,m + j) \bmod K`, :math:`j < m` (:math:`m` = ``modes_per_client``), and its points cycle
through them (equal counts). ``clients * modes_per_client >= modes`` is required so that every
mode is held by some client; when ``clients * modes_per_client`` is a multiple of ``modes`` every
mode is held equally often and the federation's pooled real data is the uniform mixture (otherwise
the pooled data over-weights the first modes, while the metrics still compare with the uniform
mixture). The real points are drawn once with numpy from the run seed.

The generator :math:`G_x` (the min variable ``x``) is an MLP ``latent_dim -> hidden -> hidden -> 2``
and the discriminator :math:`D_y` (the max variable ``y``) an MLP ``2 -> hidden -> hidden -> 1``
(a logit), both with ``activation`` (tanh by default, so every :math:`f_i` is smooth) and torch's
default layer initialisation from the seed. The objective is the original *minimax* GAN value

.. math::
    f_i(x, y; \xi) = \frac1b\sum_j \log\sigma(D_y(r_j)) + \frac1b\sum_j \log(1 - \sigma(D_y(G_x(z_j))))
                     - \frac\rho2\|y\|^2
                   = -\frac1b\sum_j \mathrm{softplus}(-D_y(r_j)) - \frac1b\sum_j \mathrm{softplus}(D_y(G_x(z_j)))
                     - \frac\rho2\|y\|^2

with real points :math:`r_j` from client :math:`i`'s data and latents :math:`z_j \sim N(0, I)` drawn
from the key; :math:`\rho` = ``disc_reg`` makes the y-side better conditioned (it does not make it
concave: the discriminator is a neural network). The popular *non-saturating* generator loss
:math:`-\log\sigma(D(G(z)))` is not the negative of any single :math:`f`, so it does not fit the
:math:`\min_x\max_y f` interface and is not offered. ``problem_class`` is ``"NC-NC"``: no
convergence rate of the minimax algorithms applies, and :meth:`GanMixture.smoothness` is ``None``
(FESS-GDA's smoothing weight ``p`` must be given explicitly and is a tuned hyperparameter here).

Gradients: the networks are evaluated by hand-written matmuls (the flat vectors are sliced into
``nn.Sequential``'s ``weight, bias`` layout), and ``oracles="closed_form"`` (default) gives
:math:`\nabla_x f_i` and :math:`\nabla_y f_i` by hand-written backpropagation (tested against
``torch.func`` to 1e-10 in float64; about 1.5x faster than autodiff under ``vmap``).

``batch_size=None`` is client :math:`i`'s full real data with a fixed latent sample (one latent per
real point, drawn once with numpy), so the full-batch :math:`f` is a deterministic function of
``(x, y)``; with a ``batch_size`` both the real indices and the latents come from the key.

Metrics (server side, fixed samples drawn once with numpy from the seed):

=======================  ==============================================================================
``sliced_wasserstein``   :math:`SW_2` between ``eval_samples`` generated points (a fixed latent sample)
                         and as many points of the true mixture (a fixed sample, equal counts per
                         mode): :math:`\sqrt{\frac1P\sum_p W_2^2(\langle\theta_p, G\rangle, \langle\theta_p,
                         T\rangle)}` over :math:`P = 64` evenly spaced directions
                         :math:`\theta_p = (\cos\frac{\pi p}{P}, \sin\frac{\pi p}{P})`, each 1-D
                         :math:`W_2^2` the mean squared difference of the sorted projections.
                         Two independent true samples of 2,000 points are about 0.007 apart (the
                         attribute ``sw_floor`` holds this reference value for the run's seed).
``high_quality_frac``    share of generated points within :math:`3s` of their nearest mode centre (the
                         "high-quality sample" rule of Srivastava et al., VEEGAN, 2017). For true samples
                         it is :math:`1 - e^{-9/2} \approx 0.989`.
``modes_covered``        number of modes whose high-quality points (nearest centre = that mode) are at
                         least 1% of all generated points.
``value``                :math:`f(x, y) = \frac1M\sum_i f_i(x, y)` on the full data (fixed latents).
``disc_loss``            the discriminator's cross-entropy :math:`-(f + \frac\rho2\|y\|^2)`; 2 log 2 when
                         :math:`D \equiv 0`.
``grad_mapping``         :math:`\sqrt{\|\nabla_x f\|^2 + \|\nabla_y f\|^2}` at the full data (``y`` is
                         unconstrained, so this is Def. 2.1's stationarity with :math:`\eta_y = 1`);
                         also reported as ``stationarity``.
=======================  ==============================================================================
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedopt import random as rnd
from fedopt.errors import check
from fedopt.oracles import grad_xy
from fedopt.problems.base import AbstractMinimaxProblem, ProblemContext
from fedopt.problems.ysets import make_yset
from fedopt.registry import PROBLEMS

__all__ = ["GanMixture", "gan_mixture", "high_quality", "mode_centres", "sliced_wasserstein"]

PROJECTIONS = 64  # directions of the sliced Wasserstein distance
HQ_STDS = 3.0  # a generated point is high-quality within this many mode_std of a centre
COVER_SHARE = 0.01  # a mode is covered if its high-quality points are >= this share of all points

_P = "problem.params"


def mode_centres(modes: int, radius: float) -> np.ndarray:
    """The ``[modes, 2]`` centres :math:`R(\\cos\\frac{2\\pi k}{K}, \\sin\\frac{2\\pi k}{K})`."""
    ang = 2.0 * math.pi * np.arange(modes) / modes
    return radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = PROJECTIONS) -> float:
    r""":math:`SW_2` between two equal-size 2-D samples ``[n, 2]`` over ``projections`` evenly spaced
    directions of the half circle (module docstring)."""
    assert a.shape == b.shape and a.shape[-1] == 2, (a.shape, b.shape)
    ang = math.pi * torch.arange(projections, dtype=torch.float64) / projections
    dirs = torch.stack([torch.cos(ang), torch.sin(ang)], 1)  # [P, 2]
    pa = torch.sort(a.detach().cpu().to(torch.float64) @ dirs.T, 0).values
    pb = torch.sort(b.detach().cpu().to(torch.float64) @ dirs.T, 0).values
    return float(torch.sqrt((pa - pb).square().mean()))


def high_quality(points: torch.Tensor, centres: torch.Tensor, mode_std: float) -> tuple[float, torch.Tensor]:
    """The share of ``points`` within ``HQ_STDS * mode_std`` of their nearest centre, and the number of
    such points per mode (``[modes]``, by nearest centre)."""
    p = points.detach().cpu().to(torch.float64)
    d2 = (p[:, None, :] - centres.to(torch.float64)[None]).square().sum(-1)  # [n, K]
    dmin, nearest = d2.min(1)
    hq = dmin <= (HQ_STDS * mode_std) ** 2
    counts = torch.bincount(nearest[hq], minlength=centres.shape[0])
    return float(hq.to(torch.float64).mean()), counts


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh() if activation == "tanh" else nn.ReLU())
    return nn.Sequential(*layers)


def _layers(flat: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(W [out, in], b [out])`` of every layer of an MLP with layer ``sizes``, from its flat vector
    (nn.Sequential's ``named_parameters`` order: weight, then bias, layer by layer)."""
    out, i = [], 0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        W = flat[i : i + fan_out * fan_in].reshape(fan_out, fan_in)
        i += fan_out * fan_in
        out.append((W, flat[i : i + fan_out]))
        i += fan_out
    return out


def _forward(layers, inp: torch.Tensor, tanh: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The MLP's output and the input of every layer (for :func:`_backward`)."""
    acts, h = [], inp
    for k, (W, b) in enumerate(layers):
        acts.append(h)
        h = h @ W.T + b
        if k < len(layers) - 1:
            h = torch.tanh(h) if tanh else torch.relu(h)
    return h, acts


def _backward(layers, acts: list[torch.Tensor], g: torch.Tensor, tanh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse pass of :func:`_forward` for the output cotangent ``g``: the flat parameter gradient
    and the input cotangent. tanh' = 1 - tanh^2; relu' = 1[out > 0] (torch's relu'(0) = 0)."""
    grads = []
    for k in reversed(range(len(layers))):
        W, _ = layers[k]
        h = acts[k]
        grads.append(g.sum(0))
        grads.append((g.T @ h).reshape(-1))
        g = g @ W
        if k > 0:
            g = g * (1 - h * h) if tanh else g * (h > 0).to(g.dtype)
    return torch.cat(grads[::-1]), g


def _seeded_init(module: nn.Module, gen: torch.Generator) -> None:
    """torch's default Linear initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from ``gen``."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    p.copy_(torch.empty(p.shape, dtype=torch.float64).uniform_(-bound, bound, generator=gen))


class GanMixture(AbstractMinimaxProblem):
    """See the module docstring. Build with :func:`gan_mixture`."""

    problem_class = "NC-NC"
    measures = ("grad_mapping",)
    measure = "grad_mapping"

    def __init__(self, ctx: ProblemContext, *, modes: int, radius: float, mode_std: float, modes_per_client: int,
                 samples_per_client: int, latent_dim: int, hidden: int, activation: str, disc_reg: float,
                 eval_samples: int, oracles: str = "closed_form") -> None:
        M, K, m, n = ctx.clients, modes, modes_per_client, samples_per_client
        self.num_clients, self.dtype, self.device = M, ctx.dtype, ctx.device
        self.modes, self.radius, self.mode_std = K, radius, mode_std
        self.modes_per_client, self.samples_per_client = m, n
        self.latent_dim, self.disc_reg = latent_dim, disc_reg
        self._n = n

        centres = mode_centres(K, radius)
        self.centres = torch.as_tensor(centres, dtype=torch.float64)
        # client i holds modes (i*m + j) % K; its points cycle through them
        self.client_modes = (np.arange(M)[:, None] * m + np.arange(m)[None, :]) % K  # [M, m]
        rng = np.random.default_rng([ctx.seed, 0x6A4])
        point_mode = self.client_modes[:, np.arange(n) % m]  # [M, n]
        real = centres[point_mode] + mode_std * rng.standard_normal((M, n, 2))
        z_full = rng.standard_normal((M, n, latent_dim))

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=self.dtype, device=self.device)

        self.data = {"real": t(real.reshape(M * n, 2)), "z": t(z_full.reshape(M * n, latent_dim))}
        self._full = {"real": self.data["real"], "z": self.data["z"]}  # equal n: f = pooled mean

        # fixed evaluation samples
        rng_eval = np.random.default_rng([ctx.seed, 0xE7A1])
        self._z_eval = t(rng_eval.standard_normal((eval_samples, latent_dim)))
        true_modes = np.arange(eval_samples) % K
        true = centres[true_modes] + mode_std * rng_eval.standard_normal((eval_samples, 2))
        self.true_sample = torch.as_tensor(true, dtype=torch.float64)
        true2 = centres[true_modes] + mode_std * rng_eval.standard_normal((eval_samples, 2))
        self.sw_floor = sliced_wasserstein(self.true_sample, torch.as_tensor(true2))

        # networks, initialised in float64 from the seed, then cast
        gen = torch.Generator().manual_seed(int(np.random.default_rng([ctx.seed, 0x1417]).integers(2**62)))
        self._g_sizes, self._d_sizes = [latent_dim, hidden, hidden, 2], [2, hidden, hidden, 1]
        flat = []
        for sizes in (self._g_sizes, self._d_sizes):
            net = _mlp(sizes, activation).to(torch.float64)
            _seeded_init(net, gen)
            flat.append(torch.cat([q.detach().reshape(-1) for q in net.parameters()]).to(self.device, self.dtype))
        self._x0, self._y0 = flat
        self._tanh = activation == "tanh"
        self.closed_form = {("loss", "grad_x"): self._grad_x, ("loss", "grad_y"): self._grad_y} \
            if oracles == "closed_form" else {}
        self.x_dim, self.y_dim = self._x0.numel(), self._y0.numel()
        self.y_set = make_yset("none", self.y_dim)

    # ---- oracles (pure, vmap-able) -------------------------------------------------------
    def init(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._x0.clone(), self._y0.clone()

    def batch(self, data, client, key, batch_size):
        n = self._n
        if batch_size is None:
            idx = client * n + torch.arange(n, device=data["real"].device)
            z = F.embedding(idx, data["z"])
        else:
            idx = client * n + rnd.randint(rnd.fold_in(key, 0), n, (batch_size,))
            z = rnd.normal(rnd.fold_in(key, 1), (batch_size, self.latent_dim), data["z"].dtype)
        return {"real": F.embedding(idx, data["real"]), "z": z}

    def generate(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """:math:`G_x(z)`, ``[b, 2]``."""
        return _forward(_layers(x, self._g_sizes), z, self._tanh)[0]

    def discriminate(self, y: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """The logits :math:`D_y(\\text{points})`, ``[b]``."""
        return _forward(_layers(y, self._d_sizes), points, self._tanh)[0].squeeze(-1)

    def _gan_value(self, x, y, batch):
        d_real = self.discriminate(y, batch["real"])
        d_fake = self.discriminate(y, self.generate(x, batch["z"]))
        return -F.softplus(-d_real).mean() - F.softplus(d_fake).mean()

    def loss(self, x, y, batch):
        return self._gan_value(x, y, batch) - 0.5 * self.disc_reg * (y @ y)

    # ---- closed-form gradients (hand-written backpropagation; checked against torch.func) --
    def _grad_y(self, x, y, batch):
        """:math:`\\nabla_y f_i`: one discriminator pass over the real and generated points together,
        output cotangents :math:`\\sigma(-D(r))/b` and :math:`-\\sigma(D(G(z)))/b`."""
        fake = _forward(_layers(x, self._g_sizes), batch["z"], self._tanh)[0]
        d_layers = _layers(y, self._d_sizes)
        b_r, b_f = batch["real"].shape[0], fake.shape[0]
        d, acts = _forward(d_layers, torch.cat([batch["real"], fake]), self._tanh)
        d = d.squeeze(-1)
        g = torch.cat([torch.sigmoid(-d[:b_r]) / b_r, -torch.sigmoid(d[b_r:]) / b_f]).unsqueeze(-1)
        gy, _ = _backward(d_layers, acts, g, self._tanh)
        return gy - self.disc_reg * y

    def _grad_x(self, x, y, batch):
        """:math:`\\nabla_x f_i`: the generated points' cotangent :math:`-\\sigma(D(G(z)))/b\\,\\partial D/\\partial u`
        pulled back through the generator."""
        g_layers, d_layers = _layers(x, self._g_sizes), _layers(y, self._d_sizes)
        fake, g_acts = _forward(g_layers, batch["z"], self._tanh)
        d, d_acts = _forward(d_layers, fake, self._tanh)
        g = -torch.sigmoid(d) / fake.shape[0]
        _, g_fake = _backward(d_layers, d_acts, g, self._tanh)
        gx, _ = _backward(g_layers, g_acts, g_fake, self._tanh)
        return gx

    # ---- server-side metrics -------------------------------------------------------------
    def metrics(self, x, y):
        with torch.no_grad():
            fake = self.generate(x, self._z_eval)
            gan = float(self._gan_value(x, y, self._full))
            value = gan - 0.5 * self.disc_reg * float(y.to(torch.float64) @ y.to(torch.float64))
        gx, gy = grad_xy(self.loss, x, y, self._full)
        grad_mapping = float(torch.sqrt(gx.to(torch.float64).square().sum() + gy.to(torch.float64).square().sum()))
        hq_frac, counts = high_quality(fake, self.centres, self.mode_std)
        covered = int((counts >= COVER_SHARE * len(fake)).sum())
        return {
            "sliced_wasserstein": sliced_wasserstein(fake, self.true_sample),
            "high_quality_frac": hq_frac,
            "modes_covered": float(covered),
            "value": value,
            "disc_loss": -gan,
            "grad_mapping": grad_mapping,
            "stationarity": grad_mapping,
        }

    def smoothness(self) -> float | None:
        return None  # neural networks: no useful global constant


@PROBLEMS.register("gan_mixture")
def gan_mixture(
    context: ProblemContext,
    /,
    *,
    modes: int = 8,
    radius: float = 2.0,
    mode_std: float = 0.05,
    modes_per_client: int = 2,
    samples_per_client: int = 500,
    latent_dim: int = 2,
    hidden: int = 32,
    activation: Literal["tanh", "relu"] = "tanh",
    disc_reg: float = 1e-3,
    eval_samples: int = 2000,
    oracles: Literal["closed_form", "autodiff"] = "closed_form",
) -> GanMixture:
    """A federated GAN on a ring of Gaussians, non-i.i.d. over clients (module docstring).

    Args:
        modes: number K of mixture components (>= 1), equally spaced on a circle.
        radius: the circle's radius (> 0).
        mode_std: standard deviation of every component (> 0); high-quality radius is 3 * mode_std.
        modes_per_client: modes each client holds (1..modes); clients * modes_per_client >= modes.
        samples_per_client: real points per client (>= 1), equal counts per held mode.
        latent_dim: generator input dimension (>= 1).
        hidden: width of both hidden layers of both networks (>= 1).
        activation: ``"tanh"`` (smooth f) or ``"relu"``.
        disc_reg: L2 penalty rho >= 0 on the discriminator, f -= rho/2 ||y||^2.
        eval_samples: generated and true points for the metrics (>= 2).
        oracles: ``"closed_form"`` (hand-written backpropagation, checked against torch.func to 1e-10)
            or ``"autodiff"`` (torch.func on :meth:`GanMixture.loss`).
    """
    check(context.data is None, "problem 'gan_mixture' is synthetic and takes no [data] / [partition] tables")
    check(modes >= 1, f"{_P}.modes must be >= 1, got {modes}")
    check(radius > 0 and math.isfinite(radius), f"{_P}.radius must be a finite number > 0, got {radius}")
    check(mode_std > 0 and math.isfinite(mode_std), f"{_P}.mode_std must be a finite number > 0, got {mode_std}")
    check(1 <= modes_per_client <= modes,
          f"{_P}.modes_per_client must be in 1..modes = {modes}, got {modes_per_client}")
    check(context.clients * modes_per_client >= modes,
          f"{_P}.modes_per_client = {modes_per_client} with {context.clients} clients leaves modes unheld; "
          f"allowed: clients * modes_per_client >= modes = {modes}")
    check(samples_per_client >= 1, f"{_P}.samples_per_client must be >= 1, got {samples_per_client}")
    check(latent_dim >= 1, f"{_P}.latent_dim must be >= 1, got {latent_dim}")
    check(hidden >= 1, f"{_P}.hidden must be >= 1, got {hidden}")
    check(activation in ("tanh", "relu"), f"{_P}.activation = {activation!r}; allowed: tanh, relu")
    check(disc_reg >= 0 and math.isfinite(disc_reg), f"{_P}.disc_reg must be a finite number >= 0, got {disc_reg}")
    check(eval_samples >= 2, f"{_P}.eval_samples must be >= 2, got {eval_samples}")
    return GanMixture(context, modes=modes, radius=radius, mode_std=mode_std, modes_per_client=modes_per_client,
                      samples_per_client=samples_per_client, latent_dim=latent_dim, hidden=hidden,
                      activation=activation, disc_reg=disc_reg, eval_samples=eval_samples,
                      oracles=oracles)
