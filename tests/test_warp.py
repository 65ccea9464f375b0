"""Template warping (diffim.warp) and its use by ImagePsfMatchTask.match_exposures."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip
from scipy.special import erf

from diffim.config import ImagePsfMatchConfig, WarpingConfig
from diffim.exceptions import ConfigError, ImagesNotRegisteredError, NoOverlapError
from diffim.image import Exposure, MaskedImage, read_fits
from diffim.task import ImagePsfMatchTask
from diffim.warp import (
    overlap_fraction,
    pixel_mapping_grid,
    warp_exposure,
    wcs_equal,
)
from tests import reference as ref

PIXEL_SCALE = 0.2  # arcsec, template
ROTATION = 5.0  # degrees
SCALE = 1.02  # science pixel / template pixel


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _tan(crpix, scale_arcsec=PIXEL_SCALE, rot_deg=0.0, crval=(150.0, 2.0)):
    """TAN WCS in 0-based parent coordinates with ``crpix`` given 0-based."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [crpix[0] + 1.0, crpix[1] + 1.0]
    th = np.deg2rad(rot_deg)
    s = scale_arcsec / 3600.0
    w.wcs.cd = s * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    w.wcs.set()
    return w


def _science_wcs(centre):
    """Science grid: rotated by ROTATION, pixels SCALE times larger, centred on ``centre``."""
    return _tan(centre, PIXEL_SCALE * SCALE, ROTATION)


def _sky_map(src_wcs, dst_wcs, x, y):
    """``src_wcs`` pixel -> ``dst_wcs`` pixel, exactly."""
    sky = src_wcs.pixel_to_world(x, y)
    return dst_wcs.world_to_pixel(sky)


def _render(shape, xs, ys, flux, fwhm):
    """Pixel-integrated circular Gaussians (exact erf integrals), float64."""
    img = np.zeros(shape)
    sig = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    r = int(np.ceil(5 * fwhm))
    for x, y, f in zip(xs, ys, flux):
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        x0, x1 = max(ix - r, 0), min(ix + r + 1, shape[1])
        y0, y1 = max(iy - r, 0), min(iy + r + 1, shape[0])
        if x0 >= x1 or y0 >= y1:
            continue
        wx = 0.5 * np.diff(erf((np.arange(x0, x1 + 1) - 0.5 - x) / (np.sqrt(2) * sig)))
        wy = 0.5 * np.diff(erf((np.arange(y0, y1 + 1) - 0.5 - y) / (np.sqrt(2) * sig)))
        img[y0:y1, x0:x1] += f * np.outer(wy, wx)
    return img


def _exposure(img, var=None, wcs=None, fwhm=None, xy0=(0, 0), mask=None):
    var = np.ones_like(img) if var is None else var
    return Exposure(MaskedImage(img, mask, var, xy0=xy0), wcs=wcs, psf_fwhm=fwhm)


def _affine(rot_deg=ROTATION, scale=SCALE, shift=(12.3, -7.6)):
    """Science pixel -> template pixel matrix: rotation, scale and shift."""
    th = np.deg2rad(rot_deg)
    a = scale * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    return np.column_stack([a, shift])


def _spread_points(rng, n, lo, hi, min_sep):
    pts = []
    while len(pts) < n:
        p = rng.uniform(lo, hi, 2)
        if all(np.hypot(*(p - q)) > min_sep for q in pts):
            pts.append(p)
    return np.array(pts).T


# ---------------------------------------------------------------------------------------------
# accuracy on a star field
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def star_field():
    """Stars drawn directly on a template grid and on a shifted, rotated, scaled science grid."""
    rng = np.random.default_rng(5)
    t_wcs = _tan((99.5, 99.5))
    s_wcs = _science_wcs((79.5 + 3.3, 79.5 - 2.7))
    xs, ys = _spread_points(rng, 40, 15.0, 145.0, 16.0)  # science pixels
    flux = rng.uniform(2e3, 2e4, xs.size)
    return dict(t_wcs=t_wcs, s_wcs=s_wcs, xs=xs, ys=ys, flux=flux, fwhm=4.0)


def _check_star_field(warped, direct, xs, ys, flux, fwhm):
    d = warped - direct
    for x, y in zip(xs, ys):
        ix, iy = int(round(x)), int(round(y))
        r = int(np.ceil(1.5 * fwhm))
        box = d[iy - r:iy + r + 1, ix - r:ix + r + 1]
        assert np.isfinite(box).all()
        assert np.abs(box).max() <= 0.01 * direct[iy, ix]
    ok = np.isfinite(warped)
    assert ok[10:-10, 10:-10].all()
    assert warped[ok].sum() == pytest.approx(direct[ok].sum(), rel=1e-3)


def test_wcs_warp_matches_direct_rendering(star_field):
    f = star_field
    tx, ty = _sky_map(f["s_wcs"], f["t_wcs"], f["xs"], f["ys"])
    template = _exposure(_render((200, 200), tx, ty, f["flux"], f["fwhm"]), wcs=f["t_wcs"],
                         fwhm=f["fwhm"])
    direct = _render((160, 160), f["xs"], f["ys"], f["flux"], f["fwhm"] / SCALE)
    science = _exposure(direct, wcs=f["s_wcs"])
    warped = warp_exposure(template, science, ImagePsfMatchConfig())
    assert warped.bbox == science.bbox
    assert wcs_equal(warped.wcs, science.wcs)
    _check_star_field(warped.image, direct, f["xs"], f["ys"], f["flux"], f["fwhm"])
    # the template PSF is carried in science pixels
    assert warped.psf_fwhm == pytest.approx(f["fwhm"] / SCALE, rel=1e-4)
    assert warped.metadata["WARPKERN"] == "lanczos3"
    assert warped.metadata["WARPJAC"] == pytest.approx(SCALE**2, rel=1e-6)
    assert warped.metadata["WARPCOV"] == 1.0


def test_affine_warp_matches_direct_rendering(star_field):
    f = star_field
    m = _affine()
    tx, ty = m[:, :2] @ np.vstack([f["xs"], f["ys"]]) + m[:, 2:]
    template = _exposure(_render((200, 200), tx, ty, f["flux"], f["fwhm"]), fwhm=f["fwhm"])
    direct = _render((160, 160), f["xs"], f["ys"], f["flux"], f["fwhm"] / SCALE)
    warped = warp_exposure(template, _exposure(direct), WarpingConfig(), transform=m)
    assert warped.wcs is None
    _check_star_field(warped.image, direct, f["xs"], f["ys"], f["flux"], f["fwhm"])


def test_parent_coordinates_are_honoured():
    """Moving both images' xy0 and the transform's origin together changes nothing."""
    rng = np.random.default_rng(1)
    img = rng.normal(100, 5, size=(60, 70))
    m = _affine(shift=(3.3, 2.1))
    a = warp_exposure(_exposure(img), _exposure(np.zeros((50, 55))), transform=m)
    # science xy0 (10, 20), template xy0 (-4, 7): template parent = m(sci parent - (10, 20))
    # + (-4, 7), i.e. shift' = shift - A @ (10, 20) + (-4, 7)
    m2 = m.copy()
    m2[:, 2] = m[:, 2] - m[:, :2] @ [10.0, 20.0] + [-4.0, 7.0]
    b = warp_exposure(_exposure(img, xy0=(-4, 7)), _exposure(np.zeros((50, 55)), xy0=(10, 20)),
                      transform=m2)
    assert b.xy0 == (10, 20)
    np.testing.assert_allclose(b.image, a.image, rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(b.mask, a.mask)


# ---------------------------------------------------------------------------------------------
# the mapping
# ---------------------------------------------------------------------------------------------

def _sip_wcs():
    w = _tan((250.0, 200.0), 0.26, 1.0)
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[0, 2], a[1, 1], a[3, 0] = 2e-5, -1.5e-5, 1e-5, 3e-8
    b[0, 2], b[2, 0], b[1, 2] = 2.5e-5, -1e-5, 2e-8
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.set()
    return w


def _tpv_wcs(pv1_7=10.0):
    """TPV (TAN + polynomial) WCS with a few pixels of distortion at the edges."""
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TPV", "DEC--TPV"
    h["CRVAL1"], h["CRVAL2"] = 150.0, 2.0
    h["CRPIX1"], h["CRPIX2"] = 251.0, 201.0
    s = 0.26 / 3600.0
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -s, 0.0, 0.0, s
    h["PV1_1"], h["PV1_4"], h["PV1_7"] = 1.0, 0.3, pv1_7
    h["PV2_1"], h["PV2_5"], h["PV2_9"] = 1.0, -0.2, 8.0
    return WCS(h)


@pytest.mark.parametrize("make_wcs", [_sip_wcs, _tpv_wcs], ids=["SIP", "TPV"])
def test_interpolated_mapping_is_within_001_px_of_exact(make_wcs):
    s_wcs = _science_wcs((240.0, 190.0))
    t_wcs = make_wcs()
    bbox = (0, 0, 503, 397)  # not multiples of the node spacing: last row/column are nodes
    mapping = pixel_mapping_grid(bbox, dst_wcs=s_wcs, src_wcs=t_wcs, interp_length=10)
    assert mapping.node_x[-1] == 502 and mapping.node_y[-1] == 396
    sx, sy, jac = mapping.interpolate()
    yy, xx = np.mgrid[:397, :503]
    ex, ey = _sky_map(s_wcs, t_wcs, xx, yy)
    assert np.hypot(sx - ex, sy - ey).max() < 0.01
    exact = pixel_mapping_grid(bbox, dst_wcs=s_wcs, src_wcs=t_wcs, interp_length=0)
    np.testing.assert_allclose(exact.src_x, ex, atol=1e-9)
    np.testing.assert_allclose(exact.src_y, ey, atol=1e-9)
    # the distortion is real: a TAN-only template WCS would be pixels off
    tx, ty = _sky_map(s_wcs, _tan((250.0, 200.0), 0.26, 1.0), xx, yy)
    assert np.hypot(tx - ex, ty - ey).max() > 1.0
    # Jacobian: SCALE² times the area distortion, smooth and close to the exact one
    assert np.nanmax(np.abs(jac - exact.jacobian)) < 1e-5
    assert np.median(jac) == pytest.approx(SCALE**2 * (0.2 / 0.26) ** 2, rel=0.02)


def test_affine_mapping_and_overlap_fraction():
    m = _affine(rot_deg=0.0, scale=1.0, shift=(50.0, 0.0))
    mapping = pixel_mapping_grid((0, 0, 100, 80), transform=m, interp_length=7)
    sx, sy, jac = mapping.interpolate()
    yy, xx = np.mgrid[:80, :100]
    np.testing.assert_allclose(sx, xx + 50.0, atol=1e-9)
    np.testing.assert_allclose(sy, yy, atol=1e-9)
    np.testing.assert_allclose(jac, 1.0)
    # template x in [0, 100): supported for 2 <= x + 50 < 97 and 2 <= y < 77 (lanczos3)
    assert overlap_fraction(mapping, (0, 0, 100, 80), order=3) == pytest.approx(
        47 * 75 / 8000)


@pytest.mark.parametrize("kwargs", [
    {},
    {"transform": np.eye(2, 3), "dst_wcs": _tan((0, 0)), "src_wcs": _tan((0, 0))},
    {"transform": np.eye(3)},
    {"transform": np.zeros((2, 3))},
    {"transform": np.eye(2, 3), "interp_length": -1},
])
def test_pixel_mapping_grid_rejects_bad_input(kwargs):
    with pytest.raises(ConfigError):
        pixel_mapping_grid((0, 0, 10, 10), **kwargs)


# ---------------------------------------------------------------------------------------------
# variance and mask
# ---------------------------------------------------------------------------------------------

def test_uniform_variance_maps_to_sum_of_squared_weights():
    shape = (40, 50)
    img = np.full(shape, 7.0)
    var = np.full(shape, 2.0)
    m = _affine(rot_deg=0.0, scale=1.0, shift=(4.3, 5.6))
    warped = warp_exposure(_exposure(img, var), _exposure(np.zeros((20, 25))), transform=m)
    wx, sx = ref.lanczos_weights(0.3, 3)
    wy, sy = ref.lanczos_weights(0.6, 3)
    expected = 2.0 * (wx**2).sum() / sx**2 * (wy**2).sum() / sy**2
    np.testing.assert_allclose(warped.variance, expected, rtol=1e-5)
    np.testing.assert_allclose(warped.image, 7.0, rtol=1e-5)  # normalised weights
    # with a scale the pixel-area ratio J multiplies the image and J² the variance
    m2 = _affine(rot_deg=0.0, scale=1.1, shift=(4.0, 5.0))
    warped2 = warp_exposure(_exposure(img, var), _exposure(np.zeros((20, 25))), transform=m2)
    j = 1.1**2
    np.testing.assert_allclose(warped2.image, 7.0 * j, rtol=1e-5)
    for y, x in [(0, 0), (7, 13), (19, 24)]:
        u, v = m2[:, :2] @ [x, y] + m2[:, 2]
        wx, sx = ref.lanczos_weights(u - np.floor(u), 3)
        wy, sy = ref.lanczos_weights(v - np.floor(v), 3)
        assert warped2.variance[y, x] == pytest.approx(
            2.0 * j**2 * (wx**2).sum() / sx**2 * (wy**2).sum() / sy**2, rel=1e-5)


def _mask_case(shift):
    shape = (30, 30)
    mi = MaskedImage(np.ones(shape), variance=np.ones(shape))
    bad = mi.get_plane_bitmask("BAD")
    edge = mi.get_plane_bitmask("EDGE")
    mi.mask[10, 12] |= bad
    mi.mask[20, 8] |= edge
    m = _affine(rot_deg=0.0, scale=1.0, shift=shift)
    warped = warp_exposure(Exposure(mi), _exposure(np.zeros((26, 26))), transform=m)
    return warped, bad, edge


def test_mask_bad_spreads_bilinearly_and_edge_to_full_footprint():
    warped, bad, edge = _mask_case((0.3, 0.6))
    # destination pixel (x, y) reads source (x + 0.3, y + 0.6): bilinear pixels
    # floor .. floor + 1, so source (12, 10) reaches x in {11, 12}, y in {9, 10}
    ys, xs = np.nonzero(warped.mask & bad)
    assert sorted(zip(ys.tolist(), xs.tolist())) == [(9, 11), (9, 12), (10, 11), (10, 12)]
    # EDGE at source (8, 20) reaches every destination pixel whose 6×6 window
    # floor - 2 .. floor + 3 holds it: floor(x + 0.3) = x in 5..10, floor(y + 0.6) = y in 17..22
    ys, xs = np.nonzero(warped.mask & edge)
    assert set(ys.tolist()) == set(range(17, 23)) and set(xs.tolist()) == set(range(5, 11))
    assert len(ys) == 36
    # a BAD pixel spoils no image value (the weights are finite)
    assert np.isfinite(warped.image[10, 12])


def test_integer_shift_copies_mask_without_spreading():
    warped, bad, edge = _mask_case((2.0, 3.0))
    ys, xs = np.nonzero(warped.mask & bad)
    assert list(zip(ys.tolist(), xs.tolist())) == [(7, 10)]
    assert (warped.mask & edge).sum() // edge == 36  # EDGE still fills the whole window


def test_off_image_pixels_are_no_data():
    warped, _, _ = _mask_case((10.4, -5.2))
    nodata = warped.masked_image.get_plane_bitmask("NO_DATA")
    off = (warped.mask & nodata) != 0
    # supported: 2 <= x + 10.4 < 27 and 2 <= y - 5.2 < 27 -> x <= 16, y >= 8
    yy, xx = np.mgrid[:26, :26]
    np.testing.assert_array_equal(off, (xx > 16) | (yy < 8))
    assert np.isnan(warped.image[off]).all() and np.isinf(warped.variance[off]).all()
    assert (warped.mask[off] == nodata).all()
    assert np.isfinite(warped.image[~off]).all()


def test_non_finite_template_pixels_become_no_data():
    img = np.ones((30, 30))
    var = np.ones((30, 30))
    img[15, 15] = np.nan
    var[5, 20] = np.inf
    m = _affine(rot_deg=0.0, scale=1.0, shift=(0.5, 0.5))
    warped = warp_exposure(_exposure(img, var), _exposure(np.zeros((28, 28))), transform=m)
    nodata = warped.masked_image.get_plane_bitmask("NO_DATA")
    # destination x reads source x + 0.5: its 6×6 window holds source columns x-2 .. x+3
    expected = np.ones((28, 28), bool)
    expected[2:27, 2:27] = False  # full support: 2 <= x + 0.5 < 27
    expected[12:18, 12:18] = True  # the NaN image pixel at (15, 15)
    expected[2:8, 17:23] = True  # the infinite variance at (y=5, x=20)
    bad = ~np.isfinite(warped.image)
    np.testing.assert_array_equal(bad, expected)
    assert ((warped.mask[bad] & nodata) != 0).all()
    assert np.isinf(warped.variance[bad]).all()


# ---------------------------------------------------------------------------------------------
# identity, overlap and registration errors
# ---------------------------------------------------------------------------------------------

def test_same_grid_is_not_resampled():
    rng = np.random.default_rng(2)
    w = _tan((40, 40))
    template = _exposure(rng.normal(size=(80, 80)), wcs=w, fwhm=3.0)
    science = _exposure(np.zeros((80, 80)), wcs=w.deepcopy())
    assert warp_exposure(template, science) is template
    no_wcs = _exposure(rng.normal(size=(80, 80)))
    assert warp_exposure(no_wcs, _exposure(np.zeros((80, 80)))) is no_wcs


def test_equal_wcs_other_bbox_is_an_exact_cutout():
    rng = np.random.default_rng(3)
    w = _tan((40, 40))
    template = _exposure(rng.normal(size=(80, 90)), wcs=w, fwhm=3.0)
    science = _exposure(np.zeros((50, 60)), wcs=w, xy0=(50, 20))
    warped = warp_exposure(template, science)
    assert warped.bbox == (50, 20, 110, 70) and warped.psf_fwhm == 3.0
    np.testing.assert_array_equal(warped.image[:, :40], template.image[20:70, 50:90])
    assert np.isnan(warped.image[:, 40:]).all()
    assert warped.metadata["WARPCOV"] == pytest.approx(40 / 60)


def test_wcs_equal():
    w = _tan((10, 10))
    assert wcs_equal(None, None) and not wcs_equal(w, None)
    # the same mapping written with PC and CDELT instead of CD: equal numerically only
    pc = WCS(naxis=2)
    pc.wcs.ctype = list(w.wcs.ctype)
    pc.wcs.crval = w.wcs.crval
    pc.wcs.crpix = w.wcs.crpix
    pc.wcs.cdelt = [w.wcs.cd[0, 0] * 2, w.wcs.cd[1, 1] * 2]
    pc.wcs.pc = w.wcs.cd / pc.wcs.cdelt[:, None]
    pc.wcs.set()
    assert wcs_equal(w, pc, bbox=(0, 0, 100, 100))
    moved = w.deepcopy()
    moved.wcs.crpix = moved.wcs.crpix + [1e-3, 0]
    moved.wcs.set()
    assert not wcs_equal(w, moved) and not wcs_equal(w, moved, bbox=(0, 0, 100, 100))
    # wcslib's compare ignores TPV polynomials; wcs_equal does not
    assert wcs_equal(_tpv_wcs(), _tpv_wcs())
    assert not wcs_equal(_tpv_wcs(), _tpv_wcs(12.0))
    assert not wcs_equal(_tpv_wcs(), _tpv_wcs(12.0), bbox=(0, 0, 500, 400))
    sip = _sip_wcs()
    assert wcs_equal(sip, sip.deepcopy()) and not wcs_equal(sip, _tan((250.0, 200.0), 0.26, 1.0))


def test_no_overlap_raises():
    template = _exposure(np.ones((60, 60)), wcs=_tan((30, 30)))
    for crval in [(150.1, 2.0), (330.0, -2.0)]:  # far away; the other side of the sky
        science = _exposure(np.ones((60, 60)), wcs=_tan((30, 30), crval=crval))
        with pytest.raises(NoOverlapError, match="do not overlap"):
            warp_exposure(template, science)
        with pytest.raises(NoOverlapError):
            ImagePsfMatchTask().subtract_exposures(template, science)


def test_small_overlap_raises_with_the_fraction():
    template = _exposure(np.ones((100, 100)), wcs=_tan((50, 50)))
    # science shifted by 90 px: about 5 % of it is covered
    science = _exposure(np.ones((100, 100)), wcs=_tan((50 - 90, 50)))
    with pytest.raises(NoOverlapError, match=r"covers only \d\.\d%.*min_overlap_fraction"):
        warp_exposure(template, science)
    cfg = ImagePsfMatchConfig()
    cfg.registration.min_overlap_fraction = 0.01
    warped = warp_exposure(template, science, cfg)
    assert 0.01 < warped.metadata["WARPCOV"] < 0.1


def test_do_warping_false_with_different_wcs_raises():
    template = _exposure(np.ones((60, 60)), wcs=_tan((30, 30)))
    science = _exposure(np.ones((60, 60)), wcs=_tan((31, 30)))
    with pytest.raises(ImagesNotRegisteredError, match="do_warping=False"):
        ImagePsfMatchTask().subtract_exposures(template, science, do_warping=False)


def test_missing_wcs_without_transform_raises():
    template = _exposure(np.ones((60, 60)))
    science = _exposure(np.ones((50, 60)), wcs=_tan((30, 30)))
    with pytest.raises(ImagesNotRegisteredError, match="no WCS"):
        warp_exposure(template, science)
    with pytest.raises(TypeError):
        warp_exposure(np.ones((5, 5)), science)


# ---------------------------------------------------------------------------------------------
# through subtract_exposures
# ---------------------------------------------------------------------------------------------

def _scene(seed, t_shape, s_shape, s_to_t, t_wcs=None, s_wcs=None, n_stars=260):
    """Noisy template (FWHM 2.5 px) and science (FWHM 3.5 px) images of one star field.

    ``s_to_t`` maps science pixels to template pixels.  Stars are spread over the union
    of both footprints (in science pixels).
    """
    rng = np.random.default_rng(seed)
    sny, snx = s_shape
    xs = rng.uniform(-40, snx + 40, n_stars)
    ys = rng.uniform(-40, sny + 40, n_stars)
    flux = 800.0 * (1 + rng.pareto(1.5, n_stars)).clip(max=60)
    tx, ty = s_to_t(xs, ys)
    t_model = _render(t_shape, tx, ty, flux, 2.5)
    s_model = _render(s_shape, xs, ys, flux, 3.5)
    t_var = 25.0 + np.maximum(t_model, 0)
    s_var = 100.0 + np.maximum(s_model, 0)
    template = _exposure(t_model + rng.normal(size=t_shape) * np.sqrt(t_var), t_var,
                         wcs=t_wcs, fwhm=2.5)
    science = _exposure(s_model + rng.normal(size=s_shape) * np.sqrt(s_var), s_var,
                        wcs=s_wcs, fwhm=3.5)
    return template, science


def _assert_clean_difference(result, science):
    d = result.subtracted_exposure
    assert d.bbox == science.bbox
    z = d.image / np.sqrt(d.variance)
    good = np.isfinite(z)
    assert good.mean() > 0.5
    assert np.median(np.abs(z[good])) == pytest.approx(0.6745, abs=0.12)
    return good


def test_subtract_exposures_different_sizes_partial_overlap():
    t_wcs = _tan((139.5, 124.5))
    s_wcs = _science_wcs((127.5 + 60, 127.5 + 25))  # science centre off the template's
    template, science = _scene(7, (250, 280), (256, 256),
                               lambda x, y: _sky_map(s_wcs, t_wcs, x, y), t_wcs, s_wcs)
    result = ImagePsfMatchTask().subtract_exposures(template, science)
    meta = result.metadata
    assert meta["registrationMethod"] == "wcs"
    assert 0.4 < meta["warpOverlapFraction"] < 0.9
    warped = result.warped_exposure
    assert warped.bbox == science.bbox and warped.psf_fwhm == pytest.approx(2.5 / SCALE)
    good = _assert_clean_difference(result, science)
    # the uncovered part of the science image has no difference
    nodata = warped.masked_image.get_plane_bitmask("NO_DATA")
    assert not good[(warped.mask & nodata) != 0].any()
    assert result.subtracted_exposure.wcs is science.wcs or wcs_equal(
        result.subtracted_exposure.wcs, science.wcs)


def test_decam_frames_on_one_grid_are_not_resampled(shared_data):
    folder = shared_data / "decam_sfft" / "input"
    template = read_fits(folder / "DEC-OBS18a.mini.fits")
    science = read_fits(folder / "DEC-OBS04a.mini.fits")
    cfg = ImagePsfMatchConfig()
    warped = warp_exposure(template, science, cfg)
    np.testing.assert_allclose(warped.image, template.image, rtol=1e-5, atol=1e-5)
    cfg.kernel.active.fit_for_background = True
    result = ImagePsfMatchTask(cfg).subtract_exposures(template, science)
    assert result.metadata["registrationMethod"] == "none"
    np.testing.assert_allclose(result.warped_exposure.image, template.image, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(result.warped_exposure.mask, template.mask)


def test_catalog_registration_without_wcs():
    pytest.importorskip("diffim._registration")
    m = _affine(shift=(-9.4, 14.2))
    template, science = _scene(
        9, (300, 300), (256, 240),
        lambda x, y: tuple(m[:, :2] @ np.vstack([x, y]) + m[:, 2:]))
    result = ImagePsfMatchTask().subtract_exposures(template, science)
    meta = result.metadata
    assert meta["registrationMethod"] == "catalog"
    assert meta["registrationNMatches"] >= 20 and meta["registrationRms"] < 0.3
    fitted = np.array(meta["registrationTransform"])
    corners = np.array([[0, 0], [239, 0], [0, 255], [239, 255]], float)
    err = corners @ (fitted[:, :2] - m[:, :2]).T + (fitted[:, 2] - m[:, 2])
    assert np.hypot(*err.T).max() < 0.3
    assert result.warped_exposure.wcs is None
    _assert_clean_difference(result, science)


def test_catalog_registration_of_drifting_real_frames(shared_data):
    """SAAO frames without WCS drift by tens of pixels; catalogs register them."""
    folder = shared_data / "saao_kb13475"
    template = read_fits(folder / "AKB13475I0100.fits")
    science = read_fits(folder / "AKB13475I0001.fits")
    shifts = {}
    for line in (folder / "frames.tsv").read_text().splitlines()[1:]:
        cols = line.split("\t")
        shifts[cols[0]] = (float(cols[5]), float(cols[6]))
    dx, dy = shifts["AKB13475I0001.fits"]  # science position = template position + (dx, dy)
    cfg = ImagePsfMatchConfig()
    cfg.kernel.active.fit_for_background = True
    cfg.registration.method = "catalog"  # same shape and no WCS: "auto" would not register
    cfg.registration.transform = "shift"
    result = ImagePsfMatchTask(cfg).subtract_exposures(template, science)
    meta = result.metadata
    assert meta["registrationMethod"] == "catalog" and meta["registrationNMatches"] > 50
    np.testing.assert_allclose(np.array(meta["registrationTransform"])[:, 2], [-dx, -dy],
                               atol=0.2)
    assert meta["warpOverlapFraction"] == pytest.approx((512 - 35 - 5) * (512 - 36 - 5)
                                                        / 512**2, abs=0.01)
    d = result.subtracted_exposure
    z = d.image / np.sqrt(d.variance)
    good = np.isfinite(z)
    assert good.mean() > 0.7
    assert np.median(np.abs(z[good])) < 1.0
