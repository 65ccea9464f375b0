"""Core engine on real telescope data: DECam i-band cutouts (template OBS18a, science OBS04a)
and the crowded SAAO KB13475 series (template frame 0100)."""

import functools
import itertools
from pathlib import Path

import numpy as np
import pytest

from diffim.config import ImagePsfMatchConfig
from diffim.detect import detect_sources
from diffim.image import read_fits
from diffim.task import ImagePsfMatchTask

TRANSIENT = (128.9, 127.7)


@pytest.fixture(scope="module")
def decam(shared_data):
    folder = shared_data / "decam_sfft" / "input"
    template = read_fits(folder / "DEC-OBS18a.mini.fits")
    science = read_fits(folder / "DEC-OBS04a.mini.fits")
    cfg = ImagePsfMatchConfig()
    cfg.kernel.active.fit_for_background = True
    result = ImagePsfMatchTask(cfg).subtract_exposures(template, science)
    return template, science, result


def test_known_transient_stands_out(decam):
    _, science, result = decam
    d = result.subtracted_exposure
    yy, xx = np.mgrid[:d.shape[0], :d.shape[1]]
    aperture = (xx - TRANSIENT[0]) ** 2 + (yy - TRANSIENT[1]) ** 2 <= science.psf_fwhm**2
    snr = d.image[aperture].sum() / np.sqrt(d.variance[aperture].sum())
    assert snr > 8.0


def test_star_free_noise_is_gaussian(decam):
    template, science, result = decam
    d = result.subtracted_exposure
    z = d.image / np.sqrt(d.variance)
    yy, xx = np.mgrid[:d.shape[0], :d.shape[1]]
    star_free = np.isfinite(z)
    for exposure in (template, science):
        for row in detect_sources(exposure.masked_image, threshold=3.0):
            star_free &= (xx - row["x"]) ** 2 + (yy - row["y"]) ** 2 > (4 * science.psf_fwhm) ** 2
    assert star_free.sum() > 20_000
    assert np.median(np.abs(z[star_free])) == pytest.approx(0.6745, abs=0.05)


def test_few_candidates_lower_the_spatial_order(decam):
    _, _, result = decam
    n_good = result.metadata["nGoodCandidates"]
    order = result.metadata["spatialKernelOrderUsed"]
    assert n_good > (order + 1) * (order + 2) // 2
    assert result.psf_matching_kernel.kernel_sum(128, 128) == pytest.approx(
        result.metadata["spatialKernelSum"])
    assert result.metadata["mode"] == "convolveTemplate"


# ---------------------------------------------------------------------------------------------
# SAAO KB13475: crowded Galactic-bulge series, no WCS (catalog registration), reference 0100
# ---------------------------------------------------------------------------------------------

SAAO_DIR = "saao_kb13475"
SAAO_TEMPLATE = "AKB13475I0100.fits"
# The example config of the workflow: the test loads it so the two cannot drift apart.
SAAO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "examples" / "saao_diffim.yaml"
# Six epochs over 12 days, from 13 days before the template to the night of the event's
# peak, with seeing 1.1-1.7x the template's.  Shared with tests/test_photometry.py (the
# subtractions are cached per process).  Over all 23 epochs the median |D/sigma| measured
# as below is 0.70-0.82 (median 0.736); the frames above 0.745 are mostly those of nearly
# the template's seeing, and 0098/0113 show bleed trails of bright stars.
SAAO_FRAMES = ("AKB13475I0042.fits", "AKB13475I0067.fits", "AKB13475I0089.fits",
               "AKB13475I0105.fits", "AKB13475I0135.fits", "AKB13475I0143.fits")
_MOFFAT_BETA = 2.5


def saao_folder(shared_data):
    folder = shared_data / SAAO_DIR
    if not ((folder / "frames.tsv").is_file() and (folder / SAAO_TEMPLATE).is_file()):
        pytest.skip(f"SAAO KB13475 frames not found under {folder}")
    return folder


@functools.lru_cache(maxsize=None)
def _saao_template(folder):
    return read_fits(Path(folder) / SAAO_TEMPLATE)


@functools.lru_cache(maxsize=None)
def saao_subtraction(folder, name):
    """(template, science, result) of subtracting frame 0100 from ``name``; cached."""
    template = _saao_template(str(folder))
    science = read_fits(Path(folder) / name)
    cfg = ImagePsfMatchConfig.from_yaml(SAAO_CONFIG)
    return template, science, ImagePsfMatchTask(cfg).subtract_exposures(template, science)


def star_free_pixels(difference, exposures, fwhm, thresholds=(3.0,), level=1.0):
    """Unmasked pixels that no detected source lights up by more than ``level`` × σ.

    Sources are detected at each of ``thresholds`` σ (3σ, as for DECam above) in each of
    ``exposures``; each is modelled as a Moffat profile (β = 2.5, the measured ``fwhm``)
    holding its aperture flux, and the disc where that profile exceeds ``level`` × the
    difference's median σ (at least 2 FWHM) is excluded.  A fixed radius would leave the
    halos of the brightest stars of a crowded field in the "star-free" sample and exclude
    far too much around faint ones.
    """
    d = difference.masked_image
    ny, nx = d.shape
    ok = np.isfinite(d.image) & np.isfinite(d.variance) & (d.mask == 0)
    sigma = float(np.sqrt(np.median(d.variance[ok])))
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / _MOFFAT_BETA) - 1.0))
    yy, xx = np.mgrid[:ny, :nx]
    for exposure, threshold in itertools.product(exposures, thresholds):
        cat = detect_sources(exposure.masked_image, threshold=threshold)
        peak = np.clip(np.asarray(cat["flux"], float), 0, None) * (_MOFFAT_BETA - 1.0) / (
            np.pi * alpha**2)
        radius = alpha * np.sqrt(np.clip((peak / (level * sigma)) ** (1.0 / _MOFFAT_BETA) - 1.0,
                                         0.0, None))
        radius = np.maximum(radius, 2.0 * fwhm)
        for x, y, r in zip(cat["x"], cat["y"], radius):
            x0, x1 = int(max(x - r, 0)), int(min(x + r + 1, nx))
            y0, y1 = int(max(y - r, 0)), int(min(y + r + 1, ny))
            if x0 < x1 and y0 < y1:
                ok[y0:y1, x0:x1] &= (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 > r * r
    return ok


def test_saao_example_config_is_crowded_field_config():
    cfg = ImagePsfMatchConfig.from_yaml(SAAO_CONFIG)
    assert cfg.kernel.active.fit_for_background
    assert not cfg.select.reject_blended
    assert cfg.select.target_kernel_sources >= 30


@pytest.mark.slow
@pytest.mark.parametrize("name", SAAO_FRAMES)
def test_saao_star_free_noise_is_gaussian(shared_data, name):
    """Issue 3: 0100 subtracted from each frame; median |D/σ| off the stars is 0.6745 ± 0.07."""
    folder = saao_folder(shared_data)
    template, science, result = saao_subtraction(str(folder), name)
    d = result.subtracted_exposure
    md = result.metadata
    # a crowded field still gives a well-constrained spatial model at the configured orders
    assert md["nGoodCandidates"] >= 30
    assert not md["spatialOrderReduced"]
    star_free = star_free_pixels(d, (result.warped_exposure, science), md["scienceFwhmPix"])
    assert star_free.sum() > 50_000
    z = d.image[star_free] / np.sqrt(d.variance[star_free])
    assert np.median(np.abs(z)) == pytest.approx(0.6745, abs=0.07)
    # no large-scale offset left by the differential background
    assert abs(np.median(z)) < 0.1
