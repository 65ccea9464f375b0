"""Core engine on real telescope data: DECam i-band cutouts (template OBS18a, science OBS04a)."""

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
