"""Kernel candidates and the grid of spatial cells that holds them.

A candidate is a pair of stamps (template, science) around one star.  Cells of
``size_cell_x × size_cell_y`` pixels cover the image; each keeps its candidates
sorted by rating (mean core S/N of the science stamp), and each visit looks at
the first ``n_star_per_cell`` candidates of every cell that are not BAD, so a
rejected star is replaced by the next best one of its cell on the next pass.
"""

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .exceptions import NoKernelCandidatesError

__all__ = [
    "GOOD",
    "BAD",
    "UNKNOWN",
    "ResidualStats",
    "CandidateSolution",
    "KernelCandidate",
    "SpatialCell",
    "SpatialCellSet",
    "stamp_half_width",
    "make_candidates",
    "write_candidate_table",
    "read_candidate_table",
    "write_solutions",
    "read_solutions",
]

log = logging.getLogger(__name__)

GOOD = "GOOD"
BAD = "BAD"
UNKNOWN = "UNKNOWN"


@dataclass
class ResidualStats:
    """Moments of ``D/σ`` over a difference stamp (``std`` is the unbiased estimate)."""

    mean: float
    std: float
    npix: int


@dataclass
class CandidateSolution:
    """A per-candidate kernel fit (ORIG basis or PCA basis)."""

    coefficients: np.ndarray
    background: float
    kernel_image: np.ndarray
    kernel_sum: float
    m: np.ndarray
    b: np.ndarray
    stats: ResidualStats | None = None
    condition_number: float | None = None
    used_pseudo_inverse: bool = False


@dataclass
class KernelCandidate:
    """One star used to constrain the PSF-matching kernel.

    Attributes
    ----------
    id : int
    x, y : float
        Parent pixel coordinates of the star.
    template, science : MaskedImage
        Stamps of the image to convolve and of the reference image.
    rating : float
        Mean S/N over the central ``(2r+1)²`` pixels of the science stamp.
    status : str
        ``"GOOD"``, ``"BAD"`` or ``"UNKNOWN"``.
    reason : str
        Why the candidate was rejected (empty while not BAD).
    """

    id: int
    x: float
    y: float
    template: object
    science: object
    rating: float
    status: str = UNKNOWN
    reason: str = ""
    orig: CandidateSolution | None = None
    pca: CandidateSolution | None = None
    spatial_stats: ResidualStats | None = None
    cell: tuple = (0, 0)
    extra: dict = field(default_factory=dict)

    @property
    def recent(self):
        """The latest solution: PCA if present, else ORIG."""
        return self.pca if self.pca is not None else self.orig

    def set_bad(self, reason):
        """Mark the candidate BAD and remember why."""
        self.status = BAD
        self.reason = reason


class SpatialCell:
    """One cell of the grid: its box and its candidates sorted by rating."""

    def __init__(self, index, bbox):
        self.index = index
        self.bbox = bbox
        self.candidates = []

    def insert(self, candidate):
        """Insert keeping the candidates sorted by rating, best first."""
        self.candidates.append(candidate)
        self.candidates.sort(key=lambda c: -c.rating if np.isfinite(c.rating) else np.inf)

    def visitable(self, n_max):
        """The first ``n_max`` (all if −1) candidates that are not BAD."""
        ok = [c for c in self.candidates if c.status != BAD]
        return ok if n_max < 0 else ok[:n_max]


class SpatialCellSet:
    """A grid of cells over a parent bounding box.

    Parameters
    ----------
    bbox : tuple
        Half-open parent box ``(x0, y0, x1, y1)``.
    size_x, size_y : int
        Cell size in pixels; the last column and row hold the remainder.
    """

    def __init__(self, bbox, size_x, size_y):
        self.bbox = tuple(int(v) for v in bbox)
        x0, y0, x1, y1 = self.bbox
        self.size_x = int(size_x)
        self.size_y = int(size_y)
        self.nx = max(1, math.ceil((x1 - x0) / self.size_x))
        self.ny = max(1, math.ceil((y1 - y0) / self.size_y))
        self.cells = []
        for j in range(self.ny):
            for i in range(self.nx):
                cb = (x0 + i * self.size_x, y0 + j * self.size_y,
                      min(x0 + (i + 1) * self.size_x, x1), min(y0 + (j + 1) * self.size_y, y1))
                self.cells.append(SpatialCell((i, j), cb))

    def insert(self, candidate):
        """Put a candidate in the cell that contains ``(round(x), round(y))``."""
        x0, y0, x1, y1 = self.bbox
        ix, iy = round(candidate.x), round(candidate.y)
        if not (x0 <= ix < x1 and y0 <= iy < y1):
            msg = (f"candidate {candidate.id} at ({candidate.x:.1f}, {candidate.y:.1f}) lies "
                   f"outside the cell grid {self.bbox}")
            raise ValueError(msg)
        i = min((ix - x0) // self.size_x, self.nx - 1)
        j = min((iy - y0) // self.size_y, self.ny - 1)
        candidate.cell = (i, j)
        self.cells[j * self.nx + i].insert(candidate)

    def candidates(self):
        """Every candidate of every cell."""
        return [c for cell in self.cells for c in cell.candidates]

    def visit(self, n_max):
        """Snapshot of the candidates a visitor processes this pass."""
        return [c for cell in self.cells for c in cell.visitable(n_max)]

    def counts(self):
        """Number of candidates per status."""
        out = {GOOD: 0, BAD: 0, UNKNOWN: 0}
        for c in self.candidates():
            out[c.status] += 1
        return out

    def to_table(self):
        """Every candidate with its status and statistics as an astropy Table."""
        from astropy.table import Table

        rows = []
        for c in self.candidates():
            o, s = c.orig, c.spatial_stats
            rows.append({
                "id": c.id, "x": c.x, "y": c.y, "cell_x": c.cell[0], "cell_y": c.cell[1],
                "rating": c.rating, "status": c.status, "reason": c.reason,
                "kernel_sum": o.kernel_sum if o else np.nan,
                "background": o.background if o else np.nan,
                "resid_mean": o.stats.mean if o and o.stats else np.nan,
                "resid_std": o.stats.std if o and o.stats else np.nan,
                "spatial_resid_mean": s.mean if s else np.nan,
                "spatial_resid_std": s.std if s else np.nan,
                "condition_number": (o.condition_number if o and o.condition_number is not None
                                     else np.nan),
            })
        names = ["id", "x", "y", "cell_x", "cell_y", "rating", "status", "reason", "kernel_sum",
                 "background", "resid_mean", "resid_std", "spatial_resid_mean",
                 "spatial_resid_std", "condition_number"]
        if not rows:
            return Table(names=names, dtype=[int, float, float, int, int, float, str, str] +
                         [float] * 7)
        return Table(rows=rows, names=names)


def stamp_half_width(config, kernel_size):
    """Stamp half-width: ``int(fp_grow_kernel_scaling·kernel_size + 0.5)`` or ``fp_grow_pix``."""
    det = config.detection_config
    if det.scale_by_fwhm:
        return int(det.fp_grow_kernel_scaling * kernel_size + 0.5)
    return int(det.fp_grow_pix)


def _rating(science_stamp, core_radius, bad_bits):
    """Mean of S/sqrt(V) over the central (2r+1)² pixels, skipping bad and non-finite pixels."""
    ny, nx = science_stamp.shape
    cy, cx = ny // 2, nx // 2
    r = core_radius
    sl = (slice(max(cy - r, 0), cy + r + 1), slice(max(cx - r, 0), cx + r + 1))
    img = science_stamp.image[sl].astype(np.float64)
    var = science_stamp.variance[sl].astype(np.float64)
    ok = (science_stamp.mask[sl] & bad_bits) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = img / np.sqrt(var)
    ok &= np.isfinite(snr)
    return float(snr[ok].mean()) if ok.any() else np.nan


def make_candidates(template, science, positions, config, kernel_size):
    """Cut stamps around each position and vet them, as ip_diffim's makeCandidateList.

    Stamps that cross an image edge are shrunk symmetrically so they stay centred;
    stamps with any ``detection_config.bad_mask_planes`` bit in either image, or with
    non-finite pixels, are dropped; stamps too small to hold the kernel fit region
    are dropped.

    Parameters
    ----------
    template, science : MaskedImage
        Images on the same pixel grid.
    positions : sequence of (x, y)
        Parent pixel coordinates.
    config : PsfMatchConfig
        The active kernel config.
    kernel_size : int

    Returns
    -------
    list of KernelCandidate

    Raises
    ------
    NoKernelCandidatesError
        If no position gives a usable stamp.
    """
    half = stamp_half_width(config, kernel_size)
    bad_bits = (science.get_plane_bitmask(*config.detection_config.bad_mask_planes)
                | template.get_plane_bitmask(*config.detection_config.bad_mask_planes))
    stat_bits = science.get_plane_bitmask(*config.bad_mask_planes)
    x0, y0, x1, y1 = science.bbox
    out = []
    n_out = n_mask = n_small = 0
    for pos in positions:
        x, y = float(pos[0]), float(pos[1])
        if not (math.isfinite(x) and math.isfinite(y)):
            n_out += 1
            continue
        cx, cy = round(x), round(y)
        if not (x0 <= cx < x1 and y0 <= cy < y1):
            n_out += 1
            continue
        g = min(half, cx - x0, x1 - 1 - cx, cy - y0, y1 - 1 - cy)
        # the fit region (stamp shrunk by the kernel) must keep enough pixels
        if 2 * g + 1 < kernel_size + 4:
            n_small += 1
            continue
        box = (cx - g, cy - g, cx + g + 1, cy + g + 1)
        t = template.subimage(*box)
        s = science.subimage(*box)
        if ((t.mask | s.mask) & bad_bits).any() or not (
                np.isfinite(t.image).all() and np.isfinite(s.image).all()
                and np.isfinite(t.variance).all() and np.isfinite(s.variance).all()):
            n_mask += 1
            continue
        rating = _rating(s, config.candidate_core_radius, stat_bits)
        out.append(KernelCandidate(id=len(out), x=x, y=y, template=t, science=s, rating=rating))
    log.info("Kernel candidates: %d of %d positions usable (%d outside the image or not "
             "finite, %d with "
             "masked or non-finite pixels, %d too close to an edge)",
             len(out), len(positions), n_out, n_mask, n_small)
    if not out:
        msg = (f"cannot find any objects suitable for kernel candidacy: of {len(positions)} "
               f"positions {n_out} are outside the image or not finite, {n_mask} have masked or "
               "non-finite "
               f"pixels in a stamp, {n_small} are too close to an edge; give more sources or "
               "relax detection_config.bad_mask_planes")
        raise NoKernelCandidatesError(msg)
    return out


# -- intermediate files of the workflow's select, solve and spatial steps ------------------

_SLOTS = ("orig", "pca")


def _provenance(header, provenance):
    from . import __version__

    header["DIFFIMV"] = (__version__, "diffim version")
    for key, value in (provenance or {}).items():
        header[key] = value


def write_candidate_table(cell_set, path, meta=None):
    """Write every candidate (position, cell, rating, status, statistics) as ECSV, atomically.

    Parameters
    ----------
    cell_set : SpatialCellSet
    path : str or os.PathLike
    meta : dict, optional
        Stored in the table's metadata (with the diffim version).
    """
    from . import __version__
    from ._atomic import atomic_open

    table = cell_set.to_table()
    table.sort("id")  # id order lets make_selection rebuild the same ids from the positions
    table.meta.update({"diffim_version": __version__, **(meta or {})})
    with atomic_open(path, "w") as fh:
        table.write(fh, format="ascii.ecsv")


def read_candidate_table(path):
    """Read a table written by :func:`write_candidate_table`.

    Raises
    ------
    DiffimError
        If the file is missing, unreadable or lacks the columns ``id, x, y``.
    """
    from astropy.table import Table

    from .exceptions import DiffimError

    try:
        table = Table.read(path, format="ascii.ecsv")
    except (OSError, ValueError) as exc:
        msg = f"{path}: cannot read the kernel-candidate table ({exc})"
        raise DiffimError(msg) from exc
    missing = {"id", "x", "y"} - set(table.colnames)
    if missing:
        msg = f"{path}: kernel-candidate table lacks the column(s) {sorted(missing)}"
        raise DiffimError(msg)
    return table


def _stack(values, shape):
    out = np.full((len(values), *shape), np.nan)
    for i, v in enumerate(values):
        if v is not None:
            out[i] = v
    return out


def write_solutions(cell_set, path, provenance=None):
    """Write every candidate with its status and kernel solutions as FITS, atomically.

    Layout: a CANDIDATES table (id, x, y, cell, rating, status, reason, spatial residual
    statistics and, per solution slot ORIG and PCA, background, kernel sum, residual
    statistics, condition number), then per slot the image extensions ``<SLOT>_COEFF``
    (n, n_basis), ``<SLOT>_KERNEL`` (n, k, k), ``<SLOT>_M`` (n, p, p) and ``<SLOT>_B``
    (n, p): the coefficients, kernel image and normal equations of each candidate's fit,
    NaN rows where a candidate has no such solution.  Everything is float64, so
    :func:`read_solutions` restores the fits exactly.

    Parameters
    ----------
    cell_set : SpatialCellSet
    path : str or os.PathLike
    provenance : dict, optional
        Extra primary-header cards (key -> value).
    """
    from astropy.io import fits
    from astropy.table import Table

    from ._atomic import atomic_open

    cands = cell_set.candidates()
    cols = {
        "id": [c.id for c in cands], "x": [c.x for c in cands], "y": [c.y for c in cands],
        "cell_x": [c.cell[0] for c in cands], "cell_y": [c.cell[1] for c in cands],
        "rating": [c.rating for c in cands], "status": [c.status for c in cands],
        # FITS strings are ASCII: escape the σ and × of the messages, undone on reading
        "reason": [c.reason.encode("ascii", "backslashreplace").decode("ascii")
                   for c in cands],
    }
    for name in ("mean", "std", "npix"):
        cols[f"spatial_{name}"] = [getattr(c.spatial_stats, name) if c.spatial_stats
                                   else np.nan for c in cands]
    hdus = [fits.PrimaryHDU()]
    _provenance(hdus[0].header, provenance)
    hdus[0].header["NCAND"] = len(cands)
    arrays = []
    for slot in _SLOTS:
        sols = [getattr(c, slot) for c in cands]
        cols[f"{slot}_ok"] = [s is not None for s in sols]
        for name in ("background", "kernel_sum", "condition_number"):
            cols[f"{slot}_{name}"] = [np.nan if s is None or getattr(s, name) is None
                                      else float(getattr(s, name)) for s in sols]
        cols[f"{slot}_pinv"] = [bool(s and s.used_pseudo_inverse) for s in sols]
        for name in ("mean", "std", "npix"):
            cols[f"{slot}_resid_{name}"] = [getattr(s.stats, name) if s and s.stats
                                            else np.nan for s in sols]
        first = next((s for s in sols if s is not None), None)
        if first is None:
            continue
        for name, attr in (("COEFF", "coefficients"), ("KERNEL", "kernel_image"),
                           ("M", "m"), ("B", "b")):
            data = _stack([None if s is None else getattr(s, attr) for s in sols],
                          np.shape(getattr(first, attr)))
            arrays.append(fits.ImageHDU(data, name=f"{slot.upper()}_{name}"))
    table = Table(cols)
    table["reason"] = table["reason"].astype(str)
    hdus.append(fits.table_to_hdu(table))
    hdus[-1].name = "CANDIDATES"
    with atomic_open(path) as fh:
        fits.HDUList(hdus + arrays).writeto(fh)


def read_solutions(path, cell_set):
    """Restore statuses and solutions written by :func:`write_solutions` into ``cell_set``.

    ``cell_set`` must hold the same candidates (same ids at the same positions), as
    :meth:`diffim.task.ImagePsfMatchTask.make_selection` rebuilds them from the images.

    Raises
    ------
    DiffimError
        If the file cannot be read or does not describe these candidates.
    """
    from astropy.io import fits
    from astropy.table import Table

    from .exceptions import DiffimError

    try:
        with fits.open(path) as hdul:
            table = Table.read(hdul["CANDIDATES"], mask_invalid=False)
            arrays = {h.name: np.array(h.data, dtype=np.float64) for h in hdul[2:]}
    except (OSError, KeyError, ValueError) as exc:
        msg = f"{path}: not a diffim kernel-solutions file ({exc})"
        raise DiffimError(msg) from exc
    by_id = {c.id: c for c in cell_set.candidates()}
    if len(table) != len(by_id):
        msg = (f"{path}: holds {len(table)} candidates, the images give {len(by_id)}; "
               "the solutions belong to other inputs")
        raise DiffimError(msg)
    for i, row in enumerate(table):
        cand = by_id.get(int(row["id"]))
        if cand is None or cand.x != row["x"] or cand.y != row["y"]:
            msg = (f"{path}: candidate {int(row['id'])} at ({row['x']}, {row['y']}) is not "
                   "among the candidates of these images; the solutions belong to other "
                   "inputs")
            raise DiffimError(msg)
        cand.status = str(row["status"])
        cand.reason = str(row["reason"]).encode("ascii").decode("unicode_escape")
        if np.isfinite(row["spatial_std"]):
            cand.spatial_stats = ResidualStats(float(row["spatial_mean"]),
                                               float(row["spatial_std"]),
                                               int(row["spatial_npix"]))
        for slot in _SLOTS:
            sol = None
            if row[f"{slot}_ok"]:
                cond = float(row[f"{slot}_condition_number"])
                stats = None
                if np.isfinite(row[f"{slot}_resid_npix"]):
                    stats = ResidualStats(float(row[f"{slot}_resid_mean"]),
                                          float(row[f"{slot}_resid_std"]),
                                          int(row[f"{slot}_resid_npix"]))
                pre = slot.upper()
                sol = CandidateSolution(
                    coefficients=arrays[f"{pre}_COEFF"][i],
                    background=float(row[f"{slot}_background"]),
                    kernel_image=arrays[f"{pre}_KERNEL"][i],
                    kernel_sum=float(row[f"{slot}_kernel_sum"]),
                    m=arrays[f"{pre}_M"][i], b=arrays[f"{pre}_B"][i], stats=stats,
                    condition_number=cond if np.isfinite(cond) else None,
                    used_pseudo_inverse=bool(row[f"{slot}_pinv"]))
            setattr(cand, slot, sol)
