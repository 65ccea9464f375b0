"""Task-level behaviour: entry points, modes, errors, kernel and background I/O."""

import numpy as np
import pytest
from astropy.wcs import WCS

from diffim.config import ImagePsfMatchConfig
from diffim.exceptions import (
    ImageShapeMismatchError,
    ImagesNotRegisteredError,
    NoKernelCandidatesError,
)
from diffim.image import Exposure, MaskedImage
from diffim.simulate import simulate_pair
from diffim.spatial import BackgroundModel, SpatialKernel
from diffim.task import ImagePsfMatchTask


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(shape=(384, 384), n_stars=250, template_fwhm=2.5, science_fwhm=3.5,
                         flux_scale=1.3, n_transients=3, seed=11)


@pytest.fixture
def config():
    cfg = ImagePsfMatchConfig()
    cfg.kernel.active.fit_for_background = True
    cfg.kernel.active.spatial_kernel_order = 1
    cfg.kernel.active.spatial_bg_order = 1
    return cfg


def test_subtract_exposures_outputs(pair, config):
    res = ImagePsfMatchTask(config).subtract_exposures(pair.template, pair.science)
    d = res.subtracted_exposure
    assert d.wcs is not None and d.psf_fwhm == pytest.approx(pair.science.psf_fwhm)
    assert res.matched_exposure.psf_fwhm is None
    assert res.warped_exposure is pair.template
    assert res.psf_matching_kernel.kernel_sum(192, 192) == pytest.approx(1.3, rel=0.01)
    table = res.kernel_cell_set.to_table()
    assert len(table) > 10
    assert set(table["status"]) <= {"GOOD", "BAD", "UNKNOWN"}
    assert (table["status"] == "GOOD").sum() >= 6
    assert res.metadata["mode"] == "convolveTemplate"
    for key in ("spatialConditionNum", "spatialKernelSum", "ALBasisSigGauss", "nGoodCandidates"):
        assert key in res.metadata
    timings = res.metadata["timings"]
    assert list(timings) == ["warp", "detect", "select", "solve", "spatial", "convolve",
                             "subtract"]
    assert all(t["wall"] >= 0 and t["cpu"] >= 0 for t in timings.values())
    assert timings["convolve"]["wall"] > 0


def test_kernel_and_background_fits_round_trip(pair, config, tmp_path):
    res = ImagePsfMatchTask(config).subtract_exposures(pair.template, pair.science)
    path = tmp_path / "kernel.fits"
    res.psf_matching_kernel.write_fits(path, background=res.background_model)
    k2 = SpatialKernel.read_fits(path)
    b2 = BackgroundModel.read_fits(path)
    for x, y in [(0, 0), (100, 300), (383, 383)]:
        np.testing.assert_allclose(k2.evaluate(x, y), res.psf_matching_kernel.evaluate(x, y))
        assert b2.evaluate(x, y) == pytest.approx(res.background_model.evaluate(x, y))


def test_auto_mode_matches_explicit(pair, config):
    task = ImagePsfMatchTask(config)
    auto = task.subtract_exposures(pair.template, pair.science, mode="auto")
    explicit = task.subtract_exposures(pair.template, pair.science, mode="convolveTemplate")
    assert auto.metadata["mode"] == "convolveTemplate"
    np.testing.assert_array_equal(auto.subtracted_exposure.image,
                                  explicit.subtracted_exposure.image)


def test_convolve_science_mode_puts_difference_on_template_scale(pair, config):
    # swap roles: the "template" is now the broader image, so auto convolves the science
    res = ImagePsfMatchTask(config).subtract_exposures(pair.science, pair.template, mode="auto")
    assert res.metadata["mode"] == "convolveScience"
    ksum = res.psf_matching_kernel.kernel_sum(192, 192)
    assert ksum == pytest.approx(1.3, rel=0.01)
    d = res.subtracted_exposure
    assert d.psf_fwhm == pytest.approx(pair.science.psf_fwhm)
    # D = (K⋆S + bg − T)/ΣK: transients of the template argument come out negative and
    # divided by the kernel sum
    for row in pair.transients:
        x, y = int(round(row["x"])), int(round(row["y"]))
        r = 6
        flux = d.image[y - r:y + r + 1, x - r:x + r + 1].sum()
        assert flux == pytest.approx(-row["flux"] / ksum, rel=0.15)


def test_shape_mismatch(pair):
    t = pair.template.masked_image.subimage(0, 0, 300, 300)
    with pytest.raises(ImageShapeMismatchError, match="same pixel grid"):
        ImagePsfMatchTask().subtract_masked_images(t, pair.science.masked_image)


def test_wcs_mismatch_not_registered(pair, config):
    wcs = pair.template.wcs.deepcopy()
    wcs.wcs.crpix = wcs.wcs.crpix + 1.0
    moved = Exposure(pair.template.masked_image, wcs=wcs, psf_fwhm=pair.template.psf_fwhm)
    with pytest.raises(ImagesNotRegisteredError):
        ImagePsfMatchTask().subtract_exposures(moved, pair.science, do_warping=False)
    # with warping (the default) the template is resampled by one pixel and subtracts fine
    res = ImagePsfMatchTask(config).subtract_exposures(moved, pair.science)
    assert res.metadata["registrationMethod"] == "wcs"
    warped = res.warped_exposure
    assert warped is not moved and warped.bbox == pair.science.bbox
    # CRPIX + 1 means template pixel x + 1 sees what science pixel x sees: an integer shift
    np.testing.assert_allclose(warped.image[20:-20, 20:-20],
                               moved.image[21:-19, 21:-19], rtol=1e-5, atol=1e-2)
    d = res.subtracted_exposure
    z = d.image / np.sqrt(d.variance)
    inner = z[30:-30, 30:-30]
    assert np.isfinite(inner).all()
    assert np.median(np.abs(inner)) == pytest.approx(0.6745, abs=0.1)


def test_empty_candidate_list(pair):
    with pytest.raises(NoKernelCandidatesError, match="no candidates"):
        ImagePsfMatchTask().subtract_exposures(pair.template, pair.science,
                                               candidate_list=np.zeros((0, 2)))


def test_candidates_off_image_raise(pair):
    with pytest.raises(NoKernelCandidatesError, match="outside the image"):
        ImagePsfMatchTask().subtract_exposures(pair.template, pair.science,
                                               candidate_list=[(-50, -50), (5000, 10)])


def test_inputs_not_modified(pair, config):
    before = [a.copy() for a in (pair.template.image, pair.template.mask, pair.science.variance)]
    ImagePsfMatchTask(config).subtract_exposures(pair.template, pair.science)
    for a, b in zip(before, (pair.template.image, pair.template.mask, pair.science.variance)):
        np.testing.assert_array_equal(a, b)


def test_masked_image_entry_point_matches_exposure_one(pair, config):
    task = ImagePsfMatchTask(config)
    r1 = task.subtract_masked_images(pair.template.masked_image, pair.science.masked_image,
                                     template_fwhm_pix=pair.template.psf_fwhm,
                                     science_fwhm_pix=pair.science.psf_fwhm)
    r2 = task.subtract_exposures(pair.template, pair.science)
    np.testing.assert_allclose(r1.subtracted_masked_image.image,
                               r2.subtracted_exposure.image, equal_nan=True)


def test_wcs_none_on_both_is_registered(pair, config):
    t = Exposure(pair.template.masked_image, psf_fwhm=pair.template.psf_fwhm)
    s = Exposure(pair.science.masked_image, psf_fwhm=pair.science.psf_fwhm)
    res = ImagePsfMatchTask(config).subtract_exposures(t, s)
    assert res.subtracted_exposure.wcs is None
    assert isinstance(res.subtracted_masked_image, MaskedImage)
    assert isinstance(pair.template.wcs, WCS)
