"""Tests of diffim.image: containers, FITS round trip, plain-image reading and noise model."""

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import sep
from astropy.io import fits
from astropy.wcs import WCS
from scipy.ndimage import binary_dilation, gaussian_filter, uniform_filter

from diffim import __version__
from diffim.exceptions import ConfigError, ImageReadError, ImageShapeMismatchError
from diffim.image import (
    DEFAULT_MASK_PLANES,
    Exposure,
    MaskedImage,
    read_fits,
    write_fits,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DECAM = DATA / "decam_sfft" / "input" / "DEC-OBS04a.mini.fits"
SAAO = DATA / "saao_kb13475" / "AKB13475I0100.fits"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _tan_wcs(crpix=(50.0, 60.0), sip=False):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = list(crpix)
    w.wcs.cd = np.array([[-7.0e-5, 1.0e-6], [1.2e-6, 7.1e-5]])
    w.wcs.set()
    if sip:
        from astropy.wcs import Sip
        a = np.zeros((3, 3))
        b = np.zeros((3, 3))
        a[2, 0] = 2e-6
        a[1, 1] = -1e-6
        b[0, 2] = 3e-6
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return w


def _write_plain(path, data, **cards):
    hdr = fits.Header()
    for k, v in cards.items():
        hdr[k] = v
    fits.PrimaryHDU(data, hdr).writeto(path, overwrite=True)
    return path


def _simulate(*, shape=(256, 256), sky=1000.0, gain=2.0, rn=5.0, n_stars=25, fwhm=3.0,
              flux=(2e3, 2e5), seed=0):
    """Raw CCD image in ADU: Poisson electrons + Gaussian read noise.  Returns (image,
    true variance, noiseless source image)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    pts = np.zeros(shape)
    ys = rng.integers(4, ny - 4, n_stars)
    xs = rng.integers(4, nx - 4, n_stars)
    np.add.at(pts, (ys, xs), 10 ** rng.uniform(np.log10(flux[0]), np.log10(flux[1]), n_stars))
    src = gaussian_filter(pts, fwhm / 2.3548, mode="constant")
    electrons = rng.poisson(gain * (sky + src)) + rng.normal(0.0, rn, shape)
    image = electrons / gain
    true_var = (rn / gain) ** 2 + (sky + src) / gain
    return image, true_var, src


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _wcs_close(w1, w2, shape, offset=(0, 0)):
    """Max sky separation (deg) between w1(x, y) and w2(x + dx, y + dy) over a grid."""
    y, x = np.mgrid[0:shape[0]:7, 0:shape[1]:7]
    a = np.array(w1.all_pix2world(x, y, 0))
    b = np.array(w2.all_pix2world(x + offset[0], y + offset[1], 0))
    return np.abs(a - b).max()


# ---------------------------------------------------------------------------------------------
# MaskedImage / Exposure
# ---------------------------------------------------------------------------------------------

def test_masked_image_defaults_and_dtypes():
    img = np.ones((4, 5), dtype=np.float32)
    mi = MaskedImage(img)
    assert mi.image is img  # no copy for float32 C-contiguous input
    assert mi.mask.dtype == np.int32 and not mi.mask.any()
    assert mi.variance.dtype == np.float32 and mi.variance.shape == (4, 5)
    assert mi.shape == (4, 5)
    assert mi.xy0 == (0, 0) and mi.bbox == (0, 0, 5, 4)
    assert mi.mask_planes == DEFAULT_MASK_PLANES
    assert mi.mask_planes is not DEFAULT_MASK_PLANES

    be = np.arange(20, dtype=">f8").reshape(4, 5)
    mi2 = MaskedImage(be, np.zeros((4, 5), np.int64), np.ones((4, 5)), xy0=(3, 7))
    assert mi2.image.dtype == np.float32 and mi2.image.dtype.isnative
    assert mi2.image.flags.c_contiguous
    assert mi2.mask.dtype == np.int32 and mi2.variance.dtype == np.float32
    np.testing.assert_array_equal(mi2.image, be)
    assert mi2.bbox == (3, 7, 8, 11)


def test_masked_image_shape_errors():
    with pytest.raises(ImageShapeMismatchError, match="same shape"):
        MaskedImage(np.zeros((4, 5)), mask=np.zeros((5, 4)))
    with pytest.raises(ImageShapeMismatchError, match="same shape"):
        MaskedImage(np.zeros((4, 5)), variance=np.zeros((4, 6)))
    with pytest.raises(ImageShapeMismatchError, match="2-D"):
        MaskedImage(np.zeros((2, 4, 5)))


def test_mask_planes():
    mi = MaskedImage(np.zeros((3, 3)))
    assert mi.get_plane_bitmask("BAD", "SAT") == 0b11
    assert mi.get_plane_bitmask(["NO_DATA", "EDGE"]) == (1 << 7) | (1 << 4)
    assert mi.get_plane_bitmask() == 0
    with pytest.raises(ConfigError, match="NOPE"):
        mi.get_plane_bitmask("BAD", "NOPE")
    assert mi.add_mask_plane("SAT") == 1
    assert mi.add_mask_plane("MY_PLANE") == 8
    assert mi.get_plane_bitmask("MY_PLANE") == 1 << 8
    for i in range(31 - 9):
        mi.add_mask_plane(f"P{i}")
    assert max(mi.mask_planes.values()) == 30
    with pytest.raises(ConfigError, match="31"):
        mi.add_mask_plane("ONE_TOO_MANY")
    with pytest.raises(ConfigError):
        MaskedImage(np.zeros((2, 2)), mask_planes={"A": 0, "B": 0})
    with pytest.raises(ConfigError):
        MaskedImage(np.zeros((2, 2)), mask_planes={"A": 31})
    with pytest.raises(ConfigError):
        mi.add_mask_plane("bad name")


def test_subimage_parent_coordinates():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(40, 30)).astype(np.float32)
    mask = rng.integers(0, 255, size=(40, 30)).astype(np.int32)
    var = rng.uniform(1, 2, size=(40, 30)).astype(np.float32)
    mi = MaskedImage(img, mask, var, xy0=(10, 20))
    mi.add_mask_plane("USER")
    sub = mi.subimage(12, 25, 15, 30)
    assert sub.xy0 == (12, 25) and sub.shape == (5, 3) and sub.bbox == (12, 25, 15, 30)
    np.testing.assert_array_equal(sub.image, img[5:10, 2:5])
    np.testing.assert_array_equal(sub.mask, mask[5:10, 2:5])
    np.testing.assert_array_equal(sub.variance, var[5:10, 2:5])
    assert sub.mask_planes == mi.mask_planes and sub.mask_planes is not mi.mask_planes
    # Nested cut: still parent coordinates.
    sub2 = sub.subimage(13, 26, 14, 28)
    np.testing.assert_array_equal(sub2.image, img[6:8, 3:4])
    assert sub2.xy0 == (13, 26)
    # Independent copy.
    sub.image[:] = 99
    assert not np.any(mi.image == 99)
    # Whole image is allowed; anything outside is not.
    assert mi.subimage(*mi.bbox).shape == mi.shape
    for box in [(9, 20, 15, 30), (12, 25, 41, 30), (12, 19, 15, 30), (12, 25, 15, 61),
                (15, 25, 15, 30), (0, 0, 5, 5)]:
        with pytest.raises(ImageShapeMismatchError, match="not inside"):
            mi.subimage(*box)


def test_copies_are_deep():
    mi = MaskedImage(np.zeros((5, 6)), xy0=(1, 2))
    exp = Exposure(mi, wcs=_tan_wcs(), psf_fwhm=2.5, phot_scale=1.5,
                   metadata={"OBJECT": "x"})
    cp = exp.copy()
    cp.image[0, 0] = 5
    cp.mask[0, 0] = 1
    cp.variance[0, 0] = 3
    cp.masked_image.add_mask_plane("NEW")
    cp.metadata["OBJECT"] = "y"
    cp.wcs.wcs.crval = [0.0, 0.0]
    assert exp.image[0, 0] == 0 and exp.mask[0, 0] == 0 and exp.variance[0, 0] == 0
    assert "NEW" not in exp.masked_image.mask_planes
    assert exp.metadata["OBJECT"] == "x"
    assert exp.wcs.wcs.crval[0] == pytest.approx(150.1)
    assert cp.xy0 == (1, 2) and cp.psf_fwhm == 2.5 and cp.phot_scale == 1.5


def test_exposure_forwarding_and_validation():
    mi = MaskedImage(np.zeros((5, 6)), xy0=(1, 2))
    exp = Exposure(mi)
    assert isinstance(exp.metadata, fits.Header) and len(exp.metadata) == 0
    assert exp.wcs is None and exp.psf_fwhm is None and exp.phot_scale is None
    assert exp.image is mi.image and exp.mask is mi.mask and exp.variance is mi.variance
    assert exp.xy0 == (1, 2) and exp.shape == (5, 6) and exp.bbox == (1, 2, 7, 7)
    with pytest.raises(ConfigError):
        Exposure(mi, psf_fwhm=-1.0)
    with pytest.raises(ConfigError):
        Exposure(mi, phot_scale=float("nan"))
    with pytest.raises(TypeError):
        Exposure(np.zeros((3, 3)))


# ---------------------------------------------------------------------------------------------
# write_fits / read_fits round trip
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sip", [False, True])
def test_mef_exact_round_trip(tmp_path, sip):
    rng = np.random.default_rng(2)
    shape = (37, 53)
    img = rng.normal(size=shape).astype(np.float32)
    img[3, 4] = np.nan
    var = rng.uniform(0.5, 2, size=shape).astype(np.float32)
    var[3, 4] = np.inf
    mi = MaskedImage(img, rng.integers(0, 2 ** 30, size=shape).astype(np.int32), var,
                     xy0=(123, -45))
    bit = mi.add_mask_plane("MyUserPlane")
    meta = fits.Header()
    meta["OBJECT"] = ("M31", "target")
    meta["EXPTIME"] = 30.0
    meta["HISTORY"] = "made by a test"
    wcs = _tan_wcs(sip=sip)
    exp = Exposure(mi, wcs=wcs, psf_fwhm=3.1234567890123457, phot_scale=1.2345678901234567e-05,
                   metadata=meta)
    path = tmp_path / "exp.fits"
    write_fits(exp, path, extra_header={"RUNID": ("r42", "run")})
    back = read_fits(path)

    np.testing.assert_array_equal(back.image, img)
    np.testing.assert_array_equal(back.mask, mi.mask)
    np.testing.assert_array_equal(back.variance, var)
    assert back.image.dtype == np.float32 and back.mask.dtype == np.int32
    assert back.variance.dtype == np.float32
    assert back.xy0 == (123, -45)
    assert back.masked_image.mask_planes == mi.mask_planes
    assert back.masked_image.mask_planes["MyUserPlane"] == bit
    assert back.psf_fwhm == exp.psf_fwhm and back.phot_scale == exp.phot_scale
    assert back.metadata["OBJECT"] == "M31" and back.metadata["RUNID"] == "r42"
    assert "made by a test" in str(back.metadata["HISTORY"])
    # The WCS maps the same parent pixels to the same sky positions.
    assert back.wcs is not None
    assert _wcs_close(wcs, back.wcs, shape) < 1e-10
    assert (back.wcs.sip is not None) == sip

    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert hdul[0].data is None
        assert hdul[0].header["DIFFIMV"] == __version__
        assert hdul[0].header["XY0X"] == 123 and hdul[0].header["XY0Y"] == -45
        assert hdul["MASK"].header["MP_MyUserPlane"] == bit
        assert hdul["IMAGE"].header["LTV1"] == -123
        # In the file the WCS is in array coordinates: array (0, 0) is parent (123, -45).
        file_wcs = WCS(hdul["IMAGE"].header)
        assert _wcs_close(file_wcs, wcs, (5, 5), offset=(123, -45)) < 1e-10
    # Writing again what was read gives the same file content (metadata is stable).
    write_fits(back, tmp_path / "again.fits")
    again = read_fits(tmp_path / "again.fits")
    assert list(again.metadata.keys()) == list(back.metadata.keys())


def test_write_masked_image_and_subimage(tmp_path):
    mi = MaskedImage(np.arange(12.0).reshape(3, 4), variance=np.ones((3, 4)))
    write_fits(mi, tmp_path / "mi.fits")
    back = read_fits(tmp_path / "mi.fits")
    np.testing.assert_array_equal(back.image, mi.image)
    assert back.wcs is None and back.psf_fwhm is None and back.phot_scale is None

    exp = Exposure(MaskedImage(np.zeros((50, 60)), variance=np.ones((50, 60))), wcs=_tan_wcs())
    sub = exp.subimage(10, 5, 40, 45)
    write_fits(sub, tmp_path / "sub.fits")
    sb = read_fits(tmp_path / "sub.fits")
    assert sb.xy0 == (10, 5)
    assert _wcs_close(exp.wcs, sb.wcs, (50, 60)) < 1e-10


def test_write_rejects_reserved_extra_keys(tmp_path):
    mi = MaskedImage(np.zeros((3, 3)))
    with pytest.raises(ConfigError, match="XY0X"):
        write_fits(mi, tmp_path / "x.fits", extra_header={"XY0X": 3})
    with pytest.raises(TypeError):
        write_fits(np.zeros((3, 3)), tmp_path / "x.fits")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_no_temp_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.fits"
    mi = MaskedImage(np.ones((20, 20)), variance=np.ones((20, 20)))
    write_fits(mi, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fits"]
    good = _sha(path)

    def broken_writeto(self, fileobj, **kwargs):
        fileobj.write(b"SIMPLE  =                    T" + b" " * 100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(fits.HDUList, "writeto", broken_writeto)
    with pytest.raises(OSError, match="disk full"):
        write_fits(MaskedImage(np.zeros((20, 20))), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fits"]
    assert _sha(path) == good


def test_write_does_not_touch_caller_arrays(tmp_path):
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    img.flags.writeable = False
    mi = MaskedImage(img, variance=np.ones((3, 4)))
    write_fits(mi, tmp_path / "ro.fits")
    np.testing.assert_array_equal(read_fits(tmp_path / "ro.fits").image, img)


# ---------------------------------------------------------------------------------------------
# plain images
# ---------------------------------------------------------------------------------------------

def test_plain_raw_image_variance_model(tmp_path):
    gain, rn = 2.0, 5.0
    image, true_var, src = _simulate(gain=gain, rn=rn, seed=3)
    path = _write_plain(tmp_path / "raw.fits", image.astype(np.float32), GAIN=gain, RDNOISE=rn)
    exp = read_fits(path)
    ratio = exp.variance / true_var
    assert abs(np.median(ratio) - 1) < 0.05
    bright = src > 10 * np.sqrt(true_var.min())
    assert bright.sum() > 50
    assert abs(np.median(ratio[bright]) - 1) < 0.05
    assert np.all(exp.variance > 0) and exp.mask.sum() == 0


def test_crowded_raw_image_variance_not_inflated_by_confusion(tmp_path):
    gain, rn, sky = 2.0, 5.0, 300.0
    image, true_var, src = _simulate(gain=gain, rn=rn, sky=sky, n_stars=4000, flux=(1e2, 3e4),
                                     seed=4)
    image = image.astype(np.float32)
    # The field really is confusion-limited: sep's rms is far above the pixel noise.
    rms = np.median(sep.Background(image, bw=64, bh=64).rms())
    assert rms ** 2 > 2 * np.median(true_var)
    exp = read_fits(_write_plain(tmp_path / "crowd.fits", image, GAIN=gain, RDNOISE=rn))
    assert abs(np.median(exp.variance / true_var) - 1) < 0.05


def test_sky_subtracted_image_variance_is_honest(tmp_path):
    gain, rn, sky = 2.0, 5.0, 1000.0
    image, true_var, src = _simulate(gain=gain, rn=rn, sky=sky, seed=5)
    image = (image - sky).astype(np.float32)
    exp = read_fits(_write_plain(tmp_path / "sub.fits", image, GAIN=gain, RDNOISE=rn))
    background = ~binary_dilation(src > 0.01, iterations=3)
    z = image[background] / np.sqrt(exp.variance[background])
    assert abs(np.std(z) - 1) < 0.05
    # Stars keep their Poisson term.
    bright = src > 10 * np.sqrt(true_var.min())
    assert abs(np.median(exp.variance[bright] / true_var[bright]) - 1) < 0.1


def test_no_gain_warns_and_uses_background_rms(tmp_path, caplog):
    rng = np.random.default_rng(6)
    image = rng.normal(100.0, 7.0, size=(128, 128)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="diffim.image"):
        exp = read_fits(_write_plain(tmp_path / "nogain.fits", image))
    assert "Poisson" in caplog.text and "nogain.fits" in caplog.text
    assert abs(np.sqrt(np.median(exp.variance)) / 7.0 - 1) < 0.05


def test_nan_becomes_no_data(tmp_path):
    rng = np.random.default_rng(7)
    image = rng.normal(100, 5, size=(64, 64)).astype(np.float32)
    image[10, 12] = np.nan
    image[20:23, 30] = np.inf
    image[40, 41] = -np.inf
    exp = read_fits(_write_plain(tmp_path / "nan.fits", image, GAIN=1.0))
    nd = (exp.mask & exp.masked_image.get_plane_bitmask("NO_DATA")) != 0
    expected = ~np.isfinite(image)
    np.testing.assert_array_equal(nd, expected)
    assert np.all(exp.image[expected] == 0) and np.all(np.isfinite(exp.image))
    assert np.all(np.isinf(exp.variance[expected]))
    assert np.all(np.isfinite(exp.variance[~expected])) and np.all(exp.variance[~expected] > 0)


def test_saturate_keyword_sets_sat(tmp_path):
    rng = np.random.default_rng(8)
    image = rng.normal(100, 5, size=(64, 64)).astype(np.float32)
    image[5, 5] = 5000.0
    image[6, 5] = 4999.0
    image[30, 31] = 7000.0
    exp = read_fits(_write_plain(tmp_path / "sat.fits", image, SATURATE=5000.0, GAIN=1.0))
    sat = (exp.mask & (1 << exp.masked_image.mask_planes["SAT"])) != 0
    assert set(zip(*np.nonzero(sat))) == {(5, 5), (30, 31)}
    exp = read_fits(_write_plain(tmp_path / "sat2.fits", image, SATLEVEL=4000.0))
    assert ((exp.mask & 2) != 0).sum() == 3


def test_big_endian_and_float64(tmp_path):
    rng = np.random.default_rng(9)
    data = rng.normal(10, 1, size=(40, 50))
    for dtype in (">f4", ">f8", "<f8"):
        exp = read_fits(_write_plain(tmp_path / "be.fits", data.astype(dtype), GAIN=1.0))
        assert exp.image.dtype == np.float32 and exp.image.dtype.isnative
        assert exp.variance.dtype == np.float32 and exp.mask.dtype == np.int32
        assert exp.image.flags.c_contiguous
        np.testing.assert_array_equal(exp.image, data.astype(np.float32))


def test_int16_and_uint16_bzero(tmp_path):
    rng = np.random.default_rng(10)
    i16 = rng.integers(-100, 3000, size=(40, 40)).astype(np.int16)
    i16[0, 0] = 32767
    exp = read_fits(_write_plain(tmp_path / "i16.fits", i16, GAIN=1.5))
    np.testing.assert_array_equal(exp.image, i16.astype(np.float32))
    assert exp.image.dtype == np.float32
    assert set(zip(*np.nonzero(exp.mask & 2))) == {(0, 0)}

    # BLANK pixels of integer data carry no data.
    i16[5, 6] = -32768
    exp = read_fits(_write_plain(tmp_path / "blank.fits", i16, BLANK=-32768, GAIN=1.5))
    nd = (exp.mask & (1 << 7)) != 0
    assert set(zip(*np.nonzero(nd))) == {(5, 6)}
    assert exp.image[5, 6] == 0 and np.isinf(exp.variance[5, 6])

    u16 = rng.integers(1000, 40000, size=(40, 40)).astype(np.uint16)
    u16[7, 8] = 65535
    path = _write_plain(tmp_path / "u16.fits", u16, GAIN=1.5)
    with fits.open(path) as hdul:
        assert hdul[0].header["BITPIX"] == 16 and hdul[0].header["BZERO"] == 32768
    exp = read_fits(path)
    np.testing.assert_array_equal(exp.image, u16.astype(np.float32))
    assert set(zip(*np.nonzero(exp.mask & 2))) == {(7, 8)}
    assert "BZERO" not in exp.metadata and "GAIN" in exp.metadata


def test_uint16_clip_plateau_is_saturation(tmp_path):
    rng = np.random.default_rng(11)
    u16 = rng.integers(500, 30000, size=(40, 40)).astype(np.uint16)
    u16[10:12, 10:12] = 65300  # flat-fielded after the ADC clipped
    exp = read_fits(_write_plain(tmp_path / "plateau.fits", u16, GAIN=1.5))
    assert ((exp.mask & 2) != 0).sum() == 4
    # A lone maximum is not a plateau.
    u16[10:12, 10:12] = 100
    u16[3, 3] = 65300
    exp = read_fits(_write_plain(tmp_path / "single.fits", u16, GAIN=1.5))
    assert ((exp.mask & 2) != 0).sum() == 0


def test_tile_compressed_fz(tmp_path):
    rng = np.random.default_rng(12)
    u16 = rng.integers(1000, 5000, size=(64, 70)).astype(np.uint16)
    hdr = fits.Header()
    hdr["GAIN"] = 2.0
    hdr["FWHM"] = (3.3, "pixels")
    path = tmp_path / "img.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(u16, hdr, compression_type="RICE_1")]
                 ).writeto(path)
    exp = read_fits(path)
    np.testing.assert_array_equal(exp.image, u16.astype(np.float32))
    assert exp.psf_fwhm == pytest.approx(3.3)
    assert np.all(exp.variance > 0)

    flt = rng.normal(100, 5, size=(64, 70)).astype(np.float32)
    path = tmp_path / "flt.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(flt, compression_type="RICE_1",
                                                       quantize_level=16)]).writeto(path)
    exp = read_fits(path)
    np.testing.assert_allclose(exp.image, flt, atol=1.0)


def test_plain_header_values_and_wcs(tmp_path):
    w = _tan_wcs()
    hdr = w.to_header()
    hdr["PFWHM"] = (4.5, "seeing in pixels")
    hdr["PHOTSCAL"] = 2.0
    hdr["OBJECT"] = "field"
    data = np.random.default_rng(13).normal(10, 1, size=(30, 40)).astype(np.float32)
    fits.PrimaryHDU(data, hdr).writeto(tmp_path / "w.fits")
    exp = read_fits(tmp_path / "w.fits")
    assert exp.wcs is not None and _wcs_close(w, exp.wcs, (30, 40)) < 1e-12
    assert exp.psf_fwhm == 4.5 and exp.phot_scale == 2.0 and exp.xy0 == (0, 0)
    assert exp.metadata["OBJECT"] == "field"
    assert "CTYPE1" not in exp.metadata and "NAXIS1" not in exp.metadata

    exp = read_fits(_write_plain(tmp_path / "nowcs.fits", data, SEEING=2.5))
    assert exp.wcs is None and exp.psf_fwhm == 2.5

    # A seeing in arcsec is converted with the WCS pixel scale, or ignored without a WCS.
    hdr = w.to_header()
    hdr["SEEING"] = (0.9, "seeing FWHM [arcsec]")
    fits.PrimaryHDU(data, hdr).writeto(tmp_path / "arcsec.fits")
    scale = 3600 * np.sqrt(abs(np.linalg.det(w.wcs.cd)))
    assert read_fits(tmp_path / "arcsec.fits").psf_fwhm == pytest.approx(0.9 / scale, rel=1e-3)
    del hdr["CTYPE*"]
    fits.PrimaryHDU(data, hdr).writeto(tmp_path / "arcsec_nowcs.fits")
    assert read_fits(tmp_path / "arcsec_nowcs.fits").psf_fwhm is None


def test_invalid_wcs_raises(tmp_path):
    path = _write_plain(tmp_path / "badwcs.fits", np.ones((10, 10), np.float32),
                        CTYPE1="RA---XYZ", CTYPE2="DEC--XYZ")
    with pytest.raises(ImageReadError, match="badwcs.fits.*WCS"):
        read_fits(path)


def test_hdu_selection(tmp_path):
    a = np.full((10, 10), 1.0, np.float32)
    b = np.full((12, 8), 2.0, np.float32)
    path = tmp_path / "multi.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(a, name="SCI"),
                  fits.ImageHDU(b, name="WHT")]).writeto(path)
    assert read_fits(path).shape == (10, 10)
    assert read_fits(path, hdu="WHT").shape == (12, 8)
    assert read_fits(path, hdu=2).shape == (12, 8)
    with pytest.raises(ImageReadError, match="multi.fits.*no HDU 7"):
        read_fits(path, hdu=7)
    with pytest.raises(ImageReadError, match="multi.fits.*no data"):
        read_fits(path, hdu=0)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_unreadable_inputs_raise_image_read_error(tmp_path):
    good = _write_plain(tmp_path / "good.fits", np.ones((100, 100), np.float32))
    raw = Path(good).read_bytes()
    cases = {
        "missing.fits": None,
        "truncated_data.fits": raw[:-20000],
        "truncated_header.fits": raw[:2000],
        "zero_bytes.fits": b"",
        "junk.fits": np.random.default_rng(14).integers(0, 256, 5000, np.uint8).tobytes(),
    }
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageReadError, match=name):
            read_fits(tmp_path / name)
    with pytest.raises(ImageReadError, match="directory"):
        read_fits(tmp_path)

    fits.PrimaryHDU().writeto(tmp_path / "empty.fits")
    with pytest.raises(ImageReadError, match="empty.fits.*no 2-D image"):
        read_fits(tmp_path / "empty.fits")
    fits.PrimaryHDU(np.zeros((3, 8, 8), np.float32)).writeto(tmp_path / "cube.fits")
    with pytest.raises(ImageReadError, match="cube.fits.*3-D"):
        read_fits(tmp_path / "cube.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column("a", "E", array=np.ones(3))])]).writeto(tmp_path / "table.fits")
    with pytest.raises(ImageReadError, match="table.fits"):
        read_fits(tmp_path / "table.fits")
    fits.PrimaryHDU(np.full((8, 8), np.nan, np.float32)).writeto(tmp_path / "allnan.fits")
    with pytest.raises(ImageReadError, match="allnan.fits.*no finite"):
        read_fits(tmp_path / "allnan.fits")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can read files whatever their permissions")
def test_permission_denied(tmp_path):
    path = _write_plain(tmp_path / "secret.fits", np.ones((5, 5), np.float32))
    os.chmod(path, 0)
    try:
        with pytest.raises(ImageReadError, match="secret.fits"):
            read_fits(path)
    finally:
        os.chmod(path, 0o644)


def test_read_never_modifies_input(tmp_path):
    u16 = np.random.default_rng(15).integers(0, 65535, size=(50, 50)).astype(np.uint16)
    path = _write_plain(tmp_path / "in.fits", u16, GAIN=2.0)
    before = (_sha(path), os.stat(path).st_mtime_ns)
    exp = read_fits(path)
    exp.image[:] = 0
    write_fits(exp, tmp_path / "other.fits")
    assert (_sha(path), os.stat(path).st_mtime_ns) == before


# ---------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------

def _star_free(image, bkg, rms):
    _, seg = sep.extract(image - bkg, 3.0, err=rms, segmentation_map=True)
    return ~binary_dilation(seg > 0, iterations=6)


def test_real_decam_sky_subtracted(tmp_path):
    if not DECAM.exists():
        pytest.skip(f"real data not available: {DECAM}")
    before = _sha(DECAM)
    exp = read_fits(DECAM)
    assert _sha(DECAM) == before
    assert exp.shape == (256, 256) and exp.image.dtype == np.float32
    assert exp.wcs is not None and exp.wcs.has_celestial
    assert exp.psf_fwhm == pytest.approx(5.231596)
    assert np.all(exp.variance > 0) and np.all(np.isfinite(exp.variance))
    bk = sep.Background(exp.image, bw=64, bh=64)
    free = _star_free(exp.image, bk.back(), bk.rms())
    assert free.mean() > 0.5
    z = ((exp.image - bk.back()) / np.sqrt(exp.variance))[free]
    assert abs(1.4826 * np.median(np.abs(z - np.median(z))) - 1) < 0.1
    assert abs(np.std(z) - 1) < 0.1
    # The header WCS survives a round trip through our format.
    write_fits(exp, tmp_path / "decam.fits")
    back = read_fits(tmp_path / "decam.fits")
    assert _wcs_close(exp.wcs, back.wcs, exp.shape) < 1e-9
    assert back.psf_fwhm == exp.psf_fwhm


def test_real_saao_crowded_raw(tmp_path):
    if not SAAO.exists():
        pytest.skip(f"real data not available: {SAAO}")
    exp = read_fits(SAAO)
    assert exp.shape == (512, 512) and exp.image.dtype == np.float32
    assert exp.wcs is None
    assert exp.psf_fwhm == pytest.approx(4.52038181824103)
    with fits.open(SAAO) as hdul:
        raw = hdul[0].data.astype(np.float32)
    np.testing.assert_array_equal(exp.image, raw)
    # Saturated cores were clipped at 65300 by the reduction.
    sat = (exp.mask & exp.masked_image.get_plane_bitmask("SAT")) != 0
    np.testing.assert_array_equal(sat, raw >= 65300)
    assert sat.sum() > 10
    # A raw crowded frame: the variance follows the gain/read-noise model, not the confusion
    # "noise" of blended bulge stars that sep's rms measures.
    g, rn = 1.9, 5.0
    model = (rn / g) ** 2 + np.maximum(raw, 0) / g
    bk = sep.Background(exp.image, bw=64, bh=64)
    faint = uniform_filter(exp.image, 3) <= bk.back()
    assert abs(np.median(exp.variance[faint] / model[faint]) - 1) < 0.1
    assert np.median(bk.rms()) ** 2 > 4 * np.median(exp.variance[faint])


def test_sky_subtracted_read_noise_dominated(tmp_path):
    # Low sky (15 ADU variance) under read noise (25 ADU variance): the keyword model looks
    # almost right, so the raw-image branch must add the measured excess.
    gain, rn, sky = 2.0, 10.0, 30.0
    image, true_var, src = _simulate(gain=gain, rn=rn, sky=sky, seed=16)
    image = (image - sky).astype(np.float32)
    exp = read_fits(_write_plain(tmp_path / "lowsky.fits", image, GAIN=gain, RDNOISE=rn))
    background = ~binary_dilation(src > 0.01, iterations=3)
    z = image[background] / np.sqrt(exp.variance[background])
    assert abs(np.std(z) - 1) < 0.07
