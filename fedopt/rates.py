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

__all__ = ["Rate", "d_tfbo", "dbo", "dbo_stochastic", "fedmbo", "fess_gda_form2", "fess_gda_nc_c", "fess_gda_nc_pl",
           "fess_gda_pl_pl", "ma_dsbo", "s_tfbo"]


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


_FESS = "Shen, Huang, Zhang and Shen, AISTATS 2024 (FESS-GDA, arXiv:2311.00944)"


def _check_mK(m: int, K: int) -> None:
    if m < 1 or K < 1:
        raise ValueError(f"m and K must be >= 1, got m={m}, K={K}")


def fess_gda_nc_pl(m: int, K: int) -> Rate:
    r"""FESS-GDA on NC-SC / NC-PL problems (Corollary 3.1): :math:`\frac1T\sum_{t<T}\mathbb E\|\nabla\Phi(x_t)\|^2
    \lesssim \kappa\Delta_0/T + \kappa\sigma/\sqrt{mKT}` with :math:`m` clients per round and :math:`K` local
    steps. The complexities it is inverted from (:math:`O(\kappa^2 m^{-1}\varepsilon^{-4})` samples per client,
    :math:`O(\kappa\varepsilon^{-2})` rounds) are from third-party summaries of the paper, not its text, and the
    bound's form is a reconstruction (``papers/fess_gda.md`` §4.1-4.2), so ``exponent_verified`` is False. One
    constant scales both terms. Noise-free (:math:`\sigma = 0`) the second term vanishes; pass ``m = K = 10**12``
    to draw :math:`C/T` alone."""
    _check_mK(m, K)
    return Rate(f"FESS-GDA NC-PL (m = {m}, K = {K})", "(1/T) sum_t E||grad Phi(x_t)||^2",
                r"$C(1/T + 1/\sqrt{mKT})$", _FESS + ", Corollary 3.1 (NC-SC / NC-PL)",
                exponent_verified=False, shape=lambda T: 1.0 / T + 1.0 / np.sqrt(m * K * T))


def fess_gda_form2(m: int, K: int) -> Rate:
    r"""FESS-GDA on the simplex form (2), :math:`\min_x\max_{y\in\Delta}\sum_j y_jF_j(x)` (Theorem 3.4):
    :math:`O(m^{-1}\varepsilon^{-4})` samples per client and :math:`O(\varepsilon^{-2})` rounds [third-party
    summaries], read as :math:`\frac1T\sum_{t<T}\mathbb E\|\nabla\Phi_{1/2l}(x_t)\|^2 \lesssim \Delta_0/T +
    \sigma/\sqrt{mKT}` (reconstruction, ``papers/fess_gda.md`` §4.2; ``exponent_verified`` False)."""
    _check_mK(m, K)
    return Rate(f"FESS-GDA form (2) (m = {m}, K = {K})", "(1/T) sum_t E||grad Phi_1/2l(x_t)||^2",
                r"$C(1/T + 1/\sqrt{mKT})$", _FESS + ", Theorem 3.4 (form (2))",
                exponent_verified=False, shape=lambda T: 1.0 / T + 1.0 / np.sqrt(m * K * T))


def fess_gda_nc_c() -> Rate:
    r"""FESS-GDA on NC-C / NC-1PC problems (Theorem 3.2). The paper's complexity could not be read (only that it is
    "comparable to the state of the art with weaker assumptions"); drawn here is the centralized Smoothed-GDA
    rate for nonconvex-concave problems, :math:`O(\varepsilon^{-4})` iterations to
    :math:`\|\nabla\Phi_{1/2l}\| \le \varepsilon`, i.e. :math:`\frac1T\sum_{t<T}\|\nabla\Phi_{1/2l}(x_t)\|^2
    \lesssim C/\sqrt T` (Zhang, Xiao, Sun and Luo, NeurIPS 2020). UNVERIFIED for FESS-GDA."""
    return Rate("FESS-GDA NC-C (Smoothed-GDA rate)", "(1/T) sum_t ||grad Phi_1/2l(x_t)||^2", r"$C/\sqrt{T}$",
                _FESS + ", Theorem 3.2 (NC-C); exponent from centralized Smoothed-GDA (Zhang et al., NeurIPS 2020)",
                exponent_verified=False, shape=lambda T: 1.0 / np.sqrt(T))


def fess_gda_pl_pl(rho: float) -> Rate:
    r"""FESS-GDA on PL-PL problems (``p = 0``): linear convergence of a potential (e.g. the distance to the saddle
    point), :math:`\le C\rho^T`. The paper's theorem (number, constants, the contraction :math:`\rho` as a
    function of :math:`\kappa` and the step sizes) could not be read, so :math:`\rho` is an argument: figures
    estimate it from the measured curve's log-slope, and the overlay then checks only that convergence is
    linear. UNVERIFIED."""
    if not 0 < rho < 1:
        raise ValueError(f"rho must be in (0, 1), got {rho}")
    return Rate(f"FESS-GDA PL-PL (rho = {rho:.3g})", "||(x_t, y_t) - (x*, y*)||", r"$C\rho^T$",
                _FESS + ", PL-PL result (theorem number unverified)", exponent_verified=False,
                shape=lambda T: rho ** np.asarray(T, dtype=np.float64))
