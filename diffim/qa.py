"""Quality assessment of a PSF-matching run: diagnostic plots and metrics.

The plots follow ip_diffim's debug displays (reference §5) but are written as PNG files
instead of being sent to a display:

* :func:`plot_candidates` — per kernel candidate, its stamps and residuals
  (``displayCandidates``);
* :func:`plot_kernel_basis` — the basis images (``displayKernelBasis``);
* :func:`plot_kernel_mosaic` — the spatial kernel realised across the image
  (``displayKernelMosaic``);
* :func:`plot_spatial_model` — each coefficient's spatial model against the single-kernel
  fits (``plotKernelSpatialModel``);
* :func:`plot_spatial_cells` — the cell grid and the candidates' status
  (``displaySpatialCells``);
* :func:`plot_difference` — template, matched image, science image, difference and the
  distribution of ``D/σ`` (``displayDiffIm``).

:func:`make_qa_plots` makes those switched on in a :class:`~diffim.config.QAConfig`.
:func:`compute_metrics` gathers numbers that need no truth (peers §5): kernel-sum map, fit
conditioning, candidate counts, per-stamp normalised residuals (HOTPANTS' X2NRM), Rubin's
footprint ratio, the star-free noise ratio and the number of ±5σ detections in the
difference; :func:`write_metrics` saves them as JSON.

Only the object-oriented matplotlib API with the Agg canvas is used, so nothing here
touches ``pyplot``'s global state or the user's backend, and every file is written
atomically (temporary file, then :func:`os.replace`).
"""

import json
import logging
import math
from pathlib import Path

import numpy as np
from scipy import ndimage, signal

from ._atomic import atomic_open
from .candidates import BAD, GOOD, UNKNOWN
from .solve import difference_stamp, stamp_good_pixels

__all__ = [
    "PLOT_FILES",
    "plot_candidates",
    "plot_kernel_basis",
    "plot_kernel_mosaic",
    "plot_spatial_model",
    "plot_spatial_cells",
    "plot_difference",
    "make_qa_plots",
    "compute_metrics",
    "write_metrics",
]

log = logging.getLogger(__name__)

#: QAConfig switch -> file name written by :func:`make_qa_plots`.
PLOT_FILES = {
    "display_candidates": "candidates.png",
    "display_kernel_basis": "kernel_basis.png",
    "display_kernel_mosaic": "kernel_mosaic.png",
    "plot_kernel_spatial_model": "spatial_model.png",
    "display_spatial_cells": "spatial_cells.png",
    "display_diff_im": "difference.png",
}

_DPI = 100
# Pixels that carry no measurement in a difference image.
_INVALID_PLANES = ("NO_DATA", "BAD", "SAT", "EDGE")
_STATUS_FRAME = {GOOD: "tab:green", BAD: "tab:red", UNKNOWN: "gold"}
_STATUS_CELLS = {GOOD: "cyan", UNKNOWN: "yellow", BAD: "red"}
_STATUS_POINTS = {GOOD: "tab:blue", BAD: "tab:red", UNKNOWN: "0.5"}
# Sky apertures for the footprint ratio; a fixed seed keeps the metric reproducible.
_N_SKY_APERTURES = 300
_SKY_SEED = 12345


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def _mi(obj):
    """The MaskedImage of an Exposure (or the MaskedImage itself)."""
    return getattr(obj, "masked_image", obj)


def _plane_bits(mi, names):
    planes = getattr(mi, "mask_planes", {}) or {}
    bits = 0
    for name in names:
        if name in planes:
            bits |= 1 << planes[name]
    return bits


def _mode(result):
    return result.metadata.get("mode", "convolveTemplate")


def _bbox(result):
    return tuple(result.kernel_cell_set.bbox)


def _centre(bbox):
    x0, y0, x1, y1 = bbox
    return 0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1)


def _grid_positions(bbox, n):
    """Centres of an ``n × n`` grid of equal boxes over a half-open parent box."""
    x0, y0, x1, y1 = bbox
    xs = x0 - 0.5 + (np.arange(n) + 0.5) * (x1 - x0) / n
    ys = y0 - 0.5 + (np.arange(n) + 0.5) * (y1 - y0) / n
    return xs, ys


def _new_figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    """Write ``fig`` as PNG to ``path`` atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=_DPI)
    log.info("wrote %s", path)
    return path


def _cmap(name, bad="0.75"):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def _zscale(img):
    """Display limits for an image: astropy's zscale, or percentiles if it degenerates."""
    from astropy.visualization import ZScaleInterval

    vals = np.asarray(img, dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    if vals.size > 250_000:
        # zscale samples anyway; a strided subset keeps big images fast
        vals = vals[:: vals.size // 250_000]
    try:
        lo, hi = ZScaleInterval().get_limits(vals)
    except Exception:  # noqa: BLE001 (astropy raises various errors on degenerate input)
        lo, hi = np.nan, np.nan
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        lo, hi = np.percentile(vals, [1.0, 99.5])
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    return float(lo), float(hi)


def _stamp_norm(img, var):
    """Asinh stretch from just below the sky to the peak, so faint wings stay visible."""
    from astropy.visualization import AsinhStretch, ImageNormalize

    vals = np.asarray(img, dtype=np.float64)
    ok = np.isfinite(vals)
    if not ok.any():
        return None
    sky = float(np.median(vals[ok]))
    sigma = float(np.sqrt(np.median(var[np.isfinite(var) & (var > 0)]))) if np.any(
        np.isfinite(var) & (var > 0)) else float(np.std(vals[ok]))
    lo = sky - 2.0 * sigma
    hi = max(float(vals[ok].max()), lo + 10.0 * max(sigma, 1e-12))
    return ImageNormalize(vmin=lo, vmax=hi, stretch=AsinhStretch(0.05), clip=True)


def _bare(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def _stamp_residual(candidate, kernel_image, background, bad_bits):
    """``D``, ``σ_D`` and the usable pixels over a candidate's fit region.

    The same quantities the engine judges residuals by (:mod:`diffim.solve`).
    """
    kern = np.ascontiguousarray(kernel_image, dtype=np.float64)
    d, var = difference_stamp(candidate, kern, background)
    good = stamp_good_pixels(candidate, kern.shape[0], bad_bits) & np.isfinite(d) & (var > 0)
    return d, np.sqrt(np.where(var > 0, var, np.nan)), good


def _stamp_bad_bits(candidate):
    return (_plane_bits(candidate.science, _INVALID_PLANES)
            | _plane_bits(candidate.template, _INVALID_PLANES))


def _solution_in_kernel_basis(candidate, kernel):
    """The candidate's single-kernel solution expressed in the spatial kernel's basis."""
    n = kernel.basis_images.shape[0]
    for sol in (candidate.pca, candidate.orig):
        if sol is not None and len(sol.coefficients) == n:
            return sol
    return None


def _rating_key(candidate):
    r = candidate.rating
    return -r if np.isfinite(r) else np.inf


def _difference(result, template, science):
    """(D, σ_D, valid) of the run: the stored difference, or recomputed from the matched image."""
    diff = result.subtracted_masked_image
    if diff is None:
        sci = _mi(science)
        matched = result.matched_image
        bg = result.background_model.image(sci.bbox)
        if _mode(result) == "convolveTemplate":
            d = sci.image.astype(np.float64) - matched.image - bg
            scale = 1.0
        else:
            tmpl = _mi(template if template is not None else result.warped_exposure)
            x, y = _centre(sci.bbox)
            scale = result.psf_matching_kernel.kernel_sum(x, y)
            d = (matched.image + bg - tmpl.image.astype(np.float64)) / scale
        var = (sci.variance.astype(np.float64) + matched.variance) / scale**2
        bits = _plane_bits(sci, _INVALID_PLANES) | _plane_bits(matched, _INVALID_PLANES)
        mask = sci.mask | matched.mask
    else:
        d = diff.image.astype(np.float64)
        var = diff.variance.astype(np.float64)
        bits = _plane_bits(diff, _INVALID_PLANES)
        mask = diff.mask
    valid = np.isfinite(d) & np.isfinite(var) & (var > 0) & ((mask & bits) == 0)
    sigma = np.sqrt(np.where(valid, var, np.nan))
    return d, sigma, valid


def _images(result, template, science):
    """(convolved, reference) MaskedImages as the run used them."""
    tmpl = _mi(template if template is not None else result.warped_exposure)
    sci = _mi(science)
    if _mode(result) == "convolveTemplate":
        return tmpl, sci
    return sci, tmpl


def _placeholder(path, title, text):
    fig = _new_figure(8, 6)
    fig.suptitle(title)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=14)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------

def plot_candidates(result, path, *, show_bad=True, max_candidates=30):
    """Stamps and residuals of the kernel candidates (ip_diffim's ``displayCandidates``).

    Each candidate is a row of four panels: the reference stamp (science, unless the science
    image was convolved), the stamp that was convolved, ``D/σ`` with the candidate's own
    kernel and ``D/σ`` with the spatial kernel at its position (both on a ±5σ scale, cropped
    to the fit region).  The panels are framed green (GOOD), red (BAD) or yellow (UNKNOWN)
    and labelled with the id and the χ² (variance of ``D/σ``) of each residual.

    Parameters
    ----------
    result : PsfMatchResult
    path : str or os.PathLike
        Output PNG.
    show_bad : bool, optional
        Include BAD candidates.
    max_candidates : int, optional
        Show at most this many, the best by rating; the title says how many were left out.

    Returns
    -------
    pathlib.Path
    """
    kernel = result.psf_matching_kernel
    background = result.background_model
    cands = [c for c in result.kernel_cell_set.candidates()
             if c.orig is not None and (show_bad or c.status != BAD)]
    cands.sort(key=_rating_key)
    n_total = len(cands)
    shown = cands[:max(int(max_candidates), 1)]
    title = "Kernel candidates"
    if not shown:
        return _placeholder(path, title, "no fitted kernel candidates to show")
    if _mode(result) == "convolveTemplate":
        ref_name, conv_name = "science", "template"
    else:
        ref_name, conv_name = "template (ref.)", "science (conv.)"

    groups = min(3, len(shown))
    rows = math.ceil(len(shown) / groups)
    ratios = []
    for g in range(groups):
        ratios += [1, 1, 1, 1] + ([0.3] if g < groups - 1 else [])
    height = 1.6 * rows + 0.8
    fig = _new_figure(max(4.6 * groups + 0.4 * (groups - 1), 8.0), height)
    gs = fig.add_gridspec(rows, len(ratios), width_ratios=ratios, left=0.01, right=0.99,
                          bottom=0.15 / height, top=1 - 0.75 / height, wspace=0.06,
                          hspace=0.45)
    chi_cmap = _cmap("RdBu_r")
    img_cmap = _cmap("gray")
    for i, cand in enumerate(shown):
        row, g = divmod(i, groups)
        col0 = 5 * g
        bad_bits = _stamp_bad_bits(cand)
        d_own, s_own, ok_own = _stamp_residual(cand, cand.orig.kernel_image,
                                               cand.orig.background, bad_bits)
        d_sp, s_sp, ok_sp = _stamp_residual(cand, kernel.evaluate(cand.x, cand.y),
                                            float(background.evaluate(cand.x, cand.y)), bad_bits)
        chi_own = np.where(ok_own, d_own / s_own, np.nan)
        chi_sp = np.where(ok_sp, d_sp / s_sp, np.nan)
        x2_own = cand.orig.stats.std**2 if cand.orig.stats else np.nanvar(chi_own)
        x2_sp = (cand.spatial_stats.std**2 if cand.spatial_stats is not None
                 else np.nanvar(chi_sp))
        panels = [
            (cand.science.image, _stamp_norm(cand.science.image, cand.science.variance),
             img_cmap, f"#{cand.id} {ref_name}"),
            (cand.template.image, _stamp_norm(cand.template.image, cand.template.variance),
             img_cmap, conv_name),
            (chi_own, None, chi_cmap, f"own K  χ²={x2_own:.2f}"),
            (chi_sp, None, chi_cmap, f"spatial K  χ²={x2_sp:.2f}"),
        ]
        frame = _STATUS_FRAME.get(cand.status, "0.5")
        for j, (img, norm, cmap, label) in enumerate(panels):
            ax = fig.add_subplot(gs[row, col0 + j])
            if norm is None:
                ax.imshow(img, origin="lower", cmap=cmap, vmin=-5, vmax=5,
                          interpolation="nearest")
            else:
                ax.imshow(img, origin="lower", cmap=cmap, norm=norm, interpolation="nearest")
            _bare(ax)
            ax.set_title(label, fontsize=7, pad=2)
            if j == 0 and cand.status == BAD and cand.reason:
                reason = cand.reason if len(cand.reason) <= 38 else cand.reason[:37] + "…"
                ax.set_xlabel(reason, fontsize=6, color=frame, loc="left", labelpad=1)
            for spine in ax.spines.values():
                spine.set_edgecolor(frame)
                spine.set_linewidth(2.5)
    left_out = n_total - len(shown)
    note = (f"{len(shown)} of {n_total} shown, best by rating"
            + (f" ({left_out} not shown)" if left_out else "")
            + ("" if show_bad else "; BAD hidden"))
    fig.suptitle(f"{title}: {note}\nPanels: {ref_name} | {conv_name} | D/σ with own kernel | "
                 "D/σ with spatial kernel (±5σ).  Frame: green GOOD, red BAD, yellow UNKNOWN",
                 fontsize=10, y=1 - 0.08 / height, va="top")
    return _save(fig, path)


def plot_kernel_basis(result, path):
    """Mosaic of the spatial kernel's basis images (ip_diffim's ``displayKernelBasis``).

    Each image is scaled to its own largest absolute value and shown on a diverging map.

    Parameters
    ----------
    result : PsfMatchResult
    path : str or os.PathLike

    Returns
    -------
    pathlib.Path
    """
    basis = result.psf_matching_kernel.basis_images
    n, k, _ = basis.shape
    ncol = math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    gap = max(1, k // 8)
    tile = k + gap
    mosaic = np.full((nrow * tile - gap, ncol * tile - gap), np.nan)
    sums = basis.reshape(n, -1).sum(axis=1)
    for i in range(n):
        r, c = divmod(i, ncol)
        peak = np.abs(basis[i]).max()
        # row 0 at the top, as reading order
        y0 = (nrow - 1 - r) * tile
        mosaic[y0:y0 + k, c * tile:c * tile + k] = basis[i] / peak if peak > 0 else 0.0
    # size the figure to the mosaic so the panel fills it (axes 8.4 in wide, aspect 1)
    ax_w = 8.4
    ax_h = ax_w * mosaic.shape[0] / mosaic.shape[1]
    fig_w, fig_h = 10.0, max(ax_h + 1.2, 6.5)
    fig = _new_figure(fig_w, fig_h)
    ax = fig.add_axes([0.3 / fig_w, 0.3 / fig_h, ax_w / fig_w, ax_h / fig_h])
    im = ax.imshow(mosaic, origin="lower", cmap=_cmap("RdBu_r", bad="white"), vmin=-1, vmax=1,
                   interpolation="nearest")
    _bare(ax)
    if n <= 200:
        size = 8 if n <= 50 else 6
        for i in range(n):
            r, c = divmod(i, ncol)
            y0 = (nrow - 1 - r) * tile
            ax.text(c * tile + 0.5, y0 + k - 1.5, f"{i}", fontsize=size, va="top",
                    color="black")
            if n <= 50:
                total = sums[i] if abs(sums[i]) > 1e-9 * np.abs(basis[i]).sum() else 0.0
                ax.text(c * tile + k - 1.5, y0 + 0.5, f"Σ={total:.3g}", fontsize=6,
                        ha="right", va="bottom", color="0.3")
    cax = fig.add_axes([(ax_w + 0.45) / fig_w, 0.3 / fig_h + 0.1 * ax_h / fig_h, 0.2 / fig_w,
                        0.8 * ax_h / fig_h])
    fig.colorbar(im, cax=cax, label="value / max |value|")
    kind = result.metadata.get("ALBasisMode")
    fig.suptitle(f"Basis of the spatial kernel: {n} images of {k}×{k} px"
                 + (f" (Alard-Lupton, {kind})" if kind else ""), fontsize=13)
    return _save(fig, path)


def _moments(img):
    """Centroid and second moments of the positive part of a kernel image."""
    w = np.clip(img, 0, None)
    tot = w.sum()
    if not tot > 0:
        return None
    yy, xx = np.indices(img.shape)
    cx, cy = (w * xx).sum() / tot, (w * yy).sum() / tot
    mxx = (w * (xx - cx) ** 2).sum() / tot
    myy = (w * (yy - cy) ** 2).sum() / tot
    mxy = (w * (xx - cx) * (yy - cy)).sum() / tot
    return cx, cy, mxx, myy, mxy


def plot_kernel_mosaic(result, path, *, grid=7):
    """The spatial kernel realised on a ``grid × grid`` raster across the image.

    Left: ``K(x, y)`` on a common scale, with each kernel's sum, centroid (blue +) and
    second-moment ellipse (red) as ip_diffim's ``displayKernelMosaic`` draws them.  Right:
    ``K(x, y) − K(centre)``, which makes the spatial variation visible.

    Parameters
    ----------
    result : PsfMatchResult
    path : str or os.PathLike
    grid : int, optional

    Returns
    -------
    pathlib.Path
    """
    from matplotlib.patches import Ellipse

    kernel = result.psf_matching_kernel
    bbox = _bbox(result)
    xs, ys = _grid_positions(bbox, grid)
    k = kernel.size
    gap = max(1, k // 8)
    tile = k + gap
    size = grid * tile - gap
    kimg = np.full((size, size), np.nan)
    dimg = np.full((size, size), np.nan)
    centre = kernel.evaluate(*_centre(bbox))
    annotations = []
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            kern = kernel.evaluate(x, y)
            kimg[j * tile:j * tile + k, i * tile:i * tile + k] = kern
            dimg[j * tile:j * tile + k, i * tile:i * tile + k] = kern - centre
            annotations.append((i * tile, j * tile, kern.sum(), _moments(kern)))
    fig = _new_figure(17, 8.6)
    ax1 = fig.add_axes([0.05, 0.07, 0.42, 0.83])
    ax2 = fig.add_axes([0.55, 0.07, 0.42, 0.83])
    vmax = float(np.nanmax(np.abs(kimg)))
    im1 = ax1.imshow(kimg, origin="lower", cmap=_cmap("viridis", bad="white"),
                     vmin=float(np.nanmin(kimg)), vmax=vmax, interpolation="nearest")
    dmax = float(np.nanmax(np.abs(dimg)))
    dmax = dmax if dmax > 0 else 1e-12
    im2 = ax2.imshow(dimg, origin="lower", cmap=_cmap("RdBu_r", bad="white"), vmin=-dmax,
                     vmax=dmax, interpolation="nearest")
    for ox, oy, ksum, mom in annotations:
        ax1.text(ox + 0.5, oy + k - 1.5, f"{ksum:.4f}", fontsize=6, color="white", va="top")
        if mom is not None:
            cx, cy, mxx, myy, mxy = mom
            ax1.plot(ox + cx, oy + cy, "+", color="tab:blue", ms=6, mew=1.2)
            evals, evecs = np.linalg.eigh(np.array([[mxx, mxy], [mxy, myy]]))
            evals = np.clip(evals, 0, None)
            angle = math.degrees(math.atan2(evecs[1, 1], evecs[0, 1]))
            ax1.add_patch(Ellipse((ox + cx, oy + cy), 2 * math.sqrt(evals[1]),
                                  2 * math.sqrt(evals[0]), angle=angle, fill=False,
                                  edgecolor="tab:red", lw=0.8))
    for ax in (ax1, ax2):
        ax.set_xticks([i * tile + k / 2 - 0.5 for i in range(grid)])
        ax.set_xticklabels([f"{x:.0f}" for x in xs], fontsize=7)
        ax.set_yticks([j * tile + k / 2 - 0.5 for j in range(grid)])
        ax.set_yticklabels([f"{y:.0f}" for y in ys], fontsize=7)
        ax.set_xlabel("x (parent px)")
        ax.set_ylabel("y (parent px)")
    fig.colorbar(im1, ax=ax1, fraction=0.046, pad=0.02)
    fig.colorbar(im2, ax=ax2, fraction=0.046, pad=0.02)
    sums = np.array([a[2] for a in annotations])
    ax1.set_title("K(x, y): sum (text), centroid (+), 1σ ellipse", fontsize=11)
    rel = dmax / max(float(np.abs(centre).max()), 1e-300)
    ax2.set_title(f"K(x, y) − K(centre); largest |Δ| = {100 * rel:.2f}% of the peak",
                  fontsize=11)
    fig.suptitle(f"Spatial kernel on a {grid}×{grid} grid (spatial order "
                 f"{kernel.function.order}); kernel sum {sums.min():.4f} … {sums.max():.4f}",
                 fontsize=13)
    return _save(fig, path)


def plot_spatial_model(result, path, *, max_coefficients=10, show_bad=True):
    """Spatial model of each kernel coefficient against the single-kernel fits.

    One row per coefficient (the first ``max_coefficients``): the spatial polynomial as an
    image with the candidates marked; each candidate's single-kernel coefficient against its
    instrumental magnitude ``−2.5 log10(rating)`` (the spatial value at the candidate as
    grey ×); and the residual (individual − spatial) against magnitude, x and y.  GOOD
    candidates are blue, BAD red, UNKNOWN grey (ip_diffim's ``plotKernelSpatialModel``).

    Parameters
    ----------
    result : PsfMatchResult
    path : str or os.PathLike
    max_coefficients : int, optional
    show_bad : bool, optional
        Include BAD candidates.

    Returns
    -------
    pathlib.Path
    """
    kernel = result.psf_matching_kernel
    bbox = _bbox(result)
    x0, y0, x1, y1 = bbox
    n_b = min(int(max_coefficients), kernel.basis_images.shape[0])
    rows = []
    for c in result.kernel_cell_set.candidates():
        if c.status == BAD and not show_bad:
            continue
        sol = _solution_in_kernel_basis(c, kernel)
        if sol is None:
            continue
        mag = -2.5 * math.log10(c.rating) if np.isfinite(c.rating) and c.rating > 0 else np.nan
        rows.append((c.x, c.y, mag, c.status, np.asarray(sol.coefficients[:n_b]),
                     kernel.coefficients_at(c.x, c.y)[:n_b]))
    n_map = 64
    gx = np.linspace(x0 - 0.5, x1 - 0.5, n_map)
    gy = np.linspace(y0 - 0.5, y1 - 0.5, n_map)
    terms = kernel.function.evaluate(gx[None, :], gy[:, None])  # (n_terms, n_map, n_map)
    fig = _new_figure(17, 2.4 * n_b + 1.0)
    gs = fig.add_gridspec(n_b, 5, left=0.05, right=0.98, bottom=0.03,
                          top=1 - 0.9 / (2.4 * n_b + 1.0), wspace=0.3, hspace=0.45)
    if rows:
        xs = np.array([r[0] for r in rows])
        ys = np.array([r[1] for r in rows])
        mags = np.array([r[2] for r in rows])
        colors = [_STATUS_POINTS.get(r[3], "0.5") for r in rows]
        indiv = np.array([r[4] for r in rows])
        spatial = np.array([r[5] for r in rows])
    for b in range(n_b):
        ax = fig.add_subplot(gs[b, 0])
        cmap_img = np.tensordot(kernel.coefficients[b], terms, axes=1)
        im = ax.imshow(cmap_img, origin="lower", extent=(x0 - 0.5, x1 - 0.5, y0 - 0.5, y1 - 0.5),
                       cmap="viridis", aspect="auto")
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=6)
        const = not np.any(kernel.coefficients[b, 1:])
        ax.set_title(f"coefficient {b}" + (" (constant)" if const else ""), fontsize=8)
        ax.tick_params(labelsize=6)
        if not rows:
            continue
        ax.scatter(xs, ys, s=6, c=colors, edgecolors="none")
        resid = indiv[:, b] - spatial[:, b]
        panels = [(mags, indiv[:, b], "magnitude", "coefficient"),
                  (mags, resid, "magnitude", "individual − spatial"),
                  (xs, resid, "x", "individual − spatial"),
                  (ys, resid, "y", "individual − spatial")]
        for j, (u, v, xl, yl) in enumerate(panels, start=1):
            ax = fig.add_subplot(gs[b, j])
            if j == 1:
                ax.scatter(u, spatial[:, b], s=14, marker="x", c="0.55", linewidths=0.8)
            ax.scatter(u, v, s=10, c=colors, edgecolors="none")
            if j > 1:
                ax.axhline(0.0, color="0.4", lw=0.8, ls="--")
            ax.tick_params(labelsize=6)
            ax.set_xlabel(xl, fontsize=7, labelpad=1)
            ax.set_ylabel(yl, fontsize=7, labelpad=1)
    n_shown = len(rows)
    fig.suptitle(f"Spatial model of the first {n_b} of {kernel.basis_images.shape[0]} kernel "
                 f"coefficients (spatial order {kernel.function.order}), {n_shown} candidates: "
                 "blue GOOD, red BAD, grey UNKNOWN; grey × = spatial model at the candidate",
                 fontsize=11)
    return _save(fig, path)


def plot_spatial_cells(result, science, path):
    """The spatial-cell grid on the science image with the candidates by status.

    GOOD candidates are cyan circles, UNKNOWN yellow, BAD red crosses; each cell is labelled
    ``good/total`` (ip_diffim's ``displaySpatialCells``).

    Parameters
    ----------
    result : PsfMatchResult
    science : Exposure or MaskedImage
    path : str or os.PathLike

    Returns
    -------
    pathlib.Path
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    sci = _mi(science)
    sx0, sy0, sx1, sy1 = sci.bbox
    lo, hi = _zscale(sci.image)
    cell_set = result.kernel_cell_set
    # many cells: a bigger canvas, smaller marks and labels
    n_side = max(cell_set.nx, cell_set.ny)
    shrink = max(0.3, min(1.0, 6.0 / n_side))
    side = 10.0 if n_side <= 6 else 14.0
    fig = _new_figure(side, side * 1.06)
    ax = fig.add_axes([0.07, 0.05, 0.9, 0.87])
    ax.imshow(sci.image, origin="lower", cmap=_cmap("gray"), vmin=lo, vmax=hi,
              extent=(sx0 - 0.5, sx1 - 0.5, sy0 - 0.5, sy1 - 0.5), interpolation="nearest")
    for cell in cell_set.cells:
        cx0, cy0, cx1, cy1 = cell.bbox
        ax.add_patch(Rectangle((cx0 - 0.5, cy0 - 0.5), cx1 - cx0, cy1 - cy0, fill=False,
                               edgecolor="magenta", lw=1.0, ls="--"))
        n_good = sum(c.status == GOOD for c in cell.candidates)
        ax.text(cx0 + 0.05 * (cx1 - cx0), cy1 - 0.05 * (cy1 - cy0),
                f"{n_good}/{len(cell.candidates)}", color="magenta",
                fontsize=9 if n_side <= 8 else 6, va="top",
                bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 1.5})
    counts = cell_set.counts()
    handles = []
    for status, marker in ((GOOD, "o"), (UNKNOWN, "o"), (BAD, "x")):
        pts = [(c.x, c.y) for c in cell_set.candidates() if c.status == status]
        color = _STATUS_CELLS[status]
        if pts:
            px, py = np.array(pts).T
            if marker == "o":
                ax.scatter(px, py, s=90 * shrink, facecolors="none", edgecolors=color,
                           linewidths=1.3 * math.sqrt(shrink))
            else:
                ax.scatter(px, py, s=70 * shrink, marker="x", c=color,
                           linewidths=1.5 * math.sqrt(shrink))
        handles.append(Line2D([], [], ls="", marker=marker, mfc="none", mec=color, color=color,
                              label=f"{status} ({counts[status]})"))
    ax.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.7)
    ax.set_xlim(sx0 - 0.5, sx1 - 0.5)
    ax.set_ylim(sy0 - 0.5, sy1 - 0.5)
    ax.set_xlabel("x (parent px)")
    ax.set_ylabel("y (parent px)")
    fig.suptitle(f"Spatial cells ({cell_set.nx}×{cell_set.ny} of {cell_set.size_x}×"
                 f"{cell_set.size_y} px) and kernel candidates on the science image",
                 fontsize=12)
    return _save(fig, path)


def plot_difference(result, template, science, path):
    """Template, matched image, science image, difference, ``D/σ`` and its histogram.

    The direct images use a zscale stretch; the difference is shown on ±5 times its median
    predicted noise and ``D/σ`` on ±5.  The histogram of ``D/σ`` over valid pixels is
    compared with N(0, 1).

    Parameters
    ----------
    result : PsfMatchResult
    template, science : Exposure or MaskedImage
        The template may be None to use ``result.warped_exposure``.
    path : str or os.PathLike

    Returns
    -------
    pathlib.Path
    """
    tmpl = _mi(template if template is not None else result.warped_exposure)
    sci = _mi(science)
    d, sigma, valid = _difference(result, template, science)
    x0, y0, x1, y1 = sci.bbox
    extent = (x0 - 0.5, x1 - 0.5, y0 - 0.5, y1 - 0.5)
    matched_name = (r"matched template $K\star T$" if _mode(result) == "convolveTemplate"
                    else r"matched science $K\star S$")
    fig = _new_figure(16, 10.5)
    gs = fig.add_gridspec(2, 3, left=0.04, right=0.97, bottom=0.06, top=0.9, wspace=0.25,
                          hspace=0.22)
    gray = _cmap("gray")
    for j, (img, name) in enumerate(((tmpl.image, "template"),
                                     (result.matched_image.image, matched_name),
                                     (sci.image, "science"))):
        ax = fig.add_subplot(gs[0, j])
        lo, hi = _zscale(img)
        im = ax.imshow(img, origin="lower", cmap=gray, vmin=lo, vmax=hi, extent=extent,
                       interpolation="nearest")
        ax.set_title(name)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    med_sigma = float(np.median(sigma[valid])) if valid.any() else 1.0
    z = np.where(valid, d / sigma, np.nan)
    diverging = _cmap("RdBu_r", bad="0.6")
    ax = fig.add_subplot(gs[1, 0])
    im = ax.imshow(np.where(valid, d, np.nan), origin="lower", cmap=diverging,
                   vmin=-5 * med_sigma, vmax=5 * med_sigma, extent=extent,
                   interpolation="nearest")
    ax.set_title(f"difference D (±5 × median σ = {5 * med_sigma:.3g})")
    ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    ax = fig.add_subplot(gs[1, 1])
    im = ax.imshow(z, origin="lower", cmap=diverging, vmin=-5, vmax=5, extent=extent,
                   interpolation="nearest")
    ax.set_title("D/σ (±5); grey = no data")
    ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)

    ax = fig.add_subplot(gs[1, 2])
    zv = z[valid]
    if zv.size:
        bins = np.linspace(-8, 8, 161)
        ax.hist(np.clip(zv, -8, 8), bins=bins, density=True, histtype="stepfilled",
                color="tab:blue", alpha=0.6, label="D/σ, valid pixels (clipped at ±8)")
        grid = np.linspace(-8, 8, 400)
        ax.plot(grid, np.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi), color="k", lw=1.2,
                label="N(0, 1)")
        ax.set_yscale("log")
        ax.set_ylim(0.5 / zv.size / (bins[1] - bins[0]), 1.0)
        med = float(np.median(zv))
        rstd = 1.4826 * float(np.median(np.abs(zv - med)))
        stats = (f"N = {zv.size}\nmean = {zv.mean():.3f}\nstd = {zv.std():.3f}\n"
                 f"1.4826·MAD = {rstd:.3f}\n|D/σ| > 5: {np.mean(np.abs(zv) > 5):.2e}")
        ax.text(0.03, 0.97, stats, transform=ax.transAxes, va="top", fontsize=8,
                family="monospace")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no valid pixels", ha="center", transform=ax.transAxes)
    ax.set_xlabel("D/σ")
    ax.set_ylabel("density")
    ax.set_title("distribution of D/σ")
    meta = result.metadata
    ksum = meta.get("spatialKernelSum")
    fig.suptitle(f"Difference imaging ({_mode(result)})"
                 + (f", kernel sum {ksum:.4f}" if ksum is not None else "")
                 + f", {meta.get('nGoodCandidates', '?')} good kernel candidates", fontsize=13)
    return _save(fig, path)


def make_qa_plots(result, template, science, outdir, qa_config=None):
    """Write the plots switched on in ``qa_config`` to ``outdir``.

    Parameters
    ----------
    result : PsfMatchResult
    template, science : Exposure or MaskedImage
        The inputs of the run (the template may be None to use ``result.warped_exposure``).
    outdir : str or os.PathLike
        Created if missing.  File names are those of :data:`PLOT_FILES`.
    qa_config : QAConfig or ImagePsfMatchConfig, optional
        Its ``qa`` section is used when an ImagePsfMatchConfig is given; None means every
        plot.

    Returns
    -------
    list of pathlib.Path
        The files written, in the order of :data:`PLOT_FILES`.
    """
    from .config import QAConfig

    qa = getattr(qa_config, "qa", qa_config)
    if qa is None:
        qa = QAConfig()
    qa.validate()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    show_bad = qa.show_bad_candidates
    makers = {
        "display_candidates": lambda p: plot_candidates(result, p, show_bad=show_bad,
                                                        max_candidates=qa.max_candidates),
        "display_kernel_basis": lambda p: plot_kernel_basis(result, p),
        "display_kernel_mosaic": lambda p: plot_kernel_mosaic(result, p,
                                                              grid=qa.kernel_mosaic_grid),
        "plot_kernel_spatial_model": lambda p: plot_spatial_model(result, p,
                                                                  show_bad=show_bad),
        "display_spatial_cells": lambda p: plot_spatial_cells(result, science, p),
        "display_diff_im": lambda p: plot_difference(result, template, science, p),
    }
    written = []
    for switch, name in PLOT_FILES.items():
        if getattr(qa, switch):
            written.append(makers[switch](outdir / name))
    return written


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

def _gaussian(fwhm):
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    half = max(2, int(math.ceil(3.0 * sigma)))
    u = np.arange(-half, half + 1)
    g = np.exp(-0.5 * (u[:, None] ** 2 + u[None, :] ** 2) / sigma**2)
    return g / g.sum()


def _fftcorrelate(img, kern):
    # correlation = convolution with the flipped kernel; odd sizes keep 'same' centred
    return signal.fftconvolve(img, kern[::-1, ::-1], mode="same")


def _disk_mask(shape, xy0, positions, radii):
    """Boolean image, True within ``radii`` of the parent ``positions``."""
    ny, nx = shape
    x0, y0 = xy0
    out = np.zeros(shape, bool)
    for (x, y), r in zip(positions, radii):
        cx, cy = x - x0, y - y0
        ri = int(math.ceil(r))
        ya, yb = max(int(cy) - ri, 0), min(int(cy) + ri + 2, ny)
        xa, xb = max(int(cx) - ri, 0), min(int(cx) + ri + 2, nx)
        if ya >= yb or xa >= xb:
            continue
        yy, xx = np.mgrid[ya:yb, xa:xb]
        out[ya:yb, xa:xb] |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    return out


def _detections(snr, good, xy0, threshold, sign, max_list=100):
    """Connected regions of ``sign·snr > threshold``: count and the brightest peaks."""
    above = good & (sign * snr > threshold)
    labels, n = ndimage.label(above, structure=np.ones((3, 3), bool))
    peaks = []
    # per-region boxes: ndimage.maximum_position would sort the whole image
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        sub = np.where(labels[sl] == i, sign * snr[sl], -np.inf)
        jy, jx = np.unravel_index(np.argmax(sub), sub.shape)
        peaks.append((float(sub[jy, jx]), sl[1].start + jx, sl[0].start + jy))
    peaks.sort(reverse=True)
    return int(n), [{"x": float(x + xy0[0]), "y": float(y + xy0[1]), "snr": sign * v}
                    for v, x, y in peaks[:max_list]]


def _fwhm_of_difference(result, template, science):
    meta = result.metadata
    key, obj = (("scienceFwhmPix", science) if _mode(result) == "convolveTemplate"
                else ("templateFwhmPix", template))
    fwhm = meta.get(key) or getattr(obj, "psf_fwhm", None)
    if fwhm:
        return float(fwhm)
    from .detect import measure_fwhm
    from .exceptions import DiffimError

    try:
        return float(measure_fwhm(_mi(obj if obj is not None else science)))
    except DiffimError:
        log.warning("no PSF FWHM for the difference image; assuming 3 px for the metrics")
        return 3.0


def _candidate_metrics(result):
    """Per-candidate residual moments and X2NRM, plus pooled X2NRM over GOOD stamps."""
    kernel = result.psf_matching_kernel
    background = result.background_model
    rows = []
    pooled = []
    for c in result.kernel_cell_set.candidates():
        o, s = c.orig, c.spatial_stats
        row = {"id": int(c.id), "x": float(c.x), "y": float(c.y), "status": c.status,
               "reason": c.reason, "rating": float(c.rating),
               "kernel_sum": float(o.kernel_sum) if o else None,
               "resid_mean": o.stats.mean if o and o.stats else None,
               "resid_std": o.stats.std if o and o.stats else None,
               "spatial_resid_mean": s.mean if s else None,
               "spatial_resid_std": s.std if s else None,
               "x2nrm_own": None, "x2nrm_spatial": None}
        bits = _stamp_bad_bits(c)
        if o is not None:
            d, sig, ok = _stamp_residual(c, o.kernel_image, o.background, bits)
            if ok.any():
                row["x2nrm_own"] = float(np.mean((d[ok] / sig[ok]) ** 2))
        d, sig, ok = _stamp_residual(c, kernel.evaluate(c.x, c.y),
                                     float(background.evaluate(c.x, c.y)), bits)
        if ok.any():
            r = d[ok] / sig[ok]
            row["x2nrm_spatial"] = float(np.mean(r**2))
            if c.status == GOOD:
                pooled.append(r)
        rows.append(row)
    out = {"candidates": rows}
    good_x2 = [r["x2nrm_spatial"] for r in rows
               if r["status"] == GOOD and r["x2nrm_spatial"] is not None]
    if pooled:
        r = np.concatenate(pooled)
        med = float(np.median(r))
        out.update({
            "x2nrm": float(np.mean(r**2)),
            "x2nrm_median_per_stamp": float(np.median(good_x2)),
            "x2nrm_scatter_per_stamp": float(np.std(good_x2)),
            "x2nrm_robust_width": 1.4826 * float(np.median(np.abs(r - med))),
            "x2nrm_tail_fraction_5sigma": float(np.mean(np.abs(r) > 5)),
            "x2nrm_n_pixels": int(r.size),
        })
    else:
        out.update({"x2nrm": None, "x2nrm_median_per_stamp": None,
                    "x2nrm_scatter_per_stamp": None, "x2nrm_robust_width": None,
                    "x2nrm_tail_fraction_5sigma": None, "x2nrm_n_pixels": 0})
    return out


def _sky_level(img, usable, box=64):
    """Smooth sky of a direct image from its source-free pixels (sep's background mesh)."""
    import sep

    data = np.ascontiguousarray(np.where(usable, img, 0.0), dtype=np.float32)
    ny, nx = data.shape
    bkg = sep.Background(data, mask=np.ascontiguousarray(~usable), bw=min(box, nx),
                         bh=min(box, ny), fw=3, fh=3)
    return bkg.back(dtype=np.float32).astype(np.float64)


def _aperture_sums(values, xy0, positions, radius):
    """Σ over a circular aperture of each parent position (NaN if the aperture leaves the image
    or holds a NaN)."""
    ny, nx = values.shape
    ri = int(math.ceil(radius))
    u = np.arange(-ri, ri + 1)
    out = np.full(len(positions), np.nan)
    for n, (x, y) in enumerate(positions):
        cx, cy = round(x - xy0[0]), round(y - xy0[1])
        if cx - ri < 0 or cy - ri < 0 or cx + ri >= nx or cy + ri >= ny:
            continue
        dx, dy = x - xy0[0] - cx, y - xy0[1] - cy
        disk = (u[None, :] - dx) ** 2 + (u[:, None] - dy) ** 2 <= radius * radius
        out[n] = values[cy - ri:cy + ri + 1, cx - ri:cx + ri + 1][disk].sum()
    return out


def compute_metrics(result, template, science, *, kernel_grid=7, detection_threshold=5.0,
                    source_threshold=5.0):
    """Quality metrics of a PSF-matching run that need no truth (peers §5).

    Parameters
    ----------
    result : PsfMatchResult
        With a difference image (from a ``subtract_*`` entry point); otherwise it is
        recomputed from the matched image.
    template, science : Exposure or MaskedImage
        The inputs on the science grid (the template may be None to use
        ``result.warped_exposure``).
    kernel_grid : int, optional
        The kernel sum is sampled on ``kernel_grid × kernel_grid`` points over the cell-set
        box.
    detection_threshold : float, optional
        Threshold, in σ of the matched-filtered difference, of the ±detection counts.
    source_threshold : float, optional
        sep threshold (per-pixel σ) for the stars that define footprints and the star-free
        region.

    Returns
    -------
    dict
        JSON-serialisable (NaN and infinities become None).  Keys:

        ``kernel_sum_center``, ``kernel_sum_min/max/std`` (over the grid),
        ``spatial_condition_number``, ``spatial_kernel_order``, ``n_good/bad/unknown_candidates``,
        ``kernel_constraint``, ``background_constraint``, ``spatial_order_reduced`` (True
        when too few candidates made the task lower the configured spatial orders) with
        ``spatial_kernel_order_used`` / ``spatial_bg_order_used``;
        ``candidates`` (per candidate: id, x, y, status, reason, rating, kernel_sum,
        resid_mean/std and spatial_resid_mean/std of D/σ, x2nrm_own and x2nrm_spatial);
        ``x2nrm`` (mean (D/σ)² pooled over GOOD stamps with the spatial kernel; ideal 1) and
        its per-stamp median and scatter, robust width and 5σ tail fraction;
        ``footprint_ratio_mean/std/median`` (Rubin's differenceFootprintRatio: per star
        (Σ|D| − ⟨Σ|D_sky|⟩)/Σ S over a circular aperture), ``footprint_n_stars``,
        ``sky_footprint_ratio`` (⟨Σ|D_sky|⟩/⟨Σ|S_sky − sky|⟩), ``footprint_aperture_radius``;
        ``noise_ratio`` (std of D/σ over star-free pixels; ideal 1), ``noise_ratio_robust``
        (1.4826·MAD), ``noise_mean``, ``noise_n_pixels``;
        ``n_positive_5sigma``, ``n_negative_5sigma`` (connected regions of the matched-filter
        S/N beyond ±``detection_threshold``) with ``positive_detections`` /
        ``negative_detections`` (x, y, snr of the brightest 100);
        ``mode``, ``image_shape``, ``metadata`` (the run's metadata).
    """
    from . import __version__
    from .detect import detect_sources

    kernel = result.psf_matching_kernel
    bbox = _bbox(result)
    cell_counts = result.kernel_cell_set.counts()
    meta = result.metadata
    out = {"diffim_version": __version__, "mode": _mode(result)}

    # -- kernel ----------------------------------------------------------------------------
    xs, ys = _grid_positions(bbox, kernel_grid)
    sums = np.array([[kernel.kernel_sum(x, y) for x in xs] for y in ys])
    out.update({
        "kernel_size": int(kernel.size),
        "n_basis": int(kernel.basis_images.shape[0]),
        "spatial_kernel_order": int(kernel.function.order),
        "kernel_sum_center": kernel.kernel_sum(*_centre(bbox)),
        "kernel_sum_min": float(sums.min()),
        "kernel_sum_max": float(sums.max()),
        "kernel_sum_std": float(sums.std()),
        "kernel_sum_grid": int(kernel_grid),
        "spatial_condition_number": meta.get("spatialConditionNum"),
        "n_good_candidates": int(cell_counts[GOOD]),
        "n_bad_candidates": int(cell_counts[BAD]),
        "n_unknown_candidates": int(cell_counts[UNKNOWN]),
        "kernel_constraint": meta.get("kernelConstraint"),
        "background_constraint": meta.get("backgroundConstraint"),
        # degraded but honest: the orders actually fitted when too few candidates made the
        # task lower them (auto_reduce_spatial_order)
        "spatial_order_reduced": bool(meta.get("spatialOrderReduced", False)),
        "spatial_kernel_order_used": meta.get("spatialKernelOrderUsed"),
        "spatial_bg_order_used": meta.get("spatialBgOrderUsed"),
    })
    out.update(_candidate_metrics(result))

    # -- the difference image --------------------------------------------------------------
    sci = _mi(science)
    tmpl = _mi(template if template is not None else result.warped_exposure)
    d, sigma, valid = _difference(result, template, science)
    out["image_shape"] = [int(v) for v in d.shape]
    fwhm = _fwhm_of_difference(result, template, science)
    out["psf_fwhm_difference"] = fwhm

    sources_s = detect_sources(sci, threshold=source_threshold)
    sources_t = detect_sources(tmpl, threshold=source_threshold)
    radius = float(sources_s.meta.get("aperture_radius", max(2.0 * fwhm, 3.0)))

    # star-free: away from anything detected in either image
    positions, radii = [], []
    for tab in (sources_s, sources_t):
        for row in tab:
            positions.append((row["x"], row["y"]))
            radii.append(max(2.5 * fwhm, 2.0 * math.sqrt(max(row["npix"], 1) / math.pi)))
    near = _disk_mask(d.shape, sci.xy0, positions, radii)
    star_free = valid & ~near
    z = d[star_free] / sigma[star_free]
    if z.size >= 100:
        med = float(np.median(z))
        out.update({"noise_ratio": float(np.std(z)), "noise_mean": float(np.mean(z)),
                    "noise_ratio_robust": 1.4826 * float(np.median(np.abs(z - med))),
                    "noise_n_pixels": int(z.size)})
    else:
        log.warning("only %d star-free pixels; no noise ratio", z.size)
        out.update({"noise_ratio": None, "noise_mean": None, "noise_ratio_robust": None,
                    "noise_n_pixels": int(z.size)})

    # footprint ratio: stars measured in the science image, sky apertures in star-free places
    absd = np.where(valid, np.abs(d), np.nan)
    ri = int(math.ceil(radius))
    # centres whose whole aperture (inside its bounding square) is star-free and valid; a
    # square minimum filter is separable, so this stays fast on large images
    ok_centre = ndimage.minimum_filter(star_free, size=2 * ri + 1, mode="constant", cval=False)
    cy, cx = np.nonzero(ok_centre)
    rng = np.random.default_rng(_SKY_SEED)
    pick = rng.choice(cy.size, size=min(_N_SKY_APERTURES, cy.size), replace=False) \
        if cy.size else np.array([], int)
    sky_pos = [(cx[i] + sci.xy0[0], cy[i] + sci.xy0[1]) for i in pick]
    sky_abs_d = _aperture_sums(absd, sci.xy0, sky_pos, radius)
    sky_abs_d = sky_abs_d[np.isfinite(sky_abs_d)]
    mean_sky = float(sky_abs_d.mean()) if sky_abs_d.size else np.nan
    usable_s = np.isfinite(sci.image) & ~near & ((sci.mask & _plane_bits(sci, _INVALID_PLANES))
                                                  == 0)
    sky_ratio = np.nan
    if sky_abs_d.size and usable_s.sum() > 100:
        s_sub = sci.image.astype(np.float64) - _sky_level(sci.image, usable_s)
        sky_abs_s = _aperture_sums(np.abs(s_sub), sci.xy0, sky_pos, radius)
        sky_abs_s = sky_abs_s[np.isfinite(sky_abs_s)]
        if sky_abs_s.size and sky_abs_s.mean() > 0:
            sky_ratio = mean_sky / float(sky_abs_s.mean())
    # Rubin's metric is over stars: saturated and blended detections would measure the
    # detection, not the subtraction
    ok_star = np.ones(len(sources_s), bool)
    if "saturated" in sources_s.colnames:
        ok_star &= ~np.asarray(sources_s["saturated"], bool)
    if "flag" in sources_s.colnames:
        ok_star &= np.asarray(sources_s["flag"]) == 0
    ok_star &= np.asarray(sources_s["flux"], float) > 0
    star_pos = [(r["x"], r["y"]) for r in sources_s[ok_star]]
    star_flux = np.asarray(sources_s["flux"], float)[ok_star]
    star_abs_d = _aperture_sums(absd, sci.xy0, star_pos, radius)
    ratios = (star_abs_d - mean_sky) / star_flux
    ratios = ratios[np.isfinite(ratios)]
    out.update({
        "footprint_ratio_mean": float(ratios.mean()) if ratios.size else None,
        "footprint_ratio_std": float(ratios.std(ddof=1)) if ratios.size > 1 else None,
        "footprint_ratio_median": float(np.median(ratios)) if ratios.size else None,
        "footprint_n_stars": int(ratios.size),
        "sky_footprint_ratio": sky_ratio,
        "footprint_aperture_radius": radius,
        "footprint_n_sky_apertures": int(sky_abs_d.size),
    })

    # ±5σ detections: matched filter with the difference's PSF and its exact noise
    # (the template part of D is correlated by K, so its filtered variance is Σ(G⋆K)²·V)
    g = _gaussian(fwhm)
    conv_mi, ref_mi = _images(result, template, science)
    k_centre = kernel.evaluate(*_centre(bbox))
    scale = 1.0 if _mode(result) == "convolveTemplate" else float(k_centre.sum())
    gk = signal.convolve2d(g, k_centre)
    v_conv = np.where(np.isfinite(conv_mi.variance), conv_mi.variance, 0.0).astype(np.float64)
    v_ref = np.where(np.isfinite(ref_mi.variance), ref_mi.variance, 0.0).astype(np.float64)
    var_f = (_fftcorrelate(v_ref, g * g) + _fftcorrelate(v_conv, gk * gk)) / scale**2
    num = _fftcorrelate(np.where(valid, d, 0.0), g)
    # drop pixels whose filter window touches an invalid pixel
    half = g.shape[0] // 2
    good_f = ndimage.minimum_filter(valid, size=2 * half + 1, mode="constant",
                                    cval=False) & (var_f > 0)
    snr = np.where(good_f, num / np.sqrt(np.where(var_f > 0, var_f, 1.0)), 0.0)
    n_pos, pos_list = _detections(snr, good_f, sci.xy0, detection_threshold, +1)
    n_neg, neg_list = _detections(snr, good_f, sci.xy0, detection_threshold, -1)
    filt_free = good_f & star_free
    out.update({
        "detection_threshold": float(detection_threshold),
        "n_positive_5sigma": n_pos,
        "n_negative_5sigma": n_neg,
        "positive_detections": pos_list,
        "negative_detections": neg_list,
        "filtered_noise_ratio": (1.4826 * float(np.median(np.abs(snr[filt_free])))
                                 if filt_free.sum() >= 100 else None),
    })
    out["metadata"] = meta
    return _jsonable(out)


def _jsonable(obj):
    """Builtin, strict-JSON form: numpy scalars/arrays converted, NaN/inf → None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def write_metrics(metrics, path):
    """Write metrics as indented JSON, atomically.

    Parameters
    ----------
    metrics : dict
        From :func:`compute_metrics` (anything else is converted the same way).
    path : str or os.PathLike

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(metrics), indent=2, allow_nan=False) + "\n"
    with atomic_open(path, "w") as fh:
        fh.write(text)
    log.info("wrote %s", path)
    return path
