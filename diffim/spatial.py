"""Spatially varying kernel and differential background models and their fit.

Each kernel coefficient varies as ``a_b(x, y) = Σ_s c_bs φ_s(x, y)`` with
``φ`` first-kind Chebyshev products on the cell-set box (``chebyshev1``) or plain
monomials in parent pixel coordinates (``polynomial``), ordered
``1, x, y, x², xy, y², …``.  For the AL and PCA bases the first coefficient (the
kernel sum) is spatially constant.  The global least-squares system is assembled
exactly from the per-candidate normal equations, assuming the coefficients are
constant across each stamp.
"""

import logging

import numpy as np
from astropy.io import fits

from . import _kernels
from ._atomic import atomic_open
from .candidates import GOOD
from .exceptions import ConfigError, DiffimError, KernelSolutionError
from .solve import difference_stats, judge_residuals

__all__ = [
    "SpatialFunction",
    "SpatialKernel",
    "BackgroundModel",
    "fit_spatial_kernel",
    "assess_spatial_kernel",
]

log = logging.getLogger(__name__)


class SpatialFunction:
    """A 2-D function basis of a given order over a parent bounding box.

    Parameters
    ----------
    kind : {"chebyshev1", "polynomial"}
    order : int
    bbox : tuple
        Half-open parent box ``(x0, y0, x1, y1)``; Chebyshev arguments map
        ``[x0 − 0.5, x1 − 0.5]`` onto ``[−1, 1]``.
    """

    def __init__(self, kind, order, bbox):
        if kind not in ("chebyshev1", "polynomial"):
            msg = f"spatial_model_type must be 'chebyshev1' or 'polynomial', got {kind!r}"
            raise ConfigError(msg)
        if order < 0:
            msg = f"spatial order must be >= 0, got {order}"
            raise ConfigError(msg)
        self.kind = kind
        self.order = int(order)
        self.bbox = tuple(int(v) for v in bbox)
        x0, y0, x1, y1 = self.bbox
        self._xr = (x0 - 0.5, x1 - 0.5)
        self._yr = (y0 - 0.5, y1 - 0.5)
        self.powers = [(d - j, j) for d in range(self.order + 1) for j in range(d + 1)]

    @property
    def n_terms(self):
        """Number of terms, ``(o+1)(o+2)/2``."""
        return len(self.powers)

    def _axis(self, v, rng):
        v = np.asarray(v, dtype=np.float64)
        out = np.empty((self.order + 1, *v.shape))
        if self.kind == "chebyshev1":
            lo, hi = rng
            t = (2.0 * v - (lo + hi)) / (hi - lo) if hi > lo else np.zeros_like(v)
        else:
            t = v
        out[0] = 1.0
        if self.order >= 1:
            out[1] = t
        for p in range(2, self.order + 1):
            out[p] = (2.0 * t * out[p - 1] - out[p - 2]) if self.kind == "chebyshev1" \
                else out[p - 1] * t
        return out

    def axis_factors(self, x, y):
        """Per-axis factors: term ``s`` at (x, y) is ``fx[p_s] · fy[q_s]``."""
        return self._axis(x, self._xr), self._axis(y, self._yr)

    def evaluate(self, x, y):
        """Every term at the points (x, y); shape ``(n_terms, *broadcast(x, y).shape)``."""
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        fx, fy = self.axis_factors(x, y)
        return np.array([fx[p] * fy[q] for p, q in self.powers])

    def header(self, prefix):
        """FITS cards describing the function."""
        x0, y0, x1, y1 = self.bbox
        return {f"{prefix}TYPE": self.kind, f"{prefix}ORD": self.order, f"{prefix}X0": x0,
                f"{prefix}Y0": y0, f"{prefix}X1": x1, f"{prefix}Y1": y1}

    @classmethod
    def from_header(cls, header, prefix):
        """Inverse of :meth:`header`."""
        return cls(header[f"{prefix}TYPE"], header[f"{prefix}ORD"],
                   (header[f"{prefix}X0"], header[f"{prefix}Y0"], header[f"{prefix}X1"],
                    header[f"{prefix}Y1"]))


class BackgroundModel:
    """Differential background ``bg(x, y) = Σ_j d_j ψ_j(x, y)`` (zero when not fitted).

    Parameters
    ----------
    function : SpatialFunction or None
        None means no background was fitted; the model is identically zero.
    coefficients : ndarray
    """

    def __init__(self, function=None, coefficients=None):
        self.function = function
        self.coefficients = (np.zeros(0) if coefficients is None
                             else np.asarray(coefficients, dtype=np.float64))

    @property
    def is_zero(self):
        """True when no background was fitted."""
        return self.function is None

    def evaluate(self, x, y):
        """Background at parent coordinates (x, y); scalars or arrays."""
        if self.function is None:
            return np.zeros(np.broadcast(np.asarray(x), np.asarray(y)).shape)[()]
        return np.tensordot(self.coefficients, self.function.evaluate(x, y), axes=1)[()]

    def image(self, bbox, dtype=np.float64):
        """The background on the pixel grid of a half-open parent box."""
        x0, y0, x1, y1 = bbox
        out = np.zeros((y1 - y0, x1 - x0), dtype=dtype)
        if self.function is None:
            return out
        fx, fy = self.function.axis_factors(np.arange(x0, x1), np.arange(y0, y1))
        # group the terms by their y power: one outer product per power, not per term, formed
        # in the output dtype (a float64 outer product and its cast cost 4× more at 4096²)
        for q in range(self.function.order + 1):
            row = sum(c * fx[p] for c, (p, qq) in zip(self.coefficients, self.function.powers)
                      if qq == q)
            if np.any(row):
                out += fy[q].astype(dtype)[:, None] * row.astype(dtype)[None, :]
        return out

    def to_hdu(self):
        """An ImageHDU named BACKGROUND holding the coefficients."""
        hdu = fits.ImageHDU(self.coefficients, name="BACKGROUND")
        hdu.header["FITTED"] = self.function is not None
        if self.function is not None:
            hdu.header.update(self.function.header("BG"))
        return hdu

    @classmethod
    def from_hdu(cls, hdu):
        """Inverse of :meth:`to_hdu`."""
        if not hdu.header.get("FITTED", False):
            return cls()
        return cls(SpatialFunction.from_header(hdu.header, "BG"), np.array(hdu.data, float))

    @classmethod
    def read_fits(cls, path):
        """Read the BACKGROUND extension written by :meth:`SpatialKernel.write_fits`."""
        with fits.open(path) as hdul:
            return cls.from_hdu(hdul["BACKGROUND"])


class SpatialKernel:
    """A spatially varying linear-combination kernel.

    Parameters
    ----------
    basis_images : ndarray, shape (n_b, k, k)
    function : SpatialFunction
    coefficients : ndarray, shape (n_b, n_terms)
        ``a_b(x, y) = Σ_s coefficients[b, s] φ_s(x, y)``.
    info : dict, optional
        Metadata written to the FITS header.
    """

    def __init__(self, basis_images, function, coefficients, info=None):
        self.basis_images = np.asarray(basis_images, dtype=np.float64)
        self.function = function
        self.coefficients = np.asarray(coefficients, dtype=np.float64)
        self.info = dict(info or {})
        if self.coefficients.shape != (self.basis_images.shape[0], function.n_terms):
            msg = (f"coefficients have shape {self.coefficients.shape}, expected "
                   f"({self.basis_images.shape[0]}, {function.n_terms})")
            raise ValueError(msg)

    @property
    def size(self):
        """Kernel width."""
        return self.basis_images.shape[1]

    @property
    def is_spatially_constant(self):
        """True when no coefficient varies across the image."""
        return self.function.n_terms == 1 or not np.any(self.coefficients[:, 1:])

    def coefficients_at(self, x, y):
        """Basis coefficients at one parent position."""
        return self.coefficients @ self.function.evaluate(float(x), float(y))

    def evaluate(self, x, y):
        """The kernel image at parent position (x, y), correlation orientation."""
        return np.tensordot(self.coefficients_at(x, y), self.basis_images, axes=1)

    def kernel_sum(self, x, y):
        """Sum of the kernel image at (x, y)."""
        return float(self.evaluate(x, y).sum())

    def term_kernels(self):
        """Kernels of the spatial terms: ``K(x, y) = Σ_s φ_s(x, y) K_s``."""
        return np.tensordot(self.coefficients.T, self.basis_images, axes=1)

    def write_fits(self, path, background=None):
        """Write basis, coefficients, function and (optionally) the background; atomic."""
        from . import __version__

        primary = fits.PrimaryHDU()
        h = primary.header
        h["DIFFIMV"] = (__version__, "diffim version")
        h["KSIZE"] = self.size
        h["NBASIS"] = self.basis_images.shape[0]
        h["ORIENT"] = ("correlation", "out(x,y)=sum K[j,i] in(x-c+i,y-c+j)")
        h.update(self.function.header("SP"))
        for key, val in self.info.items():
            if isinstance(val, (int, float, str, bool)) and len(key) <= 8:
                h[key] = val
        hdus = [primary, fits.ImageHDU(self.basis_images, name="BASIS"),
                fits.ImageHDU(self.coefficients, name="COEFFS")]
        if background is not None:
            hdus.append(background.to_hdu())
        with atomic_open(path) as fh:
            fits.HDUList(hdus).writeto(fh)

    @classmethod
    def read_fits(cls, path):
        """Read a kernel written by :meth:`write_fits`."""
        try:
            with fits.open(path) as hdul:
                h = hdul[0].header
                func = SpatialFunction.from_header(h, "SP")
                return cls(np.array(hdul["BASIS"].data, float), func,
                           np.array(hdul["COEFFS"].data, float))
        except (OSError, KeyError) as exc:
            msg = f"{path}: not a diffim kernel file ({exc})"
            raise DiffimError(msg) from exc


def fit_spatial_kernel(candidates, basis, config, bbox, *, fit_for_background,
                       spatial_kernel_order=None, spatial_bg_order=None):
    """Fit the spatially varying kernel and background from per-candidate normal equations.

    Parameters
    ----------
    candidates : list of KernelCandidate
        Visited candidates; each must hold a solution (``recent``) in ``basis``.
    basis : KernelBasis
    config : PsfMatchConfig
    bbox : tuple
        Half-open parent box of the cell set.
    fit_for_background : bool
    spatial_kernel_order, spatial_bg_order : int, optional
        Override the configured orders (used when they are lowered).

    Returns
    -------
    (SpatialKernel, BackgroundModel, dict)
        The dict holds ``condition_number``, ``n_candidates``, ``n_unknowns`` and
        ``used_pseudo_inverse``.
    """
    order = config.spatial_kernel_order if spatial_kernel_order is None else spatial_kernel_order
    kfunc = SpatialFunction(config.spatial_model_type, order, bbox)
    bg_order = config.spatial_bg_order if spatial_bg_order is None else spatial_bg_order
    bfunc = (SpatialFunction(config.spatial_model_type, bg_order, bbox)
             if fit_for_background else None)
    cands = [c for c in candidates if c.recent is not None]
    if not cands:
        msg = "no kernel candidates for the spatial fit"
        raise KernelSolutionError(msg)
    n_b = basis.n
    n_kt = kfunc.n_terms
    n_bt = bfunc.n_terms if bfunc else 0
    xs = np.array([c.x for c in cands])
    ys = np.array([c.y for c in cands])
    p = kfunc.evaluate(xs, ys).T  # (n_c, n_kt)
    mc = np.array([c.recent.m for c in cands])
    bc = np.array([c.recent.b for c in cands])
    n_c = len(cands)
    pp = (p[:, :, None] * p[:, None, :]).reshape(n_c, -1)
    mkk = (mc[:, :n_b, :n_b].reshape(n_c, -1).T @ pp).reshape(n_b, n_b, n_kt, n_kt)
    nk = n_b * n_kt
    big = np.zeros((nk + n_bt, nk + n_bt))
    big[:nk, :nk] = mkk.transpose(0, 2, 1, 3).reshape(nk, nk)
    rhs = np.zeros(nk + n_bt)
    rhs[:nk] = (bc[:, :n_b].T @ p).reshape(nk)
    if bfunc is not None:
        q = bfunc.evaluate(xs, ys).T  # (n_c, n_bt)
        cross = np.einsum("ca,ci,cj->aij", mc[:, :n_b, n_b], p, q).reshape(nk, n_bt)
        big[:nk, nk:] = cross
        big[nk:, :nk] = cross.T
        big[nk:, nk:] = np.einsum("c,ci,cj->ij", mc[:, n_b, n_b], q, q)
        rhs[nk:] = bc[:, n_b] @ q
    constant_first = basis.kind in ("alard-lupton", "pca")
    if constant_first:
        # the first function term is the constant 1, so restricting basis 0 to a
        # constant keeps only the first column of its block
        keep = np.r_[0, np.arange(n_kt, nk + n_bt)]
    else:
        keep = np.arange(nk + n_bt)
    mat = np.ascontiguousarray(big[np.ix_(keep, keep)])
    vec = np.ascontiguousarray(rhs[keep])
    theta, pinv = _kernels.solve_symmetric(mat, vec)
    cond = float(_kernels.condition_number(mat, config.condition_number_type == "SVD"))
    if not np.isfinite(theta).all():
        msg = (f"unable to determine the spatial kernel solution (condition number "
               f"{cond:.3g}); lower spatial_kernel_order or give more candidates")
        raise KernelSolutionError(msg)
    full = np.zeros(nk + n_bt)
    full[keep] = theta
    coeffs = full[:nk].reshape(n_b, n_kt)
    kernel = SpatialKernel(basis.images, kfunc, coeffs,
                           info={"SPORDER": order, "SPCOND": cond})
    bg = BackgroundModel(bfunc, full[nk:]) if bfunc is not None else BackgroundModel()
    info = {"condition_number": cond, "n_candidates": n_c, "n_unknowns": int(keep.size),
            "used_pseudo_inverse": bool(pinv), "spatial_kernel_order": order}
    log.info("Spatial fit: %d candidates, %d unknowns, condition number %.3g%s", n_c,
             keep.size, cond, " (pseudo-inverse)" if pinv else "")
    return kernel, bg, info


def assess_spatial_kernel(candidates, kernel, background, config, bad_bits):
    """Residuals of each candidate with the spatial model; clip (AssessSpatialKernelVisitor).

    Parameters
    ----------
    candidates : list of KernelCandidate
    kernel : SpatialKernel
    background : BackgroundModel
    config : PsfMatchConfig
    bad_bits : int

    Returns
    -------
    (n_good, n_rejected) : tuple of int
    """
    n_good = n_rej = 0
    for c in candidates:
        if c.recent is None:
            c.set_bad("never fitted (promoted after the last single-kernel pass)")
            continue
        stats = difference_stats(c, kernel.evaluate(c.x, c.y),
                                 float(background.evaluate(c.x, c.y)), bad_bits, config)
        c.spatial_stats = stats
        reason = judge_residuals(stats, config) if config.spatial_kernel_clipping else ""
        if reason:
            c.set_bad("spatial kernel: " + reason)
            n_rej += 1
        else:
            c.status = GOOD
            n_good += 1
    log.info("Spatial assessment: %d good, %d rejected", n_good, n_rej)
    return n_good, n_rej

