r"""Theoretical rates to draw over measured curves: one function per theorem.

Each returns a :class:`Rate`: the *shape* :math:`r(T)` of the bound on the quantity the theorem
controls (up to one constant :math:`C`, which depends on problem constants and initial steps and is
fitted on the measured curve's tail by :meth:`Rate.fit`), the citation, and whether the exponent
could be checked against the paper. A bound is an upper bound: a measured curve
*below* :math:`C\,r(T)` with the same slope confirms the rate; one that falls faster (e.g. linear
convergence on a strongly convex problem) is consistent with it but does not test it.
``exponent_verified`` says whether the rate's exponents could be read in the paper; forms that are
documented reconstructions say so in their docstrings.

Example:
    >>> import numpy as np
    >>> rate = d_tfbo()
    >>> T = np.array([10.0, 100.0, 1000.0])
    >>> round(rate.fit(T, 3.0 / T), 12)
    3.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Rate", "d_tfbo", "dbo", "dbo_stochastic", "fedmbo", "ma_dsbo", "s_tfbo"]


@dataclass(frozen=True)
class Rate:
    """The shape of a convergence bound, :math:`\\text{quantity}(T) \\le C\\, r(T)`."""

    name: str
    quantity: str  # what the theorem bounds, e.g. "(1/T) sum ||grad Phi(x_t)||^2"
    label: str  # the shape for a legend, e.g. "$C/T$"
    citation: str
    exponent_verified: bool  # False: the exponents are a documented reconstruction
    shape: Callable[[np.ndarray], np.ndarray]
    valid_from: float = 1.0  # the shape is an asymptotic form: fitted and drawn only for T >= this

    def __call__(self, T: np.ndarray, C: float = 1.0) -> np.ndarray:
        return C * self.shape(np.asarray(T, dtype=np.float64))

    def fit(self, T: np.ndarray, values: np.ndarray, *, tail: float = 0.5) -> float:
        """The constant :math:`C` matching the last ``tail`` fraction of the curve: the geometric
        mean of ``values / shape(T)`` there (a least-squares fit of the intercept in log-log)."""
        T, values = np.asarray(T, dtype=np.float64), np.asarray(values, dtype=np.float64)
        keep = (T >= self.valid_from) & np.isfinite(values) & (values > 0)
        T, values = T[keep], values[keep]
        if T.size == 0:
            raise ValueError(f"no positive finite points with T >= {self.valid_from:g} to fit {self.name}'s rate on")
        start = int(np.floor((1 - tail) * T.size))
        T, values = T[start:], values[start:]
        return float(np.exp(np.mean(np.log(values) - np.log(self.shape(T)))))


def d_tfbo() -> Rate:
    r"""D-TFBO: :math:`O(1/\varepsilon)` iterations to :math:`\|\nabla\Phi\|^2 \le \varepsilon`, i.e.
    :math:`\frac1T\sum_{t<T}\|\nabla\Phi(x_t)\|^2 \le C/T` with inner tolerances
    :math:`\varepsilon_y = \varepsilon_v = 1/T` (Yang, Ban, Huang, Ma and Ji, ICLR 2025,
    arXiv:2410.05140; the complexity is the abstract's, verified; that the theorem bounds this average
    is a reconstruction, ``papers/tfbo.md`` §3.2)."""
    return Rate("D-TFBO", "(1/T) sum_t ||grad Phi(x_t)||^2", "$C/T$",
                "Yang et al., ICLR 2025 (arXiv:2410.05140), D-TFBO: O(1/eps) iterations",
                exponent_verified=True, shape=lambda T: 1.0 / T)


def s_tfbo() -> Rate:
    r"""S-TFBO: :math:`O(\varepsilon^{-1}\log^4(1/\varepsilon))` iterations, inverted to
    :math:`\frac1T\sum_{t<T}\|\nabla\Phi(x_t)\|^2 \le C\log^4(T)/T` (to leading order; same paper and
    caveat as :func:`d_tfbo`: the complexity is verified, the averaged form is not). The shape
    decreases only from :math:`T = e^4 \approx 55`, where it is fitted and drawn."""
    return Rate("S-TFBO", "(1/T) sum_t ||grad Phi(x_t)||^2", r"$C\log^4 T/T$",
                "Yang et al., ICLR 2025 (arXiv:2410.05140), S-TFBO: O(eps^-1 log^4(1/eps)) iterations",
                exponent_verified=True, shape=lambda T: np.log(T) ** 4 / T, valid_from=math.exp(4))


def fedmbo(n: int) -> Rate:
    r"""FedMBO with :math:`n` clients sampled per round: :math:`\frac1K\sum_{k<K}\mathbb{E}\|\nabla\Phi(x_k)\|^2
    = O\big(\tfrac{1}{\sqrt{nK}} + \tfrac1K + \tfrac{\sqrt n}{K^{3/2}}\big)` with
    :math:`\alpha = \Theta(\sqrt{n/K})` (Huang, Zhang and Ji, "Achieving Linear Speedup in Non-IID
    Federated Bilevel Learning", ICML 2023, main theorem; ``papers/fedmbo.md``). The three terms'
    constants differ in the theorem; here one constant scales their sum, which is exact only up to
    those constants. Linear speedup: iterations to :math:`\varepsilon` scale as :math:`1/(n\varepsilon^2)`."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return Rate(f"FedMBO (n = {n})", "(1/K) sum_k E||grad Phi(x_k)||^2",
                r"$C(1/\sqrt{nK} + 1/K + \sqrt{n}/K^{1.5})$",
                "Huang, Zhang and Ji, ICML 2023 (FedMBO), linear speedup in the sampled clients",
                exponent_verified=True,
                shape=lambda K: 1 / np.sqrt(n * K) + 1 / K + np.sqrt(n) / K**1.5)


def ma_dsbo() -> Rate:
    r"""MA-DSBO: :math:`\frac1K\sum_{k<K}\mathbb{E}\|\nabla\Phi(\bar x_k)\|^2 = O(1/\sqrt K)` with
    :math:`\alpha \asymp 1/\sqrt K` and :math:`T, N = \Theta(\log K)` (Chen, Huang, Ma and
    Balasubramanian, ICML 2023). The paper's theorem could not be read: the exponent comes from the
    :math:`O(\varepsilon^{-2}\log(1/\varepsilon))` sample complexity that two later papers (D-SOBA,
    LoPA) restate, and the spectral-gap dependence is unknown, so no (1 - rho) factor is included
    (``papers/dsbo.md`` §3.1-3.3)."""
    return Rate("MA-DSBO", "(1/K) sum_k E||grad Phi(x_bar_k)||^2", r"$C/\sqrt{K}$",
                "Chen, Huang, Ma and Balasubramanian, ICML 2023 (MA-DSBO); exponent from D-SOBA/LoPA restatements",
                exponent_verified=False, shape=lambda K: 1 / np.sqrt(K))


def dbo() -> Rate:
    r"""DBO with exact local oracles on homogeneous data: :math:`\frac1K\sum_{k<K}\|\nabla\Phi(\bar
    x_k)\|^2 = O(1/K)` with :math:`T, N = O(\log K)` (Chen, Huang and Ma, 2022). Reconstructed from the
    single-agent double-loop analysis; UNVERIFIED (``papers/decentralized_bilevel.md`` §3.2). With
    heterogeneous data and no tracking a bias of order :math:`\alpha^2\zeta^2/(1-\rho)^2` remains."""
    return Rate("DBO", "(1/K) sum_k ||grad Phi(x_bar_k)||^2", "$C/K$",
                "Chen, Huang and Ma, 2022 (DBO), deterministic form reconstructed",
                exponent_verified=False, shape=lambda K: 1.0 / K)


def dbo_stochastic() -> Rate:
    r"""Stochastic DBO: leading term :math:`O(1/\sqrt K)`, no linear speedup in the number of nodes
    (sample complexity :math:`O(\varepsilon^{-3})`, as restated by D-SOBA; ``papers/decentralized_bilevel.md``
    §3.1)."""
    return Rate("DBO (stochastic)", "(1/K) sum_k E||grad Phi(x_bar_k)||^2", r"$C/\sqrt{K}$",
                "Chen, Huang and Ma, 2022 (DBO), rate shape as restated by Kong et al. (D-SOBA), JMLR 2025",
                exponent_verified=True, shape=lambda K: 1 / np.sqrt(K))
