"""The ip_diffim engine behaviours (reference §6): single fits, clipping, spatial fit."""

import numpy as np
import pytest
from scipy import ndimage

from diffim.basis import make_alard_lupton_basis, make_delta_function_basis
from diffim.candidates import BAD, GOOD, KernelCandidate, SpatialCellSet
from diffim.config import ImagePsfMatchConfig
from diffim.image import MaskedImage
from diffim.solve import build_candidate, clipped_mean_std, design_columns, kernel_sum_clip
from diffim.spatial import SpatialFunction, SpatialKernel, fit_spatial_kernel
from diffim.task import ImagePsfMatchTask
from tests import reference as ref


def _gauss_image(shape, positions, sigma, flux=1e4):
    y, x = np.mgrid[:shape[0], :shape[1]]
    img = np.zeros(shape)
    for px, py in positions:
        img += flux / (2 * np.pi * sigma**2) * np.exp(-((x - px) ** 2 + (y - py) ** 2)
                                                      / (2 * sigma**2))
    return img


def _candidate(t, s, var=1.0, x=0.0, y=0.0, cid=0):
    tm = MaskedImage(t.astype(np.float32), variance=np.full(t.shape, var, np.float32))
    sm = MaskedImage(s.astype(np.float32), variance=np.full(s.shape, var, np.float32))
    return KernelCandidate(id=cid, x=x, y=y, template=tm, science=sm, rating=1.0)


@pytest.fixture
def df_config():
    cfg = ImagePsfMatchConfig()
    cfg.kernel.name = "DF"
    cfg.kernel.active.kernel_size = 7
    cfg.kernel.active.use_regularization = False
    cfg.kernel.active.fit_for_background = True
    return cfg.kernel.active


@pytest.fixture
def stamp():
    rng = np.random.default_rng(1)
    img = _gauss_image((41, 41), [(20.3, 19.6), (8, 30), (31, 9)], 2.0) + 50
    return img + rng.normal(0, 0.5, img.shape)


def test_self_match_gives_delta(df_config, stamp):
    basis = make_delta_function_basis(7)
    sol = build_candidate(_candidate(stamp, stamp), basis, df_config, fit_for_background=True)
    k = sol.kernel_image
    assert k[3, 3] == pytest.approx(sol.kernel_sum, abs=1e-5)
    k[3, 3] = 0
    np.testing.assert_allclose(k, 0, atol=1e-5)
    assert sol.background == pytest.approx(0, abs=1e-4)


def test_scaled_science_gives_kernel_sum(df_config, stamp):
    basis = make_delta_function_basis(7)
    sol = build_candidate(_candidate(stamp, 2.7 * stamp), basis, df_config,
                          fit_for_background=True)
    assert sol.kernel_sum == pytest.approx(2.7, abs=1e-4)


def test_offset_science_gives_background(df_config, stamp):
    basis = make_delta_function_basis(7)
    sol = build_candidate(_candidate(stamp, stamp + 11.3), basis, df_config,
                          fit_for_background=True)
    assert sol.background == pytest.approx(11.3, abs=1e-3)


def test_known_gaussian_kernel_recovered(df_config):
    """A hot pixel convolved with a Gaussian(σx=2, σy=3): the DF kernel is that Gaussian."""
    df_config.kernel_size = 15
    u = np.arange(-7, 8)
    truth = np.exp(-u[None, :] ** 2 / 8.0 - u[:, None] ** 2 / 18.0)
    truth /= truth.sum()
    t = np.zeros((45, 45))
    t[22, 22] = 1.0
    s = ndimage.correlate(t, truth, mode="constant")
    cand = _candidate(t, s, var=1e-4)
    sol = build_candidate(cand, make_delta_function_basis(15), df_config,
                          fit_for_background=False)
    big = truth > 1e-4
    np.testing.assert_allclose(sol.kernel_image[big] / truth[big], 1.0, atol=1e-5)
    assert sol.kernel_sum == pytest.approx(s.sum(), rel=1e-6)


def test_al_recovers_gaussian_matching_kernel():
    """Template PSF σ=1.5 → science σ=2.5: the AL kernel sum is the flux ratio."""
    cfg = ImagePsfMatchConfig().kernel.al
    basis = make_alard_lupton_basis(cfg, 1.5 / 0.4247, 2.5 / 0.4247)
    pos = [(21.2, 20.7)]
    t = _gauss_image((43, 43), pos, 1.5) + 10
    s = 1.3 * _gauss_image((43, 43), pos, 2.5) + 10
    sol = build_candidate(_candidate(t, s, var=1.0), basis, cfg, fit_for_background=True)
    assert sol.kernel_sum == pytest.approx(1.3, rel=1e-3)
    # the kernel is a Gaussian of σ = sqrt(2.5² − 1.5²) = 2
    u = np.arange(-(basis.size // 2), basis.size // 2 + 1)
    g = np.exp(-(u[None, :] ** 2 + u[:, None] ** 2) / 8.0)
    g *= 1.3 / g.sum()
    assert np.abs(sol.kernel_image - g).max() < 0.01 * g.max()


def test_zero_variance_rejected(df_config, stamp):
    df_config.constant_variance_weighting = False
    cand = _candidate(stamp, stamp, var=0.0)
    from diffim.exceptions import KernelSolutionError

    with pytest.raises(KernelSolutionError, match="variance"):
        build_candidate(cand, make_delta_function_basis(7), df_config, fit_for_background=True)


def test_clipped_statistics_reject_only_outlier():
    mean, std = clipped_mean_std([1, 1, 1, 1, 2, 3, 4])
    assert mean == pytest.approx(np.mean([1, 1, 1, 1, 2, 3, 4]))
    assert std == pytest.approx(np.std([1, 1, 1, 1, 2, 3, 4], ddof=1))
    mean50, std50 = clipped_mean_std([1, 1, 1, 1, 2, 3, 4, 50])
    assert (mean50, std50) == pytest.approx((mean, std))


@pytest.mark.parametrize("clipping,expected", [(True, 1), (False, 0)])
def test_kernel_sum_clipping(clipping, expected):
    cfg = ImagePsfMatchConfig().kernel.al
    cfg.kernel_sum_clipping = clipping
    cell_set = SpatialCellSet((0, 0, 800, 100), 100, 100)
    from diffim.candidates import CandidateSolution

    for i, ks in enumerate([1, 1, 1, 1, 2, 3, 4, 50]):
        c = KernelCandidate(id=i, x=50 + 100 * i, y=50, template=None, science=None, rating=1)
        c.orig = CandidateSolution(np.zeros(1), 0.0, np.zeros((1, 1)), float(ks), None, None)
        c.status = GOOD
        cell_set.insert(c)
    _, _, n_rej = kernel_sum_clip(cell_set, cfg)
    assert n_rej == expected
    bad = [c.orig.kernel_sum for c in cell_set.candidates() if c.status == BAD]
    assert bad == ([50.0] if clipping else [])


def _fake_kernel_set(spatial_order=1, kind="polynomial", xy0=(0, 0), seed=0):
    """Stars on a 3×3 grid of cells, science = template ⋆ a known spatially varying kernel."""
    cfg = ImagePsfMatchConfig()
    kc = cfg.kernel.active
    kc.alard_n_gauss = 1
    kc.alard_sig_gauss = [2.5]
    kc.alard_deg_gauss = [2]
    kc.scale_by_fwhm = False
    kc.spatial_kernel_order = spatial_order
    kc.spatial_model_type = kind
    kc.fit_for_background = False
    kc.single_kernel_clipping = kc.kernel_sum_clipping = kc.spatial_kernel_clipping = False
    kc.size_cell_x = kc.size_cell_y = 128
    kc.n_star_per_cell = -1
    basis = make_alard_lupton_basis(kc)
    shape = (384, 384)
    bbox = (xy0[0], xy0[1], xy0[0] + shape[1], xy0[1] + shape[0])
    func = SpatialFunction(kind, spatial_order, bbox)
    rng = np.random.default_rng(seed)
    truth = np.zeros((basis.n, func.n_terms))
    truth[0, 0] = 1.0
    truth[1:, 0] = rng.uniform(-0.01, 0.01, basis.n - 1)
    if spatial_order:
        span = 384.0 if kind == "polynomial" else 1.0
        truth[1:, 1:] = rng.uniform(-0.01, 0.01, (basis.n - 1, func.n_terms - 1)) / span
    kernel = SpatialKernel(basis.images, func, truth)
    centres = [(64 + 128 * i + 0.3 * j, 64 + 128 * j - 0.2 * i) for i in range(3)
               for j in range(3)]
    extra = [(40 + 128 * i, 80 + 128 * j) for i in range(3) for j in range(3)]
    t = _gauss_image(shape, centres + extra, 1.2) + 5.0
    from tests.reference import convolve_brute_force

    s = np.array(t)
    # the truth image only has to be right where the stamps are
    c = kernel.size // 2
    for px, py in centres + extra:
        y0s, x0s = int(py) - 25, int(px) - 25
        sub = t[y0s - c:y0s + 51 + c, x0s - c:x0s + 51 + c]
        conv = convolve_brute_force(sub, kernel, (x0s - c + xy0[0], y0s - c + xy0[1]))
        s[y0s:y0s + 51, x0s:x0s + 51] = conv[c:-c, c:-c]
    tm = MaskedImage(t.astype(np.float32), variance=np.ones(shape, np.float32), xy0=xy0)
    sm = MaskedImage(s.astype(np.float32), variance=np.ones(shape, np.float32), xy0=xy0)
    positions = [(px + xy0[0], py + xy0[1]) for px, py in centres + extra]
    return cfg, basis, tm, sm, positions, truth


def test_spatial_coefficients_recovered():
    cfg, basis, tm, sm, positions, truth = _fake_kernel_set()
    task = ImagePsfMatchTask(cfg)
    res = task.match_masked_images(tm, sm, candidate_list=np.array(positions))
    kernel = res.psf_matching_kernel
    got = kernel.coefficients
    # the fit assumes coefficients constant across each stamp (as ip_diffim does), which
    # biases the constants of odd terms slightly when the kernel varies within a stamp
    big = np.abs(truth) > 1e-6
    np.testing.assert_allclose(got[big], truth[big], rtol=0.05)
    assert np.abs(got[~big]).max() < 1e-5
    true_kernel = SpatialKernel(kernel.basis_images, kernel.function, truth)
    for x, y in [(0, 0), (100, 300), (383, 10), (200, 200)]:
        k_true = true_kernel.evaluate(x, y)
        assert np.abs(kernel.evaluate(x, y) - k_true).max() < 0.01 * k_true.max()
        assert kernel.kernel_sum(x, y) == pytest.approx(1.0, abs=2e-3)


def test_chebyshev_xy0_invariance():
    a = _fake_kernel_set(kind="chebyshev1")
    b = _fake_kernel_set(kind="chebyshev1", xy0=(5000, 7000))
    ra = ImagePsfMatchTask(a[0]).match_masked_images(a[2], a[3], candidate_list=a[4])
    rb = ImagePsfMatchTask(b[0]).match_masked_images(b[2], b[3], candidate_list=b[4])
    np.testing.assert_allclose(ra.psf_matching_kernel.coefficients,
                               rb.psf_matching_kernel.coefficients, atol=1e-4)
    np.testing.assert_allclose(ra.psf_matching_kernel.evaluate(10, 20),
                               rb.psf_matching_kernel.evaluate(5010, 7020), atol=1e-6)


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("fit_bg,bg_order", [(False, 1), (True, 0), (True, 2)])
def test_spatial_term_counts(order, fit_bg, bg_order):
    cfg, basis, tm, sm, positions, _ = _fake_kernel_set()
    kc = cfg.kernel.active
    kc.spatial_bg_order = bg_order
    cell_set = SpatialCellSet(tm.bbox, 128, 128)
    from diffim.candidates import make_candidates
    from diffim.solve import build_single_kernels

    for c in make_candidates(tm, sm, positions, kc, basis.size):
        cell_set.insert(c)
    build_single_kernels(cell_set, basis, kc, fit_for_background=fit_bg)
    kernel, bg, info = fit_spatial_kernel(cell_set.visit(-1), basis, kc, tm.bbox,
                                          fit_for_background=fit_bg, spatial_kernel_order=order)
    n_kt = (order + 1) * (order + 2) // 2
    n_bt = (bg_order + 1) * (bg_order + 2) // 2 if fit_bg else 0
    assert info["n_unknowns"] == (basis.n - 1) * n_kt + 1 + n_bt
    assert kernel.coefficients.shape == (basis.n, n_kt)
    assert not kernel.coefficients[0, 1:].any()  # the kernel sum is spatially constant
    assert bg.coefficients.size == n_bt
    assert bg.is_zero == (not fit_bg)


def test_unknown_spatial_model_raises():
    from diffim.exceptions import ConfigError

    with pytest.raises(ConfigError):
        SpatialFunction("foo", 1, (0, 0, 10, 10))


def test_design_columns_of_the_separable_al_basis():
    # the AL functions share their x factors; the separable path correlates each distinct one
    # once, which must give the correlation with every full basis image
    basis = make_alard_lupton_basis(ImagePsfMatchConfig().kernel.al)
    assert basis.is_separable and len({r.tobytes() for r in basis.sep_x}) < basis.n
    stamp = np.random.default_rng(4).normal(100.0, 10.0, size=(45, 50))
    cols = design_columns(stamp, basis)
    expected = np.array([ref.correlate_valid(stamp, b) for b in basis.images])
    np.testing.assert_allclose(cols, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
