"""Convolution of a masked image with a spatially varying kernel.

Image plane — exact.  With ``K(x, y) = Σ_s φ_s(x, y) K_s``,
``Σ K(x, y)⋆T = Σ_s φ_s(x, y) (T⋆K_s)``: one FFT correlation per *spatial term*
(6 for order 2), not per basis function (27 by default), and each φ_s is a
product of 1-D factors, so the weights cost nothing to hold.  The result equals
a brute-force per-pixel evaluation of the kernel (tested to 1e-4 relative).

Variance plane — ``Σ K(x, y)²·V``.  K² does not split over the spatial terms
without squaring their number (21 products for order 2), and freezing the kernel
per block errs by several percent when the PSF width changes across the field.
Instead K² is sampled on a coarse grid of nodes and decomposed by SVD into a few
eigen-images ``E_r``; the weight of each at every pixel is computed exactly from
the spatial functions, so ``Σ_r w_r·(V⋆E_r)`` costs one FFT per kept component
and its error is the discarded SVD energy (tested against the exact per-pixel sum).

Mask plane — bitwise OR over the kernel box (every AL kernel pixel is non-zero).

Orientation is correlation, as in afw: ``out[y, x] = Σ K[j, i] in[y − c + j, x − c + i]``.
The border of half a kernel where the kernel does not fit, and any output pixel
whose kernel footprint touched a non-finite input, get image NaN, variance +inf
and the NO_DATA bit.
"""

import logging
import os

import numpy as np
import scipy.fft

from . import _kernels
from .image import MaskedImage

__all__ = ["convolve_masked_image", "correlate_fft"]

log = logging.getLogger(__name__)


def _workers():
    # scipy.fft threads; numba's thread count is the user's knob for the whole run
    from numba import get_num_threads

    return max(1, min(get_num_threads(), os.cpu_count() or 1))


def _fft_correlations(image, kernels):
    """Yield ``image⋆K`` ('same' size) for each kernel, sharing one FFT of the image."""
    ny, nx = image.shape
    k = kernels.shape[-1]
    c = k // 2
    shape = (scipy.fft.next_fast_len(ny + k - 1, real=True),
             scipy.fft.next_fast_len(nx + k - 1, real=True))
    real = np.float32 if image.dtype == np.float32 else np.float64
    workers = _workers()
    ft = scipy.fft.rfft2(image.astype(real, copy=False), s=shape, workers=workers)
    for kern in kernels:
        fk = scipy.fft.rfft2(kern[::-1, ::-1].astype(real), s=shape, workers=workers)
        fk *= ft
        yield scipy.fft.irfft2(fk, s=shape, workers=workers)[c:c + ny, c:c + nx]


def correlate_fft(image, kernels, weights=None):
    """Correlate ``image`` with each kernel by FFT and accumulate, 'same' size output.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Must be finite.
    kernels : ndarray, shape (n, k, k)
        Odd-sized kernels, correlation orientation.
    weights : sequence of (fy, fx), optional
        Per-kernel separable weights: ``out = Σ_n outer(fy_n, fx_n) · (image⋆K_n)``.
        Defaults to unit weights.

    Returns
    -------
    ndarray, shape (ny, nx)
        float32 for a float32 image, else float64.  Pixels within half a kernel of
        the border are not meaningful.
    """
    out = None
    for n, conv in enumerate(_fft_correlations(image, kernels)):
        if weights is not None:
            fy, fx = weights[n]
            conv *= fy.astype(conv.dtype)[:, None]
            conv *= fx.astype(conv.dtype)[None, :]
        if out is None:
            out = conv
        else:
            out += conv
    return out


def _variance(variance, kernel, xy0, node_step, rtol):
    """Σ K(x, y)²·V by a low-rank expansion of K² with exact per-pixel weights.

    K² is sampled on a grid of nodes every ``node_step`` pixels and decomposed by SVD
    into eigen-images ``E_r``, kept until the discarded energy is below ``rtol²``.
    The weight of ``E_r`` at a pixel is ``⟨K(x, y)², E_r⟩ = Σ_st φ_s φ_t ⟨K_s K_t, E_r⟩``;
    each φ_s φ_t is an outer product of 1-D factors, so all weights of one component
    come from a single (ny × n²)·(n² × nx) matrix product.
    """
    ny, nx = variance.shape
    x0, y0 = xy0
    if kernel.is_spatially_constant:
        k2 = kernel.evaluate(x0, y0) ** 2
        return correlate_fft(variance, k2[None])
    func = kernel.function
    terms = kernel.term_kernels()
    gx = np.unique(np.r_[np.arange(0, nx, node_step), nx - 1])
    gy = np.unique(np.r_[np.arange(0, ny, node_step), ny - 1])
    xx, yy = np.meshgrid(gx + x0, gy + y0)
    phi = func.evaluate(xx, yy)  # (n_terms, ngy, ngx)
    k_nodes = np.tensordot(np.moveaxis(phi, 0, -1), terms, axes=1)
    _, sv, vt = np.linalg.svd((k_nodes**2).reshape(gy.size * gx.size, -1),
                              full_matrices=False)
    energy = np.cumsum(sv[::-1] ** 2)[::-1]  # energy[r]: what is left out keeping r components
    enough = energy <= rtol**2 * energy[0]
    rank = max(1, int(np.argmax(enough))) if enough.any() else sv.size
    eig = vt[:rank].reshape(rank, kernel.size, kernel.size)
    fx, fy = func.axis_factors(np.arange(x0, x0 + nx), np.arange(y0, y0 + ny))
    pairs = [(s, t) for s in range(func.n_terms) for t in range(func.n_terms)]
    rows = np.stack([fy[func.powers[s][1]] * fy[func.powers[t][1]] for s, t in pairs], axis=1)
    cols = np.stack([fx[func.powers[s][0]] * fx[func.powers[t][0]] for s, t in pairs], axis=1)
    products = np.einsum("spq,tpq->stpq", terms, terms).reshape(len(pairs), -1)
    out = None
    for r, conv in enumerate(_fft_correlations(variance, eig)):
        g = products @ eig[r].ravel()
        conv *= ((rows * g) @ cols.T).astype(conv.dtype)
        if out is None:
            out = conv
        else:
            out += conv
    log.debug("variance plane: K² expanded in %d eigen-images", rank)
    return out


def convolve_masked_image(masked_image, kernel, *, variance_node_step=64,
                          variance_rtol=1e-4):
    """Convolve a MaskedImage with a (spatially varying) kernel.

    Parameters
    ----------
    masked_image : MaskedImage
        The image to convolve; its ``xy0`` places it in parent coordinates, where the
        kernel's spatial functions are evaluated.
    kernel : SpatialKernel
    variance_node_step : int
        Spacing (pixels) of the nodes where K² is sampled for the variance plane.
    variance_rtol : float
        Relative accuracy of the low-rank expansion of K² (discarded energy).

    Returns
    -------
    MaskedImage
        Same shape and origin; float32 image and variance.
    """
    mi = masked_image
    ny, nx = mi.shape
    k = kernel.size
    c = k // 2
    hi = k - 1 - c
    nodata = mi.get_plane_bitmask("NO_DATA")
    if ny < k or nx < k:
        msg = f"image of shape {mi.shape} is smaller than the {k}×{k} kernel"
        raise ValueError(msg)

    image = mi.image
    variance = mi.variance
    bad_in = ~(np.isfinite(image) & np.isfinite(variance))
    mask_in = mi.mask
    if bad_in.any():
        image = np.where(bad_in, 0.0, image).astype(np.float32)
        variance = np.where(bad_in, 0.0, variance).astype(np.float32)
        mask_in = mask_in | np.where(bad_in, np.int32(nodata), np.int32(0))
    x0, y0 = mi.xy0

    func = kernel.function
    terms = kernel.term_kernels()
    if kernel.is_spatially_constant:
        kern0 = kernel.evaluate(x0, y0)
        out_img = correlate_fft(image, kern0[None])
    else:
        fx, fy = func.axis_factors(np.arange(x0, x0 + nx), np.arange(y0, y0 + ny))
        weights = [(fy[q], fx[p]) for p, q in func.powers]
        out_img = correlate_fft(image, terms, weights)

    out_var = _variance(variance.astype(np.float32), kernel, (x0, y0), variance_node_step,
                        variance_rtol).astype(np.float32)
    out_mask = _kernels.or_filter_box(np.ascontiguousarray(mask_in, dtype=np.int32), c, hi)

    invalid = np.ones((ny, nx), dtype=bool)
    invalid[c:ny - hi, c:nx - hi] = False
    invalid |= (out_mask & nodata) != 0
    out_img = out_img.astype(np.float32, copy=False)
    out_img[invalid] = np.nan
    out_var[invalid] = np.inf
    out_mask[invalid] |= nodata
    return MaskedImage(out_img, out_mask, out_var, xy0=mi.xy0, mask_planes=dict(mi.mask_planes))
