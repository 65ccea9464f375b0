"""Hostile inputs: every bad input ends in one typed error or a documented graceful result.

Each case goes through the Python API (``read_fits`` + ``ImagePsfMatchTask``) and through
``diffim subtract TEMPLATE SCIENCE -o OUT``.  A failure must be

* one :class:`~diffim.exceptions.DiffimError` subclass in Python, with a message naming the
  problem;
* on the command line: exit status 1, exactly one ``diffim: error: ...`` line (the last
  line on stderr, no traceback) that names the offending file, and no output or temporary
  file left behind;

and no input file may change (checksums before and after).  A graceful result must be a
complete output in which every non-finite pixel is flagged ``NO_DATA``.

The reference for the messages is ``docs/errors.md``.
"""

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from diffim import exceptions as exc
from diffim.cli import main
from diffim.config import ImagePsfMatchConfig
from diffim.image import MaskedImage, read_fits, write_fits
from diffim.simulate import simulate_pair
from diffim.task import ImagePsfMatchTask

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (128, 128)
NOISE_CARDS = {"GAIN": 1.0, "RDNOISE": 5.0}
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_hang():
    """Fail (instead of hanging the suite) if one hostile input takes more than 120 s.

    Compiled loops cannot be interrupted by a signal, so the NaN-column case, where a
    widely used C implementation hangs, also runs in a subprocess with a hard timeout.
    """
    def _alarm(signum, frame):
        raise TimeoutError("a hostile input took more than 120 s: diffim hangs on it")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _reset_cli_logging():
    """main() installs a stderr handler on the "diffim" logger; drop it after each test, so
    that later log records do not go to a captured stream pytest has already closed."""
    yield
    logger = logging.getLogger("diffim")
    for handler in list(logger.handlers):
        if getattr(handler, "_diffim_cli_handler", False):
            logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def _cli_config():
    """The configuration ``diffim subtract`` uses without --config."""
    cfg = ImagePsfMatchConfig()
    cfg.kernel.active.fit_for_background = True
    cfg.kernel.active.spatial_kernel_order = 1
    cfg.kernel.active.spatial_bg_order = 0
    return cfg


def _plain(path, data, **cards):
    hdr = fits.Header()
    for key, value in {**NOISE_CARDS, **cards}.items():
        hdr[key] = value
    fits.PrimaryHDU(data, hdr).writeto(path, overwrite=True)
    return path


def _checksums(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def _sim(**kw):
    args = dict(shape=SHAPE, n_stars=40, seed=3)
    args.update(kw)
    return simulate_pair(**args)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Good pairs (MEF files with WCSs) that subtract cleanly, and their Exposures.

    128x128 for most cases; 256x256 ("big") where the hostile part masks so much that a
    smaller image keeps no clean kernel stamp (stamps are ~2 kernel widths, 43-71 px).
    """
    d = tmp_path_factory.mktemp("base")
    pair = _sim()
    t, s = d / "template.fits", d / "science.fits"
    write_fits(pair.template, t)
    write_fits(pair.science, s)
    big = _sim(shape=(256, 256), n_stars=150, seed=5)
    write_fits(big.science, d / "big_science.fits")
    return {"dir": d, "pair": pair, "template": t, "science": s, "big": big,
            "big_science": d / "big_science.fits"}


def _api_subtract(template, science, config=None):
    """What ``diffim subtract`` does, through the Python API."""
    cfg = _cli_config() if config is None else ImagePsfMatchConfig.from_yaml(Path(config))
    t = read_fits(template)
    s = read_fits(science)
    return ImagePsfMatchTask(cfg).subtract_exposures(t, s)


def _run_cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def _assert_one_error_line(err, must_name):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("diffim: error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], f"the error must be the last line:\n{err}"
    assert "Traceback" not in err, err
    for ln in lines[:-1]:
        assert LOG_LINE.match(ln), f"stray stderr line {ln!r}"
    assert any(str(name) in errors[0] for name in must_name), (must_name, errors[0])
    return errors[0]


def _assert_nothing_written(out_dir, allowed):
    left = sorted(p.name for p in Path(out_dir).iterdir() if p.name not in allowed)
    assert left == [], f"partial or temporary output left behind: {left}"


def _assert_clean_output(path, shape):
    """A complete difference image: NaN only where NO_DATA is set, positive variance."""
    out = read_fits(path)
    assert out.shape == shape
    nodata = (out.mask & out.masked_image.get_plane_bitmask("NO_DATA")) != 0
    assert np.all(np.isfinite(out.image[~nodata])), "NaN outside NO_DATA"
    assert np.all(np.isfinite(out.variance[~nodata]) & (out.variance[~nodata] > 0))
    assert nodata.mean() < 0.9, "almost everything is NO_DATA"
    return out, nodata


# ---------------------------------------------------------------------------------------------
# hostile inputs that must fail: (id, builder, expected error, words in the message)
# A builder takes (directory, base) and returns (template, science, config or None,
# the file the message must name).
# ---------------------------------------------------------------------------------------------

def _missing(d, b):
    return d / "absent.fits", b["science"], None, "absent.fits"


def _directory(d, b):
    (d / "folder.fits").mkdir()
    return d / "folder.fits", b["science"], None, "folder.fits"


def _not_fits(d, b):
    (d / "notes.fits").write_text("SIMPLE = maybe\nthis is not a FITS file\n")
    return d / "notes.fits", b["science"], None, "notes.fits"


def _zero_bytes(d, b):
    (d / "empty.fits").write_bytes(b"")
    return b["template"], d / "empty.fits", None, "empty.fits"


def _truncated(d, b):
    raw = b["template"].read_bytes()
    (d / "trunc.fits").write_bytes(raw[: len(raw) // 2])
    return d / "trunc.fits", b["science"], None, "trunc.fits"


def _header_only(d, b):
    # the first FITS block: a primary header that promises nothing else
    (d / "hdr.fits").write_bytes(b["template"].read_bytes()[:2880])
    return d / "hdr.fits", b["science"], None, "hdr.fits"


def _empty_hdu(d, b):
    fits.PrimaryHDU().writeto(d / "nodata.fits")
    return d / "nodata.fits", b["science"], None, "nodata.fits"


def _cube(d, b):
    img = b["pair"].template.image
    _plain(d / "cube.fits", np.stack([img, img]))
    return d / "cube.fits", b["science"], None, "cube.fits"


def _all_nan(d, b):
    _plain(d / "nan.fits", np.full(SHAPE, np.nan, np.float32))
    return b["template"], d / "nan.fits", None, "nan.fits"


def _wcs_cards(**cards):
    base = dict(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRPIX1=64.0, CRPIX2=64.0,
                CRVAL1=150.0, CRVAL2=2.0, CDELT1=-5.6e-5, CDELT2=5.6e-5)
    base.update(cards)
    return base


def _invalid_wcs(d, b):
    _plain(d / "badwcs.fits", b["pair"].template.image, **_wcs_cards(CRVAL2=100.0))
    return d / "badwcs.fits", b["science"], None, "badwcs.fits"


def _singular_wcs(d, b):
    cards = _wcs_cards(CD1_1=5e-5, CD1_2=5e-5, CD2_1=5e-5, CD2_2=5e-5)
    del cards["CDELT1"], cards["CDELT2"]
    _plain(d / "singular.fits", b["pair"].template.image, **cards)
    return d / "singular.fits", b["science"], None, "singular.fits"


def _fz(d, b, name):
    hdu = fits.CompImageHDU(b["pair"].template.image, name="SCI")
    for key, value in NOISE_CARDS.items():
        hdu.header[key] = value
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(d / name)
    return d / name


def _fz_truncated(d, b):
    raw = _fz(d, b, "whole.fits.fz").read_bytes()
    (d / "cut.fits.fz").write_bytes(raw[: 2 * len(raw) // 3])
    (d / "whole.fits.fz").unlink()
    return d / "cut.fits.fz", b["science"], None, "cut.fits.fz"


def _fz_corrupt(d, b):
    raw = bytearray(_fz(d, b, "corrupt.fits.fz").read_bytes())
    # scramble the compressed tiles but keep the headers (the first 2 blocks per HDU)
    for i in range(3 * 2880 + 200, len(raw) - 2880):
        raw[i] = (raw[i] * 7 + 3) % 256
    (d / "corrupt.fits.fz").write_bytes(bytes(raw))
    return d / "corrupt.fits.fz", b["science"], None, "corrupt.fits.fz"


def _mef_edit(d, b, name, edit):
    with fits.open(b["template"]) as hdul:
        edit(hdul)
        hdul.writeto(d / name, output_verify="silentfix")
    return d / name


def _bad_origin(d, b):
    def edit(hdul):
        hdul[0].header["XY0X"] = "left"
    return _mef_edit(d, b, "origin.fits", edit), b["science"], None, "origin.fits"


def _bad_mask_plane(d, b):
    def edit(hdul):
        hdul["MASK"].header["HIERARCH MP_SAT"] = 40
    return _mef_edit(d, b, "planes.fits", edit), b["science"], None, "planes.fits"


def _noise_overflow(d, b):
    _plain(d / "noisy.fits", b["pair"].template.image, GAIN=1e-30, RDNOISE=1e30)
    return d / "noisy.fits", b["science"], None, "noisy.fits"


def _all_zero(d, b):
    _plain(d / "zeros.fits", np.zeros(SHAPE, np.float32))
    return d / "zeros.fits", b["science"], None, "zeros.fits"


def _constant(d, b):
    _plain(d / "flat.fits", np.full(SHAPE, 1234.5, np.float32))
    return b["template"], d / "flat.fits", None, "flat.fits"


def _tiny(d, b):
    pair = b["pair"]
    write_fits(pair.template.subimage(40, 40, 56, 56), d / "tiny_t.fits")
    write_fits(pair.science.subimage(40, 40, 56, 56), d / "tiny_s.fits")
    return d / "tiny_t.fits", d / "tiny_s.fits", None, "tiny_s.fits"


def _pair_files(d, name, pair):
    t, s = d / f"{name}_t.fits", d / f"{name}_s.fits"
    write_fits(pair.template, t)
    write_fits(pair.science, s)
    return t, s


def _no_stars(d, b):
    t, s = _pair_files(d, "nostars", _sim(n_stars=0))
    return t, s, None, "nostars_s.fits"


def _one_star(d, b):
    t, s = _pair_files(d, "onestar", _sim(n_stars=1, flux_range=(2e4, 3e4)))
    return t, s, None, "onestar_s.fits"


def _all_saturated(d, b):
    # the sky is at 200 ADU: with a full well of 260 ADU every star is saturated
    t, s = _pair_files(d, "sat", _sim(saturation=260.0))
    return t, s, None, "sat_s.fits"


def _no_overlap(d, b):
    far = b["pair"].template.copy()
    far.wcs.wcs.crval = [10.0, -30.0]
    far.wcs.wcs.set()
    write_fits(far, d / "elsewhere.fits")
    return d / "elsewhere.fits", b["science"], None, "elsewhere.fits"


def _zero_variance(d, b):
    sci = b["pair"].science.copy()
    sci.variance[:] = 0.0
    write_fits(sci, d / "novar.fits")
    return b["template"], d / "novar.fits", None, "novar.fits"


def _yaml(text, name):
    def build(d, b):
        (d / name).write_text(text)
        return b["template"], b["science"], d / name, name
    return build


def _missing_yaml(d, b):
    return b["template"], b["science"], d / "nowhere.yaml", "nowhere.yaml"


E = exc
FAILURES = [
    ("missing-file", _missing, E.ImageReadError, "does not exist"),
    ("directory", _directory, E.ImageReadError, "directory"),
    ("not-fits", _not_fits, E.ImageReadError, "not a valid FITS"),
    ("zero-bytes", _zero_bytes, E.ImageReadError, "corrupt"),
    ("truncated", _truncated, E.ImageReadError, "truncated"),
    ("header-only", _header_only, E.ImageReadError, "no 2-D image"),
    ("empty-hdu", _empty_hdu, E.ImageReadError, "no 2-D image"),
    ("3d-cube", _cube, E.ImageReadError, "3-D"),
    ("all-nan", _all_nan, E.ImageReadError, "no finite pixel"),
    ("invalid-wcs", _invalid_wcs, E.ImageReadError, "WCS"),
    ("singular-wcs", _singular_wcs, E.ImageReadError, "cannot be inverted"),
    ("fz-truncated", _fz_truncated, E.ImageReadError, "truncated"),
    ("fz-corrupt", _fz_corrupt, E.ImageReadError, "corrupt"),
    ("mef-bad-origin", _bad_origin, E.ImageReadError, "origin"),
    ("mef-bad-mask-plane", _bad_mask_plane, E.ImageReadError, "mask plane"),
    ("noise-keyword-overflow", _noise_overflow, E.ImageReadError, "non-finite variance"),
    ("all-zero", _all_zero, E.RegistrationError, "0 sources"),
    ("constant", _constant, E.RegistrationError, "0 sources"),
    ("smaller-than-kernel", _tiny, E.NoKernelCandidatesError, "kernel candidates"),
    ("no-stars", _no_stars, E.NoKernelCandidatesError, "0 detections"),
    ("one-star", _one_star, E.InsufficientCandidatesError, "only 1 kernel candidate"),
    ("all-saturated", _all_saturated, E.NoKernelCandidatesError, "no kernel candidates"),
    ("no-overlap", _no_overlap, E.NoOverlapError, "do not overlap"),
    ("zero-variance", _zero_variance, E.NoKernelCandidatesError, "candidates"),
    ("yaml-wrong-type", _yaml("kernel:\n  active:\n    kernel_size: eleven\n", "type.yaml"),
     E.ConfigError, "kernel.active.kernel_size"),
    ("yaml-unknown-key", _yaml("kernel:\n  active:\n    fit_for_backgrund: true\n",
                               "typo.yaml"),
     E.ConfigError, "did you mean 'fit_for_background'"),
    ("yaml-even-kernel", _yaml("kernel: {AL: {kernel_size: 20, scale_by_fwhm: false}}\n",
                               "even.yaml"),
     E.ConfigError, "must be odd"),
    ("yaml-al-lists", _yaml("kernel:\n  AL:\n    alard_n_gauss: 2\n", "lists.yaml"),
     E.ConfigError, "alard_deg_gauss"),
    ("yaml-unparseable", _yaml("kernel: [AL,\n", "broken.yaml"), E.ConfigError,
     "cannot parse"),
    ("yaml-not-a-mapping", _yaml("- kernel\n- AL\n", "list.yaml"), E.ConfigError,
     "mapping"),
    ("yaml-missing", _missing_yaml, E.ConfigError, "does not exist"),
]


@pytest.mark.parametrize("case, build, error, words", FAILURES, ids=[c[0] for c in FAILURES])
def test_hostile_input_fails_cleanly(case, build, error, words, base, tmp_path, capsys,
                                     caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    template, science, config, culprit = build(inputs, base)
    before = _checksums(inputs) | {f"base/{k}": v for k, v in _checksums(base["dir"]).items()}

    # Python API: exactly the documented error class, with a helpful message
    with caplog.at_level(logging.ERROR), pytest.raises(error) as info:
        _api_subtract(template, science, config)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert words in str(info.value), str(info.value)

    # command line: status 1, one line naming the file, nothing written
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, kern = out_dir / "diff.fits", out_dir / "kernel.fits"
    argv = ["subtract", str(template), str(science), "-o", str(out), "--kernel-out", str(kern),
            "-q"]
    if config is not None:
        argv += ["--config", str(config)]
    rc, err = _run_cli(argv, capsys)
    assert rc == 1, err
    line = _assert_one_error_line(err, [culprit])
    assert "internal error" not in line
    _assert_nothing_written(out_dir, allowed=())

    after = _checksums(inputs) | {f"base/{k}": v for k, v in _checksums(base["dir"]).items()}
    assert after == before, "an input file was modified"


def test_no_overlap_between_exposures_in_memory(base):
    far = base["pair"].template.copy()
    far.wcs.wcs.crval = [10.0, -30.0]
    far.wcs.wcs.set()
    with pytest.raises(exc.NoOverlapError, match="do not overlap"):
        ImagePsfMatchTask(_cli_config()).subtract_exposures(far, base["pair"].science)


def test_different_grids_without_wcs_masked_images(base):
    pair = base["pair"]
    with pytest.raises(exc.ImageShapeMismatchError, match="same pixel grid"):
        ImagePsfMatchTask(_cli_config()).subtract_masked_images(
            pair.template.masked_image.subimage(0, 0, 100, 100), pair.science.masked_image)


def test_different_grids_without_warping(base):
    pair = base["pair"]
    shifted = pair.template.copy()
    shifted.wcs.wcs.crpix = shifted.wcs.wcs.crpix + [3.0, 0.0]
    shifted.wcs.wcs.set()
    with pytest.raises(exc.ImagesNotRegisteredError):
        ImagePsfMatchTask(_cli_config()).subtract_exposures(shifted, pair.science,
                                                             do_warping=False)


# ---------------------------------------------------------------------------------------------
# hostile inputs with a documented graceful result
# ---------------------------------------------------------------------------------------------

def _uint16_pair(d, b):
    pair = b["pair"]
    # astropy stores uint16 as int16 with BZERO = 32768, as cameras do
    t = _plain(d / "t_u16.fits", np.clip(np.round(pair.template.image), 0, 65535)
               .astype(np.uint16))
    s = _plain(d / "s_u16.fits", np.clip(np.round(pair.science.image), 0, 65535)
               .astype(np.uint16))
    return t, s


def _float64_pair(d, b):
    pair = b["pair"]
    t = _plain(d / "t_f64.fits", pair.template.image.astype(">f8"))
    s = _plain(d / "s_f64.fits", pair.science.image.astype(">f8"))
    return t, s


def _fz_pair(d, b):
    pair = b["pair"]
    paths = []
    for name, img in (("t.fits.fz", pair.template.image), ("s.fits.fz", pair.science.image)):
        hdu = fits.CompImageHDU(img, name="SCI", quantize_level=-0.01)
        for key, value in NOISE_CARDS.items():
            hdu.header[key] = value
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(d / name)
        paths.append(d / name)
    return tuple(paths)


def _inf_pixels(d, b):
    tmpl = b["big"].template.copy()
    tmpl.image[30:32, :] = np.inf
    tmpl.image[200, 10:90] = -np.inf
    tmpl.image[150:156, 60:66] = np.nan
    t = _plain(d / "t_inf.fits", tmpl.image)
    s = _plain(d / "s_plain.fits", b["big"].science.image)
    return t, s


def _negative_variance_patch(d, b):
    sci = b["pair"].science.copy()
    sci.variance[40:60, :] = -3.0
    sci.variance[10:14, 10:14] = 0.0
    write_fits(sci, d / "negvar.fits")
    return b["template"], d / "negvar.fits"


def _different_size_no_wcs(d, b):
    pair = b["pair"]
    t = _plain(d / "t_crop.fits", pair.template.image[10:, 5:])
    s = _plain(d / "s_full.fits", pair.science.image)
    return t, s


GRACEFUL = [
    ("uint16-bzero", _uint16_pair),
    ("float64-big-endian", _float64_pair),
    ("tile-compressed-fz", _fz_pair),
    ("inf-and-nan-pixels", _inf_pixels),
    ("negative-and-zero-variance-patch", _negative_variance_patch),
    ("different-size-without-wcs", _different_size_no_wcs),
]


@pytest.mark.parametrize("case, build", GRACEFUL, ids=[c[0] for c in GRACEFUL])
def test_hostile_input_with_graceful_result(case, build, base, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    template, science = build(inputs, base)
    before = _checksums(inputs)
    out = tmp_path / "out" / "diff.fits"
    rc, err = _run_cli(["subtract", str(template), str(science), "-o", str(out), "-q"], capsys)
    assert rc == 0, err
    assert "diffim: error" not in err and "Traceback" not in err
    diff, nodata = _assert_clean_output(out, read_fits(science).shape)
    # the stars are gone: the robust scatter of D/σ is close to 1
    z = diff.image[~nodata] / np.sqrt(diff.variance[~nodata])
    assert 1.4826 * np.median(np.abs(z - np.median(z))) < 1.5
    assert sorted(p.name for p in out.parent.iterdir()) == ["diff.fits"]
    assert _checksums(inputs) == before
    if case == "inf-and-nan-pixels":
        # the non-finite template pixels and their kernel footprint are NO_DATA
        assert nodata[31, 64] and nodata[200, 50] and nodata[153, 63]


def test_template_with_nan_columns_does_not_hang(base, tmp_path):
    """A widely used C implementation hangs forever on such a template; diffim must not."""
    tmpl = base["big"].template.copy()
    tmpl.image[:, 100:103] = np.nan
    tmpl.image[:, 190] = np.nan
    t = _plain(tmp_path / "nancols.fits", tmpl.image)
    out = tmp_path / "diff.fits"
    proc = subprocess.run([sys.executable, "-m", "diffim", "subtract", str(t),
                           str(base["big_science"]), "-o", str(out), "-q"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    _, nodata = _assert_clean_output(out, (256, 256))
    assert nodata[:, 100:103].all() and nodata[:, 190].all()
    assert not nodata[128, 150]


def test_real_process_reports_one_line(tmp_path):
    """The installed entry point (not only main()) exits 1 with one line and no traceback."""
    bad = tmp_path / "junk.fits"
    bad.write_bytes(b"\x00" * 5000)
    good = tmp_path / "other.fits"
    good.write_bytes(b"")
    out = tmp_path / "diff.fits"
    proc = subprocess.run([sys.executable, "-m", "diffim", "subtract", str(bad), str(good),
                           "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    _assert_one_error_line(proc.stderr, ["junk.fits"])
    assert not out.exists()


def test_big_endian_and_integer_arrays_in_memory(base):
    """Arrays straight from astropy (big-endian) or integer arrays give the same result."""
    pair = base["pair"]
    cfg = _cli_config()
    ref = ImagePsfMatchTask(cfg).subtract_masked_images(pair.template.masked_image,
                                                        pair.science.masked_image)
    be = MaskedImage(pair.template.image.astype(">f4"), pair.template.mask.astype(">i4"),
                     pair.template.variance.astype(">f8"))
    res = ImagePsfMatchTask(cfg).subtract_masked_images(be, pair.science.masked_image)
    np.testing.assert_array_equal(res.subtracted_masked_image.image,
                                  ref.subtracted_masked_image.image)
    ints = MaskedImage(np.round(pair.template.image).astype(np.int32),
                       variance=pair.template.variance)
    res = ImagePsfMatchTask(cfg).subtract_masked_images(ints, pair.science.masked_image)
    d = res.subtracted_masked_image
    assert np.isfinite(d.image[40:-40, 40:-40]).all()


def test_api_inputs_are_not_modified(base):
    pair = base["pair"]
    t = pair.template.copy()
    s = pair.science.copy()
    t.image[:, 60] = np.nan       # hostile, so the code has a reason to "fix" the input
    t.mask[:, 60] |= t.masked_image.get_plane_bitmask("NO_DATA")
    t.variance[:, 60] = np.inf
    s.variance[5:9, 5:9] = 0.0
    copies = [a.copy() for a in (t.image, t.mask, t.variance, s.image, s.mask, s.variance)]
    wcs_before = t.wcs.to_header_string()
    ImagePsfMatchTask(_cli_config()).subtract_exposures(t, s)
    for a, b in zip((t.image, t.mask, t.variance, s.image, s.mask, s.variance), copies):
        np.testing.assert_array_equal(a, b)
    assert t.wcs.to_header_string() == wcs_before


def test_unflagged_nan_in_science_never_escapes_unmasked(base):
    pair = base["pair"]
    s = pair.science.masked_image.copy()
    s.image[:, 60:62] = np.nan          # not flagged NO_DATA: in-memory data, not read_fits
    s.image[20, 20] = np.inf
    d = ImagePsfMatchTask(_cli_config()).subtract_masked_images(
        pair.template.masked_image, s).subtracted_masked_image
    nodata = (d.mask & d.get_plane_bitmask("NO_DATA")) != 0
    assert np.all(np.isfinite(d.image[~nodata]))


def test_bad_mode_is_a_config_error(base):
    pair = base["pair"]
    with pytest.raises(exc.ConfigError):
        ImagePsfMatchTask(_cli_config()).subtract_exposures(pair.template, pair.science,
                                                            mode="sideways")


def test_nan_candidate_position_is_a_typed_error(base):
    pair = base["pair"]
    with pytest.raises(exc.DiffimError):
        ImagePsfMatchTask(_cli_config()).subtract_exposures(
            pair.template, pair.science, candidate_list=np.array([[np.nan, np.nan]]))


# ---------------------------------------------------------------------------------------------
# the command line never prints a traceback, even for a bug
# ---------------------------------------------------------------------------------------------

def test_internal_error_is_one_line(base, tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(ImagePsfMatchTask, "subtract_exposures", boom)
    out = tmp_path / "diff.fits"
    rc, err = _run_cli(["subtract", str(base["template"]), str(base["science"]), "-o",
                        str(out), "-q"], capsys)
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("diffim: error:")]
    assert len(lines) == 1 and "internal error" in lines[0] and "ZeroDivisionError" in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# faults: atomic outputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_old_output_and_no_temp(base, tmp_path, monkeypatch, failure):
    out = tmp_path / "diff.fits"
    out.write_bytes(b"previous result")

    real_writeto = fits.HDUList.writeto

    def half_then_fail(self, fileobj, *args, **kwargs):
        fileobj.write(b"SIMPLE  =                    T" + b" " * 2000)   # a partial file
        raise failure

    monkeypatch.setattr(fits.HDUList, "writeto", half_then_fail)
    with pytest.raises(type(failure)):
        write_fits(base["pair"].template, out)
    monkeypatch.setattr(fits.HDUList, "writeto", real_writeto)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diff.fits"]


def test_output_path_is_a_directory(base, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    rc, err = _run_cli(["subtract", str(base["template"]), str(base["science"]), "-o",
                        str(out), "-q"], capsys)
    assert rc == 1
    _assert_one_error_line(err, [str(out)])
    assert list(out.iterdir()) == []


def test_failed_cli_run_keeps_existing_output(base, tmp_path, capsys):
    out = tmp_path / "diff.fits"
    out.write_bytes(b"previous result")
    (tmp_path / "broken.fits").write_text("not fits")
    rc, err = _run_cli(["subtract", str(tmp_path / "broken.fits"), str(base["science"]),
                        "-o", str(out), "-q"], capsys)
    assert rc == 1
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.fits", "diff.fits"]


def test_config_dump_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "cfg.yaml"
    path.write_text("old\n")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        ImagePsfMatchConfig().to_yaml(path)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.yaml"]


# ---------------------------------------------------------------------------------------------
# degraded but honest results
# ---------------------------------------------------------------------------------------------

def _few_candidates_config(auto_reduce):
    cfg = _cli_config()
    cfg.kernel.active.spatial_kernel_order = 2
    cfg.kernel.active.spatial_bg_order = 1
    cfg.auto_reduce_spatial_order = auto_reduce
    return cfg


def test_too_few_candidates_lowers_the_spatial_order(base, caplog):
    from diffim.qa import compute_metrics

    pair = base["pair"]
    positions = np.array([[r["x_science"], r["y_science"]] for r in pair.stars
                          if 2e3 < r["flux"] < 4e4 and 25 < r["x"] < 103 and 25 < r["y"] < 103])
    assert len(positions) >= 3
    positions = positions[:4]      # 4 candidates < 6 terms of a 2nd-order spatial model
    with caplog.at_level(logging.WARNING, logger="diffim"):
        res = ImagePsfMatchTask(_few_candidates_config(True)).subtract_exposures(
            pair.template, pair.science, candidate_list=positions)
    meta = res.metadata
    assert meta["spatialOrderReduced"] is True
    assert meta["spatialKernelOrderUsed"] < 2
    assert res.psf_matching_kernel.function.order == meta["spatialKernelOrderUsed"]
    assert any("auto_reduce_spatial_order" in r.getMessage() for r in caplog.records)
    metrics = compute_metrics(res, pair.template, pair.science)
    assert metrics["spatial_order_reduced"] is True
    assert metrics["spatial_kernel_order_used"] == meta["spatialKernelOrderUsed"]
    assert metrics["spatial_kernel_order"] == meta["spatialKernelOrderUsed"]
    d = res.subtracted_masked_image
    nodata = (d.mask & d.get_plane_bitmask("NO_DATA")) != 0
    assert np.isfinite(d.image[~nodata]).all()

    # switched off: the configured order is kept (an underconstrained but finite fit)
    res = ImagePsfMatchTask(_few_candidates_config(False)).subtract_exposures(
        pair.template, pair.science, candidate_list=positions)
    assert res.metadata["spatialOrderReduced"] is False
    assert res.metadata["spatialKernelOrderUsed"] == 2
    assert np.isfinite(res.psf_matching_kernel.evaluate(64, 64)).all()


def test_ill_conditioned_candidate_is_rejected_with_its_reason(base):
    pair = base["pair"]
    cfg = _cli_config()
    cfg.kernel.active.check_condition_number = True
    cfg.kernel.active.max_condition_number = 1e30
    res = ImagePsfMatchTask(cfg).subtract_exposures(pair.template, pair.science)
    table = res.kernel_cell_set.to_table()
    conds = np.sort(np.asarray(table["condition_number"], float))
    conds = conds[np.isfinite(conds)]
    assert len(conds) >= 3
    # a limit between the worst and the second-worst candidate rejects exactly the worst
    cfg.kernel.active.max_condition_number = float(np.sqrt(conds[-1] * conds[-2]))
    res = ImagePsfMatchTask(cfg).subtract_exposures(pair.template, pair.science)
    table = res.kernel_cell_set.to_table()
    rejected = [r for r in table if "condition number" in r["reason"]]
    assert len(rejected) == 1
    assert rejected[0]["status"] == "BAD"
    assert "max_condition_number" in rejected[0]["reason"]
    assert res.metadata["nGoodCandidates"] >= 2

# The workflow's pairs-sheet errors are tested in tests/test_workflow.py.


def test_saved_kernel_on_an_image_smaller_than_it_is_a_typed_error(base):
    pair = base["pair"]
    task = ImagePsfMatchTask(_cli_config())
    res = task.subtract_exposures(pair.template, pair.science)
    k = res.psf_matching_kernel.size
    tiny_t = pair.template.masked_image.subimage(0, 0, k - 2, k - 2)
    tiny_s = pair.science.masked_image.subimage(0, 0, k - 2, k - 2)
    with pytest.raises(exc.ImageShapeMismatchError, match="smaller than"):
        task.apply(tiny_t, tiny_s, res.psf_matching_kernel, res.background_model)


def test_overflowing_pixels_never_pass_for_data(base):
    pair = base["pair"]
    task = ImagePsfMatchTask(_cli_config())
    res = task.subtract_exposures(pair.template, pair.science)
    t = pair.template.masked_image.copy()
    t.image[100:103, 100:103] = 3.3e38          # finite, but the kernel sum overflows float32
    out = task.apply(t, pair.science.masked_image, res.psf_matching_kernel,
                     res.background_model).subtracted_masked_image
    nodata = (out.mask & out.get_plane_bitmask("NO_DATA")) != 0
    assert nodata[101, 101]
    assert np.all(np.isfinite(out.image[~nodata])) and np.all(np.isfinite(out.variance[~nodata]))
