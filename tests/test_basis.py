"""Kernel bases: AL sigmas and sizes (HEAD rule), normalization, DF basis, regularization."""

import numpy as np
import pytest

from diffim.basis import (
    make_alard_lupton_basis,
    make_delta_function_basis,
    make_regularization_matrix,
    renormalize_kernel_list,
)
from diffim.config import ImagePsfMatchConfig
from diffim.exceptions import ConfigError


@pytest.fixture
def al():
    return ImagePsfMatchConfig().kernel.al


@pytest.fixture
def df():
    return ImagePsfMatchConfig().kernel.df


def _check_norms(images):
    assert images[0].sum() == pytest.approx(1.0, abs=1e-7)
    for b in images[1:]:
        assert b.sum() == pytest.approx(0.0, abs=1e-7)
        assert np.sum(b * b) == pytest.approx(1.0, abs=1e-7)


def test_default_basis_counts_and_norms(al):
    basis = make_alard_lupton_basis(al)
    assert basis.n == 15 + 6 + 6 == 27
    assert basis.size == 21
    assert basis.info["ALBasisMode"] == "config"
    _check_norms(basis.images)


@pytest.mark.parametrize("degrees,count", [([4, 2, 2], 27), ([1, 1, 1], 9), ([6, 4, 2], 49),
                                            ([0, 0, 0], 3)])
def test_counts(al, degrees, count):
    al.alard_deg_gauss = degrees
    assert make_alard_lupton_basis(al).n == count


@pytest.mark.parametrize("fwhms,sigmas,size", [
    ((3, 4), [0.70, 1.40, 2.80], 21),
    ((3, 6), [1.103, 2.207, 4.413], 27),
    ((3, 8), [1.575, 3.149, 6.299], 35),
    ((4, 3), [0.562, 1.124, 2.247], 21),
])
def test_head_sigma_rule(al, fwhms, sigmas, size):
    basis = make_alard_lupton_basis(al, *fwhms)
    np.testing.assert_allclose(basis.info["ALBasisSigGauss"], sigmas, atol=1.5e-3)
    assert basis.size == size
    _check_norms(basis.images)


def test_separable_factorization_reproduces_images(al):
    basis = make_alard_lupton_basis(al, 3.0, 4.0)
    raw = basis.sep_y[:, :, None] * basis.sep_x[:, None, :]
    rebuilt = np.tensordot(basis.transform.T, raw, axes=1)
    np.testing.assert_allclose(rebuilt, basis.images, atol=1e-12)


def test_list_length_mismatch_raises(al):
    al.alard_deg_gauss = [4, 2]
    with pytest.raises(ConfigError, match="alard_n_gauss"):
        make_alard_lupton_basis(al)


def test_even_kernel_size_raises(al):
    al.kernel_size = 20
    with pytest.raises(ConfigError, match="odd"):
        make_alard_lupton_basis(al)


def test_renormalize_three_gaussians():
    u = np.arange(-7, 8)
    imgs = np.array([np.exp(-(u[:, None] ** 2 + u[None, :] ** 2) / (2 * s * s)) for s in (1, 2, 3)])
    out, _ = renormalize_kernel_list(imgs)
    _check_norms(out)


def test_delta_function_basis():
    basis = make_delta_function_basis(5)
    assert basis.n == 25
    for n, img in enumerate(basis.images):
        assert img.sum() == 1.0
        row, col = divmod(n, 5)
        assert img[row, col] == 1.0


@pytest.mark.parametrize("stencil,ok", [(5, True), (9, True), (1, False)])
def test_central_stencil_validation(df, stencil, ok):
    df.central_regularization_stencil = stencil
    if ok:
        h = make_regularization_matrix(df, 7, False)
        assert h.shape == (49, 49)
        np.testing.assert_allclose(h, h.T)
        assert np.linalg.eigvalsh(h).min() > -1e-9
    else:
        with pytest.raises(ConfigError):
            make_regularization_matrix(df, 7, False)


@pytest.mark.parametrize("penalty,ok", [(-1.0, False), (0.0, True)])
def test_border_penalty(df, penalty, ok):
    df.regularization_border_penalty = penalty
    if ok:
        make_regularization_matrix(df, 7, True)
    else:
        with pytest.raises(ConfigError):
            make_regularization_matrix(df, 7, True)


@pytest.mark.parametrize("orders,ok", [([0], False), ([4], False), ([1], True), ([1, 2], True)])
def test_forward_orders(df, orders, ok):
    df.regularization_type = "forwardDifference"
    df.forward_regularization_orders = orders
    if ok:
        h = make_regularization_matrix(df, 7, True)
        assert h.shape == (50, 50)
        assert not h[-1].any()  # the background term is not penalized
    else:
        with pytest.raises(ConfigError):
            make_regularization_matrix(df, 7, True)


def test_unknown_regularization_type(df):
    df.regularization_type = "spline"
    with pytest.raises(ConfigError):
        make_regularization_matrix(df, 7, False)


def test_laplacian_annihilates_smooth_interior(df):
    df.regularization_border_penalty = 0.0
    h = make_regularization_matrix(df, 9, False)
    flat = np.ones(81)
    assert flat @ h @ flat == pytest.approx(0.0, abs=1e-9)
