"""Private numba kernels.

Only the validated wrappers in the stage modules call these.  Each kernel has a
plain-numpy reference implementation in ``tests/reference.py`` and a test that
the two agree.  Kernels take contiguous float64/int32 arrays and scalars only.

Orientation: every correlation here is ``out[y, x] = sum K[j, i] in[y + j, x + i]``
over the *valid* region, which is the afw "convolution" (a correlation) once the
output is placed at the kernel centre.
"""

import numpy as np
from numba import njit, prange

_CACHE = True


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
def correlate_separable_valid(img, kx_rows, ky_rows):
    """Valid-mode correlation with each separable kernel ``outer(ky_rows[r], kx_rows[r])``.

    Returns an array of shape ``(n, ny_valid, nx_valid)``.  Two 1-D passes cost
    2k operations per pixel instead of k².
    """
    n, k = kx_rows.shape
    ny_in, nx_in = img.shape
    nyv = ny_in - k + 1
    nxv = nx_in - k + 1
    out = np.zeros((n, nyv, nxv))
    tmp = np.empty((ny_in, nxv))
    for r in range(n):
        for y in range(ny_in):
            for x in range(nxv):
                s = 0.0
                for i in range(k):
                    s += kx_rows[r, i] * img[y, x + i]
                tmp[y, x] = s
        for y in range(nyv):
            for x in range(nxv):
                s = 0.0
                for j in range(k):
                    s += ky_rows[r, j] * tmp[y + j, x]
                out[r, y, x] = s
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


@njit(cache=_CACHE, nogil=True)
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
def _or_window_1d(src, dst, half):
    """Sliding-window OR of width 2·half+1 (van Herk–Gil-Werman, O(n) per line)."""
    n = src.shape[0]
    w = 2 * half + 1
    nb = (n + w - 1) // w
    m = nb * w
    pre = np.zeros(m, dtype=np.int32)
    suf = np.zeros(m, dtype=np.int32)
    for i in range(m):
        v = src[i] if i < n else 0
        if i % w == 0:
            pre[i] = v
        else:
            pre[i] = pre[i - 1] | v
    for i in range(m - 1, -1, -1):
        v = src[i] if i < n else 0
        if i % w == w - 1 or i == m - 1:
            suf[i] = v
        else:
            suf[i] = suf[i + 1] | v
    for i in range(n):
        lo = i - half
        hi = i + half
        if lo < 0:
            lo = 0
        if hi > n - 1:
            hi = n - 1
        # a window [lo, hi] of width <= w spans at most two blocks
        if lo // w == hi // w:
            acc = 0
            for t in range(lo, hi + 1):
                acc |= src[t]
            dst[i] = acc
        else:
            dst[i] = suf[lo] | pre[hi]


@njit(cache=_CACHE, parallel=True)
def or_filter_box(mask, half_x, half_y):
    """Bitwise OR of ``mask`` over a (2·half_y+1) × (2·half_x+1) box centred on each pixel."""
    ny, nx = mask.shape
    tmp = np.empty_like(mask)
    out = np.empty_like(mask)
    for y in prange(ny):
        _or_window_1d(mask[y], tmp[y], half_x)
    tmp_t = np.ascontiguousarray(tmp.T)
    out_t = np.empty_like(tmp_t)
    for x in prange(nx):
        _or_window_1d(tmp_t[x], out_t[x], half_y)
    out[:, :] = out_t.T
    return out
