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
    kx = rng.normal(size=(3, 9))
    x_index = np.array([0, 2, 1, 0, 2], dtype=np.int64)  # x factors shared, as in the AL basis
    ky = rng.normal(size=(5, 9))
    np.testing.assert_allclose(_kernels.correlate_separable_valid(img, kx, x_index, ky),
                               ref.correlate_separable_valid(img, kx, x_index, ky), atol=1e-11)


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, off", [(1, 0), (6, 10), (3, 4)])
def test_weighted_accumulate(rng, dtype, m, off):
    acc = rng.normal(size=(13, 17)).astype(dtype)
    full = rng.normal(size=(13 + 2 * off + 3, 17 + 2 * off + 1)).astype(dtype)
    rows = rng.normal(size=(m, 13)).astype(dtype)
    cols = rng.normal(size=(m, 17)).astype(dtype)
    expected = ref.weighted_accumulate(acc.astype(float), full.astype(float), off,
                                       rows.astype(float), cols.astype(float))
    _kernels.weighted_accumulate(acc, full, off, rows, cols)
    assert acc.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(acc, expected, rtol=tol, atol=tol * np.abs(expected).max())


@pytest.mark.parametrize("shape,hx,hy", [((50, 61), 3, 3), ((17, 9), 10, 2), ((64, 64), 0, 5)])
def test_or_filter_box(rng, shape, hx, hy):
    mask = np.zeros(shape, np.int32)
    idx = rng.integers(0, mask.size, size=12)
    mask.flat[idx] = 1 << rng.integers(0, 8, size=12)
    expected = ref.or_filter_box(mask, hx, hy)
    np.testing.assert_array_equal(_kernels.or_filter_box(mask, hx, hy), expected)
    np.testing.assert_array_equal(_kernels.or_filter_box_serial(mask, hx, hy), expected)


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


# ---------------------------------------------------------------------------
# template warping
# ---------------------------------------------------------------------------

def _trig_tables(a):
    m = np.arange(-a, a + 1)
    return np.sin(np.pi * m / a), np.cos(np.pi * m / a)


@pytest.mark.parametrize("a", [2, 3, 4, 5])
@pytest.mark.parametrize("f", [0.0, 1e-12, 0.25, 0.5, 0.731, 1 - 1e-12])
def test_lanczos_weights(a, f):
    w = np.empty(2 * a)
    total = _kernels.lanczos_weights(f, a, *_trig_tables(a), w)
    w_ref, total_ref = ref.lanczos_weights(f, a)
    np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-12)
    assert total == pytest.approx(total_ref, rel=1e-12)


@pytest.mark.parametrize("ny,nx,step", [(23, 31, 10), (7, 40, 3), (1, 9, 4), (12, 1, 5)])
def test_interpolate_nodes(rng, ny, nx, step):
    node_y = np.unique(np.r_[np.arange(0, ny, step), ny - 1]).astype(float)
    node_x = np.unique(np.r_[np.arange(0, nx, step), nx - 1]).astype(float)
    values = rng.normal(size=(node_y.size, node_x.size))
    np.testing.assert_allclose(_kernels.interpolate_nodes(node_x, node_y, values, ny, nx),
                               ref.interpolate_nodes(node_x, node_y, values, ny, nx),
                               rtol=1e-12, atol=1e-12)


def _warp_case(rng, a, shape=(26, 29), src_shape=(30, 34)):
    """Nodes of a rotated, scaled, shifted mapping that runs partly off the source."""
    ny, nx = shape
    node_y = np.unique(np.r_[np.arange(0, ny, 5), ny - 1]).astype(float)
    node_x = np.unique(np.r_[np.arange(0, nx, 5), nx - 1]).astype(float)
    yy, xx = np.meshgrid(node_y, node_x, indexing="ij")
    th = np.deg2rad(7.0)
    map_x = 1.03 * (np.cos(th) * xx - np.sin(th) * yy) + 4.3 + 0.002 * xx * yy
    map_y = 1.03 * (np.sin(th) * xx + np.cos(th) * yy) - 1.7
    map_x[0, 0] = np.nan  # an unmappable node
    jac = 1.03**2 + 0.01 * rng.normal(size=map_x.shape)
    return node_x, node_y, map_x, map_y, jac


@pytest.mark.parametrize("a", [2, 3, 5])
def test_warp_support_counts(rng, a):
    ny, nx = 26, 29
    node_x, node_y, map_x, map_y, _ = _warp_case(rng, a)
    sx = ref.interpolate_nodes(node_x, node_y, map_x, ny, nx)
    sy = ref.interpolate_nodes(node_x, node_y, map_y, ny, nx)
    counts = _kernels.warp_support_counts(node_x, node_y, map_x, map_y, ny, nx, 30, 34, a)
    np.testing.assert_array_equal(counts, ref.warp_support_counts(sx, sy, a, (30, 34)))
    assert 0 < counts.sum() < ny * nx


@pytest.mark.parametrize("a,mask_order", [(3, 1), (3, 0), (2, 3), (5, 1), (4, 2)])
def test_lanczos_warp(rng, a, mask_order):
    ny, nx = 26, 29
    src_shape = (30, 34)
    node_x, node_y, map_x, map_y, jac = _warp_case(rng, a)
    img = rng.normal(10.0, 3.0, size=src_shape)
    var = rng.uniform(0.5, 2.0, size=src_shape)
    mask = np.zeros(src_shape, np.int32)
    idx = rng.integers(0, mask.size, size=15)
    mask.flat[idx] = 1 << rng.integers(0, 6, size=15)
    img[5, 20] = np.nan  # a non-finite source pixel spoils its footprint
    grow = np.int32(1 << 4)
    nodata = np.int32(1 << 7)
    out = _kernels.lanczos_warp(img, var, mask, node_x, node_y, map_x, map_y, jac, ny, nx,
                                a, mask_order, grow, nodata)
    sx = ref.interpolate_nodes(node_x, node_y, map_x, ny, nx)
    sy = ref.interpolate_nodes(node_x, node_y, map_y, ny, nx)
    sj = ref.interpolate_nodes(node_x, node_y, jac, ny, nx)
    expect = ref.lanczos_warp(img, var, mask, sx, sy, sj, a, mask_order, int(grow), int(nodata))
    np.testing.assert_allclose(out[0], expect[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out[1], expect[1], rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(out[2], expect[2])
    np.testing.assert_array_equal(out[3], ref.warp_support_counts(sx, sy, a, src_shape))
    assert np.isnan(out[0]).sum() > np.isnan(expect[0][~np.isfinite(sx)]).sum()


def test_lanczos_warp_integer_shift_is_exact(rng):
    """At integer source positions every weight but one is exactly zero: a pure copy."""
    src = rng.normal(size=(20, 22))
    var = rng.uniform(1.0, 2.0, size=src.shape)
    var[0, :] = np.inf  # outside every footprint's non-zero weights
    mask = rng.integers(0, 4, size=src.shape).astype(np.int32)
    ny, nx = 10, 12
    node_x = np.arange(nx, dtype=float)  # a node at every pixel: positions are integers
    node_y = np.arange(ny, dtype=float)
    map_x = node_x[None, :] + 5.0 + np.zeros((ny, 1))
    map_y = node_y[:, None] + 4.0 + np.zeros((1, nx))
    img, v, m, counts = _kernels.lanczos_warp(src, var, mask, node_x, node_y, map_x, map_y,
                                              np.ones((ny, nx)), ny, nx, 3, 1, 0, 1 << 7)
    np.testing.assert_array_equal(img, src[4:14, 5:17])
    np.testing.assert_array_equal(v, var[4:14, 5:17])
    np.testing.assert_array_equal(m, mask[4:14, 5:17])
    assert counts.sum() == ny * nx
