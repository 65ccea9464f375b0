"""ImagePsfMatchTask: PSF-match and subtract two images (the four ip_diffim entry points).

Model: ``S ≈ K⋆T + bg`` where T is the image convolved (the template unless the
science image is convolved) and S the other one.  See :mod:`diffim.basis`,
:mod:`diffim.solve` and :mod:`diffim.spatial` for the steps, and
``docs/CONTRACT.md`` for the data model.
"""

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from .basis import make_kernel_basis, make_regularization_matrix
from .candidates import BAD, GOOD, SpatialCellSet, make_candidates
from .config import ImagePsfMatchConfig
from .convolve import convolve_masked_image
from .exceptions import (
    ImageShapeMismatchError,
    NoKernelCandidatesError,
)
from .image import Exposure, MaskedImage
from .solve import build_single_kernels, kernel_sum_clip, make_pca_basis
from .spatial import assess_spatial_kernel, fit_spatial_kernel
from .warp import register_and_warp

__all__ = ["ImagePsfMatchTask", "PsfMatchResult"]

log = logging.getLogger(__name__)

_MODES = ("convolveTemplate", "convolveScience", "auto")


@dataclass
class PsfMatchResult:
    """Everything a matching or subtraction produces.

    Attributes
    ----------
    matched_image : MaskedImage
        ``K⋆T`` (the convolved image; the science image in convolveScience mode).
    psf_matching_kernel : SpatialKernel
        Evaluates the kernel image and its sum anywhere; saves to / loads from FITS.
    background_model : BackgroundModel
        Differential background, evaluated at parent (x, y).
    kernel_cell_set : SpatialCellSet
        Every candidate with its final status and residual statistics.
    matched_exposure, subtracted_masked_image, subtracted_exposure, warped_exposure
        Filled by the entry points that make them.
    metadata : dict
        Basis, counts, condition numbers, FWHMs and mode used, and ``timings``: wall
        time, CPU time and peak RSS of each stage (register/warp, fwhm, select, stamps,
        solve, convolve, subtract).
    """

    matched_image: MaskedImage
    psf_matching_kernel: object
    background_model: object
    kernel_cell_set: SpatialCellSet
    matched_exposure: Exposure | None = None
    subtracted_masked_image: MaskedImage | None = None
    subtracted_exposure: Exposure | None = None
    warped_exposure: Exposure | None = None
    metadata: dict = field(default_factory=dict)


def _peak_rss_mb():
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


@contextlib.contextmanager
def _stage(metadata, name):
    """Record wall time, CPU time and peak RSS of a stage in ``metadata["timings"]``."""
    w0, c0 = time.perf_counter(), time.process_time()
    yield
    entry = {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0,
             "peak_rss_mb": _peak_rss_mb()}
    metadata.setdefault("timings", {})[name] = entry
    log.info("%s: %.2f s", name, entry["wall"])


def _n_terms(order):
    return (order + 1) * (order + 2) // 2


def _constraint(n_good, n_terms):
    if n_good < n_terms:
        return "underconstrained"
    if n_good <= 2 * n_terms:
        return "poorly constrained"
    return "well constrained"


def _positions(candidate_list):
    if hasattr(candidate_list, "colnames"):
        names = {n.lower(): n for n in candidate_list.colnames}
        for xn, yn in (("x", "y"), ("xcentroid", "ycentroid"), ("x_image", "y_image")):
            if xn in names and yn in names:
                return np.column_stack([np.asarray(candidate_list[names[xn]], float),
                                        np.asarray(candidate_list[names[yn]], float)])
        msg = (f"candidate table has columns {candidate_list.colnames}; it needs x and y "
               "(parent pixel coordinates)")
        raise NoKernelCandidatesError(msg)
    arr = np.asarray(candidate_list, dtype=float)
    if arr.size == 0:
        msg = "no candidates in candidate_list"
        raise NoKernelCandidatesError(msg)
    if arr.ndim != 2 or arr.shape[1] != 2:
        msg = f"candidate_list must be an (N, 2) array of x, y; got shape {arr.shape}"
        raise NoKernelCandidatesError(msg)
    return arr


def _check_same_grid(template, science):
    if template.shape != science.shape or tuple(template.xy0) != tuple(science.xy0):
        msg = (f"template (shape {template.shape}, xy0 {tuple(template.xy0)}) and science "
               f"(shape {science.shape}, xy0 {tuple(science.xy0)}) are not on the same "
               "pixel grid; give Exposures with WCSs so the template can be warped")
        raise ImageShapeMismatchError(msg)


def _merged_mask(a, b):
    """OR of two masks, matching planes by name; returns (mask, planes) in ``a``'s numbering."""
    planes = dict(a.mask_planes)
    if all(planes.get(name) == bit for name, bit in b.mask_planes.items()):
        return a.mask | b.mask, planes
    out = a.mask.copy()
    for name, bit in b.mask_planes.items():
        if name not in planes:
            free = sorted(set(range(31)) - set(planes.values()))
            planes[name] = free[0]
        out |= ((b.mask >> bit) & 1).astype(np.int32) << planes[name]
    return out, planes


def _product_metadata(exposure):
    """Metadata for a product: the input's, less the note that its FWHM was a header hint."""
    metadata = exposure.metadata.copy()
    metadata.remove("FWHMSRC", ignore_missing=True)
    return metadata


class ImagePsfMatchTask:
    """PSF-match two images with the Alard–Lupton or delta-function method.

    Parameters
    ----------
    config : ImagePsfMatchConfig, optional
        Defaults to ``ImagePsfMatchConfig()``; validated on construction.

    Examples
    --------
    >>> from diffim import ImagePsfMatchTask, simulate_pair
    >>> pair = simulate_pair(shape=(256, 256), n_stars=60, seed=1)
    >>> result = ImagePsfMatchTask().subtract_exposures(pair.template, pair.science)
    >>> round(result.psf_matching_kernel.kernel_sum(128, 128), 2)
    1.3
    """

    def __init__(self, config=None):
        self.config = config if config is not None else ImagePsfMatchConfig()
        self.config.validate()
        self.metadata = {}

    @property
    def kconfig(self):
        """The active kernel configuration (``config.kernel.active``)."""
        return self.config.kernel.active

    # -- building blocks ---------------------------------------------------------------

    def make_kernel_basis(self, template_fwhm=None, science_fwhm=None):
        """Basis for convolving an image of ``template_fwhm`` to ``science_fwhm`` (pixels)."""
        basis = make_kernel_basis(self.kconfig, template_fwhm, science_fwhm)
        self.metadata.update(basis.info)
        return basis

    def make_candidate_list(self, template, science, kernel_size, candidate_list=None):
        """Kernel-source positions: the given list, or sep detections on the science image.

        Parameters
        ----------
        template, science : MaskedImage
        kernel_size : int
        candidate_list : Table or array, optional

        Returns
        -------
        ndarray, shape (N, 2)
        """
        if candidate_list is not None:
            return _positions(candidate_list)
        from .detect import select_kernel_sources

        table = select_kernel_sources(template, science, kernel_size, self.config)
        return _positions(table)

    def _fwhm(self, exposure, given, which):
        """PSF FWHM in pixels: the argument, a known value, or a measurement from stars.

        A value read from a seeing keyword (``FWHMSRC = 'header'``) is only a hint: it is
        used when no star can be measured.
        """
        if given is not None:
            return float(given)
        hint = exposure.psf_fwhm
        if hint is not None and exposure.metadata.get("FWHMSRC") != "header":
            return float(hint)
        from .detect import measure_fwhm

        try:
            fwhm = float(measure_fwhm(exposure.masked_image))
        except NoKernelCandidatesError as exc:
            if hint is not None:
                log.warning("Could not measure the %s PSF FWHM (%s); using the header value "
                            "%.3f px", which, exc, hint)
                return float(hint)
            log.warning("No PSF FWHM for the %s image and none measurable (%s); the basis "
                        "uses the configured sigmas", which, exc)
            return None
        if hint is not None:
            log.info("Measured %s PSF FWHM %.3f px (header hint %.3f px)", which, fwhm, hint)
        else:
            log.info("Measured %s PSF FWHM: %.3f px", which, fwhm)
        return fwhm

    def _solve(self, cell_set, basis, fit_for_background, bad_bits):
        """The ip_diffim iteration: single fits, kernel-sum clip, (PCA), spatial fit, assess."""
        cfg = self.kconfig
        reg = None
        if basis.kind == "delta-function" and getattr(cfg, "use_regularization", False):
            reg = make_regularization_matrix(cfg, basis.size, fit_for_background)
        n_star = cfg.n_star_per_cell
        iteration = 0
        n_rej_spatial = 0
        kernel = bg = info = None
        spatial_basis = basis
        guard = 0

        def single_pass():
            while True:
                _, n_rej = build_single_kernels(cell_set, basis, cfg,
                                                fit_for_background=fit_for_background,
                                                regularization=reg, bad_bits=bad_bits)
                if n_rej == 0:
                    return

        def pca_pass():
            for c in cell_set.candidates():
                c.pca = None  # solutions in an older PCA basis are no longer comparable
            pca_basis, _ = make_pca_basis(cell_set, cfg)
            _, n_rej = build_single_kernels(cell_set, pca_basis, cfg,
                                            fit_for_background=fit_for_background,
                                            bad_bits=bad_bits, use_pca_slot=True,
                                            skip_built=False)
            return pca_basis, n_rej

        def spatial_pass():
            visited = cell_set.visit(n_star)
            k_order, b_order = self._orders(sum(c.recent is not None for c in visited),
                                            fit_for_background)
            kern, back, inf = fit_spatial_kernel(visited, spatial_basis, cfg, cell_set.bbox,
                                                 fit_for_background=fit_for_background,
                                                 spatial_kernel_order=k_order,
                                                 spatial_bg_order=b_order)
            n_good, n_rej = assess_spatial_kernel(visited, kern, back, cfg, bad_bits)
            return kern, back, inf, n_good, n_rej

        while iteration < cfg.max_spatial_iterations:
            guard += 1
            if guard > 50 * cfg.max_spatial_iterations:
                break  # each restart rejects at least one star, so this only bounds a pathology
            single_pass()
            _, _, n_rej_ksum = kernel_sum_clip(cell_set, cfg)
            if n_rej_ksum > 0:
                continue
            if cfg.use_pca_for_spatial_kernel:
                spatial_basis, n_rej_pca = pca_pass()
                if n_rej_pca > 0:
                    continue
            kernel, bg, info, n_good, n_rej_spatial = spatial_pass()
            if n_good == 0 and n_rej_spatial == 0:
                msg = "no kernel candidates for the spatial fit"
                raise NoKernelCandidatesError(msg)
            if n_rej_spatial == 0:
                break
            iteration += 1
        if kernel is None or (n_rej_spatial > 0 and iteration == cfg.max_spatial_iterations):
            if cfg.use_pca_for_spatial_kernel:
                spatial_basis, _ = pca_pass()
            visited = [c for c in cell_set.visit(n_star) if c.recent is not None]
            if not visited:
                msg = ("every kernel candidate was rejected; check the images, or relax "
                       "candidate_residual_std_max / max_ksum_sigma")
                raise NoKernelCandidatesError(msg)
            k_order, b_order = self._orders(len(visited), fit_for_background)
            kernel, bg, info = fit_spatial_kernel(visited, spatial_basis, cfg, cell_set.bbox,
                                                  fit_for_background=fit_for_background,
                                                  spatial_kernel_order=k_order,
                                                  spatial_bg_order=b_order)
            for c in cell_set.visit(n_star):
                if c.recent is None:
                    c.set_bad("never fitted (promoted after the last single-kernel pass)")
        self._diagnostic(cell_set, kernel, info, fit_for_background)
        return kernel, bg, info

    def _orders(self, n_good, fit_for_background):
        """Spatial kernel and background orders, lowered when too few candidates constrain them."""
        cfg = self.kconfig
        k_order, b_order = cfg.spatial_kernel_order, cfg.spatial_bg_order
        if self.config.auto_reduce_spatial_order:
            # keep at least one candidate more than terms, so the spatial model is not
            # an exact interpolation of the few stars it has
            while k_order > 0 and n_good <= _n_terms(k_order):
                k_order -= 1
            while fit_for_background and b_order > 0 and n_good <= _n_terms(b_order):
                b_order -= 1
            if k_order != cfg.spatial_kernel_order or (
                    fit_for_background and b_order != cfg.spatial_bg_order):
                log.warning("Only %d kernel candidates: spatial kernel order lowered %d -> %d, "
                            "background order %d -> %d (auto_reduce_spatial_order)", n_good,
                            cfg.spatial_kernel_order, k_order, cfg.spatial_bg_order, b_order)
        self.metadata["spatialKernelOrderUsed"] = k_order
        self.metadata["spatialBgOrderUsed"] = b_order if fit_for_background else None
        self.metadata["spatialOrderReduced"] = k_order != cfg.spatial_kernel_order or (
            fit_for_background and b_order != cfg.spatial_bg_order)
        return k_order, b_order

    def _diagnostic(self, cell_set, kernel, info, fit_for_background):
        cfg = self.kconfig
        x0, y0, x1, y1 = cell_set.bbox
        ksum = kernel.kernel_sum(0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1))
        cond = info["condition_number"]
        log.info("Final spatial kernel sum %.5f; spatial condition number %.3g", ksum, cond)
        if not cond >= 0 or cond > cfg.max_spatial_condition_number:
            log.warning("Spatial condition number %.3g exceeds max_spatial_condition_number "
                        "%.3g", cond, cfg.max_spatial_condition_number)
        counts = cell_set.counts()
        n_good, n_bad = counts[GOOD], counts[BAD]
        log.info("Kernel candidates: %d good, %d bad, %d unknown", n_good, n_bad,
                 counts["UNKNOWN"])
        if n_bad > 2 * n_good:
            log.warning("Many more bad (%d) than good (%d) kernel candidates", n_bad, n_good)
        n_kt = kernel.function.n_terms
        k_status = _constraint(n_good, n_kt)
        log.log(logging.WARNING if k_status != "well constrained" else logging.INFO,
                "Spatial kernel model is %s (%d good candidates, %d terms per coefficient)",
                k_status, n_good, n_kt)
        bg_status = None
        if fit_for_background:
            n_bt = _n_terms(self.metadata.get("spatialBgOrderUsed") or 0)
            bg_status = _constraint(n_good, n_bt)
            log.log(logging.WARNING if bg_status != "well constrained" else logging.INFO,
                    "Spatial background model is %s (%d good candidates, %d terms)",
                    bg_status, n_good, n_bt)
        self.metadata.update({"spatialConditionNum": cond, "spatialKernelSum": ksum,
                              "nGoodCandidates": n_good, "nBadCandidates": n_bad,
                              "kernelConstraint": k_status, "backgroundConstraint": bg_status,
                              "spatialUsedPseudoInverse": info["used_pseudo_inverse"]})

    def _match(self, to_convolve, reference, positions, fwhm_conv, fwhm_ref, basis=None):
        _check_same_grid(to_convolve, reference)
        cfg = self.kconfig
        if basis is None:
            basis = self.make_kernel_basis(fwhm_conv, fwhm_ref)
        with _stage(self.metadata, "stamps"):
            candidates = make_candidates(to_convolve, reference, positions, cfg, basis.size)
            cell_set = SpatialCellSet(to_convolve.bbox, cfg.size_cell_x, cfg.size_cell_y)
            for cand in candidates:
                cell_set.insert(cand)
        bad_bits = (reference.get_plane_bitmask(*cfg.bad_mask_planes)
                    | to_convolve.get_plane_bitmask(*cfg.bad_mask_planes))
        with _stage(self.metadata, "solve"):
            kernel, bg, _ = self._solve(cell_set, basis, cfg.fit_for_background, bad_bits)
        with _stage(self.metadata, "convolve"):
            matched = convolve_masked_image(to_convolve, kernel)
        return PsfMatchResult(matched_image=matched, psf_matching_kernel=kernel,
                              background_model=bg, kernel_cell_set=cell_set,
                              metadata=dict(self.metadata))

    # -- the four entry points ---------------------------------------------------------

    def match_masked_images(self, template, science, candidate_list=None,
                            template_fwhm_pix=None, science_fwhm_pix=None):
        """PSF-match ``template`` to ``science`` (same pixel grid): ``matched = K⋆T``.

        Parameters
        ----------
        template, science : MaskedImage
            Registered images of the same shape and origin.
        candidate_list : Table or (N, 2) array, optional
            Kernel-source positions (parent x, y); detected on ``science`` if None.
        template_fwhm_pix, science_fwhm_pix : float, optional
            PSF FWHMs in pixels; the AL basis uses the configured sigmas without them.

        Returns
        -------
        PsfMatchResult
            ``matched_image``, ``psf_matching_kernel``, ``background_model``,
            ``kernel_cell_set``.

        Raises
        ------
        ImageShapeMismatchError, NoKernelCandidatesError, KernelSolutionError
        """
        self.metadata = {}
        _check_same_grid(template, science)
        basis = self.make_kernel_basis(template_fwhm_pix, science_fwhm_pix)
        with _stage(self.metadata, "select"):
            positions = self.make_candidate_list(template, science, basis.size, candidate_list)
        return self._match(template, science, positions, template_fwhm_pix, science_fwhm_pix,
                           basis)

    def subtract_masked_images(self, template, science, candidate_list=None,
                               template_fwhm_pix=None, science_fwhm_pix=None):
        """PSF-match and subtract: ``D = S − K⋆T − bg``.

        Parameters are those of :meth:`match_masked_images`.

        Returns
        -------
        PsfMatchResult
            With ``subtracted_masked_image`` added.
        """
        result = self.match_masked_images(template, science, candidate_list,
                                          template_fwhm_pix, science_fwhm_pix)
        with _stage(result.metadata, "subtract"):
            result.subtracted_masked_image = self._difference(science, result.matched_image,
                                                              result.background_model)
        return result

    def _difference(self, science, matched, background, scale=1.0, invert=False):
        """``(S − M − bg)/scale`` (or ``(M + bg − S)/scale``), with variance and mask."""
        # float32 throughout: the inputs are float32 and this runs over whole images
        d = science.image - matched.image
        d -= background.image(science.bbox, dtype=np.float32)
        if invert:
            np.negative(d, out=d)
        var = science.variance + matched.variance
        if scale != 1.0:
            d /= np.float32(scale)
            var /= np.float32(scale**2)
        mask, planes = _merged_mask(science, matched)
        return MaskedImage(d, mask, var, xy0=science.xy0, mask_planes=planes)

    def _resolve_mode(self, mode, convolve_template, fwhm_t, fwhm_s):
        if mode is None:
            mode = self.config.mode if convolve_template else "convolveScience"
        if mode not in _MODES:
            msg = f"mode must be one of {_MODES}, got {mode!r}"
            raise ValueError(msg)
        if mode == "auto":
            if fwhm_t is not None and fwhm_s is not None and fwhm_t > fwhm_s:
                mode = "convolveScience"
            else:
                mode = "convolveTemplate"
            log.info("mode=auto: %s (template FWHM %s px, science FWHM %s px)", mode,
                     fwhm_t, fwhm_s)
        return mode

    def match_exposures(self, template_exposure, science_exposure, template_fwhm_pix=None,
                        science_fwhm_pix=None, candidate_list=None, do_warping=True,
                        convolve_template=True, mode=None):
        """PSF-match two Exposures.

        Parameters
        ----------
        template_exposure, science_exposure : Exposure
        template_fwhm_pix, science_fwhm_pix : float, optional
            Override the exposures' PSF FWHMs (pixels); measured from stars when absent.
            A template FWHM given here is taken to be in science (warped) pixels.
        candidate_list : Table or (N, 2) array, optional
        do_warping : bool
            Resample the template onto the science grid (WCS and bbox) when they differ:
            with the WCS pair, or with a transform from catalog registration when a WCS
            is missing (``config.registration``; see :func:`diffim.warp.register_and_warp`).
        convolve_template : bool
            False convolves the science image instead (ip_diffim's convolveScience).
        mode : {"convolveTemplate", "convolveScience", "auto"}, optional
            Overrides ``convolve_template``; "auto" convolves the image with the
            narrower PSF.  Defaults to ``config.mode``.

        Returns
        -------
        PsfMatchResult
            Adds ``matched_exposure`` (science WCS and metadata, no PSF) and
            ``warped_exposure`` (the template on the science grid: the input template
            itself when no resampling was needed).  ``metadata`` records the registration
            (``registrationMethod`` and, for catalogs, ``registrationNMatches``,
            ``registrationRms``, ``registrationTransform``) and ``warpOverlapFraction``.

        Raises
        ------
        ImagesNotRegisteredError
            The grids differ and ``do_warping`` is False.
        NoOverlapError
            The warped template covers less than ``registration.min_overlap_fraction`` of
            the science image (or nothing).
        RegistrationError
            Catalog registration found no reliable transform.
        """
        self.metadata = {}
        template, science = template_exposure, science_exposure
        with _stage(self.metadata, "register/warp"):
            warped, registration = register_and_warp(template, science, self.config,
                                                     do_warping)
        self.metadata.update(registration)
        _check_same_grid(warped.masked_image, science.masked_image)
        with _stage(self.metadata, "fwhm"):
            fwhm_t = self._fwhm(warped, template_fwhm_pix, "template")
            fwhm_s = self._fwhm(science, science_fwhm_pix, "science")
        mode = self._resolve_mode(mode, convolve_template, fwhm_t, fwhm_s)
        if mode == "convolveTemplate":
            conv, ref, f_conv, f_ref = warped, science, fwhm_t, fwhm_s
        else:
            conv, ref, f_conv, f_ref = science, warped, fwhm_s, fwhm_t
        basis = self.make_kernel_basis(f_conv, f_ref)
        # kernel sources are always found on the science image, whichever is convolved
        with _stage(self.metadata, "select"):
            positions = self.make_candidate_list(warped.masked_image, science.masked_image,
                                                 basis.size, candidate_list)
        result = self._match(conv.masked_image, ref.masked_image, positions, f_conv, f_ref,
                             basis)
        result.metadata.update({"mode": mode, "templateFwhmPix": fwhm_t,
                                "scienceFwhmPix": fwhm_s})
        result.matched_exposure = Exposure(result.matched_image, wcs=science.wcs,
                                           psf_fwhm=None, phot_scale=science.phot_scale,
                                           metadata=_product_metadata(science))
        result.warped_exposure = warped
        return result

    def subtract_exposures(self, template_exposure, science_exposure, template_fwhm_pix=None,
                           science_fwhm_pix=None, candidate_list=None, do_warping=True,
                           convolve_template=True, mode=None):
        """PSF-match and subtract two Exposures.

        In convolveTemplate mode ``D = S − K⋆T − bg`` on the science photometric scale
        with the science PSF.  In convolveScience mode ``D = (K⋆S + bg − T)/ΣK`` on the
        template's scale with the template PSF.  Parameters are those of
        :meth:`match_exposures`.

        Returns
        -------
        PsfMatchResult
            Adds ``subtracted_exposure`` (science WCS and metadata).
        """
        result = self.match_exposures(template_exposure, science_exposure, template_fwhm_pix,
                                      science_fwhm_pix, candidate_list, do_warping,
                                      convolve_template, mode)
        science = science_exposure.masked_image
        warped = result.warped_exposure
        with _stage(result.metadata, "subtract"):
            if result.metadata["mode"] == "convolveTemplate":
                diff = self._difference(science, result.matched_image, result.background_model)
                psf_fwhm = result.metadata["scienceFwhmPix"]
                phot = science_exposure.phot_scale
            else:
                x0, y0, x1, y1 = science.bbox
                ksum = result.psf_matching_kernel.kernel_sum(0.5 * (x0 + x1 - 1),
                                                             0.5 * (y0 + y1 - 1))
                diff = self._difference(warped.masked_image, result.matched_image,
                                        result.background_model, scale=ksum, invert=True)
                psf_fwhm = result.metadata["templateFwhmPix"]
                phot = warped.phot_scale
        result.subtracted_masked_image = diff
        result.subtracted_exposure = Exposure(diff, wcs=science_exposure.wcs, psf_fwhm=psf_fwhm,
                                              phot_scale=phot,
                                              metadata=_product_metadata(science_exposure))
        return result
