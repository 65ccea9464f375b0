"""Tests of diffim.detect: sep detection, FWHM measurement and kernel-source selection.

Scenes are drawn here with numpy (pixel-integrated Gaussian / Moffat stars, exponential
galaxies, Poisson + sky noise with an exact variance plane) so the tests do not depend on
diffim.simulate.
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import special

from diffim.config import ImagePsfMatchConfig
from diffim.detect import detect_sources, measure_fwhm, select_kernel_sources
from diffim.exceptions import (
    ConfigError,
    DiffimError,
    ImageShapeMismatchError,
    InsufficientCandidatesError,
    NoKernelCandidatesError,
)
from diffim.image import MaskedImage

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "decam_sfft" / "input"
SKY_VAR = 100.0
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


# ---------------------------------------------------------------------------------------------
# scene helpers
# ---------------------------------------------------------------------------------------------

def _render(shape, xs, ys, fluxes, fwhm, psf="gaussian", beta=3.0):
    """Sum of pixel-integrated PSFs at array coordinates (xs, ys), like a real detector.

    Gaussians are integrated exactly (erf); Moffats with 7x7 sub-pixels in a 61x61 box.
    """
    ny, nx = shape
    out = np.zeros(shape)
    if psf == "gaussian":
        k = 1.0 / (math.sqrt(2.0) * fwhm / FWHM_PER_SIGMA)
        ex = np.arange(nx + 1) - 0.5
        ey = np.arange(ny + 1) - 0.5
        for x, y, f in zip(xs, ys, fluxes):
            wx = np.diff(special.erf((ex - x) * k)) / 2
            wy = np.diff(special.erf((ey - y) * k)) / 2
            out += f * np.outer(wy, wx)
        return out
    a = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    n_sub, half = 7, 30
    sub = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    for x, y, f in zip(xs, ys, fluxes):
        ix, iy = int(round(x)), int(round(y))
        x0, x1 = max(ix - half, 0), min(ix + half + 1, nx)
        y0, y1 = max(iy - half, 0), min(iy + half + 1, ny)
        gx = (np.arange(x0, x1)[:, None] + sub[None, :]).ravel()
        gy = (np.arange(y0, y1)[:, None] + sub[None, :]).ravel()
        r2 = (gx[None, :] - x) ** 2 + (gy[:, None] - y) ** 2
        prof = f * (beta - 1) / (np.pi * a * a) * (1 + r2 / (a * a)) ** (-beta)
        out[y0:y1, x0:x1] += prof.reshape(y1 - y0, n_sub, x1 - x0, n_sub).mean(axis=(1, 3))
    return out


def _galaxy(shape, x, y, flux, h, q, theta):
    """Exponential disc of scale length h (major axis), axis ratio q, position angle theta."""
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx].astype(float)
    c, s = math.cos(theta), math.sin(theta)
    u = (xx - x) * c + (yy - y) * s
    v = -(xx - x) * s + (yy - y) * c
    r = np.sqrt(u ** 2 + (v / q) ** 2)
    return flux / (2 * np.pi * h * h * q) * np.exp(-r / h)


def _noisy(model, rng, sky=300.0):
    var = SKY_VAR + np.clip(model, 0, None)
    img = model + sky + rng.normal(0.0, np.sqrt(var))
    return img.astype(np.float32), var.astype(np.float32)


def _grid(n, shape, margin, rng, jitter=3.0):
    ny, nx = shape
    gx = np.linspace(margin, nx - margin, n)
    gy = np.linspace(margin, ny - margin, n)
    xs, ys = np.meshgrid(gx, gy)
    xs = xs.ravel() + rng.uniform(-jitter, jitter, xs.size)
    ys = ys.ravel() + rng.uniform(-jitter, jitter, ys.size)
    return xs, ys


def _match(xd, yd, xt, yt):
    """Distance from each detection to the nearest truth position and its index."""
    d = np.hypot(np.asarray(xd)[:, None] - xt[None], np.asarray(yd)[:, None] - yt[None])
    return d.min(1), d.argmin(1)


def _config(kernel_size_scaling=1.0, **select):
    cfg = ImagePsfMatchConfig()
    cfg.kernel.active.detection_config.fp_grow_kernel_scaling = kernel_size_scaling
    for k, v in select.items():
        setattr(cfg.select, k, v)
    return cfg


# ---------------------------------------------------------------------------------------------
# detect_sources
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def star_field():
    rng = np.random.default_rng(42)
    shape = (320, 360)
    xs, ys = _grid(7, shape, 25, rng)
    fluxes = 10 ** rng.uniform(3.5, 5.0, xs.size)
    img, var = _noisy(_render(shape, xs, ys, fluxes, 3.0), rng)
    mi = MaskedImage(img, variance=var, xy0=(1000, -50))
    return mi, xs, ys, fluxes


def test_detect_positions_parent_coords(star_field):
    mi, xs, ys, fluxes = star_field
    src = detect_sources(mi)
    for col in ("x", "y", "flux", "flux_err", "snr", "peak", "a", "b", "theta", "npix", "flag",
                "fwhm", "ellipticity", "saturated"):
        assert col in src.colnames
    assert len(src) == xs.size  # every star is well above 10 sigma, no spurious detections
    d, j = _match(np.asarray(src["x"]) - 1000, np.asarray(src["y"]) + 50, xs, ys)
    assert d.max() < 0.3
    bright = np.asarray(src["snr"]) > 50
    assert bright.sum() >= 20
    assert d[bright].max() < 0.1
    # background-subtracted aperture flux close to the truth for bright stars
    ratio = np.asarray(src["flux"])[bright] / fluxes[j[bright]]
    assert np.all(np.abs(ratio - 1) < 0.05)
    # per-source FWHM estimate is in the right range for bright stars
    assert np.median(np.asarray(src["fwhm"])[bright]) == pytest.approx(3.0, rel=0.15)
    assert not np.any(src["saturated"])
    assert src.meta["noise_source"] == "variance"


def test_detect_falls_back_to_background_rms(star_field):
    mi, xs, ys, _ = star_field
    flat = MaskedImage(mi.image.copy(), xy0=mi.xy0)  # zero variance plane
    src = detect_sources(flat)
    assert src.meta["noise_source"] == "background_rms"
    d, _ = _match(np.asarray(src["x"]) - 1000, np.asarray(src["y"]) + 50, xs, ys)
    assert len(src) >= 0.9 * xs.size and d.max() < 0.5
    # rms of the sky is sqrt(SKY_VAR) = 10
    assert src.meta["background_rms"] == pytest.approx(10.0, rel=0.1)


def test_detect_big_endian_and_crowded_buffers(star_field):
    import sep

    mi, xs, _, _ = star_field
    big = MaskedImage(mi.image.astype(">f4"), variance=mi.variance.astype(">f4"), xy0=mi.xy0)
    old = sep.get_extract_pixstack()
    sep.set_extract_pixstack(200)  # forces the grow-and-retry path
    try:
        src = detect_sources(big)
        assert sep.get_extract_pixstack() == 200  # global limit restored
    finally:
        sep.set_extract_pixstack(old)
    assert len(src) == xs.size


def test_detect_saturated_flag_and_empty():
    rng = np.random.default_rng(3)
    shape = (120, 120)
    model = _render(shape, [40, 80], [60, 60], [2e5, 2e4], 3.0)
    img, var = _noisy(model, rng)
    mask = np.zeros(shape, np.int32)
    mi = MaskedImage(img, mask=mask, variance=var)
    sat = img > 8000
    assert sat.any()
    mi.mask[sat] |= mi.get_plane_bitmask("SAT")
    src = detect_sources(mi)
    src.sort("x")
    assert list(src["saturated"]) == [True, False]
    # the same test through a saturation level instead of the SAT plane
    mi2 = MaskedImage(img, variance=var)
    src2 = detect_sources(mi2, saturation_level=8000.0)
    src2.sort("x")
    assert list(src2["saturated"]) == [True, False]

    noise = MaskedImage(rng.normal(0, 10, shape).astype(np.float32),
                        variance=np.full(shape, 100, np.float32))
    empty = detect_sources(noise, threshold=10)
    assert len(empty) == 0 and "snr" in empty.colnames
    allbad = MaskedImage(img, mask=np.full(shape, 1 << 7, np.int32), variance=var)
    assert len(detect_sources(allbad)) == 0


def test_detect_bad_parameters(star_field):
    mi = star_field[0]
    with pytest.raises(ConfigError):
        detect_sources(mi, threshold=0)
    with pytest.raises(ConfigError):
        detect_sources(mi, background_box=-3)


# ---------------------------------------------------------------------------------------------
# measure_fwhm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("psf,fwhm", [("gaussian", 1.8), ("gaussian", 2.5), ("gaussian", 4.5),
                                      ("moffat", 2.8), ("moffat", 4.0)])
def test_measure_fwhm(psf, fwhm):
    rng = np.random.default_rng(7)
    shape = (300, 300)
    xs, ys = _grid(6, shape, 25, rng)
    fluxes = 10 ** rng.uniform(3.8, 5.0, xs.size)
    model = _render(shape, xs, ys, fluxes, fwhm, psf=psf, beta=2.5 if psf == "moffat" else 3)
    # a few galaxies must not bias the answer
    for gx, gy in [(60, 150), (150, 60), (240, 150)]:
        model += _galaxy(shape, gx, gy, 4e4, 4.0, 0.8, 0.3)
    img, var = _noisy(model, rng)
    mi = MaskedImage(img, variance=var, xy0=(17, 33))
    assert measure_fwhm(mi) == pytest.approx(fwhm, rel=0.05)
    src = detect_sources(mi)
    assert measure_fwhm(mi, src) == pytest.approx(fwhm, rel=0.05)


def test_measure_fwhm_no_star():
    rng = np.random.default_rng(1)
    shape = (100, 100)
    mi = MaskedImage(rng.normal(0, 10, shape).astype(np.float32),
                     variance=np.full(shape, 100, np.float32))
    with pytest.raises(NoKernelCandidatesError, match="FWHM"):
        measure_fwhm(mi)


# ---------------------------------------------------------------------------------------------
# select_kernel_sources
# ---------------------------------------------------------------------------------------------

KSIZE = 11  # stamp half-width 11 with fp_grow_kernel_scaling 1


@pytest.fixture(scope="module")
def scene():
    """Template/science pair with stars, saturated stars, galaxies and masked regions."""
    rng = np.random.default_rng(2024)
    shape = (420, 420)
    xy0 = (500, 700)
    xs, ys = _grid(9, shape, 20, rng, jitter=2.0)  # spacing ~47 px: isolated
    fluxes = 10 ** rng.uniform(3.7, 4.7, xs.size)
    kind = np.array(["star"] * xs.size, dtype=object)
    order = rng.permutation(xs.size)
    sat_idx, gal_idx, rgal_idx = order[:4], order[4:8], order[8:11]
    fluxes[sat_idx] = 3e5
    kind[sat_idx] = "sat"
    kind[gal_idx] = "galaxy"
    kind[rgal_idx] = "round_galaxy"
    star = kind == "star"
    sat = kind == "sat"
    pts = star | sat

    def draw(fwhm):
        m = _render(shape, xs[pts], ys[pts], fluxes[pts], fwhm)
        for i in gal_idx:  # elongated
            m += _galaxy(shape, xs[i], ys[i], 3e4, 3.5, 0.3, rng.uniform(0, np.pi))
        for i in rgal_idx:  # round but extended
            m += _galaxy(shape, xs[i], ys[i], 3e4, 3.0, 0.9, 0.0)
        return m

    planes = {}
    images = []
    for fwhm in (2.5, 3.6):  # template, science
        img, var = _noisy(draw(fwhm), rng)
        mi = MaskedImage(img, variance=var, xy0=xy0)
        planes = mi.mask_planes
        sat_pix = img > 15000
        mi.image[sat_pix] = 15000
        mi.mask[sat_pix] |= mi.get_plane_bitmask("SAT")
        mi.mask[:4, :] |= mi.get_plane_bitmask("EDGE")
        mi.mask[-4:, :] |= mi.get_plane_bitmask("EDGE")
        mi.mask[:, :4] |= mi.get_plane_bitmask("EDGE")
        mi.mask[:, -4:] |= mi.get_plane_bitmask("EDGE")
        images.append(mi)
    template, science = images
    assert (science.mask & science.get_plane_bitmask("SAT")).any()
    # a BAD column in the template only, through a star column
    col = int(round(xs[star][0]))
    template.mask[:, col] |= template.get_plane_bitmask("BAD")
    # a NO_DATA block in the science only
    science.mask[300:420, 0:110] |= science.get_plane_bitmask("NO_DATA")
    science.image[300:420, 0:110] = np.nan
    # one unmasked non-finite pixel near another star, in the template
    k = np.flatnonzero(star)[5]
    template.image[int(ys[k]) + 6, int(xs[k]) - 4] = np.inf
    truth = dict(xs=xs + xy0[0], ys=ys + xy0[1], kind=kind, planes=planes)
    return template, science, truth


def _stamp_is_clean(mi, x, y, g, bits):
    x0, y0 = mi.xy0
    ix, iy = int(round(x)) - x0, int(round(y)) - y0
    ny, nx = mi.image.shape
    assert ix - g >= 0 and iy - g >= 0 and ix + g < nx and iy + g < ny
    sl = (slice(iy - g, iy + g + 1), slice(ix - g, ix + g + 1))
    return not (mi.mask[sl] & bits).any() and np.isfinite(mi.image[sl]).all()


def test_select_clean_point_sources(scene):
    template, science, truth = scene
    cfg = _config()
    sel = select_kernel_sources(template, science, KSIZE, cfg)
    assert sel.colnames[:4] == ["x", "y", "snr", "flux"]
    assert "fwhm" in sel.colnames
    assert np.all(np.diff(np.asarray(sel["snr"])) <= 0)
    g = sel.meta["stamp_half_width"]
    assert g == KSIZE
    bits = template.get_plane_bitmask("SAT", "NO_DATA", "EDGE", "BAD")
    for x, y in zip(sel["x"], sel["y"]):
        assert _stamp_is_clean(template, x, y, g, bits)
        assert _stamp_is_clean(science, x, y, g, bits)
    d, j = _match(sel["x"], sel["y"], truth["xs"], truth["ys"])
    assert d.max() < 0.5
    assert set(truth["kind"][j]) == {"star"}  # no galaxies, no saturated stars
    n_star = int((truth["kind"] == "star").sum())
    assert n_star - 15 <= len(sel) <= n_star  # most clean stars survive
    rej = sel.meta["rejected"]
    assert rej["saturated"] + rej["masked stamps"] >= 4
    assert sum(v for k, v in rej.items() if k.startswith(("elongated", "extended"))) >= 6
    assert rej["masked stamps"] >= 3  # BAD column, NO_DATA block, EDGE near stars
    assert rej["non-finite stamps"] == 1


def test_select_detect_on_template_and_max(scene):
    template, science, truth = scene
    sel = select_kernel_sources(template, science, KSIZE,
                                _config(detect_on="template", max_kernel_sources=5))
    assert len(sel) == 5
    assert sel.meta["detect_on"] == "template"
    full = select_kernel_sources(template, science, KSIZE, _config(detect_on="template"))
    assert np.allclose(sel["snr"], full["snr"][:5])
    _, j = _match(sel["x"], sel["y"], truth["xs"], truth["ys"])
    assert set(truth["kind"][j]) == {"star"}


def test_select_bigger_stamps_lose_more(scene):
    template, science, _ = scene
    small = select_kernel_sources(template, science, KSIZE, _config())
    big = select_kernel_sources(template, science, KSIZE, _config(kernel_size_scaling=1.6))
    assert big.meta["stamp_half_width"] == int(1.6 * KSIZE + 0.5)
    assert len(big) < len(small)


def test_select_crowded_relaxes_default_isolation():
    """Every star has an equal neighbour 9 px away (inside the stamp, outside 2 FWHM)."""
    rng = np.random.default_rng(11)
    shape = (360, 360)
    xs, ys = _grid(6, shape, 40, rng, jitter=1.0)
    xs = np.concatenate([xs, xs + 9.0])
    ys = np.concatenate([ys, ys + rng.uniform(-1, 1, ys.size)])
    fluxes = 10 ** rng.uniform(4.0, 4.5, xs.size)
    images = []
    for fwhm in (2.5, 3.2):
        img, var = _noisy(_render(shape, xs, ys, fluxes, fwhm), rng)
        images.append(MaskedImage(img, variance=var))
    sel = select_kernel_sources(*images, KSIZE, _config())
    assert sel.meta["isolation_radius"] < KSIZE
    assert len(sel) >= 10
    d, _ = _match(sel["x"], sel["y"], xs, ys)
    assert d.max() < 0.5
    # an explicit radius is honoured as given
    with pytest.raises(NoKernelCandidatesError, match="not isolated"):
        select_kernel_sources(*images, KSIZE, _config(isolation_radius=float(KSIZE)))


def test_select_crowded_keeps_deblended_stars_with_faint_neighbours():
    """Each bright star has a fainter (20 %) companion 9 px away that sep deblends from it.

    The default rejects every deblended source; ``reject_blended=False`` keeps the bright
    stars (their neighbour is below ``neighbour_flux_fraction``) and still rejects the faint
    companions (a bright neighbour), as for a crowded bulge field.
    """
    rng = np.random.default_rng(7)
    shape = (360, 360)
    xs, ys = _grid(6, shape, 40, rng, jitter=1.0)
    fluxes = 10 ** rng.uniform(4.6, 4.9, xs.size)
    all_x = np.concatenate([xs, xs + 9.0])
    all_y = np.concatenate([ys, ys + 1.0])
    all_f = np.concatenate([fluxes, 0.2 * fluxes])
    images = []
    for fwhm in (2.5, 3.2):
        img, var = _noisy(_render(shape, all_x, all_y, all_f, fwhm), rng)
        images.append(MaskedImage(img, variance=var))
    strict = _config(detection_threshold=5.0, isolation_radius=float(KSIZE))
    crowded = _config(detection_threshold=5.0, isolation_radius=float(KSIZE),
                      reject_blended=False, neighbour_flux_fraction=0.3)
    try:
        n_strict = len(select_kernel_sources(*images, KSIZE, strict))
    except NoKernelCandidatesError as exc:
        assert "blended" in str(exc)
        n_strict = 0
    sel = select_kernel_sources(*images, KSIZE, crowded)
    assert len(sel) >= 20 and len(sel) > n_strict + 10
    assert "truncated" in sel.meta["rejected"]
    d, j = _match(sel["x"], sel["y"], all_x, all_y)
    assert d.max() < 0.5
    assert (j < xs.size).all()  # only the bright stars
    # a tighter neighbour-flux limit rejects the bright stars too
    with pytest.raises(NoKernelCandidatesError, match="not isolated"):
        select_kernel_sources(*images, KSIZE, _config(
            detection_threshold=5.0, isolation_radius=float(KSIZE), reject_blended=False,
            neighbour_flux_fraction=0.1))


def test_select_target_kernel_sources_shrinks_isolation_radius():
    """The default radius shrinks until ``target_kernel_sources`` survive (if it can)."""
    rng = np.random.default_rng(11)
    shape = (360, 360)
    xs, ys = _grid(6, shape, 40, rng, jitter=1.0)
    xs = np.concatenate([xs, xs + 9.0])
    ys = np.concatenate([ys, ys + rng.uniform(-1, 1, ys.size)])
    keep = np.ones(xs.size, bool)
    keep[6:12] = False  # six singles: enough for a target of 5 at the full radius
    xs, ys = xs[keep], ys[keep]
    fluxes = 10 ** rng.uniform(4.0, 4.5, xs.size)
    images = []
    for fwhm in (2.5, 3.2):
        img, var = _noisy(_render(shape, xs, ys, fluxes, fwhm), rng)
        images.append(MaskedImage(img, variance=var))
    few = select_kernel_sources(*images, KSIZE, _config(target_kernel_sources=5,
                                                        min_kernel_sources=3))
    many = select_kernel_sources(*images, KSIZE, _config(target_kernel_sources=40))
    assert few.meta["isolation_radius"] == KSIZE
    assert many.meta["isolation_radius"] < KSIZE
    assert len(many) > len(few)


def test_select_errors_name_counts(scene):
    template, science, _ = scene
    with pytest.raises(InsufficientCandidatesError) as err:
        select_kernel_sources(template, science, KSIZE, _config(min_kernel_sources=500))
    msg = str(err.value)
    n_found = int(re.search(r"only (\d+) kernel candidates", msg).group(1))
    assert n_found > 10
    assert "min_kernel_sources=500" in msg
    assert re.search(r"\d+ detections", msg)
    assert "saturated" in msg and "masked stamps" in msg

    with pytest.raises(NoKernelCandidatesError) as err:
        select_kernel_sources(template, science, KSIZE, _config(min_snr=1e6, max_snr=1e7))
    assert not isinstance(err.value, InsufficientCandidatesError)
    assert re.search(r"\d+ outside S/N", str(err.value))

    rng = np.random.default_rng(5)
    blank = MaskedImage(rng.normal(0, 10, (100, 100)).astype(np.float32),
                        variance=np.full((100, 100), 100, np.float32))
    with pytest.raises(NoKernelCandidatesError, match="0 detections"):
        select_kernel_sources(blank, blank, KSIZE, _config())


def test_select_bad_inputs(scene):
    template, science, _ = scene
    with pytest.raises(ConfigError):
        select_kernel_sources(template, science, KSIZE, _config(detect_on="both"))
    with pytest.raises(ConfigError):
        select_kernel_sources(template, science, KSIZE,
                              _config(exclude_mask_planes=("NO_DATA", "NOT_A_PLANE")))
    other = MaskedImage(science.image, variance=science.variance, xy0=(0, 0))
    with pytest.raises(ImageShapeMismatchError):
        select_kernel_sources(template, other, KSIZE, _config())
    assert issubclass(InsufficientCandidatesError, DiffimError)


# ---------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------

def _real(name):
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} not available")
    from diffim.image import read_fits

    return read_fits(path).masked_image


def test_real_decam_kernel_sources():
    mi = _real("DEC-OBS04a.mini.fits")
    sel = select_kernel_sources(mi, mi, 21, _config(kernel_size_scaling=1.0))
    assert len(sel) >= 3
    assert sel.meta["stamp_half_width"] == 21
    fwhm = measure_fwhm(mi)
    assert 3.5 < fwhm < 7.5  # header FWHM keyword: 5.23 px


def test_real_decam_pair():
    template = _real("DEC-OBS04a.mini.fits")
    science = _real("DEC-OBS04b.mini.fits")
    sel = select_kernel_sources(template, science, 21, _config())
    assert len(sel) >= 3
