"""Rate shapes, the one-constant fit, and the overlay helper."""

import math

import matplotlib
import numpy as np
import pytest

from fedopt import rates
from plots.rates import plot_with_rate

matplotlib.use("Agg")


@pytest.mark.parametrize("rate", [rates.d_tfbo(), rates.s_tfbo(), rates.fedmbo(4), rates.ma_dsbo(), rates.dbo(),
                                  rates.dbo_stochastic(), rates.fess_gda_nc_pl(4, 10), rates.fess_gda_form2(8, 5),
                                  rates.fess_gda_nc_c(), rates.fess_gda_pl_pl(0.999)], ids=lambda r: r.name)
def test_fit_recovers_the_constant_of_an_exact_curve(rate):
    T = np.geomspace(60, 1e5, 30)
    assert rate.fit(T, 7.5 * rate.shape(T)) == pytest.approx(7.5, rel=1e-12)


def test_fit_uses_the_tail_only():
    rate = rates.d_tfbo()
    T = np.arange(1, 101, dtype=float)
    values = np.where(T <= 50, 100.0 / T, 2.0 / T)  # a transient, then the rate with C = 2
    assert rate.fit(T, values, tail=0.5) == pytest.approx(2.0, rel=1e-12)
    assert rate.fit(T, values, tail=1.0) > 2.0


def test_shapes_match_the_stated_complexities():
    """O(1/eps) iterations <=> eps ~ 1/T; O(eps^-1 log^4(1/eps)) <=> eps ~ log^4(T)/T to leading
    order: plugging eps back into the iteration count gives T (1 - 4 log log T / log T)^4, which
    rises towards T."""
    T = np.array([1e6, 1e8, 1e12, 1e20])
    eps = rates.s_tfbo().shape(T)
    back = np.log(1 / eps) ** 4 / eps
    np.testing.assert_allclose(back / T, (1 - 4 * np.log(np.log(T)) / np.log(T)) ** 4, rtol=1e-10)
    assert np.all(np.diff(back / T) > 0) and np.all(back < T)
    assert rates.d_tfbo().shape(T) == pytest.approx(1 / T)


def test_s_tfbo_shape_is_fitted_only_where_it_decreases():
    rate = rates.s_tfbo()
    assert rate.valid_from == pytest.approx(math.exp(4))
    with pytest.raises(ValueError, match=r"T >= 54.598"):
        rate.fit(np.arange(1, 50, dtype=float), np.ones(49))


def test_overlay_draws_data_and_fitted_rate(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    T = np.geomspace(10, 1000, 20)
    C = plot_with_rate(ax, T, 3.0 / T, rates.d_tfbo(), label="measured")
    assert C == pytest.approx(3.0)
    (data, theory) = ax.get_lines()
    assert data.get_label() == "measured" and "C/T" in theory.get_label()
    np.testing.assert_allclose(theory.get_ydata(), 3.0 / theory.get_xdata())
    assert ax.get_xscale() == ax.get_yscale() == "log"
    plt.close(fig)


def test_fedmbo_rate_speeds_up_linearly_in_n_where_the_first_term_dominates():
    K = np.array([1e8])
    ratio = rates.fedmbo(1).shape(K) / rates.fedmbo(16).shape(K)
    assert ratio == pytest.approx(4.0, rel=1e-3)  # 1/sqrt(nK): 16x the clients, 4x smaller bound
    with pytest.raises(ValueError, match="n must be >= 1"):
        rates.fedmbo(0)


def test_unverified_exponents_are_marked():
    assert not rates.ma_dsbo().exponent_verified and not rates.dbo().exponent_verified
    assert rates.fedmbo(1).exponent_verified and rates.d_tfbo().exponent_verified


def test_fess_gda_rates_follow_the_stated_complexities():
    """NC-PL: O(kappa eps^-2) rounds and O(m^-1 eps^-4) samples per client: the noise term at T rounds
    and K local steps is 1/sqrt(mKT), so doubling m halves the K*T needed for the same value."""
    r1 = rates.fess_gda_nc_pl(1, 10**12)
    assert r1.shape(np.array([100.0]))[0] == pytest.approx(1 / 100, rel=1e-5)  # noise-free limit: C/T
    noise = lambda m, K, T: rates.fess_gda_nc_pl(m, K).shape(np.array([T]))[0] - 1 / T  # noqa: E731
    assert noise(2, 10, 1000) == pytest.approx(noise(1, 20, 1000)) == pytest.approx(noise(1, 10, 2000))
    assert not any(r.exponent_verified for r in (rates.fess_gda_nc_pl(1, 1), rates.fess_gda_form2(1, 1),
                                                 rates.fess_gda_nc_c(), rates.fess_gda_pl_pl(0.5)))
    T = np.arange(0, 50, dtype=float)
    assert np.allclose(np.diff(np.log(rates.fess_gda_pl_pl(0.8).shape(T))), math.log(0.8))
    with pytest.raises(ValueError, match="rho must be in"):
        rates.fess_gda_pl_pl(1.0)
    with pytest.raises(ValueError, match="m and K must be >= 1"):
        rates.fess_gda_nc_pl(0, 3)
