"""Plain-numpy reference implementations of the numba kernels and of the convolution.

Slow and obvious on purpose: tests compare the fast paths against these.
"""

import numpy as np
from scipy import ndimage, signal


def correlate_valid(img, kern):
    """Valid-mode correlation."""
    return signal.correlate2d(img, kern, mode="valid")


def correlate_separable_valid(img, kx_rows, ky_rows):
    """Valid-mode correlation with each outer(ky, kx)."""
    return np.array([signal.correlate2d(img, np.outer(ky, kx), mode="valid")
                     for kx, ky in zip(kx_rows, ky_rows)])


def shifted_windows(img, k):
    """Delta-function design columns by explicit correlation with each delta image."""
    out = []
    for j in range(k):
        for i in range(k):
            delta = np.zeros((k, k))
            delta[j, i] = 1.0
            out.append(signal.correlate2d(img, delta, mode="valid"))
    return np.array(out)


def normal_equations(cols, y, w):
    """M = Cᵀ W C, b = Cᵀ W y with C = cols.T."""
    c = cols.T
    return c.T @ (w[:, None] * c), c.T @ (w * y)


def solve_symmetric(m, b):
    """Least-squares/pseudo-inverse solution."""
    return np.linalg.lstsq(m, b, rcond=None)[0]


def residual_stats(diff, var, good):
    """Mean and ddof=1 std of diff/sqrt(var) over good pixels with finite positive var."""
    ok = good & np.isfinite(var) & (var > 0)
    z = diff[ok] / np.sqrt(var[ok])
    return z.mean(), z.std(ddof=1), int(ok.sum())


def or_filter_box(mask, half_x, half_y):
    """Bitwise OR over the box, bit by bit with a maximum filter."""
    out = np.zeros_like(mask)
    size = (2 * half_y + 1, 2 * half_x + 1)
    for bit in range(31):
        plane = ((mask >> bit) & 1).astype(np.uint8)
        if plane.any():
            grown = ndimage.maximum_filter(plane, size=size, mode="constant", cval=0)
            out |= grown.astype(mask.dtype) << bit
    return out


def convolve_brute_force(image, kernel, xy0=(0, 0)):
    """Σ K(x, y)·I per pixel, evaluating the spatial kernel exactly at every output pixel."""
    ny, nx = image.shape
    k = kernel.size
    c = k // 2
    out = np.full((ny, nx), np.nan)
    for y in range(c, ny - c):
        for x in range(c, nx - c):
            kern = kernel.evaluate(x + xy0[0], y + xy0[1])
            out[y, x] = np.sum(kern * image[y - c:y + c + 1, x - c:x + c + 1])
    return out


def convolve_variance_brute_force(variance, kernel, xy0=(0, 0)):
    """Σ K(x, y)²·V per pixel, exact."""
    ny, nx = variance.shape
    k = kernel.size
    c = k // 2
    out = np.full((ny, nx), np.nan)
    for y in range(c, ny - c):
        for x in range(c, nx - c):
            kern = kernel.evaluate(x + xy0[0], y + xy0[1])
            out[y, x] = np.sum(kern**2 * variance[y - c:y + c + 1, x - c:x + c + 1])
    return out
