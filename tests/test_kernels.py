"""Every numba kernel against its plain-numpy reference (tests/reference.py)."""

import numpy as np
import pytest

from diffim import _kernels
from tests import reference as ref


@pytest.fixture
def rng():
    return np.random.default_rng(42)


def test_correlate_valid(rng):
    img = rng.normal(size=(40, 33))
    kern = rng.normal(size=(7, 7))
    np.testing.assert_allclose(_kernels.correlate_valid(img, kern),
                               ref.correlate_valid(img, kern), rtol=1e-12, atol=1e-12)


def test_correlate_separable_valid(rng):
    img = rng.normal(size=(30, 35))
    kx = rng.normal(size=(4, 9))
    ky = rng.normal(size=(4, 9))
    np.testing.assert_allclose(_kernels.correlate_separable_valid(img, kx, ky),
                               ref.correlate_separable_valid(img, kx, ky), atol=1e-11)


def test_shifted_windows(rng):
    img = rng.normal(size=(15, 16))
    np.testing.assert_allclose(_kernels.shifted_windows(img, 5), ref.shifted_windows(img, 5))


def test_normal_equations(rng):
    cols = rng.normal(size=(6, 200))
    y = rng.normal(size=200)
    w = rng.uniform(0.5, 2.0, size=200)
    m, b = _kernels.normal_equations(cols, y, w)
    m_ref, b_ref = ref.normal_equations(cols, y, w)
    np.testing.assert_allclose(m, m_ref, rtol=1e-12)
    np.testing.assert_allclose(b, b_ref, rtol=1e-12)


def test_solve_symmetric_regular(rng):
    a = rng.normal(size=(12, 12))
    m = a @ a.T + 12 * np.eye(12)
    b = rng.normal(size=12)
    x, pinv = _kernels.solve_symmetric(m, b)
    assert not pinv
    np.testing.assert_allclose(x, ref.solve_symmetric(m, b), rtol=1e-10)


def test_solve_symmetric_singular_falls_back(rng):
    a = rng.normal(size=(8, 5))
    m = a @ a.T  # rank 5 of 8
    b = m @ rng.normal(size=8)
    x, pinv = _kernels.solve_symmetric(m, b)
    assert pinv
    np.testing.assert_allclose(x, ref.solve_symmetric(m, b), atol=1e-8)


def test_condition_number(rng):
    a = rng.normal(size=(6, 6))
    m = a @ a.T + np.eye(6)
    assert _kernels.condition_number(m, True) == pytest.approx(np.linalg.cond(m), rel=1e-8)
    ev = np.abs(np.linalg.eigvalsh(m))
    assert _kernels.condition_number(m, False) == pytest.approx(ev.max() / ev.min(), rel=1e-8)


def test_residual_stats(rng):
    diff = rng.normal(size=(20, 20))
    var = rng.uniform(0.5, 2, size=(20, 20))
    var[3, 4] = 0.0
    var[5, 5] = np.inf
    good = np.ones((20, 20), bool)
    good[0, :] = False
    mean, std, n = _kernels.residual_stats(diff, var, good)
    m_ref, s_ref, n_ref = ref.residual_stats(diff, var, good)
    assert n == n_ref == 380 - 2
    assert mean == pytest.approx(m_ref, rel=1e-12)
    assert std == pytest.approx(s_ref, rel=1e-12)


@pytest.mark.parametrize("shape,hx,hy", [((50, 61), 3, 3), ((17, 9), 10, 2), ((64, 64), 0, 5)])
def test_or_filter_box(rng, shape, hx, hy):
    mask = np.zeros(shape, np.int32)
    idx = rng.integers(0, mask.size, size=12)
    mask.flat[idx] = 1 << rng.integers(0, 8, size=12)
    np.testing.assert_array_equal(_kernels.or_filter_box(mask, hx, hy),
                                  ref.or_filter_box(mask, hx, hy))


def _sources(rng, shape, n):
    """Random sources over and just beyond a ``shape`` image, plus fixed edge/corner/outside cases."""
    ny, nx = shape
    xs = np.r_[rng.uniform(-4, nx + 3, n), -0.5, nx - 0.51, 0.0, nx + 30.0, nx / 2 + 0.5]
    ys = np.r_[rng.uniform(-4, ny + 3, n), ny - 0.5, -0.49, 0.0, ny / 2, -40.0]
    fluxes = rng.uniform(10.0, 1e5, xs.size)
    fwhms = rng.uniform(1.2, 4.0, xs.size)
    return xs, ys, fluxes, fwhms


@pytest.mark.parametrize("c,lo,n,sigma", [(0.0, -6, 13, 1.0), (3.3, 0, 5, 0.7), (-2.2, 0, 20, 2.5)])
def test_erf_pixel_weights(c, lo, n, sigma):
    w = _kernels.erf_pixel_weights(c, lo, n, sigma)
    w_ref = ref.erf_pixel_weights(c, lo, n, sigma)
    # far-wing weights are differences of erf values near ±1: allow a few ulp of 1 absolute
    np.testing.assert_allclose(w, w_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("radius_fwhm", [5.0, 1.0])
def test_add_gaussian_sources(rng, radius_fwhm):
    shape = (37, 44)
    xs, ys, fluxes, fwhms = _sources(rng, shape, 12)
    radii = np.ceil(radius_fwhm * fwhms).astype(np.int64)
    img0 = rng.normal(size=shape)
    img = img0.copy()
    sums = np.full(xs.size, -1.0)
    _kernels.add_gaussian_sources(img, xs, ys, fluxes, fwhms, radii, sums)
    img_ref, sums_ref = ref.add_gaussian_sources(img0, xs, ys, fluxes, fwhms, radii)
    atol = 1e-14 * fluxes.max()  # erf cancellation in the far wings, as above
    np.testing.assert_allclose(img - img0, img_ref - img0, rtol=1e-10, atol=atol)
    np.testing.assert_allclose(sums, sums_ref, rtol=1e-10, atol=atol)
    assert sums[-2] == 0.0 and sums[-1] == 0.0  # stamps entirely off the image


@pytest.mark.parametrize("beta,ss_core", [(1.5, 7), (2.5, 5), (4.0, 1)])
def test_add_moffat_sources(rng, beta, ss_core):
    shape = (41, 38)
    xs, ys, fluxes, fwhms = _sources(rng, shape, 10)
    radii = np.ceil(8.0 * fwhms).astype(np.int64)
    img0 = rng.normal(size=shape)
    img = img0.copy()
    sums = np.full(xs.size, -1.0)
    _kernels.add_moffat_sources(img, xs, ys, fluxes, fwhms, beta, radii, ss_core, sums)
    img_ref, sums_ref = ref.add_moffat_sources(img0, xs, ys, fluxes, fwhms, beta, radii, ss_core)
    np.testing.assert_allclose(img - img0, img_ref - img0, rtol=1e-10)
    np.testing.assert_allclose(sums, sums_ref, rtol=1e-10)
    assert sums[-2] == 0.0 and sums[-1] == 0.0  # stamps entirely off the image
