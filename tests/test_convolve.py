"""Spatially varying convolution against brute-force per-pixel evaluation."""

import numpy as np
import pytest

from diffim.basis import make_alard_lupton_basis
from diffim.config import ImagePsfMatchConfig
from diffim.convolve import convolve_masked_image
from diffim.image import MaskedImage
from diffim.spatial import SpatialFunction, SpatialKernel
from tests import reference as ref


def _kernel(bbox, order=2, kind="chebyshev1", seed=3):
    cfg = ImagePsfMatchConfig().kernel.al
    cfg.alard_deg_gauss = [2, 1, 1]
    cfg.kernel_size = 11
    basis = make_alard_lupton_basis(cfg)
    func = SpatialFunction(kind, order, bbox)
    rng = np.random.default_rng(seed)
    coeffs = np.zeros((basis.n, func.n_terms))
    coeffs[0, 0] = 1.3
    coeffs[1:] = rng.normal(scale=0.05, size=(basis.n - 1, func.n_terms))
    return SpatialKernel(basis.images, func, coeffs)


@pytest.fixture
def masked_image():
    rng = np.random.default_rng(0)
    img = rng.normal(100.0, 10.0, size=(70, 83)).astype(np.float32)
    img[30:33, 40:43] += 5000.0
    var = rng.uniform(80, 120, size=img.shape).astype(np.float32)
    return MaskedImage(img, variance=var, xy0=(1000, 2000))


@pytest.mark.parametrize("kind", ["chebyshev1", "polynomial"])
def test_image_matches_brute_force(masked_image, kind):
    mi = masked_image
    kernel = _kernel(mi.bbox, kind=kind)
    out = convolve_masked_image(mi, kernel)
    truth = ref.convolve_brute_force(mi.image.astype(float), kernel, mi.xy0)
    ok = np.isfinite(truth)
    scale = np.abs(truth[ok]).max()
    assert np.abs(out.image[ok] - truth[ok]).max() <= 1e-4 * scale
    np.testing.assert_allclose(out.image[ok], truth[ok], rtol=1e-4, atol=1e-4 * scale)


def test_variance_matches_exact_sum(fitted):
    mi, kernel = fitted
    out = convolve_masked_image(mi, kernel)
    truth = ref.convolve_variance_brute_force(mi.variance.astype(float), kernel, mi.xy0)
    ok = np.isfinite(truth)
    rel = np.abs(out.variance[ok] / truth[ok] - 1)
    assert rel.max() < 1e-3


def test_fitted_kernel_image_matches_brute_force(fitted):
    mi, kernel = fitted
    out = convolve_masked_image(mi, kernel)
    truth = ref.convolve_brute_force(mi.image.astype(float), kernel, mi.xy0)
    ok = np.isfinite(truth)
    np.testing.assert_allclose(out.image[ok], truth[ok], rtol=1e-4,
                               atol=1e-4 * np.abs(truth[ok]).max())


def test_borders_and_mask(masked_image):
    mi = masked_image
    mi.mask[35, 50] = mi.get_plane_bitmask("SAT")
    kernel = _kernel(mi.bbox)
    out = convolve_masked_image(mi, kernel)
    c = kernel.size // 2
    nodata = mi.get_plane_bitmask("NO_DATA")
    border = np.ones(mi.shape, bool)
    border[c:-c, c:-c] = False
    assert np.isnan(out.image[border]).all()
    assert np.isinf(out.variance[border]).all()
    assert ((out.mask[border] & nodata) != 0).all()
    assert np.isfinite(out.image[~border]).all()
    sat = (out.mask & mi.get_plane_bitmask("SAT")) != 0
    ys, xs = np.nonzero(sat)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (35 - c, 35 + c, 50 - c, 50 + c)


def test_nan_input_is_contained(masked_image):
    mi = masked_image
    mi.image[:, 20] = np.nan  # a NaN column
    kernel = _kernel(mi.bbox)
    out = convolve_masked_image(mi, kernel)
    nodata = (out.mask & mi.get_plane_bitmask("NO_DATA")) != 0
    assert not np.isnan(out.image[~nodata]).any()
    c = kernel.size // 2
    assert nodata[:, 20 - c:20 + c + 1].all()
    assert not nodata[c:-c, 20 + c + 1:-c].any()


def test_constant_kernel_path(masked_image):
    mi = masked_image
    kernel = _kernel(mi.bbox, order=0)
    out = convolve_masked_image(mi, kernel)
    truth = ref.convolve_brute_force(mi.image.astype(float), kernel, mi.xy0)
    ok = np.isfinite(truth)
    np.testing.assert_allclose(out.image[ok], truth[ok], rtol=1e-4,
                               atol=1e-4 * np.abs(truth[ok]).max())
    vtruth = ref.convolve_variance_brute_force(mi.variance.astype(float), kernel, mi.xy0)
    np.testing.assert_allclose(out.variance[ok], vtruth[ok], rtol=1e-5)
