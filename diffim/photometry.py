"""Source detection and PSF photometry on difference images (DIA).

* :func:`detect_dia_sources` — matched-filter detection of positive *and* negative sources
  on a difference image, with a linear PSF-flux fit, sign, dipole and mask flags.
* :func:`forced_photometry` — the same linear PSF fit at fixed positions.
* :func:`light_curve` / :func:`plot_light_curve` — forced photometry through a series of
  difference images, and its plot.
* :func:`make_cutouts` / :func:`write_cutouts` / :func:`read_cutouts` — science, template
  and difference stamps around each source.

The PSF fit is the maximum-likelihood amplitude of a known, normalised PSF ``P`` under
independent Gaussian pixel noise of variance ``V``::

    f = Σ(P D / V) / Σ(P² / V),    σ_f = 1 / sqrt(Σ P² / V)

summed over the usable pixels (those without a bad mask bit, with finite data and positive
variance).  ``σ_f`` is only right when the pixel noise is uncorrelated: run the fit on a
*decorrelated* difference (:func:`diffim.decorrelate.decorrelate_result`); on a plain
difference the convolution correlates the noise and ``σ_f`` comes out too small.
"""

import logging

import numpy as np
from astropy.table import Table
from scipy import ndimage, signal

from ._atomic import atomic_open
from .exceptions import ConfigError
from .image import Exposure, MaskedImage
from .simulate import render_psf_stamp

__all__ = [
    "FLAG_OFF_IMAGE", "FLAG_EDGE", "FLAG_MASKED", "FLAG_NO_DATA",
    "decorrelated_psf", "detect_dia_sources", "forced_photometry", "light_curve",
    "plot_light_curve",
    "make_cutouts", "write_cutouts", "read_cutouts",
]

log = logging.getLogger(__name__)

# Bits of the ``flags`` column of the photometry tables.
FLAG_OFF_IMAGE = 1    #: the position is outside the image
FLAG_EDGE = 2         #: the PSF footprint is cut by the image edge
FLAG_MASKED = 4       #: some PSF pixels were excluded (bad mask bits, non-finite, V <= 0)
FLAG_NO_DATA = 8      #: no usable pixel: flux and error are NaN

DEFAULT_BAD_MASK_PLANES = ("NO_DATA", "SAT", "BAD", "EDGE")
# Planes around which the difference is untrustworthy (see detect_dia_sources).
DEFAULT_GROW_MASK_PLANES = ("SAT", "NO_DATA")
_NAMED_FLAGS = ("SAT", "NO_DATA", "EDGE", "BAD")
# Fraction of the PSF's squared weight that may be missing before the fit is flagged MASKED
# (tiny wings lost to one bad pixel far out do not matter).
_MASKED_PSF_FRACTION = 1e-3


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _as_masked_image(obj, what):
    if isinstance(obj, Exposure):
        return obj.masked_image
    if isinstance(obj, MaskedImage):
        return obj
    if isinstance(obj, np.ndarray) and obj.ndim == 2:
        return MaskedImage(np.asarray(obj, dtype=np.float32))
    raise ConfigError(f"{what}: expected an Exposure, MaskedImage or 2-D array, "
                      f"got {type(obj).__name__}")


def _resolve_fwhm(obj, psf_fwhm, what):
    if psf_fwhm is None and isinstance(obj, Exposure):
        psf_fwhm = obj.psf_fwhm
    if psf_fwhm is None:
        raise ConfigError(f"{what}: no PSF FWHM; pass psf_fwhm= (pixels) or give an Exposure "
                          "whose psf_fwhm is set")
    psf_fwhm = float(psf_fwhm)
    if not (np.isfinite(psf_fwhm) and psf_fwhm > 0):
        raise ConfigError(f"{what}: psf_fwhm={psf_fwhm!r} must be a positive number of pixels")
    return psf_fwhm


def _bitmask(mi, names):
    """OR of the named planes that exist in ``mi`` (unknown names are ignored: nothing set)."""
    known = [n for n in names if n in mi.mask_planes]
    return int(mi.get_plane_bitmask(*known)) if known else 0


def _stamp_size(fwhm):
    # ±3 FWHM holds all but ~1e-11 of a Gaussian's flux
    half = max(3, int(np.ceil(3.0 * fwhm)))
    return 2 * half + 1


def _check_psf_array(psf):
    p = np.asarray(psf, dtype=float)
    if p.ndim != 2 or p.shape[0] % 2 == 0 or p.shape[1] % 2 == 0:
        raise ConfigError(f"psf: expected a 2-D array with odd sides, got shape {p.shape}")
    s = p.sum()
    if not (np.isfinite(s) and s > 0):
        raise ConfigError("psf: the PSF image must have a finite positive sum")
    return p / s


def _psf_model(fwhm, psf, dx, dy):
    """Normalised PSF stamp centred at ``(c + dx, c + dy)``.

    A Gaussian of ``fwhm`` is integrated exactly over pixels; a user ``psf`` array is
    shifted by cubic-spline interpolation.
    """
    if psf is None:
        return render_psf_stamp(fwhm, _stamp_size(fwhm), dx=dx, dy=dy)
    p = _check_psf_array(psf)
    if dx or dy:
        p = ndimage.shift(p, (dy, dx), order=3, mode="constant", cval=0.0)
    return p


def _inverse_variance(mi, bad_bits):
    var = mi.variance.astype(np.float64)
    img = mi.image.astype(np.float64)
    good = np.isfinite(img) & np.isfinite(var) & (var > 0)
    if bad_bits:
        good &= (mi.mask & bad_bits) == 0
    iv = np.zeros_like(var)
    iv[good] = 1.0 / var[good]
    data = np.where(good, img, 0.0)
    return data, iv, good


def _psf_fit(data, iv, good, mask, xy0, x, y, fwhm, psf, flag_box):
    """Linear PSF fit at parent position (x, y); returns flux, err, flags, mask OR."""
    ny, nx = data.shape
    xa, ya = x - xy0[0], y - xy0[1]
    if not (np.isfinite(xa) and np.isfinite(ya)) or not (-0.5 <= xa < nx - 0.5
                                                          and -0.5 <= ya < ny - 0.5):
        return np.nan, np.nan, FLAG_OFF_IMAGE | FLAG_NO_DATA, 0
    ix, iy = int(np.floor(xa + 0.5)), int(np.floor(ya + 0.5))
    p = _psf_model(fwhm, psf, xa - ix, ya - iy)
    hy, hx = p.shape[0] // 2, p.shape[1] // 2
    y0, y1 = iy - hy, iy + hy + 1
    x0, x1 = ix - hx, ix + hx + 1
    cy0, cy1 = max(y0, 0), min(y1, ny)
    cx0, cx1 = max(x0, 0), min(x1, nx)
    flags = 0
    if (cy0, cy1, cx0, cx1) != (y0, y1, x0, x1):
        flags |= FLAG_EDGE
    pp = p[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    d = data[cy0:cy1, cx0:cx1]
    w = iv[cy0:cy1, cx0:cx1]
    g = good[cy0:cy1, cx0:cx1]
    # Flag when a noticeable part of the PSF's information is lost to masked pixels.
    lost = (pp[~g] ** 2).sum() / max((p ** 2).sum(), 1e-300)
    if lost > _MASKED_PSF_FRACTION:
        flags |= FLAG_MASKED
    b = max(1, int(flag_box))
    mor = int(np.bitwise_or.reduce(
        mask[max(iy - b, 0):min(iy + b + 1, ny), max(ix - b, 0):min(ix + b + 1, nx)],
        axis=None)) if mask.size else 0
    den = float((pp * pp * w).sum())
    if not den > 0:
        return np.nan, np.nan, flags | FLAG_NO_DATA, mor
    num = float((pp * d * w).sum())
    return num / den, 1.0 / np.sqrt(den), flags, mor


def _subpixel(snr, iy, ix):
    """Parabolic refinement of a peak of ``snr`` (already sign-corrected) along each axis."""
    ny, nx = snr.shape
    off = []
    for axis, (i, n) in enumerate(((iy, ny), (ix, nx))):
        if 0 < i < n - 1:
            if axis == 0:
                a, b, c = snr[iy - 1, ix], snr[iy, ix], snr[iy + 1, ix]
            else:
                a, b, c = snr[iy, ix - 1], snr[iy, ix], snr[iy, ix + 1]
            den = a - 2.0 * b + c
            off.append(float(np.clip(0.5 * (a - c) / den, -0.5, 0.5)) if den < 0 else 0.0)
        else:
            off.append(0.0)
    return off[1], off[0]


def decorrelated_psf(result, template, science, *, psf_fwhm=None, psf=None, size=None):
    """PSF image of the decorrelated difference of a subtraction result.

    The DMTN-021 correction ``c`` (:func:`diffim.decorrelate.decorrelation_kernel`, with
    the matching kernel at the image centre and the clipped-mean variances exactly as
    :func:`diffim.decorrelate.decorrelate_result` uses them) sharpens the difference's
    PSF to ``P ∗ c``; fitting the undecorrelated PSF to a decorrelated difference biases
    fluxes (by ~10 % for a typical kernel), so pass this as ``psf=`` to
    :func:`detect_dia_sources` / :func:`forced_photometry`.

    Parameters
    ----------
    result : PsfMatchResult
    template, science : Exposure or MaskedImage
        As given to :func:`~diffim.decorrelate.decorrelate_result`.
    psf_fwhm : float, optional
        Gaussian FWHM (pixels) of the *undecorrelated* difference's PSF; default
        ``result.subtracted_exposure.psf_fwhm``.
    psf : numpy.ndarray, optional
        An explicit PSF image of the undecorrelated difference instead.
    size : int, optional
        Side of the output (odd); default large enough for the PSF and the correction.

    Returns
    -------
    numpy.ndarray
        Odd-sided float64 PSF image with unit sum.
    """
    from .decorrelate import DEFAULT_IGNORE_MASK_PLANES, _plane_level, decorrelation_kernel

    if psf is None:
        fwhm = _resolve_fwhm(result.subtracted_exposure, psf_fwhm, "decorrelated_psf")
        base = render_psf_stamp(fwhm, _stamp_size(fwhm))
    else:
        base = _check_psf_array(psf)
    mi = result.subtracted_masked_image
    if mi is None:
        mi = result.subtracted_exposure.masked_image
    x0, y0, x1, y1 = mi.bbox
    kernel = result.psf_matching_kernel.evaluate(0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1))
    var_s = _plane_level(_as_masked_image(science, "science"), DEFAULT_IGNORE_MASK_PLANES,
                         "science")
    var_t = _plane_level(_as_masked_image(template, "template"), DEFAULT_IGNORE_MASK_PLANES,
                         "template")
    mode = (result.metadata or {}).get("mode", "convolveTemplate")
    corr = decorrelation_kernel(kernel, var_s, var_t, mode=mode)
    full = signal.convolve(base, corr, mode="full")
    if size is None:
        size = max(base.shape[0], _stamp_size(_fwhm_of(full)))
    size = int(size) | 1
    cy, cx = full.shape[0] // 2, full.shape[1] // 2
    h = size // 2
    out = np.zeros((size, size))
    ys0, xs0 = max(cy - h, 0), max(cx - h, 0)
    part = full[ys0:cy + h + 1, xs0:cx + h + 1]
    oy, ox = h - (cy - ys0), h - (cx - xs0)
    out[oy:oy + part.shape[0], ox:ox + part.shape[1]] = part
    return out / out.sum()


# ---------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------

def detect_dia_sources(difference, *, threshold=5.0, psf_fwhm=None, psf=None,
                       bad_mask_planes=DEFAULT_BAD_MASK_PLANES, dipole_radius=2.0,
                       min_separation=None, grow_mask_planes=DEFAULT_GROW_MASK_PLANES,
                       grow_radius=None):
    """Detect positive and negative sources on a difference image.

    The image is filtered with the PSF (a matched filter); with ``w = 1/V`` (zero on
    excluded pixels) the filtered signal-to-noise map is
    ``S = ((D w) ⋆ P) / sqrt(w ⋆ P²)``, which reduces to ``(D⋆P)/sqrt(V⋆P²)`` for
    constant variance and treats masked pixels as missing rather than as zeros.
    Peaks of ``|S|`` above ``threshold`` become sources: local maxima of each sign's map
    within a window of ``min_separation`` (ties on a flat top inside one connected
    component count once).  The position is refined to sub-pixel precision by a parabola
    through the peak and its neighbours, then the PSF flux is fitted there.

    Parameters
    ----------
    difference : Exposure or MaskedImage
        The difference image (ideally decorrelated, so that its noise is white).
    threshold : float
        Detection threshold in σ of the filtered image, applied to both signs.
    psf_fwhm : float, optional
        FWHM (pixels) of the Gaussian PSF used as the filter and in the fit; default the
        Exposure's ``psf_fwhm``.
    psf : numpy.ndarray, optional
        An explicit PSF image (odd sides, normalised here) instead of the Gaussian.
    bad_mask_planes : sequence of str
        Mask planes whose pixels are excluded from the filter and the fit; names absent
        from the image's mask planes are ignored.
    dipole_radius : float
        A source is flagged ``dipole`` when the opposite-sign filtered S/N exceeds
        ``threshold`` within ``dipole_radius × FWHM`` of it.
    min_separation : float, optional
        Minimum separation (pixels) of two peaks of one sign; default the FWHM.
    grow_mask_planes : sequence of str
        Mask planes whose neighbourhood is untrustworthy: around saturated cores and
        missing data the subtraction leaves residuals outside the flagged pixels (the
        brightest stars are the ones that saturate, so a small kernel error is many σ
        there, and a convolution spreads whatever the masked pixels hold).  A source whose
        peak pixel lies within ``grow_radius`` of such a pixel gets ``flag_near_masked``.
        Names absent from the image's mask planes are ignored.
    grow_radius : float, optional
        Radius (pixels) of that neighbourhood; default ``2 × FWHM``.  To cover everything
        the matching kernel touched, pass its half-width,
        ``result.psf_matching_kernel.size // 2``.  0 flags only sources on such pixels.

    Returns
    -------
    astropy.table.Table
        One row per source, sorted by ``|snr|`` descending: ``id``, ``x``, ``y`` (parent
        coordinates, sub-pixel), ``flux``, ``flux_err`` (PSF fit), ``snr`` (flux/flux_err),
        ``peak_snr`` (filtered map at the peak pixel), ``sign`` (+1/−1), ``dipole``,
        ``flags`` (``FLAG_*`` bits of the fit), ``mask`` (OR of the mask bits in a box of
        half-width ~FWHM/2 around the peak), boolean ``flag_sat``, ``flag_no_data``,
        ``flag_edge``, ``flag_bad`` (from ``mask``) and ``flag_near_masked`` (see
        ``grow_mask_planes``).  A trustworthy detection has none of these flags.  The
        table's ``meta`` holds the threshold, FWHM and grow radius.

    Raises
    ------
    ConfigError
        For a bad threshold, PSF or missing FWHM.
    """
    if not (np.isfinite(threshold) and threshold > 0):
        raise ConfigError(f"detect_dia_sources: threshold={threshold!r} must be a positive "
                          "number of sigma")
    if grow_radius is not None and not (np.isfinite(grow_radius) and grow_radius >= 0):
        raise ConfigError(f"detect_dia_sources: grow_radius={grow_radius!r} must be a number "
                          "of pixels >= 0")
    mi = _as_masked_image(difference, "detect_dia_sources")
    if psf is None:
        fwhm = _resolve_fwhm(difference, psf_fwhm, "detect_dia_sources")
        kern = render_psf_stamp(fwhm, _stamp_size(fwhm))
    else:
        kern = _check_psf_array(psf)
        fwhm = psf_fwhm if psf_fwhm is not None else _fwhm_of(kern)
    bad_bits = _bitmask(mi, bad_mask_planes)
    data, iv, good = _inverse_variance(mi, bad_bits)

    # correlation with P == convolution with the flipped P
    flip = kern[::-1, ::-1]
    num = signal.fftconvolve(data * iv, flip, mode="same")
    den = signal.fftconvolve(iv, flip * flip, mode="same")
    # FFT round-off leaves tiny non-zero values where no usable pixel contributes
    ok = den > 1e-6 * np.max(den, initial=0.0)
    snr = np.zeros_like(num)
    snr[ok] = num[ok] / np.sqrt(den[ok])

    sep = fwhm if min_separation is None else float(min_separation)
    size = max(3, 2 * int(np.ceil(sep / 2.0)) + 1)
    rows = []
    for sign in (1, -1):
        s = sign * snr
        above = s > threshold
        if not above.any():
            continue
        labels, nlab = ndimage.label(above, structure=np.ones((3, 3)))
        peaks = above & (s == ndimage.maximum_filter(s, size=size, mode="constant", cval=0.0))
        py, px = np.nonzero(peaks)
        # a flat-topped plateau can give adjacent equal maxima: keep one per label+value
        seen = set()
        for iy, ix in zip(py, px):
            key = (labels[iy, ix], round(float(s[iy, ix]), 6))
            if key in seen:
                continue
            seen.add(key)
            dx, dy = _subpixel(s, iy, ix)
            rows.append((sign, iy, ix, dx, dy, float(snr[iy, ix])))
        log.debug("sign %+d: %d component(s) above %.1f sigma", sign, nlab, threshold)

    ny, nx = mi.shape
    rad = float(dipole_radius) * fwhm
    r = int(np.ceil(rad))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (xx * xx + yy * yy) <= rad * rad
    flag_box = max(1, int(round(0.5 * fwhm)))
    named_bits = {n: (_bitmask(mi, (n,))) for n in _NAMED_FLAGS}
    grow = 2.0 * fwhm if grow_radius is None else float(grow_radius)
    near_masked = _near_mask(mi, _bitmask(mi, grow_mask_planes), grow) if rows else None

    out = {k: [] for k in ("x", "y", "flux", "flux_err", "snr", "peak_snr", "sign", "dipole",
                           "flags", "mask", "near")}
    for sign, iy, ix, dx, dy, psnr in rows:
        x = ix + dx + mi.xy0[0]
        y = iy + dy + mi.xy0[1]
        f, e, fl, mor = _psf_fit(data, iv, good, mi.mask, mi.xy0, x, y, fwhm,
                                 None if psf is None else kern, flag_box)
        y0, y1, x0, x1 = iy - r, iy + r + 1, ix - r, ix + r + 1
        sub = -sign * snr[max(y0, 0):min(y1, ny), max(x0, 0):min(x1, nx)]
        dsc = disc[max(y0, 0) - y0:min(y1, ny) - y0, max(x0, 0) - x0:min(x1, nx) - x0]
        dipole = bool((sub[dsc] > threshold).any())
        out["x"].append(x)
        out["y"].append(y)
        out["flux"].append(f)
        out["flux_err"].append(e)
        out["snr"].append(f / e if e > 0 else np.nan)
        out["peak_snr"].append(psnr)
        out["sign"].append(sign)
        out["dipole"].append(dipole)
        out["flags"].append(fl)
        out["mask"].append(mor)
        out["near"].append(bool(near_masked is not None and near_masked[iy, ix]))

    t = Table()
    t["id"] = np.arange(len(rows), dtype=np.int64)
    t["x"] = np.asarray(out["x"], dtype=float)
    t["y"] = np.asarray(out["y"], dtype=float)
    t["flux"] = np.asarray(out["flux"], dtype=float)
    t["flux_err"] = np.asarray(out["flux_err"], dtype=float)
    t["snr"] = np.asarray(out["snr"], dtype=float)
    t["peak_snr"] = np.asarray(out["peak_snr"], dtype=float)
    t["sign"] = np.asarray(out["sign"], dtype=np.int8)
    t["dipole"] = np.asarray(out["dipole"], dtype=bool)
    t["flags"] = np.asarray(out["flags"], dtype=np.int32)
    t["mask"] = np.asarray(out["mask"], dtype=np.int32)
    for n in _NAMED_FLAGS:
        t[f"flag_{n.lower()}"] = (t["mask"] & named_bits[n]) != 0 if named_bits[n] else \
            np.zeros(len(t), dtype=bool)
    t["flag_near_masked"] = np.asarray(out["near"], dtype=bool)
    if len(t):
        t = t[np.argsort(-np.abs(t["peak_snr"]), kind="stable")]
        t["id"] = np.arange(len(t), dtype=np.int64)
    t.meta.update({"threshold": float(threshold), "psf_fwhm": float(fwhm),
                   "bad_mask_planes": ",".join(bad_mask_planes),
                   "grow_mask_planes": ",".join(grow_mask_planes), "grow_radius": grow})
    log.info("DIA detection at %.1f sigma (PSF FWHM %.2f px): %d positive, %d negative, "
             "%d dipole-flagged, %d near masked pixels", threshold, fwhm,
             int((t["sign"] > 0).sum()), int((t["sign"] < 0).sum()), int(t["dipole"].sum()),
             int(t["flag_near_masked"].sum()))
    return t


def _near_mask(mi, bits, radius):
    """Pixels within ``radius`` (Euclidean) of a pixel carrying any of ``bits``."""
    if not bits:
        return np.zeros(mi.shape, dtype=bool)
    hit = (mi.mask & bits) != 0
    if not hit.any() or radius <= 0:
        return hit
    # a distance transform costs the same for any radius (a disk dilation grows with r²)
    return ndimage.distance_transform_edt(~hit) <= radius


def _fwhm_of(kern):
    """FWHM (pixels) of a PSF image from its second moments, as if Gaussian."""
    yy, xx = np.mgrid[:kern.shape[0], :kern.shape[1]]
    p = np.clip(kern, 0, None)
    p = p / p.sum()
    mx, my = (p * xx).sum(), (p * yy).sum()
    var = 0.5 * ((p * (xx - mx) ** 2).sum() + (p * (yy - my) ** 2).sum())
    return float(2.0 * np.sqrt(2.0 * np.log(2.0)) * np.sqrt(max(var, 1e-6)))


# ---------------------------------------------------------------------------------------------
# forced photometry and light curves
# ---------------------------------------------------------------------------------------------

def _positions(positions):
    if isinstance(positions, Table):
        return np.asarray(positions["x"], float), np.asarray(positions["y"], float)
    pos = np.asarray(positions, dtype=float)
    if pos.ndim == 1 and pos.size == 2:
        pos = pos[None, :]
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ConfigError(f"positions: expected a Table with x, y or an (N, 2) array of x, y; "
                          f"got shape {pos.shape}")
    return pos[:, 0], pos[:, 1]


def forced_photometry(difference, positions, *, psf_fwhm=None, psf=None,
                      bad_mask_planes=DEFAULT_BAD_MASK_PLANES):
    """Linear PSF-flux fit at fixed positions.

    Parameters
    ----------
    difference : Exposure or MaskedImage
        The (preferably decorrelated) difference image.
    positions : astropy.table.Table or array_like
        A Table with ``x``, ``y`` columns or an ``(N, 2)`` array of x, y (parent coords).
    psf_fwhm : float, optional
        Gaussian PSF FWHM in pixels; default the Exposure's ``psf_fwhm``.
    psf : numpy.ndarray, optional
        Explicit PSF image (odd sides), shifted to each sub-pixel position.
    bad_mask_planes : sequence of str
        Pixels with these mask bits are left out of the fit.

    Returns
    -------
    astropy.table.Table
        ``x``, ``y``, ``flux``, ``flux_err``, ``snr``, ``flags`` (``FLAG_*`` bits) and
        ``mask`` (OR of mask bits near the position).  Positions off the image get NaN.
    """
    mi = _as_masked_image(difference, "forced_photometry")
    if psf is None:
        fwhm = _resolve_fwhm(difference, psf_fwhm, "forced_photometry")
    else:
        psf = _check_psf_array(psf)
        fwhm = float(psf_fwhm) if psf_fwhm is not None else _fwhm_of(psf)
    xs, ys = _positions(positions)
    data, iv, good = _inverse_variance(mi, _bitmask(mi, bad_mask_planes))
    flag_box = max(1, int(round(0.5 * fwhm)))
    res = [_psf_fit(data, iv, good, mi.mask, mi.xy0, x, y, fwhm, psf, flag_box)
           for x, y in zip(xs, ys)]
    t = Table()
    t["x"] = xs
    t["y"] = ys
    t["flux"] = np.array([r[0] for r in res], dtype=float)
    t["flux_err"] = np.array([r[1] for r in res], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t["snr"] = t["flux"] / t["flux_err"]
    t["flags"] = np.array([r[2] for r in res], dtype=np.int32)
    t["mask"] = np.array([r[3] for r in res], dtype=np.int32)
    t.meta["psf_fwhm"] = float(fwhm)
    log.debug("forced photometry at %d position(s), FWHM %.2f px", len(t), fwhm)
    return t


def light_curve(times, differences, position, *, psf_fwhm=None, psf=None,
                bad_mask_planes=DEFAULT_BAD_MASK_PLANES, flux_scale=None):
    """Forced PSF photometry of one object through a series of difference images.

    Parameters
    ----------
    times : array_like
        One time per difference image (e.g. MJD).
    differences : sequence of Exposure or MaskedImage
        The difference images (each may be on its own pixel grid).
    position : array_like
        ``(x, y)`` used in every image, or an ``(N, 2)`` array with one position per image
        (parent coordinates of that image, e.g. mapped through a registration transform).
    psf_fwhm : float or sequence of float, optional
        Per-image (or common) PSF FWHM; default each Exposure's ``psf_fwhm``.
    psf : numpy.ndarray or sequence of numpy.ndarray, optional
        A common explicit PSF image, or one per image (e.g. from :func:`decorrelated_psf`).
    bad_mask_planes : sequence of str
    flux_scale : float or array_like, optional
        Divisor of each epoch's flux and error, e.g. the matching kernel's sum at the
        position, which puts differences in each science frame's units (convolveTemplate)
        on the template's common scale.

    Returns
    -------
    astropy.table.Table
        ``time``, ``x``, ``y``, ``flux``, ``flux_err``, ``snr``, ``flags``, ``mask``,
        sorted by time.
    """
    times = np.asarray(times, dtype=float).ravel()
    n = len(differences)
    if times.size != n:
        raise ConfigError(f"light_curve: {times.size} times for {n} difference images")
    pos = np.asarray(position, dtype=float)
    if pos.shape == (2,):
        pos = np.tile(pos, (n, 1))
    if pos.shape != (n, 2):
        raise ConfigError(f"light_curve: position must be (x, y) or an ({n}, 2) array, "
                          f"got shape {pos.shape}")
    if psf_fwhm is None or np.ndim(psf_fwhm) == 0:
        fwhms = [psf_fwhm] * n
    else:
        fwhms = list(np.asarray(psf_fwhm, dtype=float).ravel())
        if len(fwhms) != n:
            raise ConfigError(f"light_curve: {len(fwhms)} psf_fwhm values for {n} images")
    if psf is None or (isinstance(psf, np.ndarray) and psf.ndim == 2):
        psfs = [psf] * n
    else:
        psfs = list(psf)
        if len(psfs) != n:
            raise ConfigError(f"light_curve: {len(psfs)} PSF images for {n} images")
    scale = np.ones(n) if flux_scale is None else np.broadcast_to(
        np.asarray(flux_scale, dtype=float), (n,)).copy()
    if not np.all(np.isfinite(scale) & (scale != 0)):
        raise ConfigError(f"light_curve: flux_scale={flux_scale!r} must be finite and non-zero")
    rows = [forced_photometry(d, pos[i:i + 1], psf_fwhm=fwhms[i], psf=psfs[i],
                              bad_mask_planes=bad_mask_planes)[0]
            for i, d in enumerate(differences)]
    t = Table()
    t["time"] = times
    for col in ("x", "y", "flux", "flux_err", "snr"):
        t[col] = np.array([r[col] for r in rows], dtype=float)
    t["flux"] /= scale
    t["flux_err"] /= np.abs(scale)
    for col in ("flags", "mask"):
        t[col] = np.array([r[col] for r in rows], dtype=np.int32)
    t = t[np.argsort(t["time"], kind="stable")]
    log.info("light curve: %d epoch(s), %d flagged", len(t), int((t["flags"] != 0).sum()))
    return t


def plot_light_curve(table, path, *, title=None, time_label="MJD", flux_label="difference flux"):
    """Plot a light curve (``time``, ``flux``, ``flux_err``, ``flags``) to a PNG file.

    Flagged epochs are drawn as open symbols.  The file is written atomically.

    Parameters
    ----------
    table : astropy.table.Table
        From :func:`light_curve`.
    path : str or os.PathLike
        Output PNG.
    title, time_label, flux_label : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = np.asarray(table["time"], dtype=float)
    f = np.asarray(table["flux"], dtype=float)
    e = np.asarray(table["flux_err"], dtype=float)
    flagged = (np.asarray(table["flags"]) != 0) if "flags" in table.colnames \
        else np.zeros(len(t), dtype=bool)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ok = ~flagged
    ax.errorbar(t[ok], f[ok], yerr=e[ok], fmt="o", ms=4, color="C0", label="good")
    if flagged.any():
        ax.errorbar(t[flagged], f[flagged], yerr=e[flagged], fmt="o", ms=4, mfc="none",
                    color="C3", label="flagged")
        ax.legend(loc="best", fontsize="small")
    ax.set_xlabel(time_label)
    ax.set_ylabel(flux_label)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png")
    log.info("wrote light-curve plot %s", path)
    return fig


# ---------------------------------------------------------------------------------------------
# cutouts
# ---------------------------------------------------------------------------------------------

def _cut(arr, xy0, x, y, size):
    """``size``×``size`` stamp of ``arr`` centred on the pixel nearest (x, y), NaN-padded."""
    out = np.full((size, size), np.nan, dtype=np.float32)
    if not (np.isfinite(x) and np.isfinite(y)):
        return out
    h = size // 2
    ix = int(np.floor(x - xy0[0] + 0.5))
    iy = int(np.floor(y - xy0[1] + 0.5))
    ny, nx = arr.shape
    y0, y1, x0, x1 = iy - h, iy - h + size, ix - h, ix - h + size
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, ny), max(x0, 0), min(x1, nx)
    if cy0 < cy1 and cx0 < cx1:
        out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = arr[cy0:cy1, cx0:cx1]
    return out


def make_cutouts(sources, science, template, difference, size=31):
    """Science, template and difference stamps around each source.

    Parameters
    ----------
    sources : astropy.table.Table or array_like
        ``x``, ``y`` columns (an ``id`` column is carried over) or an ``(N, 2)`` array.
    science, template, difference : Exposure, MaskedImage or 2-D array
        On one pixel grid (the template already warped to the science frame); each
        image's own ``xy0`` is honoured.
    size : int
        Stamp side (pixels); made odd so the source sits on the central pixel.

    Returns
    -------
    astropy.table.Table
        ``id``, ``x``, ``y`` and 3-D float32 columns ``science``, ``template``,
        ``difference`` of shape ``(N, size, size)``; pixels off the image are NaN.
    """
    size = int(size)
    if size < 1:
        raise ConfigError(f"make_cutouts: size={size!r} must be a positive number of pixels")
    if size % 2 == 0:
        size += 1
    xs, ys = _positions(sources)
    ids = (np.asarray(sources["id"]) if isinstance(sources, Table) and "id" in sources.colnames
           else np.arange(len(xs)))
    t = Table()
    t["id"] = ids
    t["x"] = xs
    t["y"] = ys
    for name, obj in (("science", science), ("template", template),
                      ("difference", difference)):
        mi = _as_masked_image(obj, f"make_cutouts {name}")
        stamps = np.empty((len(xs), size, size), dtype=np.float32)
        for i, (x, y) in enumerate(zip(xs, ys)):
            stamps[i] = _cut(mi.image, mi.xy0, x, y, size)
        t[name] = stamps
    t.meta["size"] = size
    return t


def write_cutouts(cutouts, path):
    """Write cutouts from :func:`make_cutouts` to a FITS file, atomically.

    The file has an empty primary HDU, three image cubes ``SCIENCE``, ``TEMPLATE`` and
    ``DIFFERENCE`` of shape ``(N, size, size)`` (NAXIS3 = N), and a ``CATALOG`` binary table
    with ``id``, ``x``, ``y``.

    Parameters
    ----------
    cutouts : astropy.table.Table
    path : str or os.PathLike
    """
    from astropy.io import fits

    hdus = [fits.PrimaryHDU()]
    hdus[0].header["NCUTOUT"] = (len(cutouts), "number of sources")
    for name in ("science", "template", "difference"):
        hdus.append(fits.ImageHDU(np.asarray(cutouts[name], dtype=np.float32),
                                  name=name.upper()))
    cat = Table({k: cutouts[k] for k in ("id", "x", "y")})
    hdus.append(fits.BinTableHDU(cat, name="CATALOG"))
    with atomic_open(path) as fh:
        fits.HDUList(hdus).writeto(fh)
    log.info("wrote %d cutout(s) to %s", len(cutouts), path)


def read_cutouts(path):
    """Read a file written by :func:`write_cutouts` back into a Table."""
    from astropy.io import fits

    with fits.open(path) as hl:
        t = Table(hl["CATALOG"].data)
        for name in ("science", "template", "difference"):
            t[name] = np.asarray(hl[name.upper()].data, dtype=np.float32)
    return t
