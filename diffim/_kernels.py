"""Private numba kernels.

Only the validated wrappers in the stage modules call these.  Each kernel has a
plain-numpy reference implementation in ``tests/reference.py`` and a test that
the two agree.  Kernels take contiguous float64/int32 arrays and scalars only.

Orientation: every correlation here is ``out[y, x] = sum K[j, i] in[y + j, x + i]``
over the *valid* region, which is the afw "convolution" (a correlation) once the
output is placed at the kernel centre.
"""

import math

import numpy as np
from numba import njit, prange

_CACHE = True
_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # Gaussian sigma / FWHM


@njit(cache=_CACHE, nogil=True)
def correlate_valid(img, kern):
    """Valid-mode 2-D correlation of ``img`` with ``kern``."""
    ky, kx = kern.shape
    ny = img.shape[0] - ky + 1
    nx = img.shape[1] - kx + 1
    out = np.zeros((ny, nx))
    for j in range(ky):
        for i in range(kx):
            w = kern[j, i]
            if w == 0.0:
                continue
            for y in range(ny):
                for x in range(nx):
                    out[y, x] += w * img[y + j, x + i]
    return out


@njit(cache=_CACHE, nogil=True)
def correlate_separable_valid(img, kx_rows, x_index, ky_rows):
    """Valid-mode correlation with each kernel ``outer(ky_rows[r], kx_rows[x_index[r]])``.

    Returns an array of shape ``(n, ny_valid, nx_valid)``, ``n = len(ky_rows)``.  Two 1-D
    passes cost 2k operations per pixel instead of k², and the row pass is done once per
    distinct x factor (11 for the 27 default AL functions, which share them).  The loops run
    along rows so the compiler vectorises them.
    """
    nu, k = kx_rows.shape
    n = ky_rows.shape[0]
    ny_in, nx_in = img.shape
    nyv = ny_in - k + 1
    nxv = nx_in - k + 1
    tmp = np.zeros((nu, ny_in, nxv))
    for u in range(nu):
        for y in range(ny_in):
            for i in range(k):
                w = kx_rows[u, i]
                for x in range(nxv):
                    tmp[u, y, x] += w * img[y, x + i]
    out = np.zeros((n, nyv, nxv))
    for r in range(n):
        u = x_index[r]
        for y in range(nyv):
            for j in range(k):
                w = ky_rows[r, j]
                for x in range(nxv):
                    out[r, y, x] += w * tmp[u, y + j, x]
    return out


@njit(cache=_CACHE, nogil=True)
def shifted_windows(img, k):
    """Design columns of the delta-function basis: every (row, col) shift of the valid window."""
    nyv = img.shape[0] - k + 1
    nxv = img.shape[1] - k + 1
    out = np.empty((k * k, nyv, nxv))
    for j in range(k):
        for i in range(k):
            out[j * k + i] = img[j:j + nyv, i:i + nxv]
    return out


# Reassociating sums lets the compiler vectorise reductions (the dot products of the normal
# equations measured 5× faster); unlike fastmath=True it keeps NaN and inf semantics, which the
# callers' finiteness checks rely on.
_REASSOC = {"reassoc", "contract"}


@njit(cache=_CACHE, nogil=True, fastmath=_REASSOC)
def normal_equations(cols, y, w):
    """Weighted normal equations ``M = Cᵀ W C`` and ``b = Cᵀ W y``.

    ``cols`` is (n, npix): one design column per row, ``y`` and ``w`` are (npix,).
    """
    n, npix = cols.shape
    m = np.zeros((n, n))
    b = np.zeros(n)
    wc = np.empty(npix)
    for a in range(n):
        for p in range(npix):
            wc[p] = w[p] * cols[a, p]
        for c in range(a, n):
            s = 0.0
            for p in range(npix):
                s += wc[p] * cols[c, p]
            m[a, c] = s
            m[c, a] = s
        s = 0.0
        for p in range(npix):
            s += wc[p] * y[p]
        b[a] = s
    return m, b


@njit(cache=_CACHE, nogil=True)
def lu_full_pivot_solve(m, b):
    """Solve ``m x = b`` by LU with full pivoting.

    Returns ``(x, ok)``; ``ok`` is False when a pivot falls below a relative
    threshold (the matrix is numerically singular), in which case the caller
    falls back to the eigen pseudo-inverse.
    """
    n = m.shape[0]
    a = m.copy()
    rhs = b.copy()
    colperm = np.arange(n)
    maxabs = 0.0
    for i in range(n):
        for j in range(n):
            v = abs(a[i, j])
            if v > maxabs:
                maxabs = v
    x = np.zeros(n)
    if maxabs == 0.0 or not np.isfinite(maxabs):
        return x, False
    tol = maxabs * n * 2.220446049250313e-16
    for k in range(n):
        pi = k
        pj = k
        best = -1.0
        for i in range(k, n):
            for j in range(k, n):
                v = abs(a[i, j])
                if v > best:
                    best = v
                    pi = i
                    pj = j
        if best <= tol:
            return x, False
        if pi != k:
            for j in range(n):
                t = a[k, j]
                a[k, j] = a[pi, j]
                a[pi, j] = t
            t = rhs[k]
            rhs[k] = rhs[pi]
            rhs[pi] = t
        if pj != k:
            for i in range(n):
                t = a[i, k]
                a[i, k] = a[i, pj]
                a[i, pj] = t
            t2 = colperm[k]
            colperm[k] = colperm[pj]
            colperm[pj] = t2
        piv = a[k, k]
        for i in range(k + 1, n):
            f = a[i, k] / piv
            a[i, k] = f
            for j in range(k + 1, n):
                a[i, j] -= f * a[k, j]
            rhs[i] -= f * rhs[k]
    z = np.zeros(n)
    for i in range(n - 1, -1, -1):
        s = rhs[i]
        for j in range(i + 1, n):
            s -= a[i, j] * z[j]
        z[i] = s / a[i, i]
    for i in range(n):
        x[colperm[i]] = z[i]
    return x, True


@njit(cache=_CACHE, nogil=True)
def eigen_pseudo_solve(m, b):
    """Pseudo-inverse solve of a symmetric system through its eigen-decomposition.

    Eigenvalues below ``n·eps·λmax`` are treated as zero, so directions the data
    do not constrain get no weight instead of a huge coefficient.
    """
    evals, evecs = np.linalg.eigh(m)
    n = m.shape[0]
    lmax = 0.0
    for i in range(n):
        if abs(evals[i]) > lmax:
            lmax = abs(evals[i])
    tol = lmax * n * 2.220446049250313e-16
    x = np.zeros(n)
    for i in range(n):
        if abs(evals[i]) > tol:
            proj = 0.0
            for p in range(n):
                proj += evecs[p, i] * b[p]
            proj /= evals[i]
            for p in range(n):
                x[p] += proj * evecs[p, i]
    return x


@njit(cache=_CACHE, nogil=True)
def solve_symmetric(m, b):
    """LU with full pivoting, falling back to the eigen pseudo-inverse.

    Returns ``(x, used_pseudo_inverse)``.
    """
    x, ok = lu_full_pivot_solve(m, b)
    if ok:
        for i in range(x.shape[0]):
            if not np.isfinite(x[i]):
                ok = False
                break
    if ok:
        return x, False
    return eigen_pseudo_solve(m, b), True


@njit(cache=_CACHE, nogil=True)
def condition_number(m, use_svd):
    """Condition number: σmax/σmin (SVD) or |λ|max/|λ|min of a symmetric matrix."""
    if use_svd:
        s = np.linalg.svd(m)[1]
        smin = s[-1]
        if smin <= 0.0:
            return np.inf
        return s[0] / smin
    evals = np.linalg.eigvalsh(m)
    lmin = np.inf
    lmax = 0.0
    for v in evals:
        av = abs(v)
        if av < lmin:
            lmin = av
        if av > lmax:
            lmax = av
    if lmin == 0.0:
        return np.inf
    return lmax / lmin


@njit(cache=_CACHE, nogil=True)
def residual_stats(diff, var, good):
    """Mean and unbiased std of ``diff/sqrt(var)`` over ``good`` pixels with finite 1/var.

    Returns ``(mean, std, npix)``; NaN statistics when fewer than two pixels qualify.
    """
    s = 0.0
    s2 = 0.0
    n = 0
    ny, nx = diff.shape
    for y in range(ny):
        for x in range(nx):
            if not good[y, x]:
                continue
            v = var[y, x]
            if not (v > 0.0) or not np.isfinite(v):
                continue
            z = diff[y, x] / np.sqrt(v)
            s += z
            s2 += z * z
            n += 1
    if n < 2:
        return np.nan, np.nan, n
    mean = s / n
    varz = (s2 / n - mean * mean) * n / (n - 1)
    if varz < 0.0:
        varz = 0.0
    return mean, np.sqrt(varz), n


@njit(cache=_CACHE, nogil=True)
def _or_row(src, dst, half):
    """``dst[x] = OR of src[x − half … x + half]`` (clipped to the row), one shift at a time.

    O(half) per pixel, but every pass is a contiguous loop the compiler vectorises; measured
    several times faster than a van Herk–Gil-Werman running OR for kernel-sized windows.
    """
    n = src.shape[0]
    for x in range(n):
        dst[x] = src[x]
    for d in range(1, min(half, n - 1) + 1):
        for x in range(n - d):
            dst[x] |= src[x + d]
        for x in range(d, n):
            dst[x] |= src[x - d]


@njit(cache=_CACHE, nogil=True)
def _or_column(tmp, out, y, half):
    """Row ``y`` of ``out``: OR of rows ``y − half … y + half`` of ``tmp`` (clipped)."""
    ny, nx = tmp.shape
    lo = max(y - half, 0)
    hi = min(y + half, ny - 1)
    for x in range(nx):
        out[y, x] = tmp[lo, x]
    for j in range(lo + 1, hi + 1):
        for x in range(nx):
            out[y, x] |= tmp[j, x]


@njit(cache=_CACHE, parallel=True)
def or_filter_box(mask, half_x, half_y):
    """Bitwise OR of ``mask`` over a (2·half_y+1) × (2·half_x+1) box centred on each pixel."""
    ny = mask.shape[0]
    tmp = np.empty_like(mask)
    out = np.empty_like(mask)
    for y in prange(ny):
        _or_row(mask[y], tmp[y], half_x)
    for y in prange(ny):
        _or_column(tmp, out, y, half_y)
    return out


@njit(cache=_CACHE, nogil=True)
def or_filter_box_serial(mask, half_x, half_y):
    """Serial :func:`or_filter_box` for stamps, where starting threads costs more than the work."""
    ny = mask.shape[0]
    tmp = np.empty_like(mask)
    out = np.empty_like(mask)
    for y in range(ny):
        _or_row(mask[y], tmp[y], half_x)
    for y in range(ny):
        _or_column(tmp, out, y, half_y)
    return out


@njit(cache=_CACHE, nogil=True, fastmath=_REASSOC)
def weighted_accumulate(acc, full, off, rows, cols):
    """``acc[y, x] += full[y + off, x + off] · Σ_a rows[a, y] cols[a, x]``.

    The weight of one spatially varying convolution term over one tile: ``rows`` (m, ty) and
    ``cols`` (m, tx) are its per-axis factors.  ``acc`` and ``full`` share one float dtype.
    """
    ty, tx = acc.shape
    m = rows.shape[0]
    w = np.empty(tx, dtype=acc.dtype)
    for y in range(ty):
        r0 = rows[0, y]
        for x in range(tx):
            w[x] = r0 * cols[0, x]
        for a in range(1, m):
            ra = rows[a, y]
            for x in range(tx):
                w[x] += ra * cols[a, x]
        for x in range(tx):
            acc[y, x] += full[y + off, x + off] * w[x]


# ---------------------------------------------------------------------------
# simulator rendering (diffim.simulate._render is the validated wrapper)
# ---------------------------------------------------------------------------

@njit(cache=_CACHE, nogil=True)
def erf_pixel_weights(c, lo, n, sigma):
    """Fraction of a unit 1-D Gaussian centred at ``c`` falling in pixels lo..lo+n-1.

    Differences of consecutive ``erf`` values: the exact pixel integral, so no
    supersampling error; each edge's ``erf`` is computed once and reused.
    """
    out = np.empty(n)
    k = 1.0 / (math.sqrt(2.0) * sigma)
    prev = math.erf((lo - 0.5 - c) * k)
    for m in range(n):
        nxt = math.erf((lo + m + 0.5 - c) * k)
        out[m] = 0.5 * (nxt - prev)
        prev = nxt
    return out


@njit(cache=_CACHE, nogil=True)
def add_gaussian_sources(img, xs, ys, fluxes, fwhms, radii, sums):
    """Add pixel-integrated Gaussians to ``img`` in place; ``sums[k]`` gets the flux deposited.

    Each source covers the square stamp of half-width ``radii[k]`` around its
    nearest pixel, clipped to the image.  A Python loop over sources and stamp
    pixels would dominate simulation time, hence numba.
    """
    ny, nx = img.shape
    for k in range(xs.size):
        sigma = fwhms[k] * _SIGMA_PER_FWHM
        r = radii[k]
        ix = int(math.floor(xs[k] + 0.5))
        iy = int(math.floor(ys[k] + 0.5))
        x0 = max(ix - r, 0)
        x1 = min(ix + r + 1, nx)
        y0 = max(iy - r, 0)
        y1 = min(iy + r + 1, ny)
        if x0 >= x1 or y0 >= y1:
            sums[k] = 0.0
            continue
        # The 2-D Gaussian is separable, so its exact pixel integral is an
        # outer product of 1-D erf differences: no supersampling error at all.
        wx = erf_pixel_weights(xs[k], x0, x1 - x0, sigma)
        wy = erf_pixel_weights(ys[k], y0, y1 - y0, sigma)
        tot = 0.0
        for j in range(y1 - y0):
            fy = fluxes[k] * wy[j]
            for i in range(x1 - x0):
                v = fy * wx[i]
                img[y0 + j, x0 + i] += v
                tot += v
        sums[k] = tot


@njit(cache=_CACHE, nogil=True, fastmath=True)
def add_moffat_sources(img, xs, ys, fluxes, fwhms, beta, radii, ss_core, sums):
    """Add pixel-integrated (supersampled) Moffats, analytically normalised, to ``img`` in place.

    ``sums[k]`` gets the flux deposited.  The Moffat has no closed-form pixel
    integral, so pixels are midpoint-supersampled (``ss_core`` per axis in the
    core, 3 and then 1 in the wings): far too many samples for a Python loop.
    """
    ny, nx = img.shape
    c = 2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0)
    for k in range(xs.size):
        alpha = fwhms[k] / c
        ia2 = 1.0 / (alpha * alpha)
        amp = fluxes[k] * (beta - 1.0) / (math.pi * alpha * alpha)
        # Supersampling tiers: the midpoint rule's relative error per pixel is
        # ~ |laplacian f| / (24 n² f).  In the wings (power law r^-2β) that is
        # (2β)² / (24 n² r²): below 0.3 % for n = 3 beyond r = 2.5β and for
        # n = 1 beyond r = 7.5β, so only the core needs the fine grid.
        rc2 = max(2.0 * fwhms[k] + 1.0, 2.5 * beta) ** 2
        rm2 = max(5.0 * fwhms[k], 7.5 * beta) ** 2
        r = radii[k]
        ix = int(math.floor(xs[k] + 0.5))
        iy = int(math.floor(ys[k] + 0.5))
        x0 = max(ix - r, 0)
        x1 = min(ix + r + 1, nx)
        y0 = max(iy - r, 0)
        y1 = min(iy + r + 1, ny)
        tot = 0.0
        for py in range(y0, y1):
            ddy = py - ys[k]
            for px in range(x0, x1):
                ddx = px - xs[k]
                d2 = ddx * ddx + ddy * ddy
                if d2 < rc2:
                    n = ss_core
                elif d2 < rm2:
                    n = 3
                else:
                    n = 1
                acc = 0.0
                for sj in range(n):
                    oy = ddy + (sj + 0.5) / n - 0.5
                    uy = 1.0 + oy * oy * ia2
                    for si in range(n):
                        ox = ddx + (si + 0.5) / n - 0.5
                        acc += (uy + ox * ox * ia2) ** (-beta)
                v = amp * acc / (n * n)
                img[py, px] += v
                tot += v
        sums[k] = tot


# ---------------------------------------------------------------------------
# template warping (diffim.warp is the validated wrapper)
# ---------------------------------------------------------------------------

@njit(cache=_CACHE, nogil=True)
def lanczos_weights(f, a, sin_tab, cos_tab, w):
    """Lanczos-``a`` weights of the 2a pixels around a source position; returns their sum.

    The source position is ``floor + f`` with ``0 <= f < 1``; ``w[k]`` is the weight of
    pixel ``floor - a + 1 + k``, i.e. ``L(m - f)`` with ``m = k - a + 1`` and
    ``L(d) = sinc(d) sinc(d / a)``.  ``sin_tab[t]``, ``cos_tab[t]`` hold ``sin(π (t − a) / a)``
    and ``cos(π (t − a) / a)`` for t = 0..2a.  The trigonometry is done once per axis, on
    ``g``, the (exact) signed distance from the nearest pixel: ``sin(π(M − g)) =
    −(−1)^M sin(πg)`` and the angle-difference formula give every weight, and the largest
    weight keeps full relative precision even when the position is within 1e-12 of a pixel.
    At ``f == 0`` the weights are exactly 1 at the pixel itself and 0 elsewhere.
    """
    n = 2 * a
    if f == 0.0:
        for k in range(n):
            w[k] = 0.0
        w[a - 1] = 1.0
        return 1.0
    shift = 0
    g = f
    if f > 0.5:
        shift = 1
        g = f - 1.0  # exact (Sterbenz)
    spg = math.sin(math.pi * g)
    spga = math.sin(math.pi * g / a)
    cpga = math.cos(math.pi * g / a)
    total = 0.0
    for k in range(n):
        mm = k - a + 1 - shift  # pixel offset from the nearest pixel; d = mm - g
        d = mm - g
        s1 = spg if (mm & 1) else -spg
        s2 = sin_tab[mm + a] * cpga - cos_tab[mm + a] * spga
        wk = a * s1 * s2 / (math.pi * math.pi * d * d)
        w[k] = wk
        total += wk
    return total


@njit(cache=_CACHE, nogil=True)
def _interp_row(j, node_x, node_y, values, nx, out):
    """Bilinear interpolation of node ``values`` (ngy, ngx) along destination row ``j``.

    ``node_x``/``node_y`` are increasing destination pixel indices (first 0, last nx-1 /
    ny-1).  Node values are reproduced exactly (no blend with a neighbour), so a NaN node
    only spoils the cells that touch it.  In between, ``a + (i − n0)·slope`` is exact for a
    unit-slope mapping with integer node values (an integer shift), where the weighted
    mean ``(1 − t)·a + t·b`` can land an ulp off and move a position across a pixel edge.
    """
    ngy = node_y.shape[0]
    ngx = node_x.shape[0]
    row = np.empty(ngx)
    if ngy == 1:
        for c in range(ngx):
            row[c] = values[0, c]
    else:
        lo = 0
        hi = ngy - 2
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if node_y[mid] <= j:
                lo = mid
            else:
                hi = mid - 1
        dy = j - node_y[lo]
        span = node_y[lo + 1] - node_y[lo]
        for c in range(ngx):
            if dy == 0.0:
                row[c] = values[lo, c]
            elif dy == span:
                row[c] = values[lo + 1, c]
            else:
                row[c] = values[lo, c] + dy * ((values[lo + 1, c] - values[lo, c]) / span)
    if ngx == 1:
        for i in range(nx):
            out[i] = row[0]
        return
    k = 0
    for i in range(nx):
        while k < ngx - 2 and node_x[k + 1] <= i:
            k += 1
        dx = i - node_x[k]
        span = node_x[k + 1] - node_x[k]
        if dx == 0.0:
            out[i] = row[k]
        elif dx == span:
            out[i] = row[k + 1]
        else:
            out[i] = row[k] + dx * ((row[k + 1] - row[k]) / span)


@njit(cache=_CACHE, parallel=True)
def interpolate_nodes(node_x, node_y, values, ny, nx):
    """Bilinear interpolation of node ``values`` onto every pixel of an (ny, nx) grid."""
    out = np.empty((ny, nx))
    for j in prange(ny):
        _interp_row(j, node_x, node_y, values, nx, out[j])
    return out


@njit(cache=_CACHE, parallel=True)
def warp_support_counts(node_x, node_y, map_x, map_y, ny, nx, src_ny, src_nx, a):
    """Per destination row, the number of pixels whose source position has full support.

    Full support: all 2a × 2a Lanczos-``a`` pixels lie inside the (src_ny, src_nx) source,
    i.e. ``a − 1 <= u < src_nx − a`` (and likewise in y); NaN positions have none.
    """
    counts = np.zeros(ny, dtype=np.int64)
    for j in prange(ny):
        sx = np.empty(nx)
        sy = np.empty(nx)
        _interp_row(j, node_x, node_y, map_x, nx, sx)
        _interp_row(j, node_x, node_y, map_y, nx, sy)
        c = 0
        for i in range(nx):
            u = sx[i]
            v = sy[i]
            if u >= a - 1.0 and u < src_nx - a and v >= a - 1.0 and v < src_ny - a:
                c += 1
        counts[j] = c
    return counts


@njit(cache=_CACHE, parallel=True)
def lanczos_warp(src_img, src_var, src_mask, node_x, node_y, map_x, map_y, jac, ny, nx, a,
                 mask_order, grow_bits, nodata_bits):
    """Resample a masked image onto an (ny, nx) destination grid with a Lanczos-``a`` kernel.

    The source position (array coordinates of the source) of destination pixel (j, i) and
    the pixel-area ratio ``|det d(src)/d(dst)|`` are bilinearly interpolated from the node
    arrays ``map_x``, ``map_y``, ``jac`` (see :func:`_interp_row`).

    * image: ``Σ w I / Σ w × J``; variance: ``Σ w² V / (Σ w)² × J²`` (separable weights);
      zero weights are skipped, so an infinite variance outside the footprint cannot give
      ``0 × inf``;
    * mask: OR of the source pixels with non-zero weight under the mask kernel
      (``mask_order`` 0 = nearest, 1 = bilinear, n >= 2 = Lanczos-n, clipped to the
      source), plus the ``grow_bits`` of every pixel of the 2a × 2a footprint;
    * no full support, or a non-finite result: image NaN, variance +inf, ``nodata_bits``
      (alone when there is no support).

    Returns ``(image, variance, mask, counts)`` with ``counts[j]`` the number of supported
    pixels of row j.
    """
    src_ny, src_nx = src_img.shape
    n = 2 * a
    out_img = np.empty((ny, nx))
    out_var = np.empty((ny, nx))
    out_mask = np.zeros((ny, nx), dtype=np.int32)
    counts = np.zeros(ny, dtype=np.int64)
    sin_tab = np.empty(n + 1)
    cos_tab = np.empty(n + 1)
    for t in range(n + 1):
        sin_tab[t] = math.sin(math.pi * (t - a) / a)
        cos_tab[t] = math.cos(math.pi * (t - a) / a)
    for j in prange(ny):
        sx = np.empty(nx)
        sy = np.empty(nx)
        sj = np.empty(nx)
        _interp_row(j, node_x, node_y, map_x, nx, sx)
        _interp_row(j, node_x, node_y, map_y, nx, sy)
        _interp_row(j, node_x, node_y, jac, nx, sj)
        wx = np.empty(n)
        wy = np.empty(n)
        c = 0
        for i in range(nx):
            u = sx[i]
            v = sy[i]
            if not (u >= a - 1.0 and u < src_nx - a and v >= a - 1.0 and v < src_ny - a):
                out_img[j, i] = np.nan
                out_var[j, i] = np.inf
                out_mask[j, i] = nodata_bits
                continue
            c += 1
            iu = int(math.floor(u))
            iv = int(math.floor(v))
            fu = u - iu
            fv = v - iv
            swx = lanczos_weights(fu, a, sin_tab, cos_tab, wx)
            swy = lanczos_weights(fv, a, sin_tab, cos_tab, wy)
            acc = 0.0
            accv = 0.0
            for q in range(n):
                wq = wy[q]
                if wq == 0.0:
                    continue
                r = iv - a + 1 + q
                s = 0.0
                sv = 0.0
                for p in range(n):
                    wp = wx[p]
                    if wp == 0.0:
                        continue
                    col = iu - a + 1 + p
                    s += wp * src_img[r, col]
                    sv += wp * wp * src_var[r, col]
                acc += wq * s
                accv += wq * wq * sv
            norm = sj[i] / (swx * swy)
            val = acc * norm
            var = accv * norm * norm

            m = 0
            if mask_order == 0:
                m = src_mask[int(math.floor(v + 0.5)), int(math.floor(u + 0.5))]
            else:
                if fu == 0.0:
                    x0 = iu
                    x1 = iu
                else:
                    x0 = max(iu - mask_order + 1, 0)
                    x1 = min(iu + mask_order, src_nx - 1)
                if fv == 0.0:
                    y0 = iv
                    y1 = iv
                else:
                    y0 = max(iv - mask_order + 1, 0)
                    y1 = min(iv + mask_order, src_ny - 1)
                for r in range(y0, y1 + 1):
                    for col in range(x0, x1 + 1):
                        m |= src_mask[r, col]
            if grow_bits != 0:
                for r in range(iv - a + 1, iv + a + 1):
                    for col in range(iu - a + 1, iu + a + 1):
                        m |= src_mask[r, col] & grow_bits

            if math.isfinite(val) and math.isfinite(var):
                out_img[j, i] = val
                out_var[j, i] = var
                out_mask[j, i] = m
            else:
                out_img[j, i] = np.nan
                out_var[j, i] = np.inf
                out_mask[j, i] = m | nodata_bits
        counts[j] = c
    return out_img, out_var, out_mask, counts
