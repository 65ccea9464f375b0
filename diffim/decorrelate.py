r"""Decorrelation of difference images (DMTN-021) and variance-plane rescaling.

Why
---
Convolving the template with the matching kernel ``κ`` correlates its noise, so the noise of
``D = S − κ⋆T`` is not white: its power spectrum is ``σ_s² + σ_t²|κ̂(k)|²`` (white inputs of
variance ``σ_s²``, ``σ_t²``).  The variance plane ``V_S + κ²⋆V_T`` gives the right *per-pixel*
variance but ignores the covariance between pixels, so detection thresholds computed from it
are mis-calibrated.  The DMTN-021 "afterburner" filters ``D`` with

.. math::

    \hat c(k) = \sqrt{\frac{σ_s² + σ_t² \hat κ(0)²}{σ_s² + σ_t² |\hat κ(k)|²}},

after which the noise power is flat, ``σ_s² + σ_t² κ̂(0)²``: white noise again, with the
variance a difference of two *unconvolved* images of the same depth would have.
``ĉ(0) = 1`` so fluxes are unchanged.  The difference-image PSF becomes ``PSF ⊗ c`` (slightly
sharper); :attr:`Exposure.psf_fwhm` is left unchanged.

When the *science* image was convolved (``D = (κ⋆S − T)/κ̂(0)``) the roles swap: the
unconvolved image is the template, and the white-noise level after correction is
``(σ_t² + σ_s² κ̂(0)²)/κ̂(0)²``.

Variance plane rules
--------------------
``D' = c⋆D = c⋆U − g⋆C`` with ``g = c∗κ`` (``U`` the unconvolved image, ``C`` the convolved
one; everything divided by ``κ̂(0)`` in convolveScience mode).  Two rules, both exact for
independent input pixels:

* **Full propagation** (when the input variance planes ``V_U``, ``V_C`` are available, as in
  :func:`decorrelate_result`): ``V' = c²⋆V_U + g²⋆V_C`` (over ``κ̂(0)²`` in convolveScience
  mode).  Exact for any spatial variation of the input variances, including the Poisson
  variance of bright sources in either image (ip_diffim's ``completeVarPlanePropagation``).
* **Ratio rule** (only the difference image's plane ``V_D`` is known): for locally white
  inputs the pixel variance of ``D'`` is ``w_U·v_U + w_C·v_C`` with ``w_U = Σ c²`` and
  ``w_C = Σ g²`` (the ip_diffim ``w1, w2`` weights), while ``V_D`` predicts
  ``v_U + Σκ²·v_C``, so ``V' = r·V_D`` with

  .. math::

      r = \frac{w_U σ_U² + w_C σ_C²}{σ_U² + Σκ²\, σ_C²}

  from the global variances that define the filter.  ``r`` depends only on ``σ_C²/σ_U²``
  and the kernel, keeps the spatial structure of ``V_D`` and is exact wherever the local
  variance ratio equals the global one.  Where one image dominates (bright sources) the
  exact factor is ``w_U`` (or ``w_C/Σκ²``) instead: the plane is then low by ``w_U/r``
  (1.004 for κ of σ = 2.46 px and equal depths; 1.27 for σ = 1.04 px, ΣK = 1.3 and a
  template 4× noisier) on science-dominated pixels and high on template-dominated ones.

The weights are computed from the *truncated* real-space kernel that is actually applied,
so truncation does not bias either rule.

Pixels without data
-------------------
Pixels with a non-finite image or variance, or the NO_DATA bit, do not enter the
convolution: they (and the area outside the image) are filled with the median of the good
pixels, which is the expected value of a background-subtracted difference and, because
``Σ c = 1``, leaves flux and background of neighbouring pixels unchanged.  In the output they
are NaN with infinite variance and NO_DATA set, as the convolution of :mod:`diffim.convolve`
marks them; NaN never spreads into other pixels.

Variance rescaling
------------------
:func:`scale_variance` is ip_diffim's ``doScaleVariance`` step (ScaleVarianceTask): the
variance plane is multiplied by the robust variance of the normalised background residuals
``(I − B)/sqrt(V)`` measured in source-free pixels.
"""

import logging
import math
import warnings
from typing import NamedTuple

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal
import sep

from .convolve import correlate_fft
from .exceptions import ConfigError, DiffimWarning
from .image import Exposure, MaskedImage

__all__ = [
    "DEFAULT_IGNORE_MASK_PLANES",
    "DEFAULT_SCALE_VARIANCE_BAD_PLANES",
    "VarianceFactors",
    "decorrelation_kernel",
    "decorrelation_variance_factors",
    "decorrelate_difference",
    "decorrelate_result",
    "scale_variance",
    "clipped_mean",
]

log = logging.getLogger(__name__)

#: ``DecorrelateALKernelConfig.ignoreMaskPlanes``: pixels with these bits are left out of the
#: variance statistics (and of the fill value for missing pixels).
DEFAULT_IGNORE_MASK_PLANES = ("INTRP", "EDGE", "DETECTED", "SAT", "CR", "BAD", "NO_DATA",
                              "DETECTED_NEGATIVE")

#: Pixels with these bits are not used to measure the noise in :func:`scale_variance`.
DEFAULT_SCALE_VARIANCE_BAD_PLANES = ("BAD", "SAT", "NO_DATA", "DETECTED", "EDGE")

_MODES = ("convolveTemplate", "convolveScience")

# Truncation of the real-space correction kernel losing more than this fraction of its
# squared norm is reported as a warning (the variance weights stay exact regardless).
_TRUNCATION_WARN = 1e-3

# Fewest usable pixels for a variance statistic.
_MIN_PIXELS = 100

# Most pixels the clipped mean of a variance plane, or the fill median of a difference image,
# is computed from (an even subsample above): measured on a 4096² simulated pair with a sky
# gradient, 2^20 of 2^24 pixels give the variance level to 7e-5 relative (1e-9 on a flat plane)
# in 0.1 s instead of 1–3 s, while the level itself varies by several per cent across such a
# field, which the spatially constant filter ignores anyway.
_MAX_LEVEL_PIXELS = 1 << 20

# Normal-distribution constants: MAD -> sigma.
_MAD_TO_SIGMA = 1.482602218505602


class VarianceFactors(NamedTuple):
    """Per-pixel noise variance of a difference image before and after decorrelation.

    Attributes
    ----------
    before : float
        Variance the propagated plane predicts for white inputs:
        ``(σ_U² + Σκ² σ_C²)/s²``.
    after : float
        Pixel variance after the correction: ``(w_U σ_U² + w_C σ_C²)/s²``; for an
        untruncated kernel this is the white level ``(σ_U² + κ̂(0)² σ_C²)/s²``.
    ratio : float
        ``after / before``: the factor applied to the variance plane.
    weight_unconvolved : float
        ``w_U = Σ c²``.
    weight_convolved : float
        ``w_C = Σ (c⋆κ)²``.
    kernel_sum : float
        ``κ̂(0) = Σ κ``.

    Notes
    -----
    ``U`` is the unconvolved image (the science image in convolveTemplate mode), ``C`` the
    convolved one, and ``s = 1`` in convolveTemplate mode, ``κ̂(0)`` in convolveScience mode.
    """

    before: float
    after: float
    ratio: float
    weight_unconvolved: float
    weight_convolved: float
    kernel_sum: float


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _check_mode(mode):
    if mode not in _MODES:
        raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}")
    return mode


def _kernel_array(matching_kernel, x=None, y=None):
    """The matching kernel as a float64 odd-sized 2-D array (evaluated at (x, y) if spatial)."""
    if hasattr(matching_kernel, "evaluate"):
        if x is None or y is None:
            raise ConfigError("a spatial matching kernel needs a position to be evaluated at; "
                              "pass its kernel image (kernel.evaluate(x, y)) instead")
        matching_kernel = matching_kernel.evaluate(x, y)
    k = np.asarray(matching_kernel, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ConfigError(f"matching kernel must be a 2-D array with odd sides, got shape "
                          f"{k.shape}")
    if not np.all(np.isfinite(k)):
        raise ConfigError("matching kernel has non-finite values; check the kernel solution")
    if k.sum() == 0.0:
        raise ConfigError("matching kernel sums to 0; a difference image cannot be "
                          "normalised by it")
    return k


def _check_variances(science_variance, template_variance):
    out = []
    for name, v in (("science_variance", science_variance),
                    ("template_variance", template_variance)):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {v!r}") from None
        if not (math.isfinite(v) and v >= 0.0):
            raise ConfigError(f"{name} must be finite and >= 0, got {v!r}")
        out.append(v)
    return out


def _roles(mode, science_variance, template_variance):
    """(variance of the unconvolved image, variance of the convolved image)."""
    s, t = _check_variances(science_variance, template_variance)
    u, c = (s, t) if _check_mode(mode) == "convolveTemplate" else (t, s)
    if u <= 0.0 and c > 0.0:
        which = "science" if mode == "convolveTemplate" else "template"
        raise ConfigError(f"the {which} (unconvolved) image variance must be > 0 when the other "
                          f"is not 0: the correction would have to undo the convolution "
                          f"exactly (unbounded gain)")
    return u, c


def _bitmask_known(masked_image, names):
    """OR of the bits of the planes in ``names`` that this image has (others are skipped)."""
    bits = 0
    missing = []
    for name in names:
        if name in masked_image.mask_planes:
            bits |= 1 << masked_image.mask_planes[name]
        else:
            missing.append(name)
    if missing:
        log.debug("mask planes %s are not defined on this image; ignored", missing)
    return bits


def _masked_image(obj, what):
    if isinstance(obj, Exposure):
        return obj.masked_image
    if isinstance(obj, MaskedImage):
        return obj
    raise TypeError(f"{what} must be a diffim Exposure or MaskedImage, got "
                    f"{type(obj).__name__}")


def _subsample(values):
    """Every n-th value, n chosen to keep at most ``_MAX_LEVEL_PIXELS``."""
    return values[::-(-values.size // _MAX_LEVEL_PIXELS)]


def _centre(masked_image):
    x0, y0, x1, y1 = masked_image.bbox
    return 0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1)


def clipped_mean(values, *, nsigma=3.0, max_iter=10):
    """Iteratively sigma-clipped mean (median/MAD-centred clipping).

    Parameters
    ----------
    values : array_like
        Finite values (non-finite ones are dropped).
    nsigma : float
        Clipping half-width in robust standard deviations.
    max_iter : int
        Maximum number of clipping passes.

    Returns
    -------
    float
        The mean of the values kept; NaN when there are none.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    keep = np.ones(v.size, dtype=bool)
    for _ in range(max_iter):
        sel = v[keep]
        med = np.median(sel)
        sigma = _MAD_TO_SIGMA * np.median(np.abs(sel - med))
        if sigma == 0.0:
            break
        new = np.abs(v - med) <= nsigma * sigma
        if np.array_equal(new, keep):
            break
        keep = new
    return float(v[keep].mean())


# ---------------------------------------------------------------------------------------------
# the correction kernel
# ---------------------------------------------------------------------------------------------

def _correction_spectrum(kernel, var_u, var_c, n):
    """ĉ(k) on an n×n grid (real, even) and κ̂(0)."""
    ky, kx = kernel.shape
    padded = np.zeros((n, n))
    padded[:ky, :kx] = kernel
    # Centre pixel to index 0: |κ̂| does not depend on the placement, but a centred kernel
    # keeps κ̂ close to real, which makes the rounding of |κ̂|² symmetric.
    padded = np.roll(padded, (-(ky // 2), -(kx // 2)), axis=(0, 1))
    khat2 = np.abs(scipy.fft.rfft2(padded)) ** 2
    ksum = float(kernel.sum())
    return np.sqrt((var_u + var_c * ksum**2) / (var_u + var_c * khat2)), ksum


def decorrelation_kernel(matching_kernel, science_variance, template_variance, *,
                         mode="convolveTemplate", size=None):
    """Real-space DMTN-021 correction kernel of a difference image.

    Parameters
    ----------
    matching_kernel : array_like
        PSF-matching kernel image (odd sides; correlation orientation, though only
        ``|κ̂|`` enters so the orientation does not matter).
    science_variance, template_variance : float
        White-noise variances of the science and template images, each in its own units
        (as in their variance planes).
    mode : {"convolveTemplate", "convolveScience"}
        Which image the kernel was applied to.
    size : int, optional
        Odd side of the returned kernel; default ``2k + 1`` for a ``k × k`` matching kernel.

    Returns
    -------
    ndarray, shape (size, size)
        float64 kernel, symmetric under 180° rotation (so correlation and convolution with it
        agree), normalised to ``Σ c = ĉ(0) = 1``.

    Raises
    ------
    ConfigError
        Bad mode, size, kernel or variances.

    Notes
    -----
    With ``U``/``C`` the unconvolved/convolved image,
    ``ĉ(k) = sqrt((σ_U² + σ_C² κ̂(0)²) / (σ_U² + σ_C² |κ̂(k)|²))`` is evaluated on an FFT grid
    several times larger than ``size`` (so |κ̂| is finely sampled and the real-space kernel
    does not wrap), transformed back and cropped to ``size``.  A zero convolved-image
    variance gives a delta function.  See :func:`decorrelation_variance_factors` for the
    resulting noise level.
    """
    kernel = _kernel_array(matching_kernel)
    var_u, var_c = _roles(mode, science_variance, template_variance)
    k = max(kernel.shape)
    if size is None:
        size = 2 * k + 1
    try:
        size = int(size)
    except (TypeError, ValueError):
        raise ConfigError(f"size must be an odd positive integer, got {size!r}") from None
    if size < 1 or size % 2 == 0:
        raise ConfigError(f"size must be an odd positive integer, got {size}")
    half = size // 2
    if var_c == 0.0:
        out = np.zeros((size, size))
        out[half, half] = 1.0
        return out
    n = scipy.fft.next_fast_len(max(4 * size, 8 * k, 64), real=True)
    corr_hat, _ = _correction_spectrum(kernel, var_u, var_c, n)
    full = scipy.fft.irfft2(corr_hat, s=(n, n))
    full = np.roll(full, (half, half), axis=(0, 1))
    out = full[:size, :size].copy()
    total2 = float(np.sum(full**2))
    lost = 1.0 - float(np.sum(out**2)) / total2 if total2 > 0 else 0.0
    # Symmetrise away FFT rounding: the exact kernel is even because |κ̂(k)| = |κ̂(-k)|.
    out = 0.5 * (out + out[::-1, ::-1])
    out /= out.sum()
    if lost > _TRUNCATION_WARN:
        log.warning("decorrelation kernel truncated to %dx%d loses %.2g of its squared norm; "
                    "pass a larger size", size, size, lost)
    else:
        log.debug("decorrelation kernel %dx%d (FFT grid %d, truncation loss %.2g)", size, size,
                  n, lost)
    return out


def decorrelation_variance_factors(correction, matching_kernel, science_variance,
                                   template_variance, *, mode="convolveTemplate"):
    """Noise variance of a difference image before and after applying ``correction``.

    Parameters
    ----------
    correction : array_like
        Correction kernel (from :func:`decorrelation_kernel`).
    matching_kernel : array_like
        The PSF-matching kernel image.
    science_variance, template_variance : float
        White-noise variances of the inputs (each in its own units).
    mode : {"convolveTemplate", "convolveScience"}

    Returns
    -------
    VarianceFactors
        ``before``, ``after``, ``ratio`` (the variance-plane factor), the weights ``w_U``,
        ``w_C`` and ``κ̂(0)``.
    """
    kernel = _kernel_array(matching_kernel)
    corr = np.asarray(correction, dtype=np.float64)
    var_u, var_c = _roles(mode, science_variance, template_variance)
    w_u = float(np.sum(corr**2))
    # c is even, so Σ(c⋆κ)² = Σ(c∗κ)²: the orientation of κ does not matter.
    w_c = float(np.sum(scipy.signal.fftconvolve(corr, kernel, mode="full") ** 2))
    ksum = float(kernel.sum())
    scale2 = 1.0 if mode == "convolveTemplate" else ksum**2
    before = (var_u + float(np.sum(kernel**2)) * var_c) / scale2
    after = (w_u * var_u + w_c * var_c) / scale2
    ratio = after / before if before > 0 else 1.0
    return VarianceFactors(before, after, ratio, w_u, w_c, ksum)


# ---------------------------------------------------------------------------------------------
# applying it
# ---------------------------------------------------------------------------------------------

def _propagate_variance(variance_planes, corr, kernel, mode, shape):
    """``c²⋆V_U + (c∗κ)²⋆V_C`` (over κ̂(0)² in convolveScience mode), float32."""
    try:
        v_sci, v_tem = variance_planes
    except (TypeError, ValueError):
        raise ConfigError("variance_planes must be a pair (science_variance_plane, "
                          "template_variance_plane)") from None
    planes = []
    for name, v in (("science", v_sci), ("template", v_tem)):
        v = np.asarray(v, dtype=np.float32)
        if v.shape != tuple(shape):
            raise ConfigError(f"the {name} variance plane has shape {v.shape} but the "
                              f"difference image has {tuple(shape)}; warp it to the same grid")
        planes.append(v)
    v_u, v_c = planes if mode == "convolveTemplate" else planes[::-1]
    # Correlating with κ and then with c is correlating with the convolution g = c∗κ, so
    # Var = g²⋆V_C (correlation with g², c² is even).  float32 transforms: their rounding
    # (measured 1e-5 of the plane next to a source 50× the sky variance) is far below any use
    # of a variance.
    g = scipy.signal.fftconvolve(corr, kernel, mode="full")
    out = None
    for v, weights in ((v_u, corr**2), (v_c, g**2)):
        finite = np.isfinite(v)
        conv = correlate_fft(v, weights[None], bad=None if finite.all() else ~finite)
        if out is None:
            out = conv
        else:
            out += conv
    if mode == "convolveScience":
        out /= np.float32(float(kernel.sum()) ** 2)
    # FFT rounding can leave tiny negative values where the variance is 0.
    return np.maximum(out, 0.0, out=out)


def decorrelate_difference(difference, matching_kernel, science_variance, template_variance, *,
                           mode="convolveTemplate", ignore_mask_planes=DEFAULT_IGNORE_MASK_PLANES,
                           size=None, variance_planes=None):
    """Decorrelate a difference image with the DMTN-021 correction.

    Parameters
    ----------
    difference : Exposure or MaskedImage
        ``D = S − κ⋆T − bg`` (convolveTemplate) or ``(κ⋆S + bg − T)/κ̂(0)``
        (convolveScience), with its propagated variance plane.  Not modified.
    matching_kernel : array_like or SpatialKernel
        The matching kernel image; a spatial kernel is evaluated at the image centre (the
        correction is spatially constant).
    science_variance, template_variance : float
        White-noise variances of the science and template images, each in its own units.
    mode : {"convolveTemplate", "convolveScience"}
        Which image was convolved.
    ignore_mask_planes : sequence of str
        Pixels with these planes are left out of the fill-value median (planes the image does
        not define are skipped).
    size : int, optional
        Side of the correction kernel (see :func:`decorrelation_kernel`).
    variance_planes : tuple of 2 arrays, optional
        ``(science_variance_plane, template_variance_plane)`` on the grid of ``difference``
        (the template's warped to it), each in its own units.  When given the variance plane
        is fully propagated, ``c²⋆V_U + (c∗κ)²⋆V_C``; otherwise the ratio rule ``r·V_D`` is
        used (module docstring).  Non-finite input variances count as 0 (those pixels are
        missing in ``difference`` and filled with a constant).

    Returns
    -------
    Exposure or MaskedImage
        Same type as ``difference``: image ``c⋆D``, the variance plane by one of the two
        rules, the mask unchanged except that missing pixels get NO_DATA.  An Exposure
        keeps WCS, PSF FWHM, photometric scale and metadata, to which ``DECORREL``,
        ``DECVARF`` (= r), ``DECVARW`` (the white variance after correction) and
        ``DECVRULE`` ("full" or "ratio") are added.

    Raises
    ------
    ConfigError
        Bad mode, kernel, size or variances.
    TypeError
        ``difference`` is not an Exposure or MaskedImage.
    """
    mi = _masked_image(difference, "difference")
    xc, yc = _centre(mi)
    kernel = _kernel_array(matching_kernel, xc, yc)
    corr = decorrelation_kernel(kernel, science_variance, template_variance, mode=mode,
                                size=size)
    factors = decorrelation_variance_factors(corr, kernel, science_variance, template_variance,
                                             mode=mode)

    planes = dict(mi.mask_planes)
    if "NO_DATA" in planes:
        nodata_bit = 1 << planes["NO_DATA"]
    else:
        tmp = MaskedImage(np.zeros((1, 1), np.float32), mask_planes=planes)
        nodata_bit = 1 << tmp.add_mask_plane("NO_DATA")
        planes = tmp.mask_planes

    image = mi.image
    variance = mi.variance
    missing = ~(np.isfinite(image) & np.isfinite(variance)) | ((mi.mask & nodata_bit) != 0)
    good = ~missing & ((mi.mask & _bitmask_known(mi, ignore_mask_planes)) == 0)
    if not good.any():
        good = ~missing
    fill = float(np.median(_subsample(image[good]))) if good.any() else 0.0

    # Linear (zero-padded) correlation of D − fill with missing pixels read as 0: the outside
    # of the image, like the missing pixels, counts as ``fill``.  c is even, so convolution
    # equals correlation.  float32 transforms in overlap-save tiles (convolve.correlate_fft).
    out_img = correlate_fft(image - np.float32(fill), corr[None],
                            bad=missing if missing.any() else None)
    out_img += np.float32(fill)
    if variance_planes is None:
        out_var = (variance.astype(np.float64) * factors.ratio).astype(np.float32)
        rule = "scaled by %.4f" % factors.ratio
    else:
        out_var = _propagate_variance(variance_planes, corr, kernel, mode, mi.shape)
        rule = "fully propagated"
    out_mask = mi.mask.copy()
    out_img[missing] = np.nan
    out_var[missing] = np.inf
    out_mask[missing] |= np.int32(nodata_bit)

    log.info("Decorrelated difference (%s): kernel %dx%d, white variance %.4g -> %.4g per "
             "pixel, variance plane %s", mode, corr.shape[0], corr.shape[1],
             factors.before, factors.after, rule)
    result = MaskedImage(out_img, out_mask, out_var, xy0=mi.xy0, mask_planes=planes)
    if isinstance(difference, Exposure):
        meta = difference.metadata.copy()
        meta["DECORREL"] = (True, "DMTN-021 decorrelation applied")
        meta["DECVARF"] = (float(factors.ratio), "white-noise variance ratio after/before")
        meta["DECVRULE"] = ("full" if variance_planes is not None else "ratio",
                            "decorrelated variance plane rule")
        meta["DECVARW"] = (float(factors.after), "expected white variance after decorrelation")
        return Exposure(result, wcs=None if difference.wcs is None else difference.wcs.deepcopy(),
                        psf_fwhm=difference.psf_fwhm, phot_scale=difference.phot_scale,
                        metadata=meta)
    return result


def _plane_level(masked_image, ignore_mask_planes, what):
    """Sigma-clipped mean of the variance plane over usable pixels (every n-th of them when
    there are more than ``_MAX_LEVEL_PIXELS``)."""
    mi = masked_image
    bits = _bitmask_known(mi, ignore_mask_planes)
    v = mi.variance
    sel = np.isfinite(v) & (v > 0) & ((mi.mask & bits) == 0) & np.isfinite(mi.image)
    if int(sel.sum()) < _MIN_PIXELS:
        raise ConfigError(f"the {what} image has only {int(sel.sum())} pixels with a finite, "
                          f"positive variance and none of the planes {list(ignore_mask_planes)}; "
                          f"at least {_MIN_PIXELS} are needed to estimate its noise level "
                          f"(relax ignore_mask_planes)")
    return clipped_mean(_subsample(v[sel]))


def decorrelate_result(result, template, science, *,
                       ignore_mask_planes=DEFAULT_IGNORE_MASK_PLANES, size=None):
    """Decorrelate the difference image of a subtraction result.

    Parameters
    ----------
    result : PsfMatchResult
        From ``ImagePsfMatchTask.subtract_exposures`` or ``subtract_masked_images``; its
        ``metadata["mode"]`` (default convolveTemplate) says which image was convolved.
    template, science : Exposure or MaskedImage
        The images that were subtracted (the template on the science grid).  Their variance
        planes give ``σ_t²`` and ``σ_s²`` as sigma-clipped means over pixels without
        ``ignore_mask_planes`` (these define the filter), and are fully propagated through
        it to make the output variance plane.
    ignore_mask_planes : sequence of str
        Mask planes left out of the variance statistics.
    size : int, optional
        Side of the correction kernel.

    Returns
    -------
    Exposure
        The decorrelated difference (see :func:`decorrelate_difference`) with the science
        WCS and metadata (those of ``result.subtracted_exposure`` when present).

    Raises
    ------
    ConfigError
        The result holds no difference image, or an input has too few usable pixels.
    """
    diff = result.subtracted_exposure
    if diff is None:
        if result.subtracted_masked_image is None:
            raise ConfigError("the PsfMatchResult has no difference image; produce it with "
                              "subtract_exposures or subtract_masked_images, not match_*")
        sci_exp = science if isinstance(science, Exposure) else None
        diff = Exposure(result.subtracted_masked_image,
                        wcs=None if sci_exp is None or sci_exp.wcs is None
                        else sci_exp.wcs.deepcopy(),
                        psf_fwhm=None if sci_exp is None else sci_exp.psf_fwhm,
                        phot_scale=None if sci_exp is None else sci_exp.phot_scale,
                        metadata=None if sci_exp is None else sci_exp.metadata.copy())
    mode = (result.metadata or {}).get("mode", "convolveTemplate")
    mi = diff.masked_image
    xc, yc = _centre(mi)
    kernel = result.psf_matching_kernel.evaluate(xc, yc)
    sci_mi = _masked_image(science, "science")
    tem_mi = _masked_image(template, "template")
    var_s = _plane_level(sci_mi, ignore_mask_planes, "science")
    var_t = _plane_level(tem_mi, ignore_mask_planes, "template")
    log.info("Decorrelation: kernel at (%.1f, %.1f), sum %.4f; clipped mean variance science "
             "%.4g, template %.4g", xc, yc, float(kernel.sum()), var_s, var_t)
    return decorrelate_difference(diff, kernel, var_s, var_t, mode=mode,
                                  ignore_mask_planes=ignore_mask_planes, size=size,
                                  variance_planes=(sci_mi.variance, tem_mi.variance))


# ---------------------------------------------------------------------------------------------
# variance rescaling
# ---------------------------------------------------------------------------------------------

def _noise_pixels(mi, bad_mask_planes):
    """Normalised residuals (I − B)/sqrt(V) in source-free, unmasked pixels."""
    image = mi.image
    variance = mi.variance
    usable = np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    usable &= (mi.mask & _bitmask_known(mi, bad_mask_planes)) == 0
    if int(usable.sum()) < _MIN_PIXELS:
        return None
    ny, nx = image.shape
    data = np.where(usable, image, 0.0).astype(np.float32)
    bad8 = (~usable).astype(np.uint8)
    try:
        bkg = sep.Background(data, mask=bad8, bw=min(64, nx), bh=min(64, ny))
        resid = data - bkg.back(dtype=np.float32)
    except Exception as exc:  # sep refuses pathological inputs (e.g. all masked meshes)
        log.debug("sep background failed (%s); using the global median", exc)
        resid = data - np.float32(np.median(image[usable]))
    sigma = np.sqrt(np.where(usable, variance, 1.0)).astype(np.float32)

    # Sources would inflate the measured noise; detect them on the residual (3σ, area 5,
    # sep's default matched filter) and drop their footprints grown by 2 pixels.  The
    # threshold is on the filtered image, where pure noise rarely reaches it, so the
    # noise distribution is not truncated measurably.
    sources = np.zeros(image.shape, dtype=bool)
    old_stack = sep.get_extract_pixstack()
    try:
        sep.set_extract_pixstack(max(old_stack, image.size))
        _, seg = sep.extract(np.ascontiguousarray(resid), 3.0, err=np.ascontiguousarray(sigma),
                             mask=bad8, minarea=5, segmentation_map=True)
        sources = scipy.ndimage.binary_dilation(seg > 0, iterations=2)
    except Exception as exc:  # e.g. too many objects in a pathological image
        log.debug("sep source detection failed (%s); measuring the noise without it", exc)
    finally:
        sep.set_extract_pixstack(old_stack)
    sel = usable & ~sources
    if int(sel.sum()) < _MIN_PIXELS:
        sel = usable
    return (resid[sel] / sigma[sel]).astype(np.float64)


def scale_variance(masked_image_or_exposure, *,
                   bad_mask_planes=DEFAULT_SCALE_VARIANCE_BAD_PLANES):
    """Rescale the variance plane to the measured pixel noise (ip_diffim ``doScaleVariance``).

    Parameters
    ----------
    masked_image_or_exposure : MaskedImage or Exposure
        Not modified.
    bad_mask_planes : sequence of str
        Pixels with these planes are not used to measure the noise (planes the image does
        not define are skipped).

    Returns
    -------
    scaled : MaskedImage or Exposure
        A copy whose variance plane is multiplied by ``factor``.
    factor : float
        ``(robust std of z)²`` with ``z = (I − B)/sqrt(V)`` over source-free pixels, ``B``
        a sep background (64-pixel mesh) and the robust std ``1.4826·MAD``.  1 when fewer
        than 100 pixels are usable (with a :class:`DiffimWarning`).

    Notes
    -----
    Normalising by the variance *per pixel* (rather than dividing a pixel variance by the
    median of the plane) keeps the measurement right when the variance varies across the
    image (gradients, vignetting, coadd depth).  The statistic is the one-point variance of
    the pixels, so it is also right for correlated noise (a warped or coadded template),
    which estimators built on pixel-to-pixel differences underestimate.  Sources are
    excluded by the given mask planes and by a 3σ sep detection grown by 2 pixels; the MAD
    tolerates what remains of their wings.
    """
    mi = _masked_image(masked_image_or_exposure, "masked_image_or_exposure")
    z = _noise_pixels(mi, bad_mask_planes)
    problem = None
    if z is None or z.size < _MIN_PIXELS:
        problem = (f"fewer than {_MIN_PIXELS} usable pixels (finite, positive variance, none "
                   f"of {list(bad_mask_planes)})")
    else:
        med = np.median(z)
        factor = float((_MAD_TO_SIGMA * np.median(np.abs(z - med))) ** 2)
        if not (math.isfinite(factor) and factor > 0):
            problem = f"measured noise factor {factor!r} is not usable (constant image?)"
    if problem is not None:
        msg = f"scale_variance: {problem}; variance plane left unscaled"
        warnings.warn(msg, DiffimWarning, stacklevel=2)
        log.warning(msg)
        factor = 1.0
    else:
        log.info("Variance plane scaled by %.4f (noise measured in %d source-free pixels)",
                 factor, z.size)
    new_mi = mi.copy()
    new_mi.variance = (new_mi.variance.astype(np.float64) * factor).astype(np.float32)
    if isinstance(masked_image_or_exposure, Exposure):
        src = masked_image_or_exposure
        out = Exposure(new_mi, wcs=None if src.wcs is None else src.wcs.deepcopy(),
                       psf_fwhm=src.psf_fwhm, phot_scale=src.phot_scale,
                       metadata=src.metadata.copy())
        return out, factor
    return new_mi, factor
