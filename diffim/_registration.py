"""Registration of two images without a WCS, by matching their source catalogs.

The geometric transform maps **science pixel coordinates to template pixel coordinates**::

    [x_t, y_t] = matrix[:, :2] @ [x_s, y_s] + matrix[:, 2]

It is found in two stages:

1. **Coarse solution** from the brightest sources only.

   * ``kind="shift"``: every pairwise offset ``template − science`` of the brightest few
     hundred sources (limited to ``max_shift``) is accumulated in a 2-D histogram; the true
     offset is the densest cell (counts summed over 2×2 cells so a peak on a cell edge is not
     split).
   * ``kind="affine"``: triangles are formed from each bright source and pairs of its nearest
     bright neighbours (all triangles for small lists). A triangle with sides
     ``a ≥ b ≥ c`` is described by the similarity invariants ``(b/a, c/a)``; template and
     science triangles that are close in that space (a kd-tree query) give candidate
     similarity transforms (rotation, scale, translation, optionally a reflection), which
     are then scored by how many bright science sources land on a bright template source
     (a vote). Wrong vertex correspondences and chance look-alikes collect few votes.

   Either way the winner must be statistically significant: the number of coincidences
   beyond those built into the candidate must be improbable (Poisson tail with the trial
   count as a look-elsewhere factor) for catalogs of that density, so unrelated catalogs
   raise :class:`~diffim.exceptions.RegistrationError` instead of giving a spurious answer.

2. **Refinement** with every source: iterative one-to-one nearest-neighbour matching within
   a radius that shrinks to ~3× the residual rms, and a least-squares fit (``shift``: mean
   offset; ``affine``: 6 parameters, a 4-parameter similarity while fewer than 6 pairs
   match) with iterative sigma clipping of the residuals.

This is a private module; :mod:`diffim.warp` (and the task) use :func:`find_transform` and
:func:`register_images`.
"""

import logging
import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import poisson

from .exceptions import ConfigError, NoOverlapError, RegistrationError

__all__ = ["RegistrationResult", "find_transform", "register_images", "apply_transform"]

log = logging.getLogger(__name__)

_KINDS = ("shift", "affine")

# --- coarse stage ----------------------------------------------------------------------------
# Numbers of brightest sources tried in turn by the triangle matcher (stop at the first that
# gives a significant solution).
_TRIANGLE_LEVELS = (40, 80, 160)
# Use all triangles (rather than nearest-neighbour ones) when a list is at most this long.
_ALL_TRIANGLES_MAX = 12
# Neighbours per source used to build local triangles.
_TRIANGLE_NEIGHBOURS = 6
# Radius in invariant space ((b/a, c/a)) within which two triangles are "similar".
_INVARIANT_TOLERANCE = 0.02
# Triangles whose shortest side is below this many pixels are too sensitive to centroid noise.
_MIN_TRIANGLE_SIDE = 3.0
# Allowed scale factor of a candidate (template px per science px).
_SCALE_RANGE = (1.0 / 3.0, 3.0)
# Most candidate transforms scored per level (the most similar triangle pairs first).
_MAX_CANDIDATES = 20000
# Best-voted candidates verified with a fitted transform and a tight radius.
_N_VERIFY = 5
# Vote radius (px): max(_VOTE_RADIUS_MIN, _VOTE_RADIUS_FRACTION * field extent).
_VOTE_RADIUS_MIN = 2.0
_VOTE_RADIUS_FRACTION = 0.01
# Brightest sources used for the pairwise-offset histogram of kind="shift".
_SHIFT_MAX_SOURCES = 400
# Histogram cell (px) of the offset search; the peak is summed over 2x2 cells.
_SHIFT_BIN = 2.0
# False-alarm probability (including the look-elsewhere factor) a coarse solution must beat.
_FALSE_ALARM = 1e-3

# --- refinement ------------------------------------------------------------------------------
_REFINE_MAX_ITER = 20
_MIN_MATCH_RADIUS = 0.5      # px: the matching radius never shrinks below this
_RADIUS_PER_RMS = 3.0        # matching radius = this × radial rms of the residuals
_CLIP_SIGMA = 3.5            # clip residuals beyond this many σ (2-D Rayleigh)
_MIN_AFFINE_MATCHES = 6      # fewer matches: fit a similarity instead of a full affine

# Median of a 2-D Gaussian's radial distance, in units of the per-axis σ.
_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))


@dataclass
class RegistrationResult:
    """Geometric transform from science to template pixel coordinates.

    Attributes
    ----------
    matrix : numpy.ndarray
        2×3 float array; ``[x_t, y_t] = matrix[:, :2] @ [x_s, y_s] + matrix[:, 2]``.
    n_matches : int
        Number of source pairs used in the final fit (after clipping).
    rms : float
        Radial rms (px) of the final fit's residuals, ``sqrt(mean(dx² + dy²))``, measured in
        template pixels.
    kind : str
        ``"shift"`` (``matrix[:, :2]`` is the identity) or ``"affine"``.
    matches : numpy.ndarray
        ``(n_matches, 2)`` int array of ``(science_index, template_index)`` pairs, indices
        into the catalogs given to :func:`find_transform`.
    """

    matrix: np.ndarray
    n_matches: int
    rms: float
    kind: str
    matches: np.ndarray = field(repr=False)

    @property
    def shift(self):
        """``(dx, dy)``: the translation ``matrix[:, 2]`` (template − science for a shift)."""
        return float(self.matrix[0, 2]), float(self.matrix[1, 2])

    @property
    def scale(self):
        """Mean linear scale factor ``sqrt(|det(matrix[:, :2])|)``."""
        return float(math.sqrt(abs(np.linalg.det(self.matrix[:, :2]))))

    @property
    def rotation_deg(self):
        """Rotation angle (degrees, counter-clockwise in pixel x/y) of the linear part."""
        a = self.matrix[:, :2]
        return float(math.degrees(math.atan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1])))

    def apply(self, xy):
        """Map science pixel coordinates ``(n, 2)`` (or ``(2,)``) to template pixels."""
        return apply_transform(self.matrix, xy)

    def inverse(self):
        """The 2×3 matrix of the inverse transform (template → science pixels)."""
        a = np.linalg.inv(self.matrix[:, :2])
        return np.column_stack([a, -a @ self.matrix[:, 2]])


def apply_transform(matrix, xy):
    """Apply a 2×3 transform matrix to points ``xy`` of shape ``(n, 2)`` or ``(2,)``."""
    m = np.asarray(matrix, dtype=float)
    p = np.asarray(xy, dtype=float)
    return p @ m[:, :2].T + m[:, 2]


# ---------------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------------

def _as_points(xy, name):
    try:
        p = np.asarray(xy, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an (n, 2) array of pixel coordinates") from None
    if p.ndim == 1 and p.size == 0:
        p = p.reshape(0, 2)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ConfigError(f"{name} must be an (n, 2) array of pixel coordinates, "
                          f"got shape {p.shape}")
    return p


def _as_flux(flux, n, name):
    if flux is None:
        return None
    f = np.asarray(flux, dtype=float).ravel()
    if f.size != n:
        raise ConfigError(f"{name} has {f.size} entries but there are {n} positions")
    return f


def _brightness_order(flux, n):
    """Indices sorted brightest first (input order when no fluxes are given)."""
    if flux is None:
        return np.arange(n)
    f = np.where(np.isfinite(flux), flux, -np.inf)
    return np.argsort(-f, kind="stable")


def _extent(*points):
    """Largest side of the bounding box of all points (at least 1 px)."""
    allp = np.vstack([p for p in points if len(p)])
    return max(float(np.ptp(allp[:, 0])), float(np.ptp(allp[:, 1])), 1.0)


def _bbox_area(p):
    return max(float(np.ptp(p[:, 0])), 1.0) * max(float(np.ptp(p[:, 1])), 1.0)


def _false_alarm(excess, expected, trials):
    """Probability that ``excess`` or more chance coincidences happen in any of ``trials``."""
    if excess <= 0:
        return 1.0
    p = float(poisson.sf(excess - 1, max(expected, 1e-12)))
    return min(1.0, p * max(trials, 1))


# ---------------------------------------------------------------------------------------------
# least-squares fits
# ---------------------------------------------------------------------------------------------

def _fit_shift(src, dst):
    d = np.mean(dst - src, axis=0)
    return np.array([[1.0, 0.0, d[0]], [0.0, 1.0, d[1]]])


def _fit_similarity(src, dst, reflect=False):
    """Least-squares similarity (rotation, scale, translation; ``reflect`` flips y first)."""
    s = src.copy()
    if reflect:
        s[:, 1] = -s[:, 1]
    cs, cd = s.mean(axis=0), dst.mean(axis=0)
    a, b = s - cs, dst - cd
    den = float(np.sum(a * a))
    if den <= 0:
        return None
    p = float(np.sum(a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1])) / den
    q = float(np.sum(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])) / den
    lin = np.array([[p, -q], [q, p]])
    if reflect:
        lin = lin @ np.diag([1.0, -1.0])
    t = cd - lin @ src.mean(axis=0)
    return np.column_stack([lin, t])


def _fit_affine(src, dst):
    c = src.mean(axis=0)
    a = np.column_stack([src - c, np.ones(len(src))])
    sol, _, rank, _ = np.linalg.lstsq(a, dst, rcond=None)
    if rank < 3:
        return None
    lin = sol[:2].T
    t = sol[2] - lin @ c
    return np.column_stack([lin, t])


def _fit(src, dst, kind, reflect):
    if kind == "shift":
        return _fit_shift(src, dst)
    if len(src) >= _MIN_AFFINE_MATCHES:
        m = _fit_affine(src, dst)
        if m is not None:
            return m
    return _fit_similarity(src, dst, reflect=reflect)


def _clipped_fit(src, dst, kind, reflect):
    """Fit with iterative sigma clipping. Returns (matrix, keep mask, rms) or None."""
    keep = np.ones(len(src), bool)
    m = None
    for _ in range(10):
        if keep.sum() < 3:
            return None
        m = _fit(src[keep], dst[keep], kind, reflect)
        if m is None:
            return None
        d = np.hypot(*(apply_transform(m, src) - dst).T)
        sigma = float(np.median(d[keep])) / _RAYLEIGH_MEDIAN
        new = d <= max(_CLIP_SIGMA * sigma, 1e-6)
        if new.sum() < 3 or np.array_equal(new, keep):
            break
        keep = new
    rms = float(np.sqrt(np.mean(np.sum((apply_transform(m, src[keep]) - dst[keep]) ** 2,
                                       axis=1))))
    return m, keep, rms


# ---------------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------------

def _match(pred, tree, radius):
    """One-to-one nearest-neighbour matches of predicted positions to tree points.

    Returns (science indices, template indices, distances); where two science sources claim
    the same template source the closer one keeps it.
    """
    dist, idx = tree.query(pred, k=1, distance_upper_bound=radius)
    ok = np.isfinite(dist)
    si = np.flatnonzero(ok)
    ti, di = idx[ok], dist[ok]
    order = np.argsort(di, kind="stable")
    si, ti, di = si[order], ti[order], di[order]
    _, first = np.unique(ti, return_index=True)
    first.sort()
    return si[first], ti[first], di[first]


def _refine(sxy, txy, matrix, radius, kind, reflect):
    """Iterative nearest-neighbour matching with a shrinking radius and clipped fits."""
    tree = cKDTree(txy)
    best = None
    prev_pairs = None
    for _ in range(_REFINE_MAX_ITER):
        si, ti, _ = _match(apply_transform(matrix, sxy), tree, radius)
        if len(si) < 3:
            break
        res = _clipped_fit(sxy[si], txy[ti], kind, reflect)
        if res is None:
            break
        matrix, keep, rms = res
        pairs = np.column_stack([si[keep], ti[keep]])
        best = (matrix, pairs, rms)
        new_radius = min(radius, max(_RADIUS_PER_RMS * rms, _MIN_MATCH_RADIUS))
        if (new_radius == radius and prev_pairs is not None
                and np.array_equal(pairs, prev_pairs)):
            break
        prev_pairs, radius = pairs, new_radius
    return best


# ---------------------------------------------------------------------------------------------
# coarse stage: shift
# ---------------------------------------------------------------------------------------------

def _coarse_shift(s, t, max_shift):
    """Densest 2×2-cell window of the pairwise offsets ``t − s``.

    Returns (shift matrix, number of pairs in the peak window, false-alarm probability).
    """
    if max_shift is not None:
        tree = cKDTree(t)
        lists = tree.query_ball_point(s, r=max_shift)
        si = np.repeat(np.arange(len(s)), [len(v) for v in lists])
        ti = np.fromiter((j for v in lists for j in v), dtype=int, count=len(si))
    else:
        si, ti = (a.ravel() for a in np.meshgrid(np.arange(len(s)), np.arange(len(t)),
                                                 indexing="ij"))
    if len(si) == 0:
        raise NoOverlapError(
            f"no template source lies within max_shift={max_shift} px of any science source "
            f"({len(s)} science, {len(t)} template sources): the images do not overlap with "
            "such a small shift; increase max_shift or pass max_shift=None")
    d = t[ti] - s[si]
    # Sparse 2-D histogram: each offset votes for the four 2x2-cell windows containing its
    # cell, so a peak straddling a cell edge is not split.
    lo = d.min(axis=0) - 2.0 * _SHIFT_BIN  # every cell index >= 1
    cell = np.floor((d - lo) / _SHIFT_BIN).astype(np.int64)
    ny = int(cell[:, 1].max()) + 2
    keys = np.concatenate([(cell[:, 0] - a) * ny + (cell[:, 1] - b)
                           for a in (0, 1) for b in (0, 1)])
    n_windows = (int(cell[:, 0].max()) + 2) * ny
    if n_windows <= 4_000_000:
        counts = np.bincount(keys, minlength=n_windows)
        key = int(np.argmax(counts))
        peak = int(counts[key])
    else:  # huge offset range (large images): count only the occupied windows
        uniq, counts = np.unique(keys, return_counts=True)
        key = int(uniq[np.argmax(counts)])
        peak = int(counts.max())
    i, j = divmod(key, ny)
    centre = lo + (np.array([i, j]) + 1.0) * _SHIFT_BIN
    # Chance level: given one pair in the window (each pair seeds a hypothesis, so there are
    # min(pairs, cells) trials), how many others fall in it by chance. The offset density is
    # taken at its maximum (zero offset between equal fields), or the mean density within
    # max_shift if that is higher.
    area = max(_bbox_area(np.vstack([s, t])), 1.0)
    density = len(s) * len(t) / area
    if max_shift is not None:
        density = max(density, len(d) / (math.pi * max_shift ** 2))
    expected = density * (2 * _SHIFT_BIN) ** 2
    fap = _false_alarm(peak - 1, expected, min(len(d), n_windows))
    sel = np.all(np.abs(d - centre) <= _SHIFT_BIN, axis=1)
    shift = np.median(d[sel], axis=0)
    matrix = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]])
    return matrix, peak, fap


# ---------------------------------------------------------------------------------------------
# coarse stage: triangles
# ---------------------------------------------------------------------------------------------

def _triangles(p):
    """Triangles of points ``p``: vertex indices ordered (opposite longest, middle, shortest
    side) and their invariants (b/a, c/a)."""
    n = len(p)
    if n < 3:
        return np.zeros((0, 3), int), np.zeros((0, 2))
    if n <= _ALL_TRIANGLES_MAX:
        tri = np.array(list(combinations(range(n), 3)), dtype=int)
    else:
        k = min(_TRIANGLE_NEIGHBOURS, n - 1)
        _, nbr = cKDTree(p).query(p, k=k + 1)
        pairs = np.array(list(combinations(range(1, k + 1), 2)), dtype=int)
        tri = np.column_stack([np.repeat(nbr[:, 0], len(pairs)),
                               nbr[:, pairs[:, 0]].ravel(), nbr[:, pairs[:, 1]].ravel()])
        tri = np.unique(np.sort(tri, axis=1), axis=0)
    v0, v1, v2 = p[tri[:, 0]], p[tri[:, 1]], p[tri[:, 2]]
    # side opposite each vertex
    sides = np.column_stack([np.hypot(*(v1 - v2).T), np.hypot(*(v0 - v2).T),
                             np.hypot(*(v0 - v1).T)])
    order = np.argsort(-sides, axis=1, kind="stable")
    sides = np.take_along_axis(sides, order, axis=1)
    tri = np.take_along_axis(tri, order, axis=1)
    good = sides[:, 2] >= _MIN_TRIANGLE_SIDE
    tri, sides = tri[good], sides[good]
    inv = np.column_stack([sides[:, 1] / sides[:, 0], sides[:, 2] / sides[:, 0]])
    return tri, inv


def _similarities(src, dst):
    """Vectorised exact-ish similarity transforms of triangle pairs.

    ``src``/``dst`` have shape (m, 3, 2). Returns (matrices (m, 2, 3), rms residual (m,),
    reflected flag (m,)) choosing per pair the better of the proper and reflected fits.
    """
    out = []
    for reflect in (False, True):
        s = src.copy()
        if reflect:
            s[..., 1] = -s[..., 1]
        cs, cd = s.mean(axis=1, keepdims=True), dst.mean(axis=1, keepdims=True)
        a, b = s - cs, dst - cd
        den = np.sum(a * a, axis=(1, 2))
        den = np.where(den > 0, den, np.nan)
        p = np.sum(a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1], axis=1) / den
        q = np.sum(a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0], axis=1) / den
        lin = np.empty((len(src), 2, 2))
        lin[:, 0, 0], lin[:, 0, 1], lin[:, 1, 0], lin[:, 1, 1] = p, -q, q, p
        if reflect:
            lin[:, :, 1] *= -1.0
        t = cd[:, 0, :] - np.einsum("mij,mj->mi", lin, src.mean(axis=1))
        pred = np.einsum("mij,mkj->mki", lin, src) + t[:, None, :]
        rms = np.sqrt(np.mean(np.sum((pred - dst) ** 2, axis=2), axis=1))
        out.append((np.concatenate([lin, t[:, :, None]], axis=2), rms))
    (m0, r0), (m1, r1) = out
    r0 = np.where(np.isfinite(r0), r0, np.inf)
    r1 = np.where(np.isfinite(r1), r1, np.inf)
    refl = r1 < r0
    return np.where(refl[:, None, None], m1, m0), np.where(refl, r1, r0), refl


def _coarse_triangles(s, t, max_shift, vote_radius, allow_reflection):
    """Best significant similarity from triangle matching of bright lists ``s``, ``t``.

    Returns (matrix, vote pairs (science idx, template idx), reflected, votes, false-alarm
    probability, match radius) or None.
    """
    tri_s, inv_s = _triangles(s)
    tri_t, inv_t = _triangles(t)
    if len(tri_s) == 0 or len(tri_t) == 0:
        return None
    lists = cKDTree(inv_t).query_ball_point(inv_s, r=_INVARIANT_TOLERANCE)
    a = np.repeat(np.arange(len(tri_s)), [len(v) for v in lists])
    b = np.fromiter((j for v in lists for j in v), dtype=int, count=len(a))
    if len(a) == 0:
        return None
    if len(a) > _MAX_CANDIDATES:
        dist = np.hypot(*(inv_s[a] - inv_t[b]).T)
        keep = np.argsort(dist, kind="stable")[:_MAX_CANDIDATES]
        a, b = a[keep], b[keep]
    mats, fit_rms, refl = _similarities(s[tri_s[a]], t[tri_t[b]])
    if not allow_reflection:
        fit_rms = np.where(refl, np.inf, fit_rms)
    scale = np.sqrt(np.abs(mats[:, 0, 0] * mats[:, 1, 1] - mats[:, 0, 1] * mats[:, 1, 0]))
    ok = ((fit_rms <= 0.5 * vote_radius) & (scale >= _SCALE_RANGE[0])
          & (scale <= _SCALE_RANGE[1]))
    if max_shift is not None:
        c = s.mean(axis=0)
        moved = np.einsum("mij,j->mi", mats[:, :, :2], c) + mats[:, :, 2] - c
        ok &= np.hypot(*moved.T) <= max_shift
    if not ok.any():
        return None
    mats, refl = mats[ok], refl[ok]
    n_cand = len(mats)

    # vote: transform every bright science source with every candidate
    tree = cKDTree(t)
    pred = np.einsum("mij,kj->mki", mats[:, :, :2], s) + mats[:, None, :, 2]
    dist, _ = tree.query(pred.reshape(-1, 2), k=1, distance_upper_bound=vote_radius)
    votes = np.isfinite(dist).reshape(n_cand, len(s)).sum(axis=1)

    # verify the best-voted candidates: fit them to their vote pairs, re-vote within a
    # radius set by the fit residuals, and test the coincidences beyond the 3 vertices
    # that define a candidate against chance for this density and number of candidates
    density = len(t) / _bbox_area(t)
    best = None
    for c in np.argsort(-votes, kind="stable")[:_N_VERIFY]:
        if votes[c] < 3:
            break
        si, ti, _ = _match(pred[c], tree, vote_radius)
        fitted = _clipped_fit(s[si], t[ti], "affine", bool(refl[c])) if len(si) >= 3 else None
        if fitted is None:
            continue
        mat, keep, _ = fitted
        n_fit = int(keep.sum())
        n_par = 6 if n_fit >= _MIN_AFFINE_MATCHES else 4
        d2 = np.sum((apply_transform(mat, s[si[keep]]) - t[ti[keep]]) ** 2)
        rms = math.sqrt(d2 / max(2 * n_fit - n_par, 1))
        radius = min(vote_radius, max(_RADIUS_PER_RMS * rms, _MIN_MATCH_RADIUS))
        si, ti, _ = _match(apply_transform(mat, s), tree, radius)
        n_votes = len(si)
        if min(len(s), len(t)) <= 3:
            # nothing beyond the triangle can confirm it: accept a clean triangle match
            fap = 0.0 if n_votes >= 3 else 1.0
        else:
            expected = max(len(s) - 3, 0) * density * math.pi * radius ** 2
            fap = _false_alarm(n_votes - 3, expected, n_cand)
        key = (fap, -n_votes)
        if best is None or key < best[0]:
            best = (key, mat, np.column_stack([si, ti]), bool(refl[c]), n_votes, fap, radius)
    if best is None:
        return None
    return best[1:]


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def find_transform(science_xy, template_xy, *, science_flux=None, template_flux=None,
                   kind="affine", max_shift=None, max_rms=1.0, min_matches=3,
                   allow_reflection=False):
    """Find the transform mapping science pixel coordinates onto template pixel coordinates.

    Parameters
    ----------
    science_xy, template_xy : array_like, shape (n, 2)
        Source positions ``(x, y)`` in each image's pixel coordinates. Non-finite rows are
        ignored. The lists need not have the same length, order or membership.
    science_flux, template_flux : array_like, optional
        Source fluxes, used to pick the brightest sources for the coarse search. Without
        them the first entries of each list are taken as the brightest, so order the lists
        brightest first or pass fluxes.
    kind : {"affine", "shift"}, optional
        ``"shift"``: pure translation (robust and fastest when the images share orientation
        and scale, e.g. a drifting telescope). ``"affine"``: general 6-parameter transform
        (handles rotation, scale and shear; found via a similarity from triangle matching).
    max_shift : float, optional
        Largest plausible displacement (px) of the science sources (at their centroid for
        ``"affine"``). None: unlimited. Setting it speeds up and robustifies crowded fields.
    max_rms : float, optional
        Largest acceptable radial rms (px) of the final fit's residuals.
    min_matches : int, optional
        Fewest matched pairs accepted (at least 3).
    allow_reflection : bool, optional
        Let the affine search consider mirrored images (a flipped axis).

    Returns
    -------
    RegistrationResult

    Raises
    ------
    ConfigError
        Bad ``kind``, shapes or parameters.
    NoOverlapError
        With ``max_shift`` and ``kind="shift"``: no template source lies within
        ``max_shift`` of any science source.
    RegistrationError
        Too few sources, no significant match (unrelated catalogs, too little overlap),
        fewer than ``min_matches`` matches, or residual rms above ``max_rms``. The message
        gives the counts and what to change.
    """
    if kind not in _KINDS:
        raise ConfigError(f"kind={kind!r} is not one of {_KINDS}")
    if max_shift is not None:
        max_shift = float(max_shift)
        if not math.isfinite(max_shift) or max_shift <= 0:
            raise ConfigError(f"max_shift={max_shift!r} must be a positive number or None")
    max_rms = float(max_rms)
    if not max_rms > 0:
        raise ConfigError(f"max_rms={max_rms!r} must be > 0")
    min_matches = max(int(min_matches), 3)

    s_all = _as_points(science_xy, "science_xy")
    t_all = _as_points(template_xy, "template_xy")
    s_flux = _as_flux(science_flux, len(s_all), "science_flux")
    t_flux = _as_flux(template_flux, len(t_all), "template_flux")
    s_ok = np.flatnonzero(np.all(np.isfinite(s_all), axis=1))
    t_ok = np.flatnonzero(np.all(np.isfinite(t_all), axis=1))
    ns, nt = len(s_ok), len(t_ok)
    if ns < 3 or nt < 3:
        raise RegistrationError(
            f"cannot register: {ns} science and {nt} template sources with finite positions; "
            "at least 3 in each are needed. Lower the detection threshold or check that the "
            "images contain stars")
    sxy, txy = s_all[s_ok], t_all[t_ok]
    s_order = _brightness_order(None if s_flux is None else s_flux[s_ok], ns)
    t_order = _brightness_order(None if t_flux is None else t_flux[t_ok], nt)
    extent = _extent(sxy, txy)
    vote_radius = max(_VOTE_RADIUS_MIN, _VOTE_RADIUS_FRACTION * extent)
    counts = f"{ns} science and {nt} template sources"

    # ---- coarse stage
    coarse = None
    if kind == "shift":
        n = min(_SHIFT_MAX_SOURCES, ns, nt)
        bs, bt = sxy[s_order[:n]], txy[t_order[:n]]
        matrix, peak, fap = _coarse_shift(bs, bt, max_shift)
        log.debug("shift search: peak %d pairs at (%.2f, %.2f), false-alarm p=%.2g",
                  peak, matrix[0, 2], matrix[1, 2], fap)
        if peak >= 2 and fap < _FALSE_ALARM:
            coarse = (matrix, False, 2.0 * _SHIFT_BIN)
        detail = (f"the best offset ({matrix[0, 2]:.1f}, {matrix[1, 2]:.1f}) px is shared "
                  f"by only {peak} of the {len(bs)}x{len(bt)} brightest pairs (chance "
                  f"probability {fap:.2g})")
    else:
        detail = "no triangle of bright sources matched"
        best_fap = 1.0
        tried = set()
        for level in _TRIANGLE_LEVELS:
            n_s, n_t = min(level, ns), min(level, nt)
            if (n_s, n_t) in tried:
                continue
            tried.add((n_s, n_t))
            bs, bt = sxy[s_order[:n_s]], txy[t_order[:n_t]]
            res = _coarse_triangles(bs, bt, max_shift, vote_radius, allow_reflection)
            if res is None:
                continue
            mat, _, refl, n_votes, fap, radius = res
            log.debug("triangle search (%d/%d brightest): %d votes, false-alarm p=%.2g",
                      n_s, n_t, n_votes, fap)
            if fap <= best_fap:
                best_fap = fap
                detail = (f"the best triangle match among the {n_s}/{n_t} brightest sources "
                          f"is confirmed by only {n_votes} sources (chance probability "
                          f"{fap:.2g})")
            if fap < _FALSE_ALARM and n_votes >= 3:
                radius = max(radius, 1.0)
                coarse = (mat, refl, radius)
                break
    if coarse is None:
        raise RegistrationError(
            f"no reliable {kind} transform between the catalogs ({counts}): {detail}. Check "
            "that the images overlap and show the same field; lower the detection threshold "
            "to get more sources" + ("; try kind='affine' if the images are rotated or scaled"
                                     if kind == "shift" else
                                     "; try kind='shift' with max_shift for pure offsets"))

    matrix, reflect, radius = coarse
    # ---- refinement with every source
    refined = _refine(sxy, txy, matrix, radius, kind, reflect)
    if refined is None or len(refined[1]) < min_matches:
        n = 0 if refined is None else len(refined[1])
        raise RegistrationError(
            f"{kind} registration found only {n} matched sources ({counts}); at least "
            f"{min_matches} are needed. Lower the detection threshold, or check the images "
            "overlap")
    matrix, pairs, rms = refined
    if rms > max_rms:
        raise RegistrationError(
            f"{kind} registration residuals are too large: rms {rms:.3f} px > max_rms "
            f"{max_rms} px over {len(pairs)} matches ({counts}). The transform may be the "
            "wrong kind (try kind='affine'), the centroids poor (raise the detection "
            "threshold), or the field distorted; raise max_rms to accept it")
    matches = np.column_stack([s_ok[pairs[:, 0]], t_ok[pairs[:, 1]]]).astype(int)
    result = RegistrationResult(matrix=np.asarray(matrix, float), n_matches=len(matches),
                                rms=float(rms), kind=kind, matches=matches)
    log.info("registered (%s): %d matches, rms %.3f px, shift (%.2f, %.2f), scale %.4f, "
             "rotation %.3f deg", kind, result.n_matches, result.rms, *result.shift,
             result.scale, result.rotation_deg)
    return result


def register_images(science_mi, template_mi, *, kind="affine", threshold=10.0, max_shift=None,
                    max_rms=1.0):
    """Detect sources in both images and find the science → template pixel transform.

    Parameters
    ----------
    science_mi, template_mi : MaskedImage or Exposure
        Images to register (parent coordinates, i.e. ``xy0`` is honoured).
    kind : {"affine", "shift"}, optional
        Transform kind, see :func:`find_transform`.
    threshold : float, optional
        Detection threshold in units of the per-pixel noise σ.
    max_shift : float, optional
        Largest plausible displacement in pixels (None: unlimited).
    max_rms : float, optional
        Largest acceptable radial rms (px) of the fit residuals.

    Returns
    -------
    RegistrationResult
        ``matches`` index rows of the detection tables (not returned); the transform maps
        science parent pixel coordinates to template parent pixel coordinates.

    Raises
    ------
    RegistrationError, NoOverlapError
        See :func:`find_transform`.
    """
    from .detect import detect_sources

    cats = []
    for name, mi in (("science", science_mi), ("template", template_mi)):
        cat = detect_sources(mi, threshold=threshold)
        if len(cat) < 3:
            raise RegistrationError(
                f"only {len(cat)} sources detected in the {name} image at threshold "
                f"{threshold}σ; at least 3 are needed to register. Lower the threshold")
        cats.append(cat)
    sc, tc = cats
    return find_transform(np.column_stack([sc["x"], sc["y"]]),
                          np.column_stack([tc["x"], tc["y"]]),
                          science_flux=np.asarray(sc["flux"], float),
                          template_flux=np.asarray(tc["flux"], float),
                          kind=kind, max_shift=max_shift, max_rms=max_rms)
