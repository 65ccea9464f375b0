"""Plain-numpy reference implementations of the numba kernels and of the convolution.

Slow and obvious on purpose: tests compare the fast paths against these.
"""

import numpy as np
from scipy import ndimage, signal, special


def correlate_valid(img, kern):
    """Valid-mode correlation."""
    return signal.correlate2d(img, kern, mode="valid")


def correlate_separable_valid(img, kx_rows, x_index, ky_rows):
    """Valid-mode correlation with each outer(ky_rows[r], kx_rows[x_index[r]])."""
    return np.array([signal.correlate2d(img, np.outer(ky, kx_rows[u]), mode="valid")
                     for u, ky in zip(x_index, ky_rows)])


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


def weighted_accumulate(acc, full, off, rows, cols):
    """acc + full[off:, off:] (cropped to acc) times the weight rowsᵀ @ cols."""
    ty, tx = acc.shape
    return acc + full[off:off + ty, off:off + tx] * (rows.T @ cols)


def _stamp_bounds(x, y, r, shape):
    """Pixel ranges [x0, x1) × [y0, y1) of the half-width-r stamp about the nearest pixel."""
    ny, nx = shape
    ix = int(np.floor(x + 0.5))
    iy = int(np.floor(y + 0.5))
    return max(ix - r, 0), min(ix + r + 1, nx), max(iy - r, 0), min(iy + r + 1, ny)


def erf_pixel_weights(c, lo, n, sigma):
    """Unit 1-D Gaussian integrated over pixels lo..lo+n-1: erf at the n+1 pixel edges, differenced."""
    edges = lo - 0.5 + np.arange(n + 1) - c
    return 0.5 * np.diff(special.erf(edges / (np.sqrt(2.0) * sigma)))


def add_gaussian_sources(img, xs, ys, fluxes, fwhms, radii):
    """Copy of ``img`` plus each pixel-integrated Gaussian stamp, and the flux each deposited."""
    out = np.array(img, dtype=float)
    sums = np.zeros(len(xs))
    for k in range(len(xs)):
        x0, x1, y0, y1 = _stamp_bounds(xs[k], ys[k], radii[k], out.shape)
        if x0 >= x1 or y0 >= y1:
            continue
        sigma = fwhms[k] / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        stamp = fluxes[k] * np.outer(erf_pixel_weights(ys[k], y0, y1 - y0, sigma),
                                     erf_pixel_weights(xs[k], x0, x1 - x0, sigma))
        out[y0:y1, x0:x1] += stamp
        sums[k] = stamp.sum()
    return out, sums


def add_moffat_sources(img, xs, ys, fluxes, fwhms, beta, radii, ss_core):
    """Copy of ``img`` plus each supersampled Moffat stamp, and the flux each deposited.

    Same tiering as the kernel: ``ss_core`` samples per axis where the pixel
    centre is within max(2 FWHM + 1, 2.5 beta), 3 within max(5 FWHM, 7.5 beta),
    else 1; each pixel is the mean of the profile at its n × n sub-pixel midpoints.
    """
    out = np.array(img, dtype=float)
    sums = np.zeros(len(xs))
    for k in range(len(xs)):
        x0, x1, y0, y1 = _stamp_bounds(xs[k], ys[k], radii[k], out.shape)
        if x0 >= x1 or y0 >= y1:
            continue
        alpha = fwhms[k] / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
        amp = fluxes[k] * (beta - 1.0) / (np.pi * alpha**2)
        ddy, ddx = np.meshgrid(np.arange(y0, y1) - ys[k], np.arange(x0, x1) - xs[k], indexing="ij")
        d2 = ddx**2 + ddy**2
        nsub = np.where(d2 < max(2.0 * fwhms[k] + 1.0, 2.5 * beta) ** 2, ss_core,
                        np.where(d2 < max(5.0 * fwhms[k], 7.5 * beta) ** 2, 3, 1))
        stamp = np.zeros(d2.shape)
        for n in np.unique(nsub):
            sel = nsub == n
            off = (np.arange(n) + 0.5) / n - 0.5
            oy = ddy[sel][:, None, None] + off[None, :, None]
            ox = ddx[sel][:, None, None] + off[None, None, :]
            prof = (1.0 + (ox**2 + oy**2) / alpha**2) ** (-beta)
            stamp[sel] = amp * prof.mean(axis=(1, 2))
        out[y0:y1, x0:x1] += stamp
        sums[k] = stamp.sum()
    return out, sums


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


# ---------------------------------------------------------------------------
# template warping
# ---------------------------------------------------------------------------

def lanczos_weights(f, a):
    """Lanczos-a weights sinc(d)·sinc(d/a) of pixels floor−a+1 … floor+a, d = pixel − position."""
    d = np.arange(-a + 1, a + 1) - f
    # sinc vanishes at non-zero integers; np.sinc leaves ~1e-17 there, which would count
    # as a non-zero weight in the mask OR
    w = np.where(d == np.round(d), (d == 0).astype(float), np.sinc(d) * np.sinc(d / a))
    return w, w.sum()


def interpolate_nodes(node_x, node_y, values, ny, nx):
    """Bilinear interpolation of node values with scipy's regular-grid interpolator."""
    from scipy.interpolate import RegularGridInterpolator

    ys, xs = np.mgrid[:ny, :nx]
    if len(node_y) == 1 or len(node_x) == 1:
        # scipy needs two nodes per axis; a single node means constant along that axis
        node_y = node_y if len(node_y) > 1 else np.array([node_y[0], node_y[0] + 1.0])
        node_x = node_x if len(node_x) > 1 else np.array([node_x[0], node_x[0] + 1.0])
        values = np.broadcast_to(values, (len(node_y), len(node_x)))
        ys = np.minimum(ys, node_y[-1])
        xs = np.minimum(xs, node_x[-1])
    f = RegularGridInterpolator((node_y, node_x), values, method="linear")
    return f(np.column_stack([ys.ravel(), xs.ravel()])).reshape(ny, nx)


def _supported(u, v, a, src_shape):
    sny, snx = src_shape
    return bool(np.isfinite(u) and np.isfinite(v) and a - 1 <= np.floor(u) <= snx - 1 - a
                and a - 1 <= np.floor(v) <= sny - 1 - a)


def warp_support_counts(sx, sy, a, src_shape):
    """Per row, destination pixels whose 2a × 2a Lanczos window is inside the source."""
    return np.array([sum(_supported(u, v, a, src_shape) for u, v in zip(rx, ry))
                     for rx, ry in zip(sx, sy)])


def lanczos_warp(src_img, src_var, src_mask, sx, sy, jac, a, mask_order, grow_bits,
                 nodata_bits):
    """Pixel-by-pixel Lanczos warp at the given per-pixel source positions and Jacobians.

    The 2-D weight array is the outer product of the 1-D Lanczos weights (np.sinc); the
    mask is the OR over the pixels where the 2-D mask-kernel weight (nearest, bilinear
    (1 − t, t) or Lanczos) is non-zero, plus ``grow_bits`` over the whole 2a × 2a window.
    """
    ny, nx = sx.shape
    sny, snx = src_img.shape
    img = np.full((ny, nx), np.nan)
    var = np.full((ny, nx), np.inf)
    mask = np.full((ny, nx), nodata_bits, dtype=np.int32)
    for j in range(ny):
        for i in range(nx):
            u, v = sx[j, i], sy[j, i]
            if not _supported(u, v, a, src_shape=(sny, snx)):
                continue
            iu, iv = int(np.floor(u)), int(np.floor(v))
            wx, _ = lanczos_weights(u - iu, a)
            wy, _ = lanczos_weights(v - iv, a)
            w = np.outer(wy, wx)
            ys = slice(iv - a + 1, iv + a + 1)
            xs = slice(iu - a + 1, iu + a + 1)
            nz = w != 0
            num = np.sum(w[nz] * src_img[ys, xs][nz])
            numv = np.sum(w[nz] ** 2 * src_var[ys, xs][nz])
            val = num / w.sum() * jac[j, i]
            vv = numv / w.sum() ** 2 * jac[j, i] ** 2
            if mask_order == 0:
                m = int(src_mask[int(np.floor(v + 0.5)), int(np.floor(u + 0.5))])
            else:
                m = 0
                ry = np.arange(iv - mask_order + 1, iv + mask_order + 1)
                rx = np.arange(iu - mask_order + 1, iu + mask_order + 1)
                if mask_order == 1:
                    ky = np.array([1 - (v - iv), v - iv])
                    kx = np.array([1 - (u - iu), u - iu])
                else:
                    ky, _ = lanczos_weights(v - iv, mask_order)
                    kx, _ = lanczos_weights(u - iu, mask_order)
                for yy, wyy in zip(ry, ky):
                    for xx, wxx in zip(rx, kx):
                        if wyy * wxx != 0 and 0 <= yy < sny and 0 <= xx < snx:
                            m |= int(src_mask[yy, xx])
            m |= int(np.bitwise_or.reduce(src_mask[ys, xs].ravel())) & grow_bits
            if np.isfinite(val) and np.isfinite(vv):
                img[j, i], var[j, i], mask[j, i] = val, vv, m
            else:
                mask[j, i] = m | nodata_bits
    return img, var, mask
