"""Tests of the image-pair simulator: the truth it returns must describe the images exactly."""

import math

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs.utils import proj_plane_pixel_scales

from diffim.exceptions import ConfigError
from diffim.image import read_fits
from diffim.simulate import (PIXEL_SCALE_ARCSEC, SimulatedPair, fwhm_at, render_psf_stamp,
                             simulate_pair, write_pair)

SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
SMALL = dict(shape=(384, 384), n_stars=150)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def moment_fwhm(stamp):
    """FWHM of a pixel-integrated Gaussian from its second moments.

    Integrating over a unit pixel convolves with a box of variance 1/12 per
    axis; removing it recovers the underlying Gaussian width exactly.
    """
    y, x = np.indices(stamp.shape, dtype=float)
    w = stamp.sum()
    cx, cy = (stamp * x).sum() / w, (stamp * y).sum() / w
    var = 0.5 * ((stamp * (x - cx) ** 2).sum() + (stamp * (y - cy) ** 2).sum()) / w
    return math.sqrt(var - 1.0 / 12.0) / SIGMA_PER_FWHM, cx, cy


def half_max_fwhm(stamp):
    """FWHM from the half-maximum crossings of the row through the peak."""
    cy, cx = np.unravel_index(np.argmax(stamp), stamp.shape)
    row = stamp[cy]
    half = row[cx] / 2.0
    right = cx + np.argmax(row[cx:] < half)
    left = cx - np.argmax(row[cx::-1] < half)
    xr = right - 1 + (row[right - 1] - half) / (row[right - 1] - row[right])
    xl = left + 1 - (row[left + 1] - half) / (row[left + 1] - row[left])
    return xr - xl


def isolated(stars, radius, xcol="x", ycol="y", min_flux_ratio=0.01):
    """Boolean: no star brighter than ``min_flux_ratio`` x own flux within ``radius``."""
    x, y, f = np.asarray(stars[xcol]), np.asarray(stars[ycol]), np.asarray(stars["flux"])
    d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
    np.fill_diagonal(d, np.inf)
    near = (d < radius) & (f[None, :] > min_flux_ratio * f[:, None])
    return ~near.any(axis=1)


def star_free(shape, x, y, flux, fwhm, sky_sigma):
    """Mask of pixels where no star contributes more than 1% of the sky noise."""
    ok = np.ones(shape, bool)
    ny, nx = shape
    for xi, yi, fi, wi in zip(x, y, flux, fwhm):
        s = wi * SIGMA_PER_FWHM
        peak = fi / (2 * np.pi * s * s)
        r = s * math.sqrt(2 * math.log(max(peak / (0.01 * sky_sigma), 1.0))) + 2
        r = int(math.ceil(r))
        ix, iy = int(round(xi)), int(round(yi))
        ok[max(iy - r, 0):iy + r + 1, max(ix - r, 0):ix + r + 1] = False
    return ok


def aperture_sum(image, x, y, r):
    ix, iy = int(round(x)), int(round(y))
    yy, xx = np.mgrid[iy - r:iy + r + 1, ix - r:ix + r + 1]
    inside = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    return image[iy - r:iy + r + 1, ix - r:ix + r + 1][inside].sum(), inside.sum()


@pytest.fixture(scope="module")
def default_pair():
    return simulate_pair(shape=(512, 512), n_stars=250, seed=11, keep_model=True)


# ---------------------------------------------------------------------------
# reproducibility and basic structure
# ---------------------------------------------------------------------------

def test_reproducible_with_seed_and_different_with_another():
    a = simulate_pair(**SMALL, seed=3, n_transients=2)
    b = simulate_pair(**SMALL, seed=3, n_transients=2)
    c = simulate_pair(**SMALL, seed=4, n_transients=2)
    for attr in ("image", "mask", "variance"):
        np.testing.assert_array_equal(getattr(a.template, attr), getattr(b.template, attr))
        np.testing.assert_array_equal(getattr(a.science, attr), getattr(b.science, attr))
    for col in a.stars.colnames:
        np.testing.assert_array_equal(a.stars[col], b.stars[col])
    for col in a.transients.colnames:
        np.testing.assert_array_equal(a.transients[col], b.transients[col])
    assert not np.array_equal(a.template.image, c.template.image)
    assert not np.array_equal(a.science.image, c.science.image)
    assert not np.array_equal(a.stars["x"], c.stars["x"])


def test_types_shapes_and_attributes(default_pair):
    p = default_pair
    assert isinstance(p, SimulatedPair)
    for exp in (p.template, p.science):
        assert exp.shape == (512, 512)
        assert exp.image.dtype == np.float32 and exp.variance.dtype == np.float32
        assert exp.mask.dtype == np.int32 and not exp.mask.any()
        assert np.all(np.isfinite(exp.image)) and np.all(exp.variance > 0)
        assert exp.xy0 == (0, 0)
        assert exp.metadata["GAIN"] == 1.0 and exp.metadata["RDNOISE"] == 5.0
        assert exp.metadata["SIMSEED"] == 11
    assert p.template.psf_fwhm == 2.5 and p.science.psf_fwhm == 3.5
    assert p.template.phot_scale == 1.0 and p.science.phot_scale == 1.3
    assert p.template.metadata["FWHM"] == 2.5 and p.science.metadata["FWHM"] == 3.5
    assert len(p.stars) == 250 and len(p.transients) == 0
    for col in ("x", "y", "flux", "template_fwhm_at", "science_fwhm_at", "saturated"):
        assert col in p.stars.colnames
    t = p.truth
    assert t["flux_scale"] == 1.3 and t["psf"] == "gaussian" and t["seed"] == 11
    assert t["background_gradient"] == (5.0, 0.002, -0.001) and t["sky_science"] == 200.0
    # Stars keep their distance from the edges.
    assert p.stars["x"].min() >= 20 and p.stars["x"].max() <= 511 - 20
    assert p.stars["y"].min() >= 20 and p.stars["y"].max() <= 511 - 20


def test_default_flux_distribution_has_useful_stars():
    p = simulate_pair(seed=1)
    snr = p.stars["snr_science"]
    assert ((snr > 20) & (snr < 500)).sum() > 200
    assert (p.stars["flux"] > 30000).sum() >= 10
    assert p.stars["flux"].min() >= 300 and p.stars["flux"].max() <= 3e5


def test_wcs_identical_and_optional(default_pair):
    tw, sw = default_pair.template.wcs, default_pair.science.wcs
    assert tw is not None and sw is not None and tw is not sw
    assert tw.to_header() == sw.to_header()
    scales = proj_plane_pixel_scales(tw) * 3600.0
    np.testing.assert_allclose(scales, PIXEL_SCALE_ARCSEC, rtol=1e-9)
    px = np.array([[0.0, 0.0], [511.0, 300.0]])
    np.testing.assert_array_equal(tw.wcs_pix2world(px, 0), sw.wcs_pix2world(px, 0))
    p = simulate_pair(**SMALL, wcs=False)
    assert p.template.wcs is None and p.science.wcs is None


# ---------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_noise_consistent_with_variance_plane(gain):
    p = simulate_pair(shape=(512, 512), n_stars=250, seed=2, gain=gain, read_noise=6.0)
    rn_adu2 = (6.0 / gain) ** 2
    s = p.stars
    for exp, bkg, x, y, f, w in (
            (p.template, p.template_background(), s["x"], s["y"], s["flux"],
             s["template_fwhm_at"]),
            (p.science, p.science_background(), s["x_science"], s["y_science"],
             s["science_flux"], s["science_fwhm_at"])):
        # The variance plane is the exact expectation (sky/gain + rn²) off the stars.
        ok = star_free(exp.shape, x, y, f, w, math.sqrt(bkg.mean() / gain + rn_adu2))
        assert ok.sum() > 50_000
        np.testing.assert_allclose(exp.variance[ok], bkg[ok] / gain + rn_adu2, rtol=1e-5)
        z = (exp.image[ok] - bkg[ok]) / np.sqrt(exp.variance[ok])
        assert abs(z.mean()) < 0.02
        assert abs(z.std() / 1.0 - 1.0) < 0.03


@pytest.mark.parametrize("psf", ["gaussian", "moffat"])
def test_noise_matches_model_everywhere(psf):
    p = simulate_pair(shape=(384, 384), n_stars=200, psf=psf, seed=8, keep_model=True)
    for exp, model in ((p.template, p.template_model), (p.science, p.science_model)):
        np.testing.assert_allclose(exp.variance, model + 25.0, rtol=1e-5)
        z = (exp.image - model) / np.sqrt(exp.variance)
        assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01


# ---------------------------------------------------------------------------
# PSF rendering
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fwhm", [1.8, 2.5, 3.5, 6.0])
@pytest.mark.parametrize("dx,dy", [(0.0, 0.0), (0.37, -0.21)])
def test_gaussian_stamp_normalised_centred_and_right_width(fwhm, dx, dy):
    size = 2 * int(math.ceil(5 * fwhm)) + 1
    st = render_psf_stamp(fwhm, size, dx=dx, dy=dy)
    assert st.shape == (size, size)
    assert abs(st.sum() - 1.0) < 1e-6
    measured, cx, cy = moment_fwhm(st)
    assert abs(measured / fwhm - 1) < 0.03
    assert abs(measured / fwhm - 1) < 1e-3  # exact erf integration: far better than needed
    assert abs(cx - (size // 2 + dx)) < 1e-4 and abs(cy - (size // 2 + dy)) < 1e-4


def _moffat_brute(fwhm, size, beta, dx, dy, n=41):
    """Independent numpy reference: dense midpoint supersampling of the analytic Moffat."""
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    c = size // 2
    o = (np.arange(n) + 0.5) / n - 0.5
    y, x = np.mgrid[0:size, 0:size].astype(float)
    acc = np.zeros((size, size))
    for oy in o:
        for ox in o:
            acc += (1 + ((x + ox - c - dx) ** 2 + (y + oy - c - dy) ** 2) / alpha ** 2) ** -beta
    return acc / n ** 2 * (beta - 1) / (np.pi * alpha ** 2)


@pytest.mark.parametrize("fwhm,beta", [(3.5, 3.0), (2.5, 2.5), (2.0, 4.0)])
def test_moffat_stamp_matches_dense_reference(fwhm, beta):
    st = render_psf_stamp(fwhm, 31, "moffat", beta, 0.3, -0.2)
    ref = _moffat_brute(fwhm, 31, beta, 0.3, -0.2)
    assert np.abs(st - ref).max() < 3e-3 * ref.max()
    assert np.abs(st / ref - 1).max() < 5e-3


@pytest.mark.parametrize("beta", [2.5, 3.0, 4.5])
def test_moffat_fwhm_by_half_maximum(beta):
    # A wide rendering makes pixel integration negligible (<0.1 %), so the
    # half-maximum width tests the profile's alpha(FWHM, beta) directly.
    st = render_psf_stamp(14.0, 121, "moffat", beta)
    assert abs(half_max_fwhm(st) / 14.0 - 1) < 0.01
    # At native sampling, integrating the peaky core over pixels broadens the
    # half-max width by a few per cent (the dense-reference test checks those
    # pixel values exactly); it can only broaden, never narrow.
    st = render_psf_stamp(3.5, 41, "moffat", beta)
    assert 1.0 < half_max_fwhm(st) / 3.5 < 1.05
    # Analytic normalisation: a large stamp holds 1 minus the far wings.
    st = render_psf_stamp(3.5, 301, "moffat", beta)
    alpha = 3.5 / (2 * math.sqrt(2 ** (1 / beta) - 1))
    outside_circle = (1 + (150 / alpha) ** 2) ** (1 - beta)
    assert 1 - outside_circle - 1e-3 < st.sum() <= 1.0


@pytest.mark.parametrize("psf,beta,tol", [("gaussian", 3.0, 0.005), ("moffat", 3.0, 0.02),
                                          ("moffat", 2.5, 0.02)])
def test_isolated_star_total_flux(psf, beta, tol):
    p = simulate_pair(shape=(256, 256), n_stars=1, psf=psf, moffat_beta=beta,
                      flux_range=(2e5, 2.1e5), seed=4, keep_model=True, read_noise=3.0)
    star = p.stars[0]
    # Noiseless: the rendered flux is the recorded stamp flux, and the true flux
    # to within the (documented) truncation of the analytic profile.
    t_sum = (p.template_model - p.template_background()).sum()
    s_sum = (p.science_model - p.science_background()).sum()
    np.testing.assert_allclose(t_sum, star["template_stamp_flux"], rtol=1e-9)
    np.testing.assert_allclose(s_sum, star["science_stamp_flux"], rtol=1e-9)
    assert abs(t_sum / star["flux"] - 1) < tol
    assert abs(s_sum / star["science_flux"] - 1) < tol
    if psf == "gaussian":
        assert abs(t_sum / star["flux"] - 1) < 1e-6
    # Noisy image: aperture sum agrees within the noise (5 sigma).
    for exp, bkg, x, y, true in ((p.template, p.template_background(), star["x"], star["y"],
                                  star["template_stamp_flux"]),
                                 (p.science, p.science_background(), star["x_science"],
                                  star["y_science"], star["science_stamp_flux"])):
        r = 19
        flux, _ = aperture_sum(exp.image - bkg, x, y, r)
        var, _ = aperture_sum(exp.variance, x, y, r)
        assert abs(flux - true) < 5 * math.sqrt(var) + 0.01 * true


def test_fwhm_gradient_and_rendered_widths():
    g = 0.3
    p = simulate_pair(shape=(512, 512), n_stars=200, fwhm_gradient=g, seed=6, keep_model=True)
    s = p.stars
    np.testing.assert_allclose(s["template_fwhm_at"],
                               2.5 * (1 + g * (s["x"] / 512 - 0.5) + 0.5 * g * (s["y"] / 512 - 0.5)))
    np.testing.assert_allclose(s["science_fwhm_at"],
                               fwhm_at(3.5, s["x_science"], s["y_science"], (512, 512), g))
    assert s["template_fwhm_at"].max() / s["template_fwhm_at"].min() > 1.2
    # Measure isolated bright stars in the noiseless model.
    # Second moments weight r², so even faint neighbours must stay out of the
    # +-12 px stamp (half-diagonal 17 px plus a neighbour's 3 sigma).
    sel = isolated(s, 30.0, min_flux_ratio=1e-4) & (s["flux"] > 3000)
    sel &= (s["x"] > 30) & (s["x"] < 481) & (s["y"] > 30) & (s["y"] < 481)
    assert sel.sum() >= 5
    for model, bkg, xc, yc, fcol in ((p.template_model, p.template_background(), "x", "y",
                                      "template_fwhm_at"),
                                     (p.science_model, p.science_background(), "x_science",
                                      "y_science", "science_fwhm_at")):
        for row in s[sel]:
            ix, iy = int(round(row[xc])), int(round(row[yc]))
            stamp = (model - bkg)[iy - 12:iy + 13, ix - 12:ix + 13]
            measured, cx, cy = moment_fwhm(stamp)
            assert abs(measured / row[fcol] - 1) < 0.03
            assert abs(cx + ix - 12 - row[xc]) < 0.01 and abs(cy + iy - 12 - row[yc]) < 0.01


def test_shift_moves_science_stars():
    p = simulate_pair(**SMALL, shift=(1.7, -0.6), seed=9, keep_model=True)
    s = p.stars
    np.testing.assert_allclose(s["x_science"] - s["x"], 1.7)
    np.testing.assert_allclose(s["y_science"] - s["y"], -0.6)
    assert p.truth["shift"] == (1.7, -0.6)
    row = s[np.argmax(np.where(isolated(s, 30.0), s["flux"], 0))]
    for model, bkg, xc, yc in ((p.template_model, p.template_background(), row["x"], row["y"]),
                               (p.science_model, p.science_background(), row["x_science"],
                                row["y_science"])):
        ix, iy = int(round(xc)), int(round(yc))
        _, cx, cy = moment_fwhm((model - bkg)[iy - 15:iy + 16, ix - 15:ix + 16])
        assert abs(cx + ix - 15 - xc) < 0.01 and abs(cy + iy - 15 - yc) < 0.01


# ---------------------------------------------------------------------------
# photometric scale
# ---------------------------------------------------------------------------

def test_flux_scale_applied(default_pair):
    p = default_pair
    s = p.stars
    np.testing.assert_allclose(s["science_flux"], 1.3 * s["flux"])
    np.testing.assert_allclose(s["science_stamp_flux"] / s["template_stamp_flux"], 1.3, rtol=1e-6)
    # Measured on the noisy images: aperture sums of bright isolated stars.
    sel = isolated(s, 25.0) & (s["snr_science"] > 50)
    sel &= (s["x"] > 25) & (s["x"] < 486) & (s["y"] > 25) & (s["y"] < 486)
    assert sel.sum() >= 10
    ft = sum(aperture_sum(p.template.image - p.template_background(), r["x"], r["y"], 14)[0]
             for r in s[sel])
    fs = sum(aperture_sum(p.science.image - p.science_background(), r["x_science"],
                          r["y_science"], 14)[0] for r in s[sel])
    assert abs(fs / ft / 1.3 - 1) < 0.01
    assert abs(ft / s["flux"][sel].sum() - 1) < 0.01


# ---------------------------------------------------------------------------
# transients
# ---------------------------------------------------------------------------

def test_transients_positions_and_fluxes_recorded():
    kw = dict(shape=(512, 512), n_stars=200, seed=5, keep_model=True)
    p0 = simulate_pair(**kw)
    p1 = simulate_pair(**kw, n_transients=8, transient_sign="both")
    # Independent random streams: adding transients does not move the stars.
    np.testing.assert_array_equal(p0.stars["x"], p1.stars["x"])
    np.testing.assert_array_equal(p0.stars["flux"], p1.stars["flux"])
    tr = p1.transients
    assert len(tr) == 8 and set(tr["sign"]) == {-1, 1}
    assert np.all(np.sign(tr["flux"]) == tr["sign"])
    assert np.all((tr["x"] >= 30) & (tr["x"] <= 481) & (tr["y"] >= 30) & (tr["y"] <= 481))
    d = np.hypot(tr["x"][:, None] - p1.stars["x_science"][None, :],
                 tr["y"][:, None] - p1.stars["y_science"][None, :])
    assert d.min() >= 3 * 3.5
    # Positive transients are added to the science image, negative ones to the
    # template (scaled to template units), each exactly where recorded.
    dsci = p1.science_model - p0.science_model
    dtpl = p1.template_model - p0.template_model
    for row in tr:
        if row["sign"] > 0:
            diff, xc, yc, scale = dsci, row["x"], row["y"], 1.0
        else:
            diff, xc, yc, scale = dtpl, row["x_template"], row["y_template"], 1.3
        ix, iy = int(round(xc)), int(round(yc))
        stamp = diff[iy - 18:iy + 19, ix - 18:ix + 19]
        assert abs(stamp.sum() * scale - abs(row["flux"])) < 1e-6 * abs(row["flux"])
        np.testing.assert_allclose(row["stamp_flux"], row["flux"], rtol=1e-6)
        _, cx, cy = moment_fwhm(stamp)
        assert abs(cx + ix - 18 - xc) < 0.01 and abs(cy + iy - 18 - yc) < 0.01
    pos, neg = tr["sign"] > 0, tr["sign"] < 0
    np.testing.assert_allclose(dsci.sum(), tr["flux"][pos].sum(), rtol=1e-6)
    np.testing.assert_allclose(dtpl.sum() * 1.3, -tr["flux"][neg].sum(), rtol=1e-6)


def test_default_transient_flux_gives_snr_30():
    p = simulate_pair(**SMALL, n_transients=5, seed=12)
    tr = p.transients
    assert np.all(tr["sign"] == 1)
    np.testing.assert_allclose(tr["flux"], p.truth["transient_flux"])
    assert np.all((tr["snr"] > 27) & (tr["snr"] < 33))


def test_explicit_transient_fluxes():
    flux = [1000.0, -2000.0, 3000.0]
    p = simulate_pair(**SMALL, n_transients=3, transient_flux=flux, seed=12)
    np.testing.assert_array_equal(p.transients["flux"], flux)
    np.testing.assert_array_equal(p.transients["sign"], [1, -1, 1])
    p = simulate_pair(**SMALL, n_transients=2, transient_flux=-500.0, seed=12)
    np.testing.assert_array_equal(p.transients["flux"], [-500.0, -500.0])
    with pytest.raises(ConfigError):
        simulate_pair(**SMALL, n_transients=2, transient_flux=[1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------
# saturation
# ---------------------------------------------------------------------------

def test_saturation_sets_sat_and_bleeds():
    sat_level = 20000.0
    p = simulate_pair(shape=(256, 256), n_stars=15, flux_range=(2e4, 1e6), saturation=sat_level,
                      seed=7, keep_model=True)
    for exp, model, xc, yc, flag in ((p.template, p.template_model, "x", "y",
                                      "saturated_template"),
                                     (p.science, p.science_model, "x_science", "y_science",
                                      "saturated_science")):
        satbit = exp.masked_image.get_plane_bitmask("SAT")
        sat = (exp.mask & satbit) != 0
        assert sat.any() and not (exp.mask & ~satbit).any()
        assert exp.image.max() <= sat_level
        np.testing.assert_array_equal(exp.image[sat], sat_level)
        assert np.all(sat[model >= sat_level])
        s = p.stars
        peak_model = model[np.round(s[yc]).astype(int), np.round(s[xc]).astype(int)]
        np.testing.assert_array_equal(s[flag], peak_model >= sat_level)
        # Bleed trails: the brightest star's saturated region is taller than wide.
        b = s[np.argmax(s["flux"])]
        ix, iy = int(round(b[xc])), int(round(b[yc]))
        col = sat[:, ix]
        core_w = sat[iy].sum()
        assert col.sum() > core_w + 2
        assert np.all(col[iy - 2:iy + 3])
        assert exp.metadata["SATURATE"] == sat_level
    assert np.array_equal(p.stars["saturated"],
                          p.stars["saturated_template"] | p.stars["saturated_science"])
    q = simulate_pair(shape=(256, 256), n_stars=15, flux_range=(2e4, 1e6), seed=7)
    assert not q.template.mask.any() and not q.science.mask.any()
    assert q.template.image.max() > sat_level


# ---------------------------------------------------------------------------
# I/O and validation
# ---------------------------------------------------------------------------

def test_write_pair_round_trip(tmp_path):
    p = simulate_pair(**SMALL, n_transients=3, seed=21, saturation=30000.0)
    tpath, spath = write_pair(p, tmp_path / "out", prefix="run1_")
    assert tpath.name == "run1_template.fits" and spath.name == "run1_science.fits"
    for path, exp in ((tpath, p.template), (spath, p.science)):
        back = read_fits(path)
        np.testing.assert_array_equal(back.image, exp.image)
        np.testing.assert_array_equal(back.mask, exp.mask)
        np.testing.assert_array_equal(back.variance, exp.variance)
        assert back.psf_fwhm == exp.psf_fwhm and back.phot_scale == exp.phot_scale
        assert back.metadata["GAIN"] == 1.0 and back.metadata["SIMSEED"] == 21
        px = np.array([[0.0, 0.0], [100.5, 300.25]])
        np.testing.assert_allclose(back.wcs.wcs_pix2world(px, 0), exp.wcs.wcs_pix2world(px, 0),
                                   rtol=0, atol=1e-10)
    stars = Table.read(tmp_path / "out" / "run1_stars.ecsv")
    trans = Table.read(tmp_path / "out" / "run1_transients.ecsv")
    for back, orig in ((stars, p.stars), (trans, p.transients)):
        assert back.colnames == orig.colnames
        for col in orig.colnames:
            np.testing.assert_array_equal(back[col], orig[col])
    assert stars.meta["truth"]["seed"] == 21
    assert stars.meta["truth"]["flux_scale"] == 1.3
    assert list(stars.meta["truth"]["shift"]) == [0.0, 0.0]


@pytest.mark.parametrize("kwargs", [
    dict(psf="airy"),
    dict(psf="moffat", moffat_beta=1.0),
    dict(gain=0.0),
    dict(read_noise=-1.0),
    dict(template_fwhm=-2.0),
    dict(flux_scale=0.0),
    dict(shape=(50, 50)),
    dict(n_stars=-1),
    dict(saturation=-5.0),
    dict(flux_range=(100.0, 10.0)),
    dict(fwhm_gradient=2.0),
    dict(transient_sign="sideways"),
    dict(sky=(1.0, 2.0, 3.0)),
])
def test_invalid_parameters_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        simulate_pair(**{**SMALL, **kwargs})


def test_render_psf_stamp_validation_and_shapes():
    assert render_psf_stamp(3.0, (15, 21)).shape == (15, 21)
    with pytest.raises(ConfigError):
        render_psf_stamp(0.0, 15)
    with pytest.raises(ConfigError):
        render_psf_stamp(3.0, 15, psf="box")


def test_two_sky_levels_and_empty_field():
    p = simulate_pair(shape=(128, 128), n_stars=0, sky=(100.0, 300.0),
                      background_gradient=(0.0, 0.0, 0.0), seed=1)
    assert len(p.stars) == 0 and "flux" in p.stars.colnames
    assert abs(p.template.image.mean() - 100.0) < 0.5
    assert abs(p.science.image.mean() - 300.0) < 0.5
