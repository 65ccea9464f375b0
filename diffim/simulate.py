"""Simulated template/science image pairs with fully known truth.

Used by the tests, the demo workflow and the benchmarks.  Every quantity that
goes into the images is returned, so a test can compare what the pipeline
measures against what was put in.

Model
-----
Pixel ``[j, i]`` covers ``x in [i - 0.5, i + 0.5)``, ``y in [j - 0.5, j + 0.5)``
(pixel centres at integer coordinates, as in ``sep`` and the rest of diffim).
All fluxes, sky levels and backgrounds are in image units (ADU); read noise is
in electrons and ``gain`` is e-/ADU.

* **Stars**: positions uniform, at least ``20 px + |shift|`` from every edge so
  that they are inside both images.  Template fluxes follow a power law
  ``dN/dF ∝ F**-flux_index`` between ``flux_range``.  With the defaults
  (index 1.5 between 300 and 300000) about half of 800 stars have template
  S/N > 20, ~50 are brighter than 30000 ADU and a few are very bright.
* **PSF**: ``"gaussian"`` or ``"moffat"`` (``moffat_beta``), integrated over
  each pixel: analytically (``erf``) for the Gaussian; by midpoint
  supersampling for the Moffat (``supersample`` per axis in the core, 3 in
  the inner wings, 1 in the far wings where the profile is smooth on the
  pixel scale; the error is < 0.3 % of the peak and < 0.5 % of the value in
  wing pixels).
  Profiles are normalised *analytically* to the total flux and truncated at a
  square stamp of half-width ``ceil(5 FWHM)`` (Gaussian) or ``ceil(8 FWHM)``
  (Moffat).  The Gaussian loses nothing measurable; a Moffat loses its far
  wings (~1e-4 of the flux for beta = 3, ~1 % for beta = 2).  The flux actually
  deposited for each star is returned (``template_stamp_flux``,
  ``science_stamp_flux``), as is the loss for a star at the field centre
  (``truth["template_stamp_fraction"]`` / ``["science_stamp_fraction"]``).
* **Spatially varying PSF**: with ``fwhm_gradient = g`` the FWHM of *both*
  images follows ``FWHM(x, y) = fwhm * (1 + g (x/nx - 0.5) + 0.5 g (y/ny - 0.5))``
  (see :func:`fwhm_at`).  The same *relative* pattern is used in both images,
  so the FWHM ratio is constant but the width of the matching kernel,
  ``sqrt(fwhm_s² - fwhm_t²)``, still scales across the field.
* **Template**: ``sky_t + stars``.
* **Science**: ``flux_scale * stars`` moved by ``shift = (dx, dy)`` px and drawn
  with the science PSF, ``+ sky_s + b0 + b1 x + b2 y`` (``background_gradient``,
  x and y in pixels) ``+ transients``.  Both images carry the *same* WCS, so
  ``shift`` is a small uncorrected astrometric offset that the PSF-matching
  kernel has to absorb.
* **Transients**: point sources with the local science PSF at random positions
  away from edges, stars and each other.  A *negative* transient (a source
  that has faded) is drawn in the *template* instead, with flux
  ``|flux| / flux_scale`` at the matching template position, so that a perfect
  difference image ``science - kernel ⊗ template`` shows ``-|flux|`` while
  every expected count stays non-negative (Poisson statistics stay valid).
* **Noise**: Poisson on the expected electrons ``model * gain`` plus Gaussian
  read noise; the variance plane is the exact expected variance
  ``model / gain + (read_noise / gain)**2`` (not estimated from the noisy
  image), so ``(image - model) / sqrt(variance)`` has unit variance.
* **Saturation** (if ``saturation`` ADU is given): pixels whose noisy value or
  expected value reaches it are clipped to it and flagged ``SAT``; each column
  of a saturated core bleeds vertically by ``ceil(excess / saturation)``
  pixels, where ``excess`` is that column's expected charge above the full
  well (split up/down).  Bleed pixels are set to ``saturation`` and flagged
  ``SAT``; the variance plane keeps the unsaturated expectation there.
  ``saturation=(template_level, science_level)`` saturates the images at
  different levels (``None`` for one of them leaves it unsaturated).
* **Bad columns** (``template_nan_columns`` / ``science_nan_columns``): whole
  columns set to NaN, flagged ``NO_DATA`` with infinite variance, as
  :func:`diffim.image.read_fits` flags non-finite pixels (a dead CCD column or a
  gap between detectors in a stacked template).

Random streams for star positions/fluxes, transients and the noise of each
image are independent children of ``seed``, so changing ``n_transients``
leaves the stars where they were.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import pathlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from . import _kernels
from .exceptions import ConfigError
from .image import Exposure, MaskedImage, write_fits

__all__ = [
    "SimulatedPair",
    "simulate_pair",
    "write_pair",
    "render_psf_stamp",
    "fwhm_at",
    "PIXEL_SCALE_ARCSEC",
]

log = logging.getLogger(__name__)

PIXEL_SCALE_ARCSEC = 0.2
"""Pixel scale of the simulated TAN WCS, arcsec per pixel."""

_CRVAL_DEG = (150.1, 2.2)  # arbitrary, away from the poles and RA wrap
_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_STAMP_RADIUS_FWHM = {"gaussian": 5.0, "moffat": 8.0}
_EDGE_MARGIN = 20
_TRANSIENT_EDGE_MARGIN = 30
_DEFAULT_TRANSIENT_SNR = 30.0
_THREAD_MIN_PIXELS = 512 * 512  # below this, thread start-up costs more than it saves


def _render(img, xs, ys, fluxes, fwhms, psf, beta, supersample, radius_fwhm=None):
    """Add point sources to float64 ``img`` in place; return flux deposited per source."""
    xs = np.ascontiguousarray(xs, dtype=np.float64)
    ys = np.ascontiguousarray(ys, dtype=np.float64)
    fluxes = np.ascontiguousarray(fluxes, dtype=np.float64)
    fwhms = np.ascontiguousarray(fwhms, dtype=np.float64)
    sums = np.zeros(xs.size)
    if xs.size == 0:
        return sums
    if radius_fwhm is None:
        radius_fwhm = _STAMP_RADIUS_FWHM[psf]
    radii = np.ceil(radius_fwhm * fwhms).astype(np.int64)
    if psf == "gaussian":
        _kernels.add_gaussian_sources(img, xs, ys, fluxes, fwhms, radii, sums)
    else:
        _kernels.add_moffat_sources(img, xs, ys, fluxes, fwhms, float(beta), radii,
                                    int(supersample), sums)
    return sums


# ---------------------------------------------------------------------------
# small public helpers
# ---------------------------------------------------------------------------

def fwhm_at(fwhm, x, y, shape, fwhm_gradient=0.0):
    """PSF FWHM at pixel position(s) ``(x, y)`` for the simulator's variation pattern.

    Parameters
    ----------
    fwhm : float
        FWHM at the field centre, pixels.
    x, y : float or array_like
        Pixel coordinates (0-based, pixel centres at integers).
    shape : tuple of int
        Image shape ``(ny, nx)``.
    fwhm_gradient : float, optional
        Relative gradient ``g``.

    Returns
    -------
    float or numpy.ndarray
        ``fwhm * (1 + g (x/nx - 0.5) + 0.5 g (y/ny - 0.5))``.
    """
    ny, nx = shape
    g = float(fwhm_gradient)
    return fwhm * (1.0 + g * (np.asarray(x) / nx - 0.5) + 0.5 * g * (np.asarray(y) / ny - 0.5))


def render_psf_stamp(fwhm, size, psf="gaussian", beta=3.0, dx=0.0, dy=0.0, *, supersample=7):
    """Pixel-integrated PSF image with unit total flux.

    The profile is normalised analytically (its integral over the infinite
    plane is 1), exactly as stars are drawn by :func:`simulate_pair`, so the
    stamp sums to 1 for a Gaussian in a stamp several FWHM wide and to the
    enclosed fraction (slightly below 1) for a Moffat.

    Parameters
    ----------
    fwhm : float
        FWHM in pixels.
    size : int or tuple of int
        Stamp size; an int gives a square stamp, a tuple is ``(ny, nx)``.
    psf : {"gaussian", "moffat"}, optional
        Profile.
    beta : float, optional
        Moffat index (ignored for a Gaussian); must exceed 1.
    dx, dy : float, optional
        Offset of the centre from pixel ``(size // 2, size // 2)`` (the
        kernel-centre convention used across diffim).
    supersample : int, optional
        Subsamples per axis in the Moffat core (the Gaussian is integrated
        exactly).

    Returns
    -------
    numpy.ndarray
        Float64 array of shape ``(ny, nx)``.

    Raises
    ------
    ConfigError
        For an invalid FWHM, size, profile or beta.
    """
    psf = _check_psf(psf, beta)
    if not (np.isfinite(fwhm) and fwhm > 0):
        raise ConfigError(f"render_psf_stamp: fwhm={fwhm!r} must be a positive number of pixels")
    if np.ndim(size) == 0:
        ny = nx = int(size)
    else:
        ny, nx = (int(s) for s in size)
    if ny < 1 or nx < 1:
        raise ConfigError(f"render_psf_stamp: size={size!r} must be at least 1 pixel")
    if int(supersample) < 1:
        raise ConfigError(f"render_psf_stamp: supersample={supersample!r} must be >= 1")
    img = np.zeros((ny, nx))
    # A radius covering the whole stamp: here the caller chooses the truncation.
    radius = max(ny, nx) / float(fwhm) + 2.0
    _render(img, [nx // 2 + dx], [ny // 2 + dy], [1.0], [fwhm], psf, beta,
            supersample, radius_fwhm=radius)
    return img


# ---------------------------------------------------------------------------
# the simulated pair
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class SimulatedPair:
    """A template/science pair and everything used to make it.

    Attributes
    ----------
    template, science : diffim.image.Exposure
        The two images (float32 image, int32 mask, float32 variance).
    stars : astropy.table.Table
        One row per star: ``id``, ``x``, ``y`` (template position),
        ``x_science``, ``y_science`` (= x + dx, y + dy), ``flux`` (template
        ADU, analytic total), ``science_flux`` (= flux_scale * flux),
        ``template_fwhm_at``, ``science_fwhm_at`` (local FWHM, px),
        ``template_stamp_flux``, ``science_stamp_flux`` (flux actually
        deposited after stamp truncation and edge clipping), ``snr_template``,
        ``snr_science`` (expected PSF-optimal S/N ignoring neighbours),
        ``saturated``, ``saturated_template``, ``saturated_science``.
    transients : astropy.table.Table
        One row per transient: ``id``, ``x``, ``y`` (science position),
        ``x_template``, ``y_template``, ``flux`` (signed, science ADU: what a
        perfect difference image shows), ``sign`` (+1/-1), ``fwhm`` (local
        FWHM of the image it is drawn in), ``stamp_flux`` (signed, science
        units, as deposited), ``snr`` (expected S/N in the science image).
    truth : dict
        Every simulation parameter plus derived values (see
        :func:`simulate_pair`).
    template_model, science_model : numpy.ndarray or None
        Noiseless expected images (float64) when ``keep_model=True``.
    """

    template: Exposure
    science: Exposure
    stars: Table
    transients: Table
    truth: dict
    template_model: np.ndarray | None = None
    science_model: np.ndarray | None = None

    def template_background(self):
        """Noiseless template background (constant sky) as a float64 array."""
        return np.full(self.truth["shape"], float(self.truth["sky_template"]))

    def science_background(self):
        """Noiseless science background ``sky_s + b0 + b1 x + b2 y`` as a float64 array."""
        return _science_background(self.truth["shape"], self.truth["sky_science"],
                                   self.truth["background_gradient"])


def _science_background(shape, sky, coeffs):
    ny, nx = shape
    b0, b1, b2 = coeffs
    return (b1 * np.arange(nx)[None, :] + (sky + b0 + b2 * np.arange(ny))[:, None])


def _check_psf(psf, beta):
    name = str(psf).lower()
    if name not in _STAMP_RADIUS_FWHM:
        raise ConfigError(f"psf={psf!r} is not supported; use 'gaussian' or 'moffat'")
    if name == "moffat" and not (np.isfinite(beta) and beta > 1.0):
        raise ConfigError(f"moffat_beta={beta!r} must be > 1 (the Moffat flux diverges otherwise)")
    return name


def _neff(fwhm, psf, beta):
    """Effective noise area 1 / sum(p²) of a PSF, pixels (analytic, pixelisation approx.)."""
    fwhm = np.asarray(fwhm, dtype=float)
    if psf == "gaussian":
        # Pixel integration adds a box of variance 1/12 per axis.
        s2 = (fwhm * _SIGMA_PER_FWHM) ** 2 + 1.0 / 12.0
        return 4.0 * np.pi * s2
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return np.pi * alpha ** 2 * (2.0 * beta - 1.0) / (beta - 1.0) ** 2


def _expected_snr(flux, neff, bkg, gain, read_noise):
    """PSF-optimal S/N of an isolated point source on a flat background."""
    flux = np.asarray(flux, dtype=float)
    var_pix = bkg / gain + (read_noise / gain) ** 2
    return np.abs(flux) / np.sqrt(np.abs(flux) / gain + neff * var_pix)


def _flux_for_snr(snr, neff, bkg, gain, read_noise):
    """Inverse of :func:`_expected_snr`: the flux giving S/N ``snr``."""
    var_pix = bkg / gain + (read_noise / gain) ** 2
    a = snr ** 2 / gain
    return 0.5 * (a + math.sqrt(a * a + 4.0 * snr ** 2 * neff * var_pix))


def _powerlaw_fluxes(rng, n, lo, hi, index):
    """Draw ``n`` fluxes with dN/dF ∝ F**-index on [lo, hi] by inverting the CDF."""
    u = rng.random(n)
    if abs(index - 1.0) < 1e-9:
        return lo * (hi / lo) ** u
    p = 1.0 - index
    return (lo ** p + u * (hi ** p - lo ** p)) ** (1.0 / p)


def _make_wcs(shape):
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = list(_CRVAL_DEG)
    # FITS pixels are 1-based: the array centre (nx-1)/2 is FITS (nx+1)/2.
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    w.wcs.cdelt = [-PIXEL_SCALE_ARCSEC / 3600.0, PIXEL_SCALE_ARCSEC / 3600.0]
    w.wcs.set()
    return w


def _add_noise(model, gain, read_noise, rng):
    """Noisy float32 ADU image and exact expected float32 variance for expected ADU ``model``."""
    lam = np.clip(model, 0.0, None)
    lam *= gain
    img = rng.poisson(lam).astype(np.float32)
    if gain != 1.0:
        img /= np.float32(gain)
    if read_noise > 0:
        noise = rng.standard_normal(model.shape, dtype=np.float32)
        noise *= np.float32(read_noise / gain)
        img += noise
    lam *= 1.0 / gain ** 2
    lam += (read_noise / gain) ** 2
    return img, lam.astype(np.float32)


def _build_image(shape, sources, sky, coeffs, gain, read_noise, rng, psf, beta, supersample):
    """Render ``sources`` (list of (x, y, flux, fwhm)) on a background and add noise.

    Returns the noiseless model, the noisy image, the variance and the flux
    deposited for each source list.  Releases the GIL in the heavy parts so the
    template and the science image can be built in parallel threads.
    """
    model = np.zeros(shape)
    sums = [_render(model, *src, psf, beta, supersample) for src in sources]
    ny, nx = shape
    b0, b1, b2 = coeffs
    model += b1 * np.arange(nx)[None, :]
    model += (sky + b0 + b2 * np.arange(ny))[:, None]
    img, var = _add_noise(model, gain, read_noise, rng)
    return model, img, var, sums


def _saturate(img, model, saturation, xs, ys, radii):
    """Clip at ``saturation``, add vertical bleed trails; return the SAT boolean mask."""
    sat = (img >= saturation) | (model >= saturation)
    ny, nx = img.shape
    for x, y, r in zip(xs, ys, radii):
        ix = int(math.floor(x + 0.5))
        iy = int(math.floor(y + 0.5))
        if not (0 <= ix < nx and 0 <= iy < ny) or model[iy, ix] < saturation:
            continue
        x0, x1 = max(ix - r, 0), min(ix + r + 1, nx)
        y0, y1 = max(iy - r, 0), min(iy + r + 1, ny)
        stamp = model[y0:y1, x0:x1]
        # Charge above the full well overflows along the readout columns; a
        # pixel at full well holds `saturation`, so the overflow fills about
        # excess/saturation extra pixels, half above and half below the core.
        excess = np.clip(stamp - saturation, 0.0, None).sum(axis=0)
        for c in np.nonzero(excess > 0)[0]:
            col = x0 + c
            rows = np.nonzero(stamp[:, c] >= saturation)[0] + y0
            nb = int(math.ceil(excess[c] / saturation))
            up = nb // 2 + nb % 2
            lo = max(rows.min() - nb // 2, 0)
            hi = min(rows.max() + up + 1, ny)
            sat[lo:hi, col] = True
    img[sat] = saturation
    return sat


def _star_flags(sat, xs, ys):
    """True where the star's centre pixel or a neighbour is SAT."""
    ny, nx = sat.shape
    out = np.zeros(len(xs), dtype=bool)
    for k, (x, y) in enumerate(zip(xs, ys)):
        ix = int(math.floor(x + 0.5))
        iy = int(math.floor(y + 0.5))
        out[k] = sat[max(iy - 1, 0):iy + 2, max(ix - 1, 0):ix + 2].any()
    return out


def _saturation_levels(saturation):
    """``(template, science)`` saturation levels (float or None) from ``saturation``."""
    if saturation is None or np.ndim(saturation) == 0:
        levels = (saturation, saturation)
    else:
        levels = tuple(saturation)
        if len(levels) != 2:
            raise ConfigError(f"saturation={saturation!r} must be a level, None or a "
                              "(template, science) pair")
    out = []
    for level in levels:
        if level is None:
            out.append(None)
            continue
        try:
            v = float(level)
        except (TypeError, ValueError):
            v = float("nan")
        if not (np.isfinite(v) and v > 0):
            raise ConfigError(f"saturation={saturation!r} must be a positive ADU level or "
                              "None (or a (template, science) pair of them)")
        out.append(v)
    return tuple(out)


def _nan_columns(columns, nx, name):
    """Sorted unique column indices in ``[0, nx)``; ConfigError otherwise."""
    try:
        cols = sorted({int(c) for c in columns})
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={columns!r} must be a sequence of column indices") from None
    if cols and not (0 <= cols[0] and cols[-1] < nx):
        raise ConfigError(f"{name}={columns!r}: columns must be in 0..{nx - 1}")
    return cols


def _as_pair(value, name):
    if np.ndim(value) == 0:
        return float(value), float(value)
    vals = tuple(float(v) for v in value)
    if len(vals) != 2:
        raise ConfigError(f"{name}={value!r} must be a number or a (template, science) pair")
    return vals


def _place_transients(rng, n, shape, margin, star_xy, star_flux_sci, fwhm_sci,
                      min_flux_abs):
    """Random positions away from edges, stars (bright ones farther) and each other."""
    from scipy.spatial import cKDTree

    ny, nx = shape
    near = 3.0 * fwhm_sci           # clear of any star's core
    bright_radius = 8.0 * fwhm_sci  # clear of bright stars' wings
    bright = star_flux_sci > 20.0 * max(min_flux_abs, 1.0)
    tree_all = cKDTree(star_xy) if len(star_xy) else None
    tree_bright = cKDTree(star_xy[bright]) if bright.any() else None
    placed = []
    for relax in (False, True):
        tries = 0
        while len(placed) < n and tries < 2000 * max(n, 1):
            tries += 1
            p = np.array([rng.uniform(margin, nx - 1 - margin), rng.uniform(margin, ny - 1 - margin)])
            if tree_bright is not None and tree_bright.query(p)[0] < bright_radius:
                continue
            if not relax and tree_all is not None and tree_all.query(p)[0] < near:
                continue
            if placed and np.min(np.hypot(*(np.array(placed) - p).T)) < 5.0 * fwhm_sci:
                continue
            placed.append(p)
        if len(placed) == n:
            break
        log.warning("crowded field: placing %d transient(s) next to faint stars", n - len(placed))
    if len(placed) < n:
        raise ConfigError(
            f"could only place {len(placed)} of n_transients={n} transients away from bright "
            f"stars and each other in a {nx}x{ny} image; reduce n_transients or n_stars")
    return np.array(placed).reshape(-1, 2)


def simulate_pair(*, shape=(1024, 1024), n_stars=800, template_fwhm=2.5, science_fwhm=3.5,
                  psf="gaussian", moffat_beta=3.0, fwhm_gradient=0.0, flux_scale=1.3,
                  sky=200.0, background_gradient=(5.0, 0.002, -0.001), shift=(0.0, 0.0),
                  n_transients=0, transient_flux=None, transient_sign="positive",
                  gain=1.0, read_noise=5.0, saturation=None, seed=0,
                  flux_range=(300.0, 3.0e5), flux_index=1.5, wcs=True, supersample=7,
                  keep_model=False, template_nan_columns=(), science_nan_columns=()):
    """Simulate a template and a science exposure of the same star field.

    See the module docstring for the full model.

    Parameters
    ----------
    shape : tuple of int
        Image shape ``(ny, nx)``.
    n_stars : int
        Number of stars.
    template_fwhm, science_fwhm : float
        PSF FWHM at the field centre, pixels.
    psf : {"gaussian", "moffat"}
        PSF profile of both images.
    moffat_beta : float
        Moffat index (> 1).
    fwhm_gradient : float
        Relative FWHM gradient ``g`` (see :func:`fwhm_at`); same pattern in
        both images.
    flux_scale : float
        Photometric scale: science flux / template flux.
    sky : float or (float, float)
        Sky level in ADU, either one value for both images or
        ``(template, science)``.
    background_gradient : tuple of 3 float
        ``(b0, b1, b2)``: extra science background ``b0 + b1 x + b2 y`` (x, y
        in pixels) on top of the science sky.
    shift : tuple of 2 float
        ``(dx, dy)`` pixel offset of the science stars relative to the template.
    n_transients : int
        Number of transients.
    transient_flux : None, float or array_like
        Science-unit flux of the transients.  None gives S/N ≈ 30 in the
        science image at the field centre.  A scalar is the magnitude for all
        (a negative scalar means ``transient_sign="negative"``); an array of
        length ``n_transients`` is used as is, signs included, overriding
        ``transient_sign``.
    transient_sign : {"positive", "negative", "both"}
        Sign of scalar/default transient fluxes; "both" draws each at random.
    gain : float
        e-/ADU.
    read_noise : float
        Read noise in electrons.
    saturation : float, None or (float or None, float or None)
        Saturation level in ADU of both images, or ``(template, science)``
        levels; None disables saturation (of both images, or of one).
    seed : int
        Seed of every random stream.
    flux_range : tuple of 2 float
        Template star flux range (ADU) of the power law.
    flux_index : float
        Power-law index: ``dN/dF ∝ F**-flux_index``.
    wcs : bool
        Attach an identical TAN WCS (0.2 arcsec/px) to both exposures.
    supersample : int
        Subsamples per axis in the Moffat core (>= 5 recommended).
    keep_model : bool
        Also return the noiseless expected images.
    template_nan_columns, science_nan_columns : sequence of int
        Columns (0-based x) set to NaN, flagged ``NO_DATA`` and given infinite
        variance in that image.

    Returns
    -------
    SimulatedPair
        ``truth`` holds: shape, seed, n_stars, n_transients, psf, moffat_beta,
        template_fwhm, science_fwhm, fwhm_gradient, fwhm_pattern, flux_scale,
        sky_template, sky_science, background_gradient, shift, gain,
        read_noise, saturation (float, None or [template, science]),
        saturation_template, saturation_science, template_nan_columns,
        science_nan_columns, flux_range, flux_index, transient_flux
        (magnitude used: default/scalar, or median |flux| of an explicit
        array), transient_sign, supersample,
        stamp_radius_fwhm, psf_normalisation, template_stamp_fraction,
        science_stamp_fraction, pixel_scale_arcsec, crval_deg, edge_margin.

    Raises
    ------
    ConfigError
        For any invalid parameter.
    """
    # ---- validation -------------------------------------------------------
    try:
        ny, nx = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"shape={shape!r} must be (ny, nx)") from None
    psf = _check_psf(psf, moffat_beta)
    beta = float(moffat_beta)
    for name, val in (("template_fwhm", template_fwhm), ("science_fwhm", science_fwhm),
                      ("flux_scale", flux_scale), ("gain", gain)):
        if not (np.isfinite(val) and val > 0):
            raise ConfigError(f"{name}={val!r} must be a positive number")
    if not (np.isfinite(read_noise) and read_noise >= 0):
        raise ConfigError(f"read_noise={read_noise!r} must be >= 0 electrons")
    sat_levels = _saturation_levels(saturation)
    nan_cols = [_nan_columns(c, nx, name) for c, name in
                ((template_nan_columns, "template_nan_columns"),
                 (science_nan_columns, "science_nan_columns"))]
    if int(n_stars) < 0 or int(n_transients) < 0:
        raise ConfigError(f"n_stars={n_stars!r} and n_transients={n_transients!r} must be >= 0")
    n_stars, n_transients = int(n_stars), int(n_transients)
    try:
        dx, dy = (float(s) for s in shift)
        b0, b1, b2 = (float(b) for b in background_gradient)
        flo, fhi = (float(f) for f in flux_range)
    except (TypeError, ValueError):
        raise ConfigError("shift must be (dx, dy), background_gradient (b0, b1, b2) and "
                          "flux_range (min, max)") from None
    if not (0 < flo < fhi):
        raise ConfigError(f"flux_range={flux_range!r} must satisfy 0 < min < max")
    sky_t, sky_s = _as_pair(sky, "sky")
    if int(supersample) < 1:
        raise ConfigError(f"supersample={supersample!r} must be >= 1")
    supersample = int(supersample)
    transient_sign = str(transient_sign).lower()
    if transient_sign not in ("positive", "negative", "both"):
        raise ConfigError(f"transient_sign={transient_sign!r}: use 'positive', 'negative' or 'both'")
    g = float(fwhm_gradient)
    # The FWHM pattern is linear, so its extremes are at the corners.
    corner = 1.0 - 0.75 * abs(g) - 0.5 * abs(g) / max(nx, ny)
    if corner * min(template_fwhm, science_fwhm) < 0.5:
        raise ConfigError(f"fwhm_gradient={fwhm_gradient!r} makes the FWHM drop below 0.5 px "
                          "in a corner; use |g| well below 1.3")
    margin = _EDGE_MARGIN + int(math.ceil(max(abs(dx), abs(dy))))
    tmargin = _TRANSIENT_EDGE_MARGIN + int(math.ceil(max(abs(dx), abs(dy))))
    if nx <= 2 * tmargin + 1 or ny <= 2 * tmargin + 1:
        raise ConfigError(f"shape={shape!r} is too small: need more than {2 * tmargin + 1} px "
                          f"per axis for the {tmargin}-px edge margin")

    ss = np.random.SeedSequence(int(seed))
    rng_star, rng_trans, rng_tnoise, rng_snoise = (np.random.default_rng(s) for s in ss.spawn(4))

    # ---- stars --------------------------------------------------------------
    xs = rng_star.uniform(margin, nx - 1 - margin, n_stars)
    ys = rng_star.uniform(margin, ny - 1 - margin, n_stars)
    flux = _powerlaw_fluxes(rng_star, n_stars, flo, fhi, float(flux_index))
    xs_s, ys_s = xs + dx, ys + dy
    fw_t = np.atleast_1d(fwhm_at(template_fwhm, xs, ys, (ny, nx), g)).astype(float)
    fw_s = np.atleast_1d(fwhm_at(science_fwhm, xs_s, ys_s, (ny, nx), g)).astype(float)

    bkg_s_star = sky_s + b0 + b1 * xs_s + b2 * ys_s
    snr_t = _expected_snr(flux, _neff(fw_t, psf, beta), sky_t, gain, read_noise)
    snr_s = _expected_snr(flux_scale * flux, _neff(fw_s, psf, beta), bkg_s_star, gain, read_noise)

    # ---- transients ---------------------------------------------------------
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    bkg_centre = sky_s + b0 + b1 * xc + b2 * yc
    default_tflux = _flux_for_snr(_DEFAULT_TRANSIENT_SNR, float(_neff(science_fwhm, psf, beta)),
                                  max(bkg_centre, 0.0), gain, read_noise)
    if transient_flux is None or np.ndim(transient_flux) == 0:
        mag = default_tflux if transient_flux is None else abs(float(transient_flux))
        if transient_flux is not None and float(transient_flux) < 0 and transient_sign == "positive":
            transient_sign = "negative"
        if transient_sign == "positive":
            signs = np.ones(n_transients)
        elif transient_sign == "negative":
            signs = -np.ones(n_transients)
        else:
            signs = rng_trans.choice([-1.0, 1.0], size=n_transients)
        tflux = mag * signs
    else:
        tflux = np.asarray(transient_flux, dtype=float).ravel()
        if tflux.size != n_transients:
            raise ConfigError(f"transient_flux has {tflux.size} values but "
                              f"n_transients={n_transients}")
        mag = float(np.median(np.abs(tflux))) if tflux.size else default_tflux
    if not np.all(np.isfinite(tflux)) or np.any(tflux == 0):
        raise ConfigError("transient_flux values must be finite and non-zero")
    tsign = np.where(tflux > 0, 1, -1).astype(np.int64)
    txy = _place_transients(rng_trans, n_transients, (ny, nx), tmargin,
                            np.column_stack([xs_s, ys_s]), flux_scale * flux, science_fwhm,
                            float(np.min(np.abs(tflux))) if n_transients else 0.0)
    tx, ty = txy[:, 0], txy[:, 1]
    tx_t, ty_t = tx - dx, ty - dy
    tfw = np.where(tsign > 0, fwhm_at(science_fwhm, tx, ty, (ny, nx), g),
                   fwhm_at(template_fwhm, tx_t, ty_t, (ny, nx), g)).astype(float)
    tsnr = _expected_snr(tflux, _neff(fwhm_at(science_fwhm, tx, ty, (ny, nx), g), psf, beta),
                         sky_s + b0 + b1 * tx + b2 * ty, gain, read_noise)

    # ---- images -----------------------------------------------------------------
    pos = tsign > 0
    # A faded (negative) transient is a source present only in the template.
    t_sources = [(xs, ys, flux, fw_t),
                 (tx_t[~pos], ty_t[~pos], -tflux[~pos] / flux_scale, tfw[~pos])]
    s_sources = [(xs_s, ys_s, flux_scale * flux, fw_s),
                 (tx[pos], ty[pos], tflux[pos], tfw[pos])]
    jobs = [((ny, nx), t_sources, sky_t, (0.0, 0.0, 0.0), rng_tnoise),
            ((ny, nx), s_sources, sky_s, (b0, b1, b2), rng_snoise)]
    extra = (float(gain), float(read_noise))
    if ny * nx >= _THREAD_MIN_PIXELS:
        # The numba renderers and numpy's samplers release the GIL: build both
        # images at once.  Each image has its own generator, so results do not
        # depend on scheduling.
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(_build_image, shp, src, sk, co, *extra, rng, psf, beta,
                                   supersample) for shp, src, sk, co, rng in jobs]
            built = [f.result() for f in futures]
    else:
        built = [_build_image(shp, src, sk, co, *extra, rng, psf, beta, supersample)
                 for shp, src, sk, co, rng in jobs]
    (model_t, img_t, var_t, (tsum, tneg)), (model_s, img_s, var_s, (ssum, tpos)) = built
    tstamp = np.zeros(n_transients)
    tstamp[pos] = tpos
    tstamp[~pos] = -flux_scale * tneg

    mi_t = MaskedImage(img_t, variance=var_t)
    mi_s = MaskedImage(img_s, variance=var_s)
    sat_t_flag = np.zeros(n_stars, bool)
    sat_s_flag = np.zeros(n_stars, bool)
    if any(level is not None for level in sat_levels):
        rad = _STAMP_RADIUS_FWHM[psf]
        all_xt = np.concatenate([xs, tx_t[~pos]])
        all_yt = np.concatenate([ys, ty_t[~pos]])
        all_rt = np.ceil(rad * np.concatenate([fw_t, tfw[~pos]])).astype(int)
        all_xs = np.concatenate([xs_s, tx[pos]])
        all_ys = np.concatenate([ys_s, ty[pos]])
        all_rs = np.ceil(rad * np.concatenate([fw_s, tfw[pos]])).astype(int)
        for mi, model, ax, ay, ar, level in (
                (mi_t, model_t, all_xt, all_yt, all_rt, sat_levels[0]),
                (mi_s, model_s, all_xs, all_ys, all_rs, sat_levels[1])):
            if level is None:
                continue
            sat = _saturate(mi.image, model, level, ax, ay, ar)
            mi.mask[sat] |= mi.get_plane_bitmask("SAT")
        sat_t = (mi_t.mask & mi_t.get_plane_bitmask("SAT")) != 0
        sat_s = (mi_s.mask & mi_s.get_plane_bitmask("SAT")) != 0
        sat_t_flag = _star_flags(sat_t, xs, ys)
        sat_s_flag = _star_flags(sat_s, xs_s, ys_s)
    for mi, cols in ((mi_t, nan_cols[0]), (mi_s, nan_cols[1])):
        if cols:
            mi.image[:, cols] = np.nan
            mi.variance[:, cols] = np.inf
            mi.mask[:, cols] |= mi.get_plane_bitmask("NO_DATA")

    # ---- tables and truth -----------------------------------------------------
    stars = Table()
    stars["id"] = np.arange(n_stars, dtype=np.int64)
    stars["x"] = xs
    stars["y"] = ys
    stars["x_science"] = xs_s
    stars["y_science"] = ys_s
    stars["flux"] = flux
    stars["science_flux"] = flux_scale * flux
    stars["template_fwhm_at"] = fw_t
    stars["science_fwhm_at"] = fw_s
    stars["template_stamp_flux"] = tsum
    stars["science_stamp_flux"] = ssum
    stars["snr_template"] = np.atleast_1d(snr_t).astype(float)
    stars["snr_science"] = np.atleast_1d(snr_s).astype(float)
    stars["saturated"] = sat_t_flag | sat_s_flag
    stars["saturated_template"] = sat_t_flag
    stars["saturated_science"] = sat_s_flag

    transients = Table()
    transients["id"] = np.arange(n_transients, dtype=np.int64)
    transients["x"] = tx
    transients["y"] = ty
    transients["x_template"] = tx_t
    transients["y_template"] = ty_t
    transients["flux"] = tflux
    transients["sign"] = tsign
    transients["fwhm"] = tfw
    transients["stamp_flux"] = tstamp
    transients["snr"] = np.atleast_1d(tsnr).astype(float)

    def centre_fraction(fwhm):
        r = int(math.ceil(_STAMP_RADIUS_FWHM[psf] * fwhm))
        return float(render_psf_stamp(fwhm, 2 * r + 1, psf, beta, supersample=supersample).sum())

    truth = {
        "shape": (ny, nx), "seed": int(seed), "n_stars": n_stars, "n_transients": n_transients,
        "psf": psf, "moffat_beta": beta,
        "template_fwhm": float(template_fwhm), "science_fwhm": float(science_fwhm),
        "fwhm_gradient": g,
        "fwhm_pattern": "fwhm * (1 + g*(x/nx - 0.5) + 0.5*g*(y/ny - 0.5)), both images",
        "flux_scale": float(flux_scale), "sky_template": sky_t, "sky_science": sky_s,
        "background_gradient": (b0, b1, b2), "shift": (dx, dy),
        "gain": float(gain), "read_noise": float(read_noise),
        "saturation": (sat_levels[0] if sat_levels[0] == sat_levels[1]
                       else list(sat_levels)),
        "saturation_template": sat_levels[0], "saturation_science": sat_levels[1],
        "template_nan_columns": nan_cols[0], "science_nan_columns": nan_cols[1],
        "flux_range": (flo, fhi), "flux_index": float(flux_index),
        "transient_flux": float(mag), "transient_sign": transient_sign,
        "supersample": supersample, "stamp_radius_fwhm": _STAMP_RADIUS_FWHM[psf],
        "psf_normalisation": "analytic unit total flux, truncated at a square stamp of "
                             "half-width ceil(stamp_radius_fwhm * FWHM) px",
        "template_stamp_fraction": centre_fraction(float(template_fwhm)),
        "science_stamp_fraction": centre_fraction(float(science_fwhm)),
        "pixel_scale_arcsec": PIXEL_SCALE_ARCSEC, "crval_deg": _CRVAL_DEG,
        "edge_margin": margin,
    }

    # ---- exposures --------------------------------------------------------------
    w = _make_wcs((ny, nx)) if wcs else None

    def header(kind, fwhm, scale, skylev, sat_level):
        h = fits.Header()
        h["SIMTYPE"] = (kind, "diffim.simulate image kind")
        h["SIMSEED"] = (int(seed), "simulation seed")
        h["GAIN"] = (float(gain), "e-/ADU")
        h["RDNOISE"] = (float(read_noise), "read noise, e-")
        h["FWHM"] = (float(fwhm), "PSF FWHM at field centre, px")
        h["PSFTYPE"] = (psf, "PSF profile")
        if psf == "moffat":
            h["MOFBETA"] = (beta, "Moffat beta")
        h["FWHMGRAD"] = (g, "relative FWHM gradient")
        h["SKYLEVEL"] = (skylev, "sky level, ADU")
        h["FLXSCALE"] = (float(scale), "flux relative to the template")
        h["SHIFTX"] = (dx if kind == "science" else 0.0, "star offset x, px")
        h["SHIFTY"] = (dy if kind == "science" else 0.0, "star offset y, px")
        if kind == "science":
            h["BKG0"] = (b0, "background b0, ADU")
            h["BKG1"] = (b1, "background b1, ADU/px (x)")
            h["BKG2"] = (b2, "background b2, ADU/px (y)")
            h["NTRANS"] = (n_transients, "number of transients")
        if sat_level is not None:
            h["SATURATE"] = (sat_level, "saturation level, ADU")
        h["NSTARS"] = (n_stars, "number of stars")
        return h

    template = Exposure(mi_t, wcs=w, psf_fwhm=float(template_fwhm), phot_scale=1.0,
                        metadata=header("template", template_fwhm, 1.0, sky_t, sat_levels[0]))
    science = Exposure(mi_s, wcs=copy.deepcopy(w), psf_fwhm=float(science_fwhm),
                       phot_scale=float(flux_scale),
                       metadata=header("science", science_fwhm, flux_scale, sky_s,
                                       sat_levels[1]))
    log.debug("simulated %dx%d pair: %d stars, %d transients, seed %d",
              nx, ny, n_stars, n_transients, seed)
    return SimulatedPair(template, science, stars, transients, truth,
                         model_t if keep_model else None, model_s if keep_model else None)


def _yaml_safe(value):
    """Tuples to lists (recursively) so the truth dict serialises into ECSV metadata."""
    if isinstance(value, dict):
        return {k: _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_pair(pair, directory, *, prefix=""):
    """Write a simulated pair to FITS plus its truth tables to ECSV.

    Writes ``<prefix>template.fits`` and ``<prefix>science.fits`` (via
    :func:`diffim.image.write_fits`) and ``<prefix>stars.ecsv`` and
    ``<prefix>transients.ecsv``; the ``truth`` dict is stored in the ECSV
    metadata (key ``truth``).  ``directory`` is created if needed and existing
    files are overwritten.

    Parameters
    ----------
    pair : SimulatedPair
        The pair to write.
    directory : str or os.PathLike
        Output directory.
    prefix : str, optional
        File-name prefix.

    Returns
    -------
    tuple of pathlib.Path
        ``(template_path, science_path)``; the ECSV files sit beside them.
    """
    d = pathlib.Path(os.fspath(directory))
    d.mkdir(parents=True, exist_ok=True)
    tpath = d / f"{prefix}template.fits"
    spath = d / f"{prefix}science.fits"
    write_fits(pair.template, tpath)
    write_fits(pair.science, spath)
    truth = _yaml_safe(pair.truth)
    for name, table in (("stars", pair.stars), ("transients", pair.transients)):
        t = table.copy(copy_data=False)
        t.meta["truth"] = truth
        t.write(d / f"{prefix}{name}.ecsv", format="ascii.ecsv", overwrite=True)
    return tpath, spath
