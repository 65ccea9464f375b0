"""Pixel containers and FITS input/output.

:class:`MaskedImage` bundles an image (float32), a mask of bit planes (int32) and a variance
(float32) on one pixel grid whose origin ``xy0`` places it in *parent* coordinates, so that
sub-images keep the coordinates of the image they were cut from.  :class:`Exposure` adds
what is known about the sky and the observation: a WCS, the PSF FWHM, a photometric scale
and the FITS metadata.

Coordinate conventions
----------------------
* Arrays are indexed ``[y, x]``; parent coordinates are ``array index + xy0``.
* ``Exposure.wcs`` maps **parent** pixel coordinates (0-based) to the sky, as in afw: a
  sub-image shares its parent's WCS object unchanged.  For an image read from a plain FITS
  file ``xy0 == (0, 0)``, so parent and array coordinates coincide.  In files written by
  :func:`write_fits` the IMAGE header carries the WCS shifted to array coordinates, so that
  standard FITS tools (ds9, astropy) place the pixels correctly; :func:`read_fits` shifts it
  back.

File format of :func:`write_fits`
---------------------------------
HDU 0: empty primary HDU holding the Exposure metadata plus

* ``DIFFIMV``: diffim version that wrote the file;
* ``XY0X``, ``XY0Y``: parent coordinates of pixel ``[0, 0]``;
* ``PSFFWHM``: PSF FWHM in pixels (absent when unknown);
* ``PHOTSCAL``: photometric scale (absent when unknown).

Floating-point cards are written with 17 significant digits so they read back bit-exactly.

HDU 1 ``IMAGE`` (float32, WCS in array coordinates, IRAF ``LTV1/LTV2 = -xy0`` so that ds9's
"physical" coordinates are parent coordinates), HDU 2 ``MASK`` (int32, one card
``HIERARCH MP_<NAME> = bit`` per plane), HDU 3 ``VARIANCE`` (float32).

Reading plain images
--------------------
A single-HDU image (any BITPIX, with BZERO/BSCALE, or tile-compressed) becomes a native
float32 Exposure.  Non-finite (and BLANK) pixels are set to 0 in the image, flagged
``NO_DATA`` and given **infinite variance**, so that inverse-variance weights vanish there.
Pixels at or above the saturation level are flagged ``SAT``.  The variance is built from a
sep background map; see :func:`read_fits` for the model.
"""

import logging
import math
import operator
import os
import re
import warnings

import numpy as np
import sep
from astropy.io import fits
from scipy.ndimage import uniform_filter
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning, Sip
from astropy.wcs.utils import proj_plane_pixel_scales

from . import __version__
from ._atomic import atomic_open
from .exceptions import ConfigError, ImageReadError, ImageShapeMismatchError

__all__ = [
    "DEFAULT_MASK_PLANES",
    "MAX_MASK_PLANES",
    "MaskedImage",
    "Exposure",
    "read_fits",
    "write_fits",
]

log = logging.getLogger(__name__)

DEFAULT_MASK_PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5,
                       "DETECTED_NEGATIVE": 6, "NO_DATA": 7}

#: Bits 0..30 of the int32 mask; bit 31 is the sign bit, which would make masks negative
#: and break ``mask & bits`` idioms that compare against 0 with ``>``.
MAX_MASK_PLANES = 31

# Header keywords, first match wins.  ESATUR (effective saturation after sky subtraction,
# written by some pipelines) comes first because on a sky-subtracted image the raw SATURATE
# level is never reached and saturated cores would go unflagged.
_SATURATION_KEYS = ("ESATUR", "SATURATE", "SATLEVEL", "SATUR")
_GAIN_KEYS = ("GAIN", "EGAIN", "GAINEFF")
_READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "RON")
_FWHM_KEYS = ("FWHM", "SEEING", "PFWHM")

# Keywords this module writes and interprets; kept out of ``metadata`` on read so that a
# stale copy can never contradict the Exposure attributes on the next write.
_RESERVED_KEYS = ("DIFFIMV", "XY0X", "XY0Y", "PSFFWHM", "PHOTSCAL")

# Keywords that describe the HDU structure or data encoding of the file they came from.
# Copied into another HDU they would be wrong (or make astropy rescale the data).
_STRUCTURAL_RE = re.compile(
    r"^(SIMPLE|XTENSION|BITPIX|NAXIS\d*|EXTEND|PCOUNT|GCOUNT|GROUPS|BZERO|BSCALE|BLANK|"
    r"EXTNAME|EXTVER|EXTLEVEL|INHERIT|CHECKSUM|DATASUM|END|"
    r"ZIMAGE|ZSIMPLE|ZTENSION|ZEXTEND|ZBITPIX|ZNAXIS\d*|ZTILE\d+|ZCMPTYPE|ZNAME\d+|ZVAL\d+|"
    r"ZMASKCMP|ZQUANTIZ|ZDITHER0|ZBLANK|ZSCALE|ZZERO|ZPCOUNT|ZGCOUNT|ZHECKSUM|ZDATASUM|"
    r"ZBLOCKED)$"
)

# WCS keywords (with an optional alternate-WCS letter).  The WCS lives in ``Exposure.wcs``;
# a second, stale copy in ``metadata`` would disagree with it after warping or cutting.
_WCS_RE = re.compile(
    r"^(WCSAXES|WCSNAME|CTYPE\d|CRPIX\d|CRVAL\d|CDELT\d|CUNIT\d|CROTA\d|CD\d_\d|PC\d_\d|"
    r"PV\d_\d+|PS\d_\d+|LONPOLE|LATPOLE|RADESYS|RADECSYS|WCSDIM|WAT\d_\d+|LTV\d|LTM\d_\d|"
    r"(A|B|AP|BP)_ORDER|(A|B|AP|BP)_\d+_\d+|(A|B)_DMAX)[A-Z]?$"
)

# Smallest variance given to a finite pixel: keeps 1/variance finite in float32 even for
# noiseless (e.g. synthetic constant) images.
_VARIANCE_FLOOR = np.float32(1e-20)

# sep background mesh (pixels), clipped to the image size for small stamps.
_BACKGROUND_BOX = 64

# A plain image with gain keywords is treated as raw (variance from the keyword model) when
# its measured sky noise is at most this multiple of the model's; real raw frames give
# 1.00-1.02 and sky-subtracted ones 4-15 (see _white_noise_ratio).
_MODEL_TRUST_RATIO = 1.5
# Measured/model ratios up to this are attributed to star structure leaking into the noise
# measurement (1.02 on the SAAO frames, 1.06 on a simulated confusion-limited field with
# FWHM 3 px) rather than to extra noise; larger would hide real sky noise on read-noise-
# dominated sky-subtracted images (a compromise: at most ~5% low there, ~3% high here).
_LEAKAGE_RATIO = 1.05
# Fewest sky pixels for that measurement; below it the rms-based variance is used.
_MIN_NOISE_PIXELS = 200

# Pixels sharing the maximum value of integer data that mark a clipped (saturated) plateau.
_MIN_PLATEAU_PIXELS = 3

_EXTNAMES = ("IMAGE", "MASK", "VARIANCE")

_PLANE_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,60}$")


# ---------------------------------------------------------------------------------------------
# MaskedImage / Exposure
# ---------------------------------------------------------------------------------------------

def _as_2d(array, dtype, what):
    """Return ``array`` as a C-contiguous native ``dtype`` 2-D array, copying only if needed."""
    arr = np.ascontiguousarray(array, dtype=dtype)
    if arr.ndim != 2:
        raise ImageShapeMismatchError(
            f"{what} must be a 2-D array, got {arr.ndim}-D with shape {arr.shape}")
    return arr


def _check_planes(planes):
    """Validate a mask-plane dictionary and return a fresh copy of it."""
    out = {}
    used = {}
    for name, bit in dict(planes).items():
        if not isinstance(name, str) or not _PLANE_NAME_RE.match(name):
            raise ConfigError(
                f"mask plane name {name!r} is invalid; use 1-60 characters from A-Z, a-z, "
                f"0-9, '_' and '-'")
        try:
            bit = operator.index(bit)
        except TypeError:
            raise ConfigError(f"mask plane {name!r} has bit {bit!r}; bits must be integers "
                              f"in 0..{MAX_MASK_PLANES - 1}") from None
        if not 0 <= bit < MAX_MASK_PLANES:
            raise ConfigError(f"mask plane {name!r} has bit {bit}; bits must be in "
                              f"0..{MAX_MASK_PLANES - 1}")
        if bit in used:
            raise ConfigError(f"mask planes {used[bit]!r} and {name!r} share bit {bit}; "
                              f"give each plane its own bit")
        used[bit] = name
        out[name] = bit
    return out


def _check_positive(value, name):
    """Return ``value`` as a float (> 0, finite) or None."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive number or None, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{name} must be a positive finite number or None, got {value!r}")
    return v


class MaskedImage:
    """An image with a bit-plane mask and a variance on one pixel grid.

    Parameters
    ----------
    image : array_like
        2-D pixel values ``[y, x]``.  Stored as C-contiguous float32; an array that already
        is one is used without copying.
    mask : array_like, optional
        2-D integer mask of bit planes; zeros (int32) when omitted.  Not copied when already
        C-contiguous int32.
    variance : array_like, optional
        2-D per-pixel variance; zeros (float32) when omitted, which callers should avoid.
        Not copied when already C-contiguous float32.
    xy0 : tuple of int, optional
        Parent coordinates ``(x0, y0)`` of pixel ``[0, 0]``.
    mask_planes : dict, optional
        Plane name -> bit number (0..30).  Copied; defaults to :data:`DEFAULT_MASK_PLANES`.

    Raises
    ------
    ImageShapeMismatchError
        If an array is not 2-D or the shapes of image, mask and variance differ.
    ConfigError
        If ``mask_planes`` is invalid (bad name, bit out of range, duplicate bit).
    """

    def __init__(self, image, mask=None, variance=None, xy0=(0, 0), mask_planes=None):
        self.image = _as_2d(image, np.float32, "image")
        shape = self.image.shape
        if mask is None:
            self.mask = np.zeros(shape, dtype=np.int32)
        else:
            self.mask = _as_2d(mask, np.int32, "mask")
        if variance is None:
            self.variance = np.zeros(shape, dtype=np.float32)
        else:
            self.variance = _as_2d(variance, np.float32, "variance")
        if self.mask.shape != shape or self.variance.shape != shape:
            raise ImageShapeMismatchError(
                f"image {shape}, mask {self.mask.shape} and variance {self.variance.shape} "
                f"must have the same shape")
        try:
            x0, y0 = xy0
            self.xy0 = (operator.index(x0), operator.index(y0))
        except (TypeError, ValueError):
            raise ConfigError(f"xy0 must be a pair of integers (x0, y0), got {xy0!r}") from None
        self.mask_planes = _check_planes(DEFAULT_MASK_PLANES if mask_planes is None
                                         else mask_planes)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def shape(self):
        """(ny, nx) of the arrays."""
        return self.image.shape

    @property
    def bbox(self):
        """Half-open parent box ``(x0, y0, x1, y1)``: x in ``[x0, x1)``, y in ``[y0, y1)``."""
        x0, y0 = self.xy0
        ny, nx = self.image.shape
        return (x0, y0, x0 + nx, y0 + ny)

    # -- mask planes -------------------------------------------------------------------------
    def get_plane_bitmask(self, *names):
        """Return the OR of ``1 << bit`` of the named planes.

        Parameters
        ----------
        *names : str or iterable of str
            Plane names; lists/tuples of names are flattened, so both
            ``get_plane_bitmask("BAD", "SAT")`` and ``get_plane_bitmask(["BAD", "SAT"])`` work.

        Returns
        -------
        int
            The bit mask (0 when no name is given).

        Raises
        ------
        ConfigError
            If a name is not a plane of this image.
        """
        bits = 0
        for name in _flatten_names(names):
            try:
                bits |= 1 << self.mask_planes[name]
            except KeyError:
                raise ConfigError(
                    f"unknown mask plane {name!r}; known planes are "
                    f"{sorted(self.mask_planes)} (add it with add_mask_plane)") from None
        return bits

    def add_mask_plane(self, name):
        """Add a mask plane (if new) and return its bit number.

        Parameters
        ----------
        name : str
            Plane name (1-60 characters from ``A-Za-z0-9_-``).

        Returns
        -------
        int
            The bit of the existing or newly added plane (lowest free bit).

        Raises
        ------
        ConfigError
            If the name is invalid or all 31 bits are taken.
        """
        if name in self.mask_planes:
            return self.mask_planes[name]
        used = set(self.mask_planes.values())
        free = [b for b in range(MAX_MASK_PLANES) if b not in used]
        if not free:
            raise ConfigError(f"cannot add mask plane {name!r}: all {MAX_MASK_PLANES} mask "
                              f"bits are used ({sorted(self.mask_planes)})")
        planes = dict(self.mask_planes)
        planes[name] = free[0]
        self.mask_planes = _check_planes(planes)
        return free[0]

    # -- copies ------------------------------------------------------------------------------
    def subimage(self, x0, y0, x1, y1):
        """Return a copy of the half-open parent box ``x in [x0, x1), y in [y0, y1)``.

        Parameters
        ----------
        x0, y0, x1, y1 : int
            Box corners in parent coordinates.

        Returns
        -------
        MaskedImage
            Independent arrays, ``xy0 == (x0, y0)``, same mask planes.

        Raises
        ------
        ImageShapeMismatchError
            If the box is empty or not entirely inside :attr:`bbox`.
        """
        x0, y0, x1, y1 = (operator.index(v) for v in (x0, y0, x1, y1))
        bx0, by0, bx1, by1 = self.bbox
        if not (bx0 <= x0 < x1 <= bx1 and by0 <= y0 < y1 <= by1):
            raise ImageShapeMismatchError(
                f"subimage box x in [{x0}, {x1}), y in [{y0}, {y1}) (parent coordinates) is "
                f"empty or not inside the image bbox x in [{bx0}, {bx1}), y in [{by0}, {by1}); "
                f"clip the box to the image")
        sy = slice(y0 - by0, y1 - by0)
        sx = slice(x0 - bx0, x1 - bx0)
        return MaskedImage(self.image[sy, sx].copy(), self.mask[sy, sx].copy(),
                           self.variance[sy, sx].copy(), xy0=(x0, y0),
                           mask_planes=self.mask_planes)

    def copy(self):
        """Return a deep copy (new arrays, new plane dictionary)."""
        return MaskedImage(self.image.copy(), self.mask.copy(), self.variance.copy(),
                           xy0=self.xy0, mask_planes=self.mask_planes)

    def __repr__(self):
        return (f"MaskedImage(shape={self.shape}, xy0={self.xy0}, "
                f"planes={len(self.mask_planes)})")


def _flatten_names(names):
    for n in names:
        if isinstance(n, str):
            yield n
        else:
            yield from _flatten_names(n)


class Exposure:
    """A :class:`MaskedImage` with its WCS, PSF width, photometric scale and metadata.

    Parameters
    ----------
    masked_image : MaskedImage
        The pixels (kept, not copied).
    wcs : astropy.wcs.WCS or None
        Celestial WCS in **parent** pixel coordinates (0-based); None when unknown.
    psf_fwhm : float or None
        PSF full width at half maximum in pixels.
    phot_scale : float or None
        Photometric scale (flux per count); None when unknown.
    metadata : astropy.io.fits.Header or mapping, optional
        FITS metadata; an empty Header when None.

    Raises
    ------
    TypeError
        If ``masked_image`` is not a MaskedImage or ``wcs`` not an astropy WCS.
    ConfigError
        If ``psf_fwhm`` or ``phot_scale`` is not a positive finite number.
    """

    def __init__(self, masked_image, wcs=None, psf_fwhm=None, phot_scale=None, metadata=None):
        if not isinstance(masked_image, MaskedImage):
            raise TypeError(f"masked_image must be a diffim MaskedImage, "
                            f"got {type(masked_image).__name__}")
        if wcs is not None and not isinstance(wcs, WCS):
            raise TypeError(f"wcs must be an astropy.wcs.WCS or None, got {type(wcs).__name__}")
        self.masked_image = masked_image
        self.wcs = wcs
        self.psf_fwhm = psf_fwhm
        self.phot_scale = phot_scale
        if metadata is None:
            metadata = fits.Header()
        elif not isinstance(metadata, fits.Header):
            metadata = _to_header(metadata)
        self.metadata = metadata

    @property
    def psf_fwhm(self):
        """PSF FWHM in pixels, or None."""
        return self._psf_fwhm

    @psf_fwhm.setter
    def psf_fwhm(self, value):
        self._psf_fwhm = _check_positive(value, "psf_fwhm")

    @property
    def phot_scale(self):
        """Photometric scale, or None."""
        return self._phot_scale

    @phot_scale.setter
    def phot_scale(self, value):
        self._phot_scale = _check_positive(value, "phot_scale")

    # Forwarders, so most code can take either an Exposure or a MaskedImage.
    @property
    def image(self):
        """The image array of :attr:`masked_image`."""
        return self.masked_image.image

    @property
    def mask(self):
        """The mask array of :attr:`masked_image`."""
        return self.masked_image.mask

    @property
    def variance(self):
        """The variance array of :attr:`masked_image`."""
        return self.masked_image.variance

    @property
    def mask_planes(self):
        """The mask-plane dictionary of :attr:`masked_image`."""
        return self.masked_image.mask_planes

    @property
    def xy0(self):
        """Parent coordinates ``(x0, y0)`` of pixel ``[0, 0]``."""
        return self.masked_image.xy0

    @property
    def shape(self):
        """(ny, nx)."""
        return self.masked_image.shape

    @property
    def bbox(self):
        """Half-open parent box ``(x0, y0, x1, y1)``."""
        return self.masked_image.bbox

    def subimage(self, x0, y0, x1, y1):
        """Return an Exposure of the parent box (see :meth:`MaskedImage.subimage`).

        The WCS (parent coordinates) and metadata are copied unchanged.
        """
        return Exposure(self.masked_image.subimage(x0, y0, x1, y1),
                        wcs=None if self.wcs is None else self.wcs.deepcopy(),
                        psf_fwhm=self.psf_fwhm, phot_scale=self.phot_scale,
                        metadata=self.metadata.copy())

    def copy(self):
        """Return a deep copy (pixels, WCS and metadata)."""
        return Exposure(self.masked_image.copy(),
                        wcs=None if self.wcs is None else self.wcs.deepcopy(),
                        psf_fwhm=self.psf_fwhm, phot_scale=self.phot_scale,
                        metadata=self.metadata.copy())

    def __repr__(self):
        return (f"Exposure(shape={self.shape}, xy0={self.xy0}, wcs={self.wcs is not None}, "
                f"psf_fwhm={self.psf_fwhm}, phot_scale={self.phot_scale})")


# ---------------------------------------------------------------------------------------------
# helpers shared by reading and writing
# ---------------------------------------------------------------------------------------------

def _shift_wcs(wcs, dx, dy):
    """Return a copy of ``wcs`` for pixel coordinates shifted by ``(+dx, +dy)``.

    ``new(x + dx, y + dy) == old(x, y)``.  SIP polynomials are expressed relative to CRPIX,
    so moving CRPIX (in both the core WCS and the SIP object) shifts them exactly.
    """
    out = wcs.deepcopy()
    if dx == 0 and dy == 0:
        return out
    out.wcs.crpix = out.wcs.crpix + np.array([dx, dy], dtype=float)
    if out.sip is not None:
        s = out.sip
        out.sip = Sip(s.a, s.b, s.ap, s.bp, s.crpix + np.array([dx, dy], dtype=float))
    if any(getattr(out, n, None) is not None for n in ("cpdis1", "cpdis2", "det2im1", "det2im2")):
        log.warning("WCS lookup-table distortions (CPDIS/D2IM) are not shifted to the new "
                    "pixel origin; the WCS may be off by the origin shift")
    out.wcs.set()
    return out


def _clean_metadata(header, drop_wcs=True):
    """Copy of ``header`` without structural, diffim-reserved and (optionally) WCS cards.

    Cards are re-parsed from their text so the copy shares no Card object with ``header``
    (astropy mutates cards in place when it fixes them on output).
    """
    out = fits.Header()
    for card in header.cards:
        key = card.keyword.upper()
        keep = key in ("COMMENT", "HISTORY", "") or not (
            _STRUCTURAL_RE.match(key) or key in _RESERVED_KEYS
            or (drop_wcs and _WCS_RE.match(key)))
        if keep:
            out.append(fits.Card.fromstring(card.image), bottom=True)
    return out


def _header_number(header, keys):
    """First finite numeric value among ``keys``; returns (key, value, comment) or None."""
    for key in keys:
        if key not in header:
            continue
        value = header[key]
        if isinstance(value, bool):
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            log.debug("header keyword %s=%r is not a number; ignored", key, value)
            continue
        if math.isfinite(v):
            return key, v, header.comments[key]
    return None


def _to_header(mapping):
    """Header from a mapping whose values are ``value`` or ``(value, comment)``."""
    hdr = fits.Header()
    for key, value in dict(mapping).items():
        hdr[key] = value
    return hdr


def _exact_float_card(key, value, comment):
    """A header card whose value reads back bit-exactly (astropy rounds some to 15 digits)."""
    text = repr(float(value)).upper()
    return fits.Card.fromstring(f"{key:<8}= {text:>20} / {comment}")


# ---------------------------------------------------------------------------------------------
# write_fits
# ---------------------------------------------------------------------------------------------

def write_fits(obj, path, *, extra_header=None):
    """Write an Exposure or MaskedImage as a multi-extension FITS file, atomically.

    The file is written to a temporary file in the destination directory and renamed over
    ``path`` only when complete, so ``path`` is never left partially written and an existing
    file survives a failed write.  Reading it back with :func:`read_fits` gives identical
    arrays, ``xy0``, mask planes, PSF FWHM and photometric scale, and an equivalent WCS.
    See the module docstring for the layout.

    Parameters
    ----------
    obj : Exposure or MaskedImage
        What to write.
    path : str or os.PathLike
        Destination; replaced if it exists.
    extra_header : astropy.io.fits.Header or mapping, optional
        Additional cards for the primary header.

    Raises
    ------
    TypeError
        If ``obj`` is neither an Exposure nor a MaskedImage.
    ConfigError
        If ``extra_header`` sets a structural or diffim-reserved keyword.
    OSError
        If the file cannot be written (the destination is then unchanged).
    """
    if isinstance(obj, Exposure):
        exposure = obj
    elif isinstance(obj, MaskedImage):
        exposure = Exposure(obj)
    else:
        raise TypeError(f"write_fits needs an Exposure or MaskedImage, got {type(obj).__name__}")
    mi = exposure.masked_image
    path = os.fspath(path)
    x0, y0 = mi.xy0

    primary = fits.PrimaryHDU()
    hdr = primary.header
    for card in _clean_metadata(exposure.metadata).cards:
        hdr.append(card, bottom=True)
    hdr["DIFFIMV"] = (__version__, "diffim version that wrote this file")
    hdr["XY0X"] = (x0, "parent x coordinate of pixel [0, 0]")
    hdr["XY0Y"] = (y0, "parent y coordinate of pixel [0, 0]")
    if exposure.psf_fwhm is not None:
        hdr.append(_exact_float_card("PSFFWHM", exposure.psf_fwhm, "PSF FWHM [pixel]"))
    if exposure.phot_scale is not None:
        hdr.append(_exact_float_card("PHOTSCAL", exposure.phot_scale, "photometric scale"))
    if extra_header:
        extra = (extra_header if isinstance(extra_header, fits.Header)
                 else _to_header(extra_header))
        for card in extra.cards:
            key = card.keyword.upper()
            if _STRUCTURAL_RE.match(key) or key in _RESERVED_KEYS:
                raise ConfigError(f"extra_header may not set {card.keyword!r}: it is a "
                                  f"structural or diffim-reserved keyword; rename it")
            if key in ("COMMENT", "HISTORY", ""):
                hdr.append(card, bottom=True)
            else:
                hdr[card.keyword] = (card.value, card.comment)

    img_hdr = fits.Header()
    if exposure.wcs is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            img_hdr.update(_shift_wcs(exposure.wcs, -x0, -y0).to_header(relax=True))
    # IRAF physical coordinates = parent coordinates, for viewers such as ds9.
    img_hdr["LTV1"] = (-x0, "array = parent + LTV (IRAF convention)")
    img_hdr["LTV2"] = (-y0, "array = parent + LTV (IRAF convention)")
    img_hdr["LTM1_1"] = 1.0
    img_hdr["LTM2_2"] = 1.0

    mask_hdr = fits.Header()
    for name, bit in sorted(mi.mask_planes.items(), key=lambda kv: kv[1]):
        mask_hdr[f"HIERARCH MP_{name}"] = (bit, "mask plane bit")

    # Big-endian copies: astropy would otherwise byteswap the caller's arrays in place while
    # writing, which fails on read-only arrays and is visible to other threads.
    hdul = fits.HDUList([
        primary,
        fits.ImageHDU(mi.image.astype(">f4"), img_hdr, name="IMAGE"),
        fits.ImageHDU(mi.mask.astype(">i4"), mask_hdr, name="MASK"),
        fits.ImageHDU(mi.variance.astype(">f4"), name="VARIANCE"),
    ])

    with atomic_open(path) as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        hdul.writeto(fh, output_verify="silentfix", checksum=True)
    log.debug("wrote %s (%dx%d, xy0=%s)", path, mi.shape[1], mi.shape[0], mi.xy0)


# ---------------------------------------------------------------------------------------------
# read_fits
# ---------------------------------------------------------------------------------------------

def read_fits(path, *, hdu=None):
    """Read a FITS image into an :class:`Exposure`.

    Two kinds of file are understood:

    * **diffim/afw multi-extension files** with ``IMAGE``, ``MASK`` and ``VARIANCE``
      extensions (when ``hdu`` is None): the planes are read as written; mask-plane names come
      from the ``MP_<NAME>`` cards of the MASK header, ``xy0`` from ``XY0X/XY0Y`` (or the
      IRAF ``LTV1/LTV2`` of the IMAGE header), PSF FWHM from ``PSFFWHM`` and the photometric
      scale from ``PHOTSCAL``.
    * **plain images**: the HDU ``hdu``, or else the first HDU holding 2-D image data
      (tile-compressed ``.fz`` images included).  Data of any BITPIX is scaled by
      BZERO/BSCALE and converted to native float32.  Masks and variance are derived:

      - non-finite and BLANK pixels: image 0, ``NO_DATA``, variance ``inf``;
      - ``SAT`` where the pixel is >= the first of ESATUR, SATURATE, SATLEVEL, SATUR; for
        integer data without such a keyword, at the largest value the integer type can hold
        (e.g. 65535 for uint16 stored with BZERO = 32768), or at a lower clip level if the
        image maximum is a plateau of >= 3 pixels in the upper half of the range (data
        processed after clipping, e.g. flat-fielded);
      - variance from a sep background (mesh 64 px, NO_DATA and SAT pixels excluded), with
        background ``B`` and background rms ``s``.  With a gain ``g`` (GAIN, EGAIN or GAINEFF,
        e-/ADU) and read noise ``r`` (RDNOISE, READNOIS or RON, electrons; 0 if absent) the
        sky model is ``M = (r/g)**2 + max(B, 0)/g``.  The pixel-to-pixel (white) noise is
        measured on sky pixels with a Laplacian filter and compared with ``M``:

        * ratio ``q <= 1.5`` (a raw image: the keywords describe the noise)::

              var = (r/g)**2 + max(image, 0)/g  [+ (q**2 - 1.05**2) * M_sky if q > 1.05]

          i.e. the usual CCD noise model, plus any measured sky-noise excess beyond what
          stars leaking into the measurement explain (``M_sky``: median model variance of the
          sky pixels).  sep's ``s`` is not used here because in crowded fields it measures
          the confusion of blended stars (up to 8x the pixel noise on the SAAO bulge frames),
          which cancels in a difference image;
        * otherwise (a sky-subtracted image, whose removed sky's Poisson noise is absent from
          the pixel values but present in ``s``; or inconsistent keywords)::

              var = max(s**2, M) + max(image - B, 0)/g

          which is honest for sky-subtracted images (conservative if they are also crowded).

        Without a gain ``var = s**2`` and a warning is logged, because the Poisson noise of
        sources is then missing.  Finite pixels get at least a tiny positive variance.

      PSF FWHM comes from FWHM, SEEING or PFWHM (pixels; a value whose comment says arcsec is
      converted with the WCS pixel scale), the photometric scale from PHOTSCAL, and the WCS
      from the header when it has ``CTYPE1``/``CTYPE2``.  ``metadata`` holds the header
      (primary header merged with the image HDU's) without structural and WCS keywords.

    The file is opened read-only and never modified.

    Parameters
    ----------
    path : str or os.PathLike
        FITS file (may be gzip-compressed or tile-compressed).
    hdu : int, str or (str, int), optional
        HDU to read as a plain image (index, EXTNAME or (EXTNAME, EXTVER)).

    Returns
    -------
    Exposure
        ``xy0 == (0, 0)`` for plain images.

    Raises
    ------
    ImageReadError
        The file is missing, a directory, unreadable, truncated or corrupt; the chosen HDU
        has no data or non-2-D data; the planes of a multi-extension file disagree; or the
        header WCS is invalid.  The message names the file and the problem.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageReadError(f"cannot read FITS file {path!r}: it does not exist")
    if os.path.isdir(path):
        raise ImageReadError(f"cannot read FITS file {path!r}: it is a directory")
    if not os.access(path, os.R_OK):
        raise ImageReadError(f"cannot read FITS file {path!r}: permission denied")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, mode="readonly", memmap=False, lazy_load_hdus=False)
        except Exception as exc:
            raise ImageReadError(
                f"cannot read FITS file {path!r}: not a valid FITS file or corrupt "
                f"({type(exc).__name__}: {exc})") from exc
    with hdul:
        _raise_if_truncated(path, caught)
        if hdu is None and _is_masked_image_file(hdul):
            return _read_mef(path, hdul)
        return _read_plain(path, hdul, hdu)


def _raise_if_truncated(path, caught):
    """Turn astropy's truncation warning into an error; log the other warnings it raised."""
    for w in caught:
        text = str(w.message)
        if "truncated" in text.lower():
            raise ImageReadError(f"cannot read FITS file {path!r}: file is truncated ({text})")
        log.debug("%s: astropy: %s", path, text)


def _hdu_label(hdul, index):
    name = hdul[index].name
    return f"HDU {index}" + (f" ({name})" if name and name != "PRIMARY" else "")


def _load_data(path, hdul, index):
    """Data of HDU ``index`` (scaled by astropy), with read problems turned into ImageReadError."""
    h = hdul[index]
    label = _hdu_label(hdul, index)
    if not isinstance(h, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
        raise ImageReadError(f"cannot read FITS file {path!r}: {label} is a "
                             f"{type(h).__name__}, not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = h.data
        except Exception as exc:
            raise ImageReadError(
                f"cannot read FITS file {path!r}: data of {label} is unreadable, the file "
                f"is probably truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    _raise_if_truncated(path, caught)
    if data is None or data.size == 0:
        raise ImageReadError(f"cannot read FITS file {path!r}: {label} has no data")
    if data.ndim != 2:
        raise ImageReadError(f"cannot read FITS file {path!r}: {label} has {data.ndim}-D data "
                             f"of shape {data.shape}; diffim needs a 2-D image")
    return data


def _is_masked_image_file(hdul):
    names = {h.name.upper() for h in hdul}
    return all(n in names for n in _EXTNAMES)


def _read_wcs(path, header, hdul, label):
    """Celestial WCS of ``header`` or None; ImageReadError if the header WCS is invalid."""
    if not any(k in header for k in ("CTYPE1", "CTYPE2")):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            warnings.simplefilter("ignore", AstropyWarning)
            wcs = WCS(header, fobj=hdul, relax=True, naxis=2)
            if not wcs.has_celestial:
                log.debug("%s: %s WCS is not celestial (CTYPE %s); ignored", path, label,
                          list(wcs.wcs.ctype))
                return None
            # wcslib defers some checks to the first transform, so try one now.
            nx = header.get("NAXIS1", header.get("ZNAXIS1", 1))
            ny = header.get("NAXIS2", header.get("ZNAXIS2", 1))
            centre = np.array([[0.5 * (nx - 1), 0.5 * (ny - 1)]])
            world = wcs.all_pix2world(centre, 0)
            back = None
            if np.all(np.isfinite(world)):
                # a singular CD/PC matrix maps pixels to the sky but not back; the warp
                # needs both directions
                back = wcs.all_world2pix(world, 0)
    except Exception as exc:
        detail = " ".join(str(exc).split())
        raise ImageReadError(f"cannot read FITS file {path!r}: the WCS in the {label} header is "
                             f"invalid ({type(exc).__name__}: {detail}); fix or remove the "
                             f"WCS keywords") from exc
    if not np.all(np.isfinite(world)):
        raise ImageReadError(f"cannot read FITS file {path!r}: the WCS in the {label} header "
                             f"gives non-finite sky coordinates at the image centre; fix or "
                             f"remove the WCS keywords")
    if not (np.all(np.isfinite(back)) and np.max(np.abs(back - centre)) < 1e-3):
        raise ImageReadError(f"cannot read FITS file {path!r}: the WCS in the {label} header "
                             f"cannot be inverted (its CD/PC matrix is singular: sky "
                             f"coordinates do not map back to pixels); fix or remove the WCS "
                             f"keywords")
    return wcs


def _read_mef(path, hdul):
    arrays = []
    for name in _EXTNAMES:
        index = hdul.index_of(name)
        arrays.append(_load_data(path, hdul, index))
    image, mask, variance = arrays
    if not image.shape == mask.shape == variance.shape:
        raise ImageReadError(f"cannot read FITS file {path!r}: IMAGE {image.shape}, MASK "
                             f"{mask.shape} and VARIANCE {variance.shape} shapes differ")
    primary = hdul[0].header
    img_hdr = hdul["IMAGE"].header
    mask_hdr = hdul["MASK"].header

    try:
        if "XY0X" in primary or "XY0Y" in primary:
            xy0 = (int(primary.get("XY0X", 0)), int(primary.get("XY0Y", 0)))
        elif str(img_hdr.get("CTYPE1A", "")).strip().upper() == "LINEAR" and \
                "CRVAL1A" in img_hdr:
            # afw records xy0 as an alternate "A" WCS.
            xy0 = (int(round(img_hdr["CRVAL1A"])), int(round(img_hdr.get("CRVAL2A", 0))))
        else:
            xy0 = (-int(round(img_hdr.get("LTV1", 0))), -int(round(img_hdr.get("LTV2", 0))))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ImageReadError(f"cannot read FITS file {path!r}: the image origin keywords "
                             f"(XY0X/XY0Y, CRVAL1A/CRVAL2A or LTV1/LTV2) are not integers "
                             f"({exc}); fix or remove them") from exc

    planes = {}
    for card in mask_hdr.cards:
        if card.keyword.upper().startswith("MP_"):
            planes[card.keyword[3:]] = card.value
    try:
        mi = MaskedImage(image, mask, variance, xy0=xy0, mask_planes=planes or None)
    except (ConfigError, ImageShapeMismatchError) as exc:
        raise ImageReadError(f"cannot read FITS file {path!r}: invalid mask planes in the MASK "
                             f"header ({exc})") from exc

    _warn_unusable_variance(path, mi)
    wcs = _read_wcs(path, img_hdr, hdul, "IMAGE")
    if wcs is not None:
        wcs = _shift_wcs(wcs, xy0[0], xy0[1])
    try:
        psf_fwhm = primary.get("PSFFWHM")
        phot_scale = primary.get("PHOTSCAL")
        exposure = Exposure(mi, wcs=wcs, psf_fwhm=psf_fwhm, phot_scale=phot_scale,
                            metadata=_clean_metadata(primary))
    except ConfigError as exc:
        raise ImageReadError(f"cannot read FITS file {path!r}: {exc}") from exc
    log.debug("read %s: multi-extension %dx%d, xy0=%s", path, image.shape[1], image.shape[0],
              xy0)
    return exposure


def _warn_unusable_variance(path, mi):
    """Log what a stored VARIANCE plane gives no weight to (it is kept as written)."""
    data_ok = np.isfinite(mi.image)
    with np.errstate(invalid="ignore"):
        bad = data_ok & ~(np.isfinite(mi.variance) & (mi.variance > 0))
    n_bad = int(np.count_nonzero(bad))
    if n_bad == 0:
        return
    if n_bad == int(np.count_nonzero(data_ok)):
        log.warning("%s: the VARIANCE plane has no finite positive value where the image has "
                    "data; no pixel can be weighted and PSF matching will find no usable "
                    "kernel candidate", path)
    else:
        log.warning("%s: %d pixels with data have a zero, negative or non-finite variance; "
                    "they get no weight", path, n_bad)


def _select_plain_hdu(path, hdul, hdu):
    if hdu is not None:
        try:
            index = hdul.index_of(hdu)
            hdul[index]
        except (KeyError, IndexError) as exc:
            names = [h.name for h in hdul]
            raise ImageReadError(f"cannot read FITS file {path!r}: it has no HDU {hdu!r}; its "
                                 f"{len(hdul)} HDUs are {names}") from exc
        return index
    found = []
    for index, h in enumerate(hdul):
        if not isinstance(h, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            continue
        # The header tells the dimensionality without decompressing or reading the data.
        naxis = h.header.get("NAXIS", 0)
        dims = [h.header.get(f"NAXIS{i}", 0) for i in range(1, naxis + 1)]
        if naxis == 0 or any(d == 0 for d in dims):
            continue
        if naxis == 2:
            return index
        found.append(f"{_hdu_label(hdul, index)} is {naxis}-D {tuple(reversed(dims))}")
    detail = "; ".join(found) if found else "no HDU has image data"
    raise ImageReadError(f"cannot read FITS file {path!r}: no 2-D image found ({detail}); "
                         f"diffim needs a 2-D image")


def _integer_max(raw, header):
    """Largest physical value representable by the file's integer encoding, or None."""
    if raw.dtype.kind in "iu":
        return float(np.iinfo(raw.dtype).max)
    bitpix = header.get("BITPIX", -32)
    if isinstance(bitpix, int) and bitpix > 0:
        # Scaled integers (BSCALE != 1) arrive as floats; undo the scaling of the raw maximum.
        raw_max = 255 if bitpix == 8 else 2 ** (bitpix - 1) - 1
        return raw_max * float(header.get("BSCALE", 1.0)) + float(header.get("BZERO", 0.0))
    return None


def _clip_plateau(image, nodata, int_max):
    """Saturation level of integer data without a saturation keyword.

    Saturated pixels sit at the largest value the encoding can hold, unless processing
    moved the clip level: the SAAO frames were bias-subtracted and flat-fielded after the
    ADC clipped, so their saturated cores are a plateau at 65300, not 65535.  A maximum
    value shared by several pixels in the upper half of the range is such a plateau (for
    unsaturated data, whose bright pixels are spread over thousands of values, the maximum
    essentially never repeats).
    """
    good = image[~nodata]
    if good.size == 0:
        return int_max
    top = float(good.max())
    if top < int_max and top >= 0.5 * int_max and int(np.count_nonzero(good == top)) >= \
            _MIN_PLATEAU_PIXELS:
        log.debug("integer image clipped at %g (below the type maximum %g); using it as the "
                  "saturation level", top, int_max)
        return top
    return int_max


def _background(path, image, bad):
    """sep background and rms maps (float32); robust global values if sep fails."""
    ny, nx = image.shape
    try:
        bkg = sep.Background(image, mask=bad.astype(np.uint8),
                             bw=min(_BACKGROUND_BOX, nx), bh=min(_BACKGROUND_BOX, ny))
        return bkg.back(dtype=np.float32), bkg.rms(dtype=np.float32)
    except Exception as exc:
        log.warning("%s: sep background failed (%s); using a global median and MAD instead",
                    path, exc)
        good = image[~bad]
        med = np.median(good)
        rms = 1.4826 * np.median(np.abs(good - med))
        return (np.full(image.shape, med, dtype=np.float32),
                np.full(image.shape, rms, dtype=np.float32))


def _white_noise_ratio(image, bad, bkg, g, rn):
    """Robust ratio of the measured pixel-to-pixel noise to the gain/read-noise sky model.

    The noise is measured with the 5-point Laplacian ``(4c - N - S - E - W) / sqrt(20)``,
    which has the pixel variance for white noise but cancels smooth structure, so blended
    stars in crowded fields (which inflate sep's rms several-fold) barely enter.  It is
    sampled on pixels whose 3x3 mean is at or below the background; for Gaussian noise the
    Laplacian is uncorrelated with the 3x3 sum, so this selection picks sky-dominated pixels
    without biasing the estimate.

    Returns
    -------
    ratio : float
        Robust std of ``Laplacian / sqrt(model)``; NaN if too few pixels qualify.
    sky_model : float
        Median model variance of the sampled sky pixels.
    """
    c = image[1:-1, 1:-1]
    lap = (4.0 * c - image[1:-1, :-2] - image[1:-1, 2:] - image[:-2, 1:-1]
           - image[2:, 1:-1]) / np.float32(math.sqrt(20.0))
    mean3 = uniform_filter(image, 3, mode="nearest")[1:-1, 1:-1]
    near_bad = (bad[1:-1, 1:-1] | bad[1:-1, :-2] | bad[1:-1, 2:] | bad[:-2, 1:-1]
                | bad[2:, 1:-1])
    sel = (mean3 <= bkg[1:-1, 1:-1]) & ~near_bad
    n = int(sel.sum())
    if n < _MIN_NOISE_PIXELS:
        return float("nan"), float("nan")
    # Every k-th selected pixel is plenty for a median and keeps large images fast.
    step = max(1, n // 1_000_000)
    lap_s = lap[sel][::step].astype(np.float64)
    model = (rn / g) ** 2 + np.maximum(mean3[sel][::step], 0.0) / g
    z = lap_s / np.sqrt(np.maximum(model, 1e-30))
    return float(1.4826 * np.median(np.abs(z - np.median(z)))), float(np.median(model))


def _gain_variance(path, image, bad, bkg, rms, gain, rn):
    """Variance of a plain image whose header gives the gain (see :func:`read_fits`)."""
    key, g = gain[0], gain[1]
    inv_g = np.float32(1.0 / g)
    read_var = np.float32((rn / g) ** 2)
    sky_model = read_var + np.maximum(bkg, 0) * inv_g
    ratio, sky_sel = _white_noise_ratio(image, bad, bkg, g, rn)
    if math.isfinite(ratio) and ratio <= _MODEL_TRUST_RATIO:
        # The keyword model describes the measured noise: a raw (not sky-subtracted) image.
        # Use the model on the pixel value itself, as a CCD reduction would, rather than
        # sep's rms, which in crowded fields measures the confusion of blended stars (they
        # cancel in a difference image), and rather than the background map, which there
        # sits above the sky level.
        variance = read_var + np.maximum(image, 0) * inv_g
        # Sky noise measured beyond the model and beyond what star structure leaking through
        # the Laplacian can explain (a sky-subtracted, read-noise-dominated image, or a gain
        # keyword slightly off) is added as a constant.
        excess = ratio ** 2 - _LEAKAGE_RATIO ** 2
        if excess > 0:
            variance = variance + np.float32(excess * sky_sel)
        branch = "gain/read-noise model"
    else:
        # The pixels are noisier than the model allows: the sky was subtracted (its Poisson
        # noise is no longer in the pixel values) or the keywords are wrong.  The background
        # rms then carries the sky noise.
        variance = np.maximum(rms * rms, sky_model) + np.maximum(image - bkg, 0) * inv_g
        branch = "background rms (sky-subtracted image or inconsistent gain keywords)"
    log.debug("%s: %s=%g, read noise %g e-, measured/model sky noise %.3f -> variance from %s",
              path, key, g, rn, ratio, branch)
    return variance


def _read_plain(path, hdul, hdu):
    index = _select_plain_hdu(path, hdul, hdu)
    raw = _load_data(path, hdul, index)
    label = _hdu_label(hdul, index)
    h = hdul[index]
    header = h.header
    if index == 0:
        merged = header.copy()
    else:
        # Primary keywords are defaults that the image HDU overrides (FITS INHERIT practice;
        # .fz files keep the observation keywords in either place).
        merged = _clean_metadata(hdul[0].header, drop_wcs=False)
        for card in header.cards:
            key = card.keyword.upper()
            if key in ("COMMENT", "HISTORY", ""):
                merged.append(card, bottom=True)
            else:
                merged[card.keyword] = (card.value, card.comment)

    with np.errstate(over="ignore", invalid="ignore"):
        image = np.array(raw, dtype=np.float32, order="C")
    nodata = ~np.isfinite(image)
    if raw.dtype.kind in "iu" and "BLANK" in header:
        # astropy leaves BLANK in unscaled integer data (and in BZERO-unsigned data).
        try:
            blank = int(header["BLANK"]) * float(header.get("BSCALE", 1.0)) + \
                float(header.get("BZERO", 0.0))
            nodata |= raw == blank
        except (TypeError, ValueError):
            log.debug("%s: BLANK=%r is not an integer; ignored", path, header["BLANK"])
    if nodata.all():
        raise ImageReadError(f"cannot read FITS file {path!r}: {label} has no finite pixel")

    sat_key = _header_number(merged, _SATURATION_KEYS)
    if sat_key is not None:
        sat_level = sat_key[1]
    else:
        sat_level = _integer_max(raw, header)
        if sat_level is not None:
            sat_level = _clip_plateau(image, nodata, sat_level)
    sat = np.zeros(image.shape, dtype=bool)
    if sat_level is not None:
        with np.errstate(invalid="ignore"):
            sat = (image >= np.float32(sat_level)) & ~nodata
    image[nodata] = 0.0

    planes = dict(DEFAULT_MASK_PLANES)
    mask = np.zeros(image.shape, dtype=np.int32)
    mask[nodata] |= np.int32(1 << planes["NO_DATA"])
    mask[sat] |= np.int32(1 << planes["SAT"])

    bkg, rms = _background(path, image, nodata | sat)
    gain = _header_number(merged, _GAIN_KEYS)
    noise_source = "the background rms"
    with np.errstate(over="ignore", invalid="ignore"):
        if gain is not None and gain[1] > 0:
            rn_key = _header_number(merged, _READ_NOISE_KEYS)
            rn = abs(rn_key[1]) if rn_key is not None else 0.0
            noise_source = (f"the noise keywords ({gain[0]}={gain[1]:g}, "
                            f"{rn_key[0] if rn_key else 'RDNOISE'}={rn:g})")
            variance = _gain_variance(path, image, nodata | sat, bkg, rms, gain, rn)
        else:
            variance = rms * rms
            log.warning("%s: no positive GAIN/EGAIN/GAINEFF keyword; the variance is the "
                        "background rms squared and does not include the Poisson noise of "
                        "sources", path)
        variance = np.maximum(variance, _VARIANCE_FLOOR).astype(np.float32, copy=False)
    if not np.all(np.isfinite(variance[~nodata])):
        raise ImageReadError(
            f"cannot read FITS file {path!r}: {noise_source} of {label} give a non-finite "
            f"variance (pixel values up to {float(np.abs(image).max()):.3g}); check the "
            f"pixel values and the GAIN/RDNOISE keywords")
    variance[nodata] = np.inf
    has_data = ~nodata
    lo = float(np.min(image, where=has_data, initial=np.inf))
    if lo == float(np.max(image, where=has_data, initial=-np.inf)):
        log.warning("%s: %s is constant (every pixel with data is %g); no source can be "
                    "detected in it", path, label, lo)

    mi = MaskedImage(image, mask, variance, xy0=(0, 0), mask_planes=planes)

    wcs_header = header
    if index != 0 and not any(k in header for k in ("CTYPE1", "CTYPE2")):
        wcs_header = merged
    wcs = _read_wcs(path, wcs_header, hdul, label)

    psf_fwhm = _read_fwhm(path, merged, wcs)
    phot = _header_number(merged, ("PHOTSCAL",))
    phot_scale = phot[1] if phot is not None and phot[1] > 0 else None
    metadata = _clean_metadata(merged)
    if psf_fwhm is not None:
        # a seeing keyword is only a hint: the task measures the PSF from stars when it can
        metadata["FWHMSRC"] = ("header", "psf_fwhm is a header hint, not a measurement")
    exposure = Exposure(mi, wcs=wcs, psf_fwhm=psf_fwhm, phot_scale=phot_scale,
                        metadata=metadata)
    log.debug("read %s %s: %dx%d %s, %d NO_DATA, %d SAT, psf_fwhm=%s", path, label,
              image.shape[1], image.shape[0], raw.dtype, int(nodata.sum()), int(sat.sum()),
              psf_fwhm)
    return exposure


def _read_fwhm(path, header, wcs):
    for key in _FWHM_KEYS:
        found = _header_number(header, (key,))
        if found is None or found[1] <= 0:
            continue
        _, value, comment = found
        if "arcsec" in comment.lower() or '"' in comment:
            if wcs is None:
                log.debug("%s: %s=%g is in arcsec and there is no WCS to convert it", path,
                          key, value)
                continue
            scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0
            return value / scale
        return value
    return None
