"""Property-based tests (hypothesis): config validation and the solver on random stamps.

Properties:

* any mapping of config keys to values either loads into a valid config (which then
  survives a YAML round trip exactly) or raises :class:`~diffim.exceptions.ConfigError`
  naming the key; never another exception;
* any text given to ``from_yaml`` loads or raises ``ConfigError``;
* a single-kernel solve on random stamps returns a finite kernel or raises
  ``KernelSolutionError``;
* PSF matching of random small images with hostile pixels raises a ``DiffimError`` or
  returns images in which no NaN (or infinite variance) appears outside ``NO_DATA``.

Examples are derandomized so that every run checks the same inputs.
"""

import dataclasses
import logging

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis", reason="pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from diffim.basis import make_kernel_basis  # noqa: E402
from diffim.candidates import make_candidates  # noqa: E402
from diffim.config import ImagePsfMatchConfig  # noqa: E402
from diffim.exceptions import (ConfigError, DiffimError, KernelSolutionError,  # noqa: E402
                               NoKernelCandidatesError)
from diffim.image import MaskedImage  # noqa: E402
from diffim.simulate import render_psf_stamp  # noqa: E402
from diffim.solve import build_candidate  # noqa: E402
from diffim.task import ImagePsfMatchTask  # noqa: E402

FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SOLVER = settings(max_examples=40, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def _quiet():
    """The hostile inputs make the task log many warnings; keep the output readable."""
    logger = logging.getLogger("diffim")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# config validation
# ---------------------------------------------------------------------------------------------

def _leaves(d, prefix=""):
    out = []
    for key, value in d.items():
        if isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


LEAVES = _leaves(ImagePsfMatchConfig().to_dict())
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(-2, 80),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0.0, 100.0),
    st.text(max_size=12),
    st.sampled_from(["AL", "DF", "auto", "lanczos3", "SVD", "relative", "NO_DATA",
                     "convolveScience", "chebyshev1", "polynomial", "minimizeBiasedRisk"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4),
                   st.dictionaries(st.text(max_size=6), SCALARS, max_size=2))


def _assert_names_key(err, keys):
    text = str(err)
    # a cross-field error names at least one of the keys involved; one override is enough
    # to tell which
    assert any(k.rsplit(".", 1)[-1] in text for k in keys) or len(keys) > 1, (keys, text)


def _round_trip(cfg):
    cfg.validate()
    again = ImagePsfMatchConfig.from_yaml(cfg.to_yaml())
    assert again.to_dict() == cfg.to_dict()
    again = ImagePsfMatchConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


@FAST
@given(st.dictionaries(st.sampled_from(LEAVES), VALUES, min_size=1, max_size=3))
def test_config_random_values(overrides):
    try:
        cfg = ImagePsfMatchConfig.from_dict(overrides)
    except ConfigError as err:
        _assert_names_key(err, list(overrides))
        return
    _round_trip(cfg)


@FAST
@given(st.sampled_from(LEAVES), VALUES)
def test_config_attribute_assignment_then_validate(key, value):
    """Setting an attribute directly, then validate(): ConfigError or a valid config."""
    cfg = ImagePsfMatchConfig()
    *path, leaf = key.split(".")
    target = cfg
    for part in path:
        target = getattr(target, part.lower() if part in ("AL", "DF") else part)
    setattr(target, leaf, value)
    try:
        cfg.validate()
    except ConfigError as err:
        _assert_names_key(err, [key])
        return
    # a value that validates is also one that dumps and loads (as the same value)
    _round_trip(cfg)


KEYS = st.one_of(st.sampled_from(LEAVES), st.text(max_size=20),
                 st.sampled_from(["kernel", "kernel.active", "select", "qa", "registration",
                                  "kernel.AL", "kernel.df", "fitForBackground", "sizeCellX",
                                  "kernel.active.alardNGauss", "..", "a..b", "kernel."]))
TREES = st.recursive(VALUES, lambda inner: st.dictionaries(KEYS, inner, max_size=3),
                     max_leaves=8)


@FAST
@given(st.dictionaries(KEYS, TREES, max_size=4))
def test_config_random_trees(data):
    try:
        cfg = ImagePsfMatchConfig.from_dict(data)
    except ConfigError:
        return
    _round_trip(cfg)


@FAST
@given(st.one_of(st.text(max_size=80),
                 st.dictionaries(KEYS, TREES, max_size=3).map(
                     lambda d: yaml.safe_dump(d, default_flow_style=True))))
def test_config_random_yaml_text(text):
    try:
        cfg = ImagePsfMatchConfig.from_yaml(text)
    except ConfigError:
        return
    _round_trip(cfg)


@FAST
@given(st.integers(1, 8), st.lists(st.integers(-2, 8), max_size=9),
       st.lists(st.floats(-1.0, 10.0, allow_nan=False), max_size=9))
def test_config_al_lists_consistency(n_gauss, degrees, sigmas):
    data = {"kernel": {"AL": {"alard_n_gauss": n_gauss, "alard_deg_gauss": degrees,
                              "alard_sig_gauss": sigmas}}}
    consistent = (len(degrees) == n_gauss == len(sigmas) and all(d >= 0 for d in degrees)
                  and all(s > 0 for s in sigmas))
    if consistent:
        cfg = ImagePsfMatchConfig.from_dict(data)
        assert cfg.kernel.al.alard_deg_gauss == tuple(degrees)
        _round_trip(cfg)
    else:
        with pytest.raises(ConfigError, match="alard_"):
            ImagePsfMatchConfig.from_dict(data)


@FAST
@given(st.integers(-5, 60), st.booleans())
def test_config_kernel_size_parity(size, scale_by_fwhm):
    data = {"kernel": {"active": {"kernel_size": size, "scale_by_fwhm": scale_by_fwhm}}}
    if size >= 1 and size % 2 == 1:
        assert ImagePsfMatchConfig.from_dict(data).kernel.active.kernel_size == size
    else:
        with pytest.raises(ConfigError, match="kernel_size"):
            ImagePsfMatchConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------
# the solver on random stamps
# ---------------------------------------------------------------------------------------------

def _small_kernel_config(fit_for_background, constant_variance_weighting, check_condition,
                         clipping=True):
    cfg = ImagePsfMatchConfig()
    k = cfg.kernel.active
    # without clipping, bad fits reach the output: the strictest test of NaN handling
    k.single_kernel_clipping = k.kernel_sum_clipping = k.spatial_kernel_clipping = clipping
    k.kernel_size_min = k.kernel_size_max = k.kernel_size = 11
    k.fit_for_background = fit_for_background
    k.constant_variance_weighting = constant_variance_weighting
    k.check_condition_number = check_condition
    k.spatial_kernel_order = 1
    k.spatial_bg_order = 0
    k.size_cell_x = k.size_cell_y = 32
    cfg.select.min_kernel_sources = 1
    cfg.validate()
    return cfg


VARIANCE_MODES = ["model", "zero", "negative", "tiny", "huge", "zero-patch", "inf-patch",
                  "constant"]


def _stamp_images(rng, shape, flux, sky, noise, fwhm_t, fwhm_s, scale, var_mode,
                  positions):
    ny, nx = shape
    tmpl = np.full(shape, sky, np.float64)
    sci = np.full(shape, sky * scale, np.float64)
    for x, y in positions:
        for img, fwhm, f in ((tmpl, fwhm_t, flux), (sci, fwhm_s, flux * scale)):
            stamp = render_psf_stamp(fwhm, 15, dx=x % 1.0, dy=y % 1.0)
            ix, iy = int(x), int(y)
            y0, x0 = max(iy - 7, 0), max(ix - 7, 0)
            y1, x1 = min(iy + 8, ny), min(ix + 8, nx)
            img[y0:y1, x0:x1] += f * stamp[y0 - iy + 7:y1 - iy + 7, x0 - ix + 7:x1 - ix + 7]
    tmpl += rng.normal(0.0, noise, shape)
    sci += rng.normal(0.0, noise, shape)
    var = np.full(shape, max(noise, 1e-3) ** 2)
    if var_mode == "zero":
        var[:] = 0.0
    elif var_mode == "negative":
        var[:] = -1.0
    elif var_mode == "tiny":
        var[:] = 1e-30
    elif var_mode == "huge":
        var[:] = 1e30
    elif var_mode == "zero-patch":
        var[ny // 3:ny // 2, :] = 0.0
    elif var_mode == "inf-patch":
        var[:, nx // 3:nx // 2] = np.inf
    elif var_mode == "constant":
        tmpl[:] = sky
        sci[:] = sky
    return (MaskedImage(tmpl, variance=var), MaskedImage(sci, variance=var.copy()))


@SOLVER
@given(seed=st.integers(0, 2**31 - 1),
       flux=st.one_of(st.floats(-1e5, 1e7), st.just(0.0)),
       sky=st.floats(-1e4, 1e5),
       noise=st.one_of(st.just(0.0), st.floats(1e-3, 300.0)),
       fwhm_t=st.floats(0.8, 4.0), fwhm_s=st.floats(0.8, 5.0), scale=st.floats(-2.0, 10.0),
       var_mode=st.sampled_from(VARIANCE_MODES), fit_for_background=st.booleans(),
       constant_weighting=st.booleans(), check_condition=st.booleans())
def test_single_kernel_solve_on_random_stamps(seed, flux, sky, noise, fwhm_t, fwhm_s, scale,
                                              var_mode, fit_for_background,
                                              constant_weighting, check_condition):
    rng = np.random.default_rng(seed)
    cfg = _small_kernel_config(fit_for_background, constant_weighting, check_condition)
    active = cfg.kernel.active
    t, s = _stamp_images(rng, (41, 41), flux, sky, noise, fwhm_t, fwhm_s, scale, var_mode,
                         [(20.3, 19.6)])
    basis = make_kernel_basis(active, fwhm_t, fwhm_s)
    try:
        cands = make_candidates(t, s, [(20.3, 19.6)], active, basis.size)
    except NoKernelCandidatesError:
        assert var_mode == "inf-patch"          # non-finite stamps are refused, nothing else
        return
    try:
        sol = build_candidate(cands[0], basis, active, fit_for_background=fit_for_background)
    except KernelSolutionError as err:
        hypothesis.event("KernelSolutionError")
        assert str(err)
        return
    hypothesis.event("solved")
    assert np.isfinite(sol.kernel_image).all()
    assert np.isfinite(sol.background)
    assert np.isfinite(sol.kernel_sum)


HOSTILE = ["none", "nan-rows-flagged", "nan-template-unflagged", "inf-template-unflagged",
           "sat-patch", "zero-variance-patch", "negative-variance", "inf-variance-template",
           "everything-masked", "constant", "huge-values"]


@settings(SOLVER, max_examples=80)
@given(seed=st.integers(0, 2**31 - 1), n_stars=st.sampled_from([0, 3, 4, 5, 6, 8]),
       flux=st.floats(2e3, 5e5), scale=st.floats(0.3, 3.0),
       fwhm_t=st.floats(1.5, 3.0), fwhm_s=st.floats(1.5, 4.0),
       hostile=st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=3, unique=True),
       give_candidates=st.sampled_from([True, True, False]),
       fit_for_background=st.booleans(), clipping=st.booleans())
def test_psf_matching_random_images_never_leaks_nan(seed, n_stars, flux, scale, fwhm_t,
                                                    fwhm_s, hostile, give_candidates,
                                                    fit_for_background, clipping):
    """The convolved image (the template) may hold unflagged non-finite pixels; the science
    image follows the read_fits convention (non-finite pixels are NO_DATA), see
    test_robustness.test_unflagged_nan_in_science_never_escapes_unmasked."""
    rng = np.random.default_rng(seed)
    shape = (72, 72)
    positions = rng.uniform(14, 58, size=(n_stars, 2))
    t, s = _stamp_images(rng, shape, flux, 100.0, 5.0, fwhm_t, fwhm_s, scale, "model",
                         positions)
    nodata_t = t.get_plane_bitmask("NO_DATA")
    for h in hostile:
        r0 = int(rng.integers(0, 60))
        if h == "nan-rows-flagged":       # what read_fits produces for NaN rows
            for mi in (t, s):
                mi.image[r0:r0 + 3] = np.nan
                mi.variance[r0:r0 + 3] = np.inf
                mi.mask[r0:r0 + 3] |= nodata_t
        elif h == "nan-template-unflagged":
            t.image[:, r0] = np.nan
        elif h == "inf-template-unflagged":
            t.image[r0, r0:r0 + 5] = -np.inf
        elif h == "sat-patch":
            s.mask[r0:r0 + 6, r0:r0 + 6] |= s.get_plane_bitmask("SAT")
        elif h == "zero-variance-patch":
            s.variance[r0:r0 + 8, :] = 0.0
        elif h == "negative-variance":
            t.variance[:, r0:r0 + 4] = -2.0
        elif h == "inf-variance-template":
            t.variance[r0:r0 + 2, :] = np.inf
        elif h == "everything-masked":
            s.mask[:] |= s.get_plane_bitmask("BAD")
        elif h == "constant":
            t.image[:] = 100.0
        elif h == "huge-values":
            t.image *= np.float32(1e12)
            t.variance *= np.float32(1e24)
    cfg = _small_kernel_config(fit_for_background, True, False, clipping=clipping)
    task = ImagePsfMatchTask(cfg)
    candidates = positions if give_candidates and n_stars else None
    t_in, s_in = t.copy(), s.copy()
    try:
        res = task.subtract_masked_images(t, s, candidate_list=candidates,
                                          template_fwhm_pix=fwhm_t, science_fwhm_pix=fwhm_s)
    except DiffimError as err:
        hypothesis.event(f"typed error: {type(err).__name__}: {str(err)[:50]}")
        assert str(err)
        return
    finally:
        for a, b in zip((t.image, t.mask, t.variance, s.image, s.mask, s.variance),
                        (t_in.image, t_in.mask, t_in.variance, s_in.image, s_in.mask,
                         s_in.variance)):
            np.testing.assert_array_equal(a, b)    # inputs are never modified
    hypothesis.event("result")
    for mi in (res.matched_image, res.subtracted_masked_image):
        nodata = (mi.mask & mi.get_plane_bitmask("NO_DATA")) != 0
        assert np.isfinite(mi.image[~nodata]).all(), "NaN outside NO_DATA"
        assert not np.isnan(mi.variance[~nodata]).any(), "NaN variance outside NO_DATA"
        assert np.isnan(mi.image[nodata]).all() or not nodata.any() or \
            np.isinf(mi.variance[nodata]).all()
    assert np.isfinite(res.psf_matching_kernel.evaluate(36, 36)).all()


def test_config_dataclass_fields_have_docs():
    """Every field the property tests can reach is documented (errors.md points there)."""
    cfg = ImagePsfMatchConfig()
    docs = cfg.field_docs()
    for f in dataclasses.fields(cfg):
        assert docs.get(f.name), f.name
