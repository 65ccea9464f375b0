"""Per-candidate kernel fits, their quality cuts, kernel-sum clipping and the PCA basis.

The single-candidate model is ``S ≈ K⋆T + bg`` over the stamp shrunk by the
kernel (the fit region), with ``K = Σ a_k B_k``.  The weighted normal equations
are built and solved in :mod:`diffim._kernels`; this module validates inputs,
keeps the bookkeeping of statuses and reasons, and applies the three clipping
stages of ip_diffim that act on single candidates (residual moments, kernel-sum
outliers) — the spatial residual stage lives in :mod:`diffim.spatial`.
"""

import logging

import numpy as np

from . import _kernels
from .basis import KernelBasis, renormalize_kernel_list
from .candidates import GOOD, CandidateSolution, ResidualStats
from .exceptions import KernelSolutionError, NoKernelCandidatesError

__all__ = [
    "design_columns",
    "stamp_good_pixels",
    "difference_stamp",
    "difference_stats",
    "build_candidate",
    "build_single_kernels",
    "judge_residuals",
    "clipped_mean_std",
    "kernel_sum_clip",
    "make_pca_basis",
]

log = logging.getLogger(__name__)


def _distinct_rows(rows):
    """The distinct rows of a 2-D array (first-seen order) and each row's index among them."""
    first = {}
    index = np.array([first.setdefault(row.tobytes(), len(first)) for row in rows],
                     dtype=np.int64)
    _, keep = np.unique(index, return_index=True)
    return np.ascontiguousarray(rows[keep], dtype=np.float64), index


def design_columns(template_stamp, basis):
    """Correlate a template stamp with every basis function over the valid region.

    Parameters
    ----------
    template_stamp : ndarray, shape (ny, nx)
    basis : KernelBasis

    Returns
    -------
    ndarray, shape (n_basis, ny - k + 1, nx - k + 1)
    """
    img = np.ascontiguousarray(template_stamp, dtype=np.float64)
    k = basis.size
    if img.shape[0] < k or img.shape[1] < k:
        msg = f"stamp of shape {img.shape} is smaller than the {k}×{k} kernel"
        raise ValueError(msg)
    if basis.kind == "delta-function":
        return _kernels.shifted_windows(img, k)
    if basis.is_separable:
        kx, x_index = _distinct_rows(basis.sep_x)
        raw = _kernels.correlate_separable_valid(img, kx, x_index,
                                                 np.ascontiguousarray(basis.sep_y))
        return np.tensordot(basis.transform.T, raw, axes=1)
    return np.stack([_kernels.correlate_valid(img, np.ascontiguousarray(b))
                     for b in basis.images])


def _valid(arr, k):
    c = k // 2
    hi = k - 1 - c
    return arr[c:arr.shape[0] - hi, c:arr.shape[1] - hi]


def stamp_good_pixels(candidate, kernel_size, bad_bits):
    """Fit-region pixels usable for residual statistics.

    A pixel is excluded if the science stamp has a bad bit there, or the template
    has one anywhere under the kernel footprint (the convolved mask is dilated).
    """
    key = ("good", kernel_size, bad_bits)
    good = candidate.extra.get(key)
    if good is None:
        half = kernel_size // 2
        tmask = _kernels.or_filter_box_serial(np.ascontiguousarray(candidate.template.mask),
                                              half, half)
        good = ((_valid(candidate.science.mask, kernel_size) | _valid(tmask, kernel_size))
                & bad_bits) == 0
        candidate.extra[key] = good
    return good


def difference_stamp(candidate, kernel_image, background):
    """``D = S − (K⋆T + bg)`` and its variance ``V_S + K²⋆V_T`` over the fit region.

    Parameters
    ----------
    candidate : KernelCandidate
    kernel_image : ndarray, shape (k, k)
    background : float

    Returns
    -------
    (diff, var) : tuple of ndarray, shape (ny − k + 1, nx − k + 1)
    """
    k = kernel_image.shape[0]
    t = np.ascontiguousarray(candidate.template.image, dtype=np.float64)
    kern = np.ascontiguousarray(kernel_image, dtype=np.float64)
    diff = _valid(candidate.science.image, k) - _kernels.correlate_valid(t, kern) - background
    var = (_valid(candidate.science.variance, k)
           + _kernels.correlate_valid(np.ascontiguousarray(candidate.template.variance,
                                                           dtype=np.float64), kern * kern))
    return np.ascontiguousarray(diff), var


def difference_stats(candidate, kernel_image, background, bad_bits, config):
    """Residual moments of ``D = S − (K⋆T + bg)`` normalized by ``sqrt(V_S + K²⋆V_T)``.

    Parameters
    ----------
    candidate : KernelCandidate
    kernel_image : ndarray, shape (k, k)
    background : float
    bad_bits : int
        Mask bits excluded from the statistics.
    config : PsfMatchConfig
        Uses ``use_core_stats`` and ``candidate_core_radius``.

    Returns
    -------
    ResidualStats
    """
    k = kernel_image.shape[0]
    diff, var = difference_stamp(candidate, kernel_image, background)
    good = stamp_good_pixels(candidate, k, bad_bits)
    if config.use_core_stats:
        good = good.copy()
        core = np.zeros_like(good)
        r = config.candidate_core_radius
        cy, cx = good.shape[0] // 2, good.shape[1] // 2
        core[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1] = True
        good &= core
    mean, std, npix = _kernels.residual_stats(diff, var, good)
    return ResidualStats(float(mean), float(std), int(npix))


def _lambda(config, m, h):
    if config.lambda_type == "absolute":
        return config.lambda_value
    if config.lambda_type == "relative":
        return np.trace(m) / np.trace(h) * config.lambda_scaling
    msg = f"lambda_type {config.lambda_type!r} is not supported; use 'absolute' or 'relative'"
    raise KernelSolutionError(msg)


def build_candidate(candidate, basis, config, *, fit_for_background, regularization=None,
                    bad_bits=0):
    """Fit one candidate's kernel and background, as ip_diffim's KernelCandidate.build.

    Parameters
    ----------
    candidate : KernelCandidate
    basis : KernelBasis
    config : PsfMatchConfig
    fit_for_background : bool
        Append a constant background column.
    regularization : ndarray, optional
        Regularization matrix ``H``; the solve uses ``M + λH``.
    bad_bits : int
        Mask bits excluded from the residual statistics.

    Returns
    -------
    CandidateSolution

    Raises
    ------
    KernelSolutionError
        Non-positive variance, ill-conditioned system (when checked) or NaN solution.
    """
    k = basis.size
    cols = design_columns(candidate.template.image, basis)
    n_b = basis.n
    y = _valid(candidate.science.image, k).astype(np.float64).ravel()
    var = (_valid(candidate.science.variance, k).astype(np.float64)
           + _valid(candidate.template.variance, k).astype(np.float64)).ravel()
    if config.constant_variance_weighting:
        med = float(np.median(var))
        w = np.full(y.size, 1.0 / med if med > 0 else 1.0)
    else:
        if not (var > 0).all():
            msg = "variance is zero or negative in the fit region"
            raise KernelSolutionError(msg)
        w = 1.0 / var
    ncol = n_b + (1 if fit_for_background else 0)
    design = np.empty((ncol, y.size))
    design[:n_b] = cols.reshape(n_b, -1)
    if fit_for_background:
        design[n_b] = 1.0

    def solve_once(weights):
        m, b = _kernels.normal_equations(design, y, weights)
        cond = None
        if config.check_condition_number:
            cond = float(_kernels.condition_number(m, config.condition_number_type == "SVD"))
            if cond > config.max_condition_number:
                msg = (f"condition number {cond:.3g} exceeds max_condition_number "
                       f"{config.max_condition_number:.3g}")
                raise KernelSolutionError(msg)
        mm = m
        if regularization is not None:
            mm = m + _lambda(config, m, regularization) * regularization
        a, pinv = _kernels.solve_symmetric(np.ascontiguousarray(mm), b)
        if not np.isfinite(a).all():
            msg = "the kernel solution contains NaN"
            raise KernelSolutionError(msg)
        return m, b, a, cond, pinv

    m, b, a, cond, pinv = solve_once(w)
    kernel = np.tensordot(a[:n_b], basis.images, axes=1)
    if config.iterate_single_kernel and not config.constant_variance_weighting:
        # refit once with the variance of the first difference stamp, V_S + K²⋆V_T
        var2 = (_valid(candidate.science.variance, k).astype(np.float64)
                + _kernels.correlate_valid(np.ascontiguousarray(candidate.template.variance,
                                                                dtype=np.float64),
                                           kernel * kernel)).ravel()
        if (var2 > 0).all():
            m, b, a, cond, pinv = solve_once(1.0 / var2)
            kernel = np.tensordot(a[:n_b], basis.images, axes=1)
    bg = float(a[n_b]) if fit_for_background else 0.0
    sol = CandidateSolution(coefficients=a[:n_b].copy(), background=bg, kernel_image=kernel,
                            kernel_sum=float(kernel.sum()), m=m, b=b, condition_number=cond,
                            used_pseudo_inverse=bool(pinv))
    sol.stats = difference_stats(candidate, kernel, bg, bad_bits, config)
    return sol


def judge_residuals(stats, config):
    """Residual clipping rule shared by the single and spatial stages.

    Returns the rejection reason, or an empty string when the candidate passes.
    """
    if not (np.isfinite(stats.mean) and np.isfinite(stats.std)):
        return "residual statistics are NaN"
    if abs(stats.mean) > config.candidate_residual_mean_max:
        return (f"|mean(D/σ)| = {abs(stats.mean):.3f} > candidate_residual_mean_max "
                f"{config.candidate_residual_mean_max}")
    if stats.std > config.candidate_residual_std_max:
        return (f"std(D/σ) = {stats.std:.3f} > candidate_residual_std_max "
                f"{config.candidate_residual_std_max}")
    return ""


def build_single_kernels(cell_set, basis, config, *, fit_for_background, regularization=None,
                         bad_bits=0, use_pca_slot=False, skip_built=True):
    """Visit the cells and fit each visited candidate (BuildSingleKernelVisitor).

    Parameters
    ----------
    cell_set : SpatialCellSet
    basis : KernelBasis
    config : PsfMatchConfig
    fit_for_background : bool
    regularization : ndarray, optional
    bad_bits : int
    use_pca_slot : bool
        Store the fit in ``candidate.pca`` (refit with a PCA basis) instead of ``orig``.
    skip_built : bool
        Skip candidates that already hold an ORIG solution.

    Returns
    -------
    (n_processed, n_rejected) : tuple of int
    """
    n_proc = n_rej = 0
    for cand in cell_set.visit(config.n_star_per_cell):
        if skip_built and not use_pca_slot and cand.orig is not None:
            continue
        n_proc += 1
        try:
            sol = build_candidate(cand, basis, config, fit_for_background=fit_for_background,
                                  regularization=regularization, bad_bits=bad_bits)
        except (KernelSolutionError, ValueError, np.linalg.LinAlgError) as exc:
            cand.set_bad(f"single-kernel fit failed: {exc}")
            n_rej += 1
            continue
        if use_pca_slot:
            cand.pca = sol
        else:
            cand.orig = sol
        reason = judge_residuals(sol.stats, config) if config.single_kernel_clipping else ""
        if not np.isfinite(sol.stats.mean) or not np.isfinite(sol.stats.std):
            reason = reason or "residual statistics are NaN"
        if reason:
            cand.set_bad("single kernel: " + reason)
            n_rej += 1
        else:
            cand.status = GOOD
    log.debug("single-kernel visit: %d processed, %d rejected", n_proc, n_rej)
    return n_proc, n_rej


def clipped_mean_std(values, nsigma=3.0, niter=3):
    """Iteratively clipped mean and standard deviation (afw MEANCLIP/STDEVCLIP semantics).

    The first pass keeps values within ``nsigma × 0.7413 × IQR`` of the median; later
    passes use the clipped mean ± ``nsigma`` clipped standard deviations.

    Parameters
    ----------
    values : array_like
    nsigma : float
    niter : int

    Returns
    -------
    (mean, std) : tuple of float
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.nan, np.nan
    if v.size == 1:
        return float(v[0]), 0.0
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    centre, half = med, nsigma * 0.7413 * (q75 - q25)
    keep = v
    for _ in range(niter):
        sel = v[np.abs(v - centre) <= half]
        if sel.size == 0:
            break
        keep = sel
        centre = keep.mean()
        half = nsigma * (keep.std(ddof=1) if keep.size > 1 else 0.0)
    std = keep.std(ddof=1) if keep.size > 1 else 0.0
    return float(keep.mean()), float(std)


def kernel_sum_clip(cell_set, config):
    """Reject candidates whose kernel sum is an outlier (KernelSumVisitor).

    Parameters
    ----------
    cell_set : SpatialCellSet
    config : PsfMatchConfig

    Returns
    -------
    (mean, std, n_rejected) : tuple

    Raises
    ------
    NoKernelCandidatesError
        If no visited candidate has a kernel solution.
    """
    visited = [c for c in cell_set.visit(config.n_star_per_cell) if c.orig is not None]
    sums = [c.orig.kernel_sum for c in visited]
    if not sums:
        msg = ("unable to determine the kernel sum: 0 candidates survived the single-kernel "
               "fits; check the candidate list, or relax candidate_residual_std_max / "
               "candidate_residual_mean_max")
        raise NoKernelCandidatesError(msg)
    mean, std = clipped_mean_std(sums)
    if not (np.isfinite(mean) and np.isfinite(std)):
        msg = f"kernel-sum statistics are not finite (mean {mean}, std {std})"
        raise NoKernelCandidatesError(msg)
    limit = config.max_ksum_sigma * std
    n_rej = 0
    if config.kernel_sum_clipping:
        for c in visited:
            if abs(c.orig.kernel_sum - mean) > limit:
                c.set_bad(f"kernel sum {c.orig.kernel_sum:.4f} is more than max_ksum_sigma="
                          f"{config.max_ksum_sigma} std from the clipped mean {mean:.4f} "
                          f"(std {std:.4f})")
                n_rej += 1
    log.info("Kernel sum: clipped mean %.5f, std %.5f; %d candidates rejected", mean, std, n_rej)
    return mean, std, n_rej


def make_pca_basis(cell_set, config):
    """PCA basis from the unit-sum kernels of the visited candidates.

    Parameters
    ----------
    cell_set : SpatialCellSet
    config : PsfMatchConfig
        Uses ``subtract_mean_for_pca`` and ``num_principal_components``.

    Returns
    -------
    (KernelBasis, eigenvalues) : tuple
    """
    kernels = [c.orig.kernel_image / c.orig.kernel_sum
               for c in cell_set.visit(config.n_star_per_cell) if c.orig is not None]
    if not kernels:
        msg = "no candidate kernels to build a PCA basis from"
        raise NoKernelCandidatesError(msg)
    stack = np.array(kernels)
    n, k, _ = stack.shape
    flat = stack.reshape(n, -1)
    eig_kernels = []
    if config.subtract_mean_for_pca:
        mean = flat.mean(axis=0)
        flat = flat - mean
        eig_kernels.append(mean)
    if n == 1:
        evals = np.array([1.0])
        eimgs = flat.copy()
    else:
        r = flat @ flat.T / flat.shape[1]
        evals, q = np.linalg.eigh(r)
        order = np.argsort(evals)[::-1]
        evals, q = evals[order], q[:, order]
        eimgs = q.T @ flat
    if evals.sum() == 0 and not config.subtract_mean_for_pca:
        msg = "PCA eigenvalues sum to zero: the candidate kernels are all zero"
        raise KernelSolutionError(msg)
    for img, ev in zip(eimgs, evals):
        if ev <= 0 and config.subtract_mean_for_pca:
            continue  # identical kernels leave only the mean; null components carry no shape
        peak = img[np.argmax(np.abs(img))]
        if peak != 0 and np.isfinite(img).all():
            eig_kernels.append(img / peak)
    eig_kernels = eig_kernels[:min(config.num_principal_components, len(eig_kernels))]
    images, transform = renormalize_kernel_list(np.array(eig_kernels).reshape(-1, k, k))
    log.info("PCA basis: %d components from %d kernels", images.shape[0], n)
    return KernelBasis(images=images, kind="pca", info={"PCAEigenvalues": evals.tolist()}), evals
