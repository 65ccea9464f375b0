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
    ConfigError,
    ImageShapeMismatchError,
    NoKernelCandidatesError,
)
from .image import Exposure, MaskedImage
from .solve import build_single_kernels, kernel_sum_clip, make_pca_basis
from .spatial import assess_spatial_kernel, fit_spatial_kernel
from .warp import register_and_warp

__all__ = ["ImagePsfMatchTask", "PsfMatchResult", "CandidateSelection"]

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


@dataclass
class CandidateSelection:
    """The kernel candidates of one pair and how they are fitted (the ``select`` step).

    Attributes
    ----------
    mode : str
        "convolveTemplate" or "convolveScience".
    template_fwhm, science_fwhm : float or None
        PSF FWHMs (pixels) the basis was built for.
    basis : KernelBasis
    cell_set : SpatialCellSet
        The candidates, with their stamps, statuses and (after :meth:`~ImagePsfMatchTask.
        solve`) solutions.
    bad_bits : int
        Mask bits that keep a pixel out of the fits.
    """

    mode: str
    template_fwhm: float | None
    science_fwhm: float | None
    basis: object
    cell_set: SpatialCellSet
    bad_bits: int


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

    def _basis_for(self, mode, template_fwhm, science_fwhm):
        """The basis that convolves whichever image ``mode`` convolves to the other one."""
        if mode == "convolveTemplate":
            return self.make_kernel_basis(template_fwhm, science_fwhm)
        return self.make_kernel_basis(science_fwhm, template_fwhm)

    def make_candidate_list(self, template, science, kernel_size, candidate_list=None,
                            sources=None):
        """Kernel-source positions: the given list, or sep detections on the science image.

        Parameters
        ----------
        template, science : MaskedImage
        kernel_size : int
        candidate_list : Table or array, optional
        sources : astropy.table.Table, optional
            A :meth:`detect` catalog of the ``config.select.detect_on`` image, reused
            instead of detecting again.

        Returns
        -------
        ndarray, shape (N, 2)
        """
        if candidate_list is not None:
            return _positions(candidate_list)
        from .detect import select_kernel_sources

        table = select_kernel_sources(template, science, kernel_size, self.config,
                                      sources=sources)
        return _positions(table)

    def _fwhm(self, exposure, given, which, sources=None):
        """PSF FWHM in pixels: the argument, a known value, or a measurement from stars.

        A value read from a seeing keyword (``FWHMSRC = 'header'``) is only a hint: it is
        used when no star can be measured.
        """
        if given is not None:
            if not (np.isfinite(given) and given > 0):
                msg = f"the {which} PSF FWHM must be a positive number of pixels, got {given!r}"
                raise ConfigError(msg)
            return float(given)
        hint = exposure.psf_fwhm
        if hint is not None and exposure.metadata.get("FWHMSRC") != "header":
            return float(hint)
        from .detect import measure_fwhm

        try:
            fwhm = float(measure_fwhm(exposure.masked_image, sources))
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

    def _needs_fwhm_measurement(self, exposure, given):
        return given is None and (exposure.psf_fwhm is None
                                  or exposure.metadata.get("FWHMSRC") == "header")

    # -- the pipeline steps (each is one workflow rule and one CLI subcommand) -----------

    def warp(self, template_exposure, science_exposure, do_warping=True):
        """Step ``warp``: the template on the science pixel grid.

        Returns
        -------
        (Exposure, dict)
            The warped template (the input itself when no resampling is needed) and the
            registration record (see :func:`diffim.warp.register_and_warp`).
        """
        warped, registration = register_and_warp(template_exposure, science_exposure,
                                                 self.config, do_warping)
        _check_same_grid(warped.masked_image, science_exposure.masked_image)
        return warped, registration

    def detect(self, exposure, which="science", fwhm=None, *, catalog=True):
        """Step ``detect``: sep sources of one image and its PSF FWHM.

        Sources are detected with ``config.select.detection_threshold`` and
        ``background_box``, so the same catalog serves the FWHM measurement and the
        kernel-source selection.

        Parameters
        ----------
        exposure : Exposure
        which : str
            "science" or "template", for the log.
        fwhm : float, optional
            A known FWHM (pixels); otherwise the exposure's, or measured from the stars.
        catalog : bool
            False skips detection when the FWHM is already known (the catalog is then
            None).

        Returns
        -------
        (astropy.table.Table or None, float or None)
            The catalog (see :func:`diffim.detect.detect_sources`) and the FWHM.
        """
        sources = None
        if catalog or self._needs_fwhm_measurement(exposure, fwhm):
            from .detect import detect_sources

            sel = self.config.select
            sources = detect_sources(exposure.masked_image,
                                     threshold=sel.detection_threshold,
                                     background_box=sel.background_box)
        return sources, self._fwhm(exposure, fwhm, which, sources)

    def resolve_mode(self, mode=None, convolve_template=True, template_fwhm=None,
                     science_fwhm=None):
        """Which image to convolve: "convolveTemplate" or "convolveScience".

        ``mode`` (default ``config.mode``) may be "auto": convolve the image with the
        narrower PSF.  ``convolve_template=False`` means "convolveScience" when ``mode``
        is None.
        """
        if mode is None:
            mode = self.config.mode if convolve_template else "convolveScience"
        if mode not in _MODES:
            msg = f"mode must be one of {_MODES}, got {mode!r}"
            raise ConfigError(msg)
        if mode == "auto":
            if (template_fwhm is not None and science_fwhm is not None
                    and template_fwhm > science_fwhm):
                mode = "convolveScience"
            else:
                mode = "convolveTemplate"
            log.info("mode=auto: %s (template FWHM %s px, science FWHM %s px)", mode,
                     template_fwhm, science_fwhm)
        return mode

    def select(self, template, science, *, mode="convolveTemplate", template_fwhm=None,
               science_fwhm=None, candidate_list=None, sources=None):
        """Step ``select``: kernel sources, their stamps and the cells that hold them.

        Sources are always found on the science image (or the template, with
        ``config.select.detect_on``), whichever image is convolved.

        Parameters
        ----------
        template, science : MaskedImage
            On one pixel grid (the template warped).
        mode : {"convolveTemplate", "convolveScience"}
        template_fwhm, science_fwhm : float, optional
        candidate_list : Table or (N, 2) array, optional
            Replaces the detection.
        sources : astropy.table.Table, optional
            A :meth:`detect` catalog of the ``detect_on`` image.

        Returns
        -------
        CandidateSelection
        """
        _check_same_grid(template, science)
        basis = self._basis_for(mode, template_fwhm, science_fwhm)
        positions = self.make_candidate_list(template, science, basis.size, candidate_list,
                                             sources)
        return self.make_selection(template, science, positions, mode=mode,
                                   template_fwhm=template_fwhm, science_fwhm=science_fwhm,
                                   basis=basis)

    def make_selection(self, template, science, positions, *, mode="convolveTemplate",
                       template_fwhm=None, science_fwhm=None, basis=None):
        """Cut and vet the stamps at ``positions`` and file them in spatial cells.

        Deterministic: the same images and positions give the same candidates with the
        same ids, which is how the workflow's later steps rebuild a selection from
        ``candidates.ecsv``.

        Returns
        -------
        CandidateSelection
        """
        _check_same_grid(template, science)
        to_convolve, reference = ((template, science) if mode == "convolveTemplate"
                                  else (science, template))
        cfg = self.kconfig
        if basis is None:
            basis = self._basis_for(mode, template_fwhm, science_fwhm)
        candidates = make_candidates(to_convolve, reference, positions, cfg, basis.size)
        cell_set = SpatialCellSet(to_convolve.bbox, cfg.size_cell_x, cfg.size_cell_y)
        for cand in candidates:
            cell_set.insert(cand)
        bad_bits = (reference.get_plane_bitmask(*cfg.bad_mask_planes)
                    | to_convolve.get_plane_bitmask(*cfg.bad_mask_planes))
        return CandidateSelection(mode=mode, template_fwhm=template_fwhm,
                                  science_fwhm=science_fwhm, basis=basis, cell_set=cell_set,
                                  bad_bits=bad_bits)

    def _regularization(self, basis):
        cfg = self.kconfig
        if basis.kind == "delta-function" and getattr(cfg, "use_regularization", False):
            return make_regularization_matrix(cfg, basis.size, cfg.fit_for_background)
        return None

    def _single_pass(self, selection, reg):
        """Fit every visited candidate not fitted yet, until no new one is rejected."""
        while True:
            _, n_rej = build_single_kernels(selection.cell_set, selection.basis, self.kconfig,
                                            fit_for_background=self.kconfig.fit_for_background,
                                            regularization=reg, bad_bits=selection.bad_bits)
            if n_rej == 0:
                return

    def solve(self, selection):
        """Step ``solve``: per-candidate kernel fits and kernel-sum clipping.

        Fits the ``n_star_per_cell`` best candidates of every cell (promoting the next of a
        cell when one is rejected) until the kernel-sum clipping rejects none; updates the
        candidates of ``selection`` in place.

        Returns
        -------
        CandidateSelection
        """
        reg = self._regularization(selection.basis)
        while True:
            self._single_pass(selection, reg)
            _, _, n_rej = kernel_sum_clip(selection.cell_set, self.kconfig)
            if n_rej == 0:
                return selection

    def fit_spatial(self, selection):
        """Step ``spatial``: the spatial kernel and background models.

        The ip_diffim iteration on top of :meth:`solve`: (PCA basis,) spatial fit, and
        assessment of every candidate against it; a rejection promotes the next candidate
        of its cell and starts again, at most ``max_spatial_iterations`` times.

        Returns
        -------
        (SpatialKernel, BackgroundModel, dict)
            The kernel, the background and the fit information.

        Raises
        ------
        NoKernelCandidatesError
            If every candidate was rejected.
        """
        cfg = self.kconfig
        cell_set, bad_bits = selection.cell_set, selection.bad_bits
        fit_for_background = cfg.fit_for_background
        n_star = cfg.n_star_per_cell
        iteration = 0
        n_rej_spatial = 0
        kernel = bg = info = None
        spatial_basis = selection.basis
        guard = 0

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
            self.solve(selection)
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
        kernel.info["PSFMMODE"] = selection.mode
        for key, value in (("TFWHM", selection.template_fwhm),
                           ("SFWHM", selection.science_fwhm)):
            if value is not None:
                kernel.info[key] = float(value)
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

    def apply(self, template, science, kernel, background, *, mode="convolveTemplate",
              template_fwhm=None, science_fwhm=None, subtract=True, timings=None):
        """Step ``subtract``: convolve with a fitted kernel and (optionally) subtract.

        Parameters
        ----------
        template, science : Exposure or MaskedImage
            On one pixel grid (the template warped).
        kernel : SpatialKernel
        background : BackgroundModel
        mode : {"convolveTemplate", "convolveScience"}
        template_fwhm, science_fwhm : float, optional
            PSF FWHMs; the difference carries the one of the image not convolved.
        subtract : bool
            Also form the difference.
        timings : dict, optional
            Receives the stage timings (``convolve``, ``subtract``).

        Returns
        -------
        PsfMatchResult
            ``matched_image``, ``psf_matching_kernel``, ``background_model`` and, with
            Exposures, ``matched_exposure``; with ``subtract``, ``subtracted_masked_image``
            (and ``subtracted_exposure``).  ``kernel_cell_set`` is None.
        """
        metadata = {} if timings is None else timings
        t_exp = template if isinstance(template, Exposure) else None
        s_exp = science if isinstance(science, Exposure) else None
        tmi = template.masked_image if t_exp is not None else template
        smi = science.masked_image if s_exp is not None else science
        _check_same_grid(tmi, smi)
        conv = tmi if mode == "convolveTemplate" else smi
        with _stage(metadata, "convolve"):
            matched = convolve_masked_image(conv, kernel)
        result = PsfMatchResult(matched_image=matched, psf_matching_kernel=kernel,
                                background_model=background, kernel_cell_set=None)
        if s_exp is not None:
            result.matched_exposure = Exposure(matched, wcs=s_exp.wcs, psf_fwhm=None,
                                               phot_scale=s_exp.phot_scale,
                                               metadata=_product_metadata(s_exp))
        if not subtract:
            return result
        with _stage(metadata, "subtract"):
            if mode == "convolveTemplate":
                diff = self._difference(smi, matched, background)
                psf_fwhm, exp = science_fwhm, s_exp
            else:
                x0, y0, x1, y1 = smi.bbox
                ksum = kernel.kernel_sum(0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1))
                diff = self._difference(tmi, matched, background, scale=ksum, invert=True)
                psf_fwhm, exp = template_fwhm, t_exp
        result.subtracted_masked_image = diff
        if s_exp is not None:
            result.subtracted_exposure = Exposure(
                diff, wcs=s_exp.wcs, psf_fwhm=psf_fwhm,
                phot_scale=exp.phot_scale if exp is not None else None,
                metadata=_product_metadata(s_exp))
        return result

    def _run(self, template, science, *, mode, template_fwhm, science_fwhm, candidate_list,
             sources, subtract):
        """select → solve → spatial → subtract on registered images."""
        with _stage(self.metadata, "select"):
            selection = self.select(template.masked_image if isinstance(template, Exposure)
                                    else template,
                                    science.masked_image if isinstance(science, Exposure)
                                    else science,
                                    mode=mode, template_fwhm=template_fwhm,
                                    science_fwhm=science_fwhm, candidate_list=candidate_list,
                                    sources=sources)
        with _stage(self.metadata, "solve"):
            self.solve(selection)
        with _stage(self.metadata, "spatial"):
            kernel, bg, _ = self.fit_spatial(selection)
        result = self.apply(template, science, kernel, bg, mode=mode,
                            template_fwhm=template_fwhm, science_fwhm=science_fwhm,
                            subtract=subtract, timings=self.metadata)
        result.kernel_cell_set = selection.cell_set
        result.metadata = dict(self.metadata)
        return result

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
        return self._run(template, science, mode="convolveTemplate",
                         template_fwhm=template_fwhm_pix, science_fwhm=science_fwhm_pix,
                         candidate_list=candidate_list, sources=None, subtract=False)

    def subtract_masked_images(self, template, science, candidate_list=None,
                               template_fwhm_pix=None, science_fwhm_pix=None):
        """PSF-match and subtract: ``D = S − K⋆T − bg``.

        Parameters are those of :meth:`match_masked_images`.

        Returns
        -------
        PsfMatchResult
            With ``subtracted_masked_image`` added.
        """
        self.metadata = {}
        _check_same_grid(template, science)
        return self._run(template, science, mode="convolveTemplate",
                         template_fwhm=template_fwhm_pix, science_fwhm=science_fwhm_pix,
                         candidate_list=candidate_list, sources=None, subtract=True)

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
        # a non-finite pixel the inputs left unflagged must not pass for data
        bad = ~(np.isfinite(d) & np.isfinite(var))
        if bad.any():
            if "NO_DATA" not in planes:
                planes["NO_DATA"] = min(set(range(31)) - set(planes.values()))
            d[bad] = np.nan
            var[bad] = np.inf
            mask[bad] |= np.int32(1 << planes["NO_DATA"])
        return MaskedImage(d, mask, var, xy0=science.xy0, mask_planes=planes)

    def _exposures(self, template_exposure, science_exposure, template_fwhm_pix,
                   science_fwhm_pix, candidate_list, do_warping, convolve_template, mode,
                   subtract):
        self.metadata = {}
        with _stage(self.metadata, "warp"):
            warped, registration = self.warp(template_exposure, science_exposure, do_warping)
        self.metadata.update(registration)
        detect_on = str(self.config.select.detect_on).lower()
        with _stage(self.metadata, "detect"):
            # catalogs only where the selection needs one; FWHMs always
            s_src, fwhm_s = self.detect(science_exposure, "science", science_fwhm_pix,
                                        catalog=candidate_list is None
                                        and detect_on == "science")
            t_src, fwhm_t = self.detect(warped, "template", template_fwhm_pix,
                                        catalog=candidate_list is None
                                        and detect_on == "template")
        mode = self.resolve_mode(mode, convolve_template, fwhm_t, fwhm_s)
        self.metadata.update({"mode": mode, "templateFwhmPix": fwhm_t,
                              "scienceFwhmPix": fwhm_s})
        result = self._run(warped, science_exposure, mode=mode, template_fwhm=fwhm_t,
                           science_fwhm=fwhm_s, candidate_list=candidate_list,
                           sources=s_src if detect_on == "science" else t_src,
                           subtract=subtract)
        result.warped_exposure = warped
        return result

    def match_exposures(self, template_exposure, science_exposure, template_fwhm_pix=None,
                        science_fwhm_pix=None, candidate_list=None, do_warping=True,
                        convolve_template=True, mode=None):
        """PSF-match two Exposures.

        The steps are those of the workflow: :meth:`warp`, :meth:`detect` (both images),
        :meth:`select`, :meth:`solve`, :meth:`fit_spatial` and :meth:`apply`.

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
        return self._exposures(template_exposure, science_exposure, template_fwhm_pix,
                               science_fwhm_pix, candidate_list, do_warping,
                               convolve_template, mode, subtract=False)

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
        return self._exposures(template_exposure, science_exposure, template_fwhm_pix,
                               science_fwhm_pix, candidate_list, do_warping,
                               convolve_template, mode, subtract=True)
