"""Kernel bases: Alard–Lupton Gaussians × polynomials, delta functions, regularization.

The kernel is ``K = Σ a_k B_k``.  Bases are renormalized so that ``ΣB_0 = 1`` and
``ΣB_k = 0``, ``‖B_k‖₂ = 1`` for ``k ≥ 1``; the kernel sum (the photometric
ratio) is then carried by ``a_0`` alone.

Alard–Lupton sigmas follow the current ip_diffim rule (``_calculateBasisSigmas``):
``σ_K = max(sqrt(σ_ref² − σ_tgt²), minSig)``, the first sigma is
``max(minSig, σ_K/β)`` and each next one is ``β`` times wider.  Deconvolution
(the image to convolve has the wider PSF) swaps the roles and uses
``alard_min_sig_deconv``.  The older rule (Ulmer 2010 deconvolution set, the
``alard_n_gauss_deconv``/``alard_deg_gauss_deconv`` fields) is not used: it
produced NaN sigmas for β² < 2 and a discontinuity of the kernel size (3→4 px
FWHM gave 27 px in the old rule, 21 px now).  The kernel size is recomputed from
the widest sigma in every mode, the equal-FWHM case included.
"""

import logging
from dataclasses import dataclass, field

import numpy as np

from .exceptions import ConfigError

__all__ = [
    "KernelBasis",
    "FWHM_TO_SIGMA",
    "alard_lupton_sigmas",
    "alard_lupton_kernel_size",
    "make_alard_lupton_basis",
    "make_delta_function_basis",
    "make_kernel_basis",
    "renormalize_kernel_list",
    "make_regularization_matrix",
]

log = logging.getLogger(__name__)

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
_FLT_EPSILON = float(np.finfo(np.float32).eps)


@dataclass
class KernelBasis:
    """A list of kernel basis images with an optional separable factorization.

    Attributes
    ----------
    images : ndarray, shape (n, k, k)
        Basis images (float64), correlation orientation.
    kind : str
        ``"alard-lupton"``, ``"delta-function"`` or ``"pca"``.
    sep_x, sep_y : ndarray, shape (n_raw, k), optional
        Separable factors: ``raw_r = outer(sep_y[r], sep_x[r])``.
    transform : ndarray, shape (n_raw, n), optional
        ``images[b] = Σ_r transform[r, b] · raw_r``; lets stamp convolutions run as
        two 1-D passes per raw function.
    info : dict
        Metadata (sigmas, degrees, mode) recorded in results and headers.
    """

    images: np.ndarray
    kind: str
    sep_x: np.ndarray | None = None
    sep_y: np.ndarray | None = None
    transform: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def n(self):
        """Number of basis functions."""
        return self.images.shape[0]

    @property
    def size(self):
        """Kernel width (odd)."""
        return self.images.shape[1]

    @property
    def is_separable(self):
        """True when a separable factorization is available."""
        return self.transform is not None


def alard_lupton_sigmas(reference_sigma, target_sigma, min_sig, beta, n_gauss):
    """Gaussian sigmas of the AL basis for matching ``target`` onto ``reference``.

    Parameters
    ----------
    reference_sigma : float
        PSF sigma (pixels) of the image that is *not* convolved.
    target_sigma : float
        PSF sigma (pixels) of the image that is convolved.
    min_sig, beta : float
        Minimum sigma and geometric ratio between successive sigmas.
    n_gauss : int
        Number of Gaussians.

    Returns
    -------
    list of float
    """
    sig_k = max(np.sqrt(max(reference_sigma**2 - target_sigma**2, 0.0)), min_sig)
    first = sig_k if n_gauss == 1 else max(min_sig, sig_k / beta)
    return [first * beta**i for i in range(n_gauss)]


def alard_lupton_kernel_size(sigma_max, scaling, size_min, size_max):
    """Kernel size ``int(scaling·σmax)``, forced odd, clipped to ``[size_min, size_max]``."""
    size = int(scaling * sigma_max)
    if size % 2 == 0:
        size += 1
    return int(min(max(size, size_min), size_max))


def _poly_terms(degree):
    """(p, q) powers of x and y in afw PolynomialFunction2 order: 1, x, y, x², xy, y², …"""
    return [(d - j, j) for d in range(degree + 1) for j in range(d + 1)]


def renormalize_kernel_list(images):
    """Renormalize basis images: first sums to 1, the others sum to 0 with unit norm.

    This is not Gram–Schmidt: ``B_k ← B_k/ΣB_k − B_0`` for terms with a non-zero sum
    (terms odd in u or v already sum to 0), then ``B_k ← B_k/‖B_k‖₂``.

    Parameters
    ----------
    images : ndarray, shape (n, k, k)

    Returns
    -------
    renormalized : ndarray, shape (n, k, k)
    transform : ndarray, shape (n, n)
        ``renormalized[b] = Σ_r transform[r, b] · images[r]``.
    """
    images = np.asarray(images, dtype=np.float64)
    n = images.shape[0]
    flat = images.reshape(n, -1)
    transform = np.zeros((n, n))
    s0 = flat[0].sum()
    if abs(s0) <= _FLT_EPSILON:
        msg = "the first kernel basis image sums to zero and cannot be normalized to 1"
        raise ConfigError(msg)
    transform[0, 0] = 1.0 / s0
    for k in range(1, n):
        col = np.zeros(n)
        col[k] = 1.0
        s = flat[k].sum()
        if abs(s) > _FLT_EPSILON:
            col[k] = 1.0 / s
            col -= transform[:, 0]
        vec = col @ flat
        norm = np.sqrt(np.dot(vec, vec))
        if norm == 0.0:
            msg = f"kernel basis image {k} is identically zero after renormalization"
            raise ConfigError(msg)
        transform[:, k] = col / norm
    out = (transform.T @ flat).reshape(images.shape)
    return out, transform


def make_alard_lupton_basis(config, template_fwhm=None, science_fwhm=None):
    """Build the AL basis for matching an image of ``template_fwhm`` to ``science_fwhm``.

    Parameters
    ----------
    config : PsfMatchConfigAL
        The active kernel configuration.
    template_fwhm, science_fwhm : float, optional
        PSF FWHMs in pixels of the image to convolve and the reference image.
        When either is missing, or ``scale_by_fwhm`` is False, the config sigmas,
        degrees and ``kernel_size`` are used.

    Returns
    -------
    KernelBasis
    """
    n_gauss = config.alard_n_gauss
    degrees = list(config.alard_deg_gauss)
    if len(degrees) != n_gauss or len(config.alard_sig_gauss) != n_gauss:
        msg = (f"alard_deg_gauss (length {len(degrees)}) and alard_sig_gauss (length "
               f"{len(config.alard_sig_gauss)}) must both have alard_n_gauss={n_gauss} entries")
        raise ConfigError(msg)
    if config.kernel_size % 2 == 0:
        msg = f"kernel_size must be odd, got {config.kernel_size}"
        raise ConfigError(msg)

    if template_fwhm is None or science_fwhm is None or not config.scale_by_fwhm:
        sigmas = [float(s) for s in config.alard_sig_gauss]
        size = config.kernel_size
        mode = "config"
    else:
        sig_t = template_fwhm * FWHM_TO_SIGMA
        sig_s = science_fwhm * FWHM_TO_SIGMA
        if sig_s >= sig_t:
            mode = "convolution" if sig_s > sig_t else "equal"
            sigmas = alard_lupton_sigmas(sig_s, sig_t, config.alard_min_sig,
                                         config.alard_gauss_beta, n_gauss)
        else:
            mode = "deconvolution"
            sigmas = alard_lupton_sigmas(sig_t, sig_s, config.alard_min_sig_deconv,
                                         config.alard_gauss_beta, n_gauss)
        size = alard_lupton_kernel_size(max(sigmas), config.kernel_size_fwhm_scaling,
                                        config.kernel_size_min, config.kernel_size_max)

    half = size // 2
    u = np.arange(-half, half + 1, dtype=np.float64)
    sep_x, sep_y = [], []
    for sigma, degree in zip(sigmas, degrees):
        g = np.exp(-0.5 * u**2 / sigma**2)
        g /= g.sum()  # the 2-D Gaussian outer(g, g) then sums to exactly 1
        for p, q in _poly_terms(degree):
            # polynomials run over [-1, 1] edge to edge, not scaled by sigma
            sep_x.append(g * (u / half) ** p)
            sep_y.append(g * (u / half) ** q)
    sep_x = np.array(sep_x)
    sep_y = np.array(sep_y)
    raw = sep_y[:, :, None] * sep_x[:, None, :]
    images, transform = renormalize_kernel_list(raw)
    info = {"ALBasisNGauss": n_gauss, "ALBasisDegGauss": degrees,
            "ALBasisSigGauss": [float(s) for s in sigmas], "ALKernelSize": size,
            "ALBasisMode": mode}
    log.info("Alard-Lupton basis: %d functions, sigmas %s px, degrees %s, kernel %d px (%s)",
             images.shape[0], np.round(sigmas, 3).tolist(), degrees, size, mode)
    return KernelBasis(images=images, kind="alard-lupton", sep_x=sep_x, sep_y=sep_y,
                       transform=transform, info=info)


def make_delta_function_basis(kernel_size):
    """Delta-function basis: ``kernel_size²`` images with a single 1, row-major order.

    Parameters
    ----------
    kernel_size : int
        Odd kernel width.

    Returns
    -------
    KernelBasis
    """
    if kernel_size % 2 == 0 or kernel_size < 1:
        msg = f"kernel_size must be a positive odd number, got {kernel_size}"
        raise ConfigError(msg)
    n = kernel_size * kernel_size
    images = np.eye(n).reshape(n, kernel_size, kernel_size)
    return KernelBasis(images=images, kind="delta-function",
                       info={"DFKernelSize": kernel_size})


def make_kernel_basis(config, template_fwhm=None, science_fwhm=None):
    """Dispatch on ``config.kernel_basis_set`` and build the basis.

    Parameters
    ----------
    config : PsfMatchConfigAL or PsfMatchConfigDF
    template_fwhm, science_fwhm : float, optional
        FWHMs (pixels) of the image to convolve and of the reference image.

    Returns
    -------
    KernelBasis
    """
    if config.kernel_basis_set == "alard-lupton":
        return make_alard_lupton_basis(config, template_fwhm, science_fwhm)
    if config.kernel_basis_set == "delta-function":
        return make_delta_function_basis(config.kernel_size)
    msg = (f"unknown kernel_basis_set {config.kernel_basis_set!r}; "
           "use 'alard-lupton' or 'delta-function'")
    raise ConfigError(msg)


_STENCILS = {
    5: np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]),
    9: np.array([[1.0, 4.0, 1.0], [4.0, -20.0, 4.0], [1.0, 4.0, 1.0]]) / 6.0,
}
_FORWARD = {0: [1.0], 1: [-1.0, 1.0], 2: [-1.0, 2.0, -1.0], 3: [-1.0, 3.0, -3.0, 1.0]}


def make_regularization_matrix(config, kernel_size, fit_for_background):
    """Regularization matrix ``H = LᵀL`` for the delta-function basis.

    Parameters
    ----------
    config : PsfMatchConfigDF
        Uses ``regularization_type``, ``central_regularization_stencil``,
        ``forward_regularization_orders`` and ``regularization_border_penalty``.
    kernel_size : int
    fit_for_background : bool
        Append a zero row/column for the background term.

    Returns
    -------
    ndarray, shape (n, n)
    """
    k = kernel_size
    npar = k * k
    border = config.regularization_border_penalty
    if border < 0:
        msg = f"regularization_border_penalty must be >= 0, got {border}"
        raise ConfigError(msg)
    rows = []
    if config.regularization_type == "centralDifference":
        stencil = _STENCILS.get(config.central_regularization_stencil)
        if stencil is None:
            msg = (f"central_regularization_stencil must be 5 or 9, "
                   f"got {config.central_regularization_stencil}")
            raise ConfigError(msg)
        for y in range(k):
            for x in range(k):
                row = np.zeros(npar)
                if 0 < x < k - 1 and 0 < y < k - 1:
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            row[(y + dy) * k + x + dx] = stencil[dy + 1, dx + 1]
                else:
                    row[y * k + x] = border
                rows.append(row)
    elif config.regularization_type == "forwardDifference":
        orders = list(config.forward_regularization_orders)
        if not orders or any(o < 1 or o > 3 for o in orders):
            msg = f"forward_regularization_orders must be within 1..3, got {orders}"
            raise ConfigError(msg)
        for order in orders:
            for axis in (0, 1):
                for y in range(k):
                    for x in range(k):
                        dist = (k - 1 - x) if axis == 0 else (k - 1 - y)
                        o = min(dist, order)  # the order tapers near the far edge
                        coeffs = _FORWARD[o] if o > 0 else [border]
                        row = np.zeros(npar)
                        for t, c in enumerate(coeffs):
                            xx, yy = (x + t, y) if axis == 0 else (x, y + t)
                            row[yy * k + xx] += c
                        rows.append(row)
    else:
        msg = (f"unknown regularization_type {config.regularization_type!r}; "
               "use 'centralDifference' or 'forwardDifference'")
        raise ConfigError(msg)
    lmat = np.array(rows)
    h = lmat.T @ lmat
    if fit_for_background:
        h = np.pad(h, ((0, 1), (0, 1)))
    return h
