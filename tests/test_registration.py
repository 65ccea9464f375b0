"""Catalog-based registration without a WCS (diffim._registration)."""

import csv
import math

import numpy as np
import pytest

from diffim._registration import RegistrationResult, apply_transform, find_transform, \
    register_images
from diffim.exceptions import ConfigError, NoOverlapError, RegistrationError
from diffim.image import MaskedImage


def _matrix(dx, dy, rot_deg=0.0, scale=1.0, shear=0.0):
    c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    lin = scale * np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    return np.column_stack([lin, [dx, dy]])


def _catalogs(rng, matrix, *, n=600, field=1024.0, noise=0.03, unmatched=0.2):
    """Science/template catalogs of one star field seen through ``matrix``.

    Stars of a large sky area are kept where they fall on each ``field``-sized image; each
    list gets ``unmatched`` × its length of extra sources absent from the other list, and
    independent positional noise and flux scatter. Returns the lists and the true star id of
    each entry (-1 for unmatched ones).
    """
    lin_inv = np.linalg.inv(matrix[:, :2])
    sky = rng.uniform(-0.5 * field, 1.5 * field, (4 * n, 2))  # template pixel frame
    flux = 100.0 * (1.0 + rng.pareto(1.5, len(sky)))
    sci = (sky - matrix[:, 2]) @ lin_inv.T
    lists = []
    for pos in (sci, sky):
        inside = np.flatnonzero(np.all((pos >= 0) & (pos < field), axis=1))
        xy = pos[inside] + rng.normal(0.0, noise, (len(inside), 2))
        f = flux[inside] * np.exp(rng.normal(0.0, 0.1, len(inside)))
        n_extra = int(round(unmatched * len(inside)))
        xy = np.vstack([xy, rng.uniform(0, field, (n_extra, 2))])
        f = np.concatenate([f, 100.0 * (1.0 + rng.pareto(1.5, n_extra))])
        ids = np.concatenate([inside, np.full(n_extra, -1)])
        order = rng.permutation(len(xy))
        lists.append((xy[order], f[order], ids[order]))
    return lists


def _max_error(fitted, truth, science_xy, field=1024.0):
    """Largest |fitted − truth| displacement (px) over the science field that overlaps."""
    g = np.linspace(0.0, field, 33)
    grid = np.column_stack([a.ravel() for a in np.meshgrid(g, g)])
    mapped = apply_transform(truth, grid)
    grid = grid[np.all((mapped >= 0) & (mapped <= field), axis=1)]
    return float(np.max(np.hypot(*(apply_transform(fitted, grid)
                                   - apply_transform(truth, grid)).T)))


def _check_matches(result, s_ids, t_ids, min_fraction=0.99):
    pairs = result.matches
    assert pairs.shape == (result.n_matches, 2)
    correct = s_ids[pairs[:, 0]] == t_ids[pairs[:, 1]]
    correct &= s_ids[pairs[:, 0]] >= 0
    assert correct.mean() >= min_fraction
    return int(correct.sum())


# ---------------------------------------------------------------------------------------------
# synthetic catalogs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["shift", "affine"])
def test_large_shift_partial_overlap(kind):
    rng = np.random.default_rng(11)
    truth = _matrix(173.4, -79.3)  # SAAO-like drift: ~55 % overlap
    (s, sf, sid), (t, tf, tid) = _catalogs(rng, truth, n=800)
    res = find_transform(s, t, science_flux=sf, template_flux=tf, kind=kind)
    assert isinstance(res, RegistrationResult)
    assert res.kind == kind
    assert _max_error(res.matrix, truth, s) < 0.05
    n_true = np.intersect1d(sid[sid >= 0], tid[tid >= 0]).size
    assert _check_matches(res, sid, tid) >= 0.95 * n_true
    assert res.rms < 0.1
    if kind == "shift":
        np.testing.assert_array_equal(res.matrix[:, :2], np.eye(2))


@pytest.mark.parametrize("rot, scale, shear, shift", [
    (5.0, 1.02, 0.0, (40.0, -25.0)),
    (-10.0, 0.95, 0.0, (-120.0, 60.0)),
    (3.0, 1.04, 0.004, (15.0, 170.0)),
])
def test_rotation_scale_recovered(rot, scale, shear, shift):
    rng = np.random.default_rng(int(abs(rot) * 100 + scale * 10))
    truth = _matrix(*shift, rot, scale, shear)
    (s, sf, sid), (t, tf, tid) = _catalogs(rng, truth, n=500)
    res = find_transform(s, t, science_flux=sf, template_flux=tf, kind="affine")
    assert _max_error(res.matrix, truth, s) < 0.05
    assert res.scale == pytest.approx(scale * math.sqrt(1.0), abs=2e-3)
    assert res.rotation_deg == pytest.approx(rot, abs=0.3)
    _check_matches(res, sid, tid)
    # the matched pairs obey the transform to within the noise
    pred = res.apply(s[res.matches[:, 0]])
    assert np.sqrt(np.mean(np.sum((pred - t[res.matches[:, 1]]) ** 2, axis=1))) \
        == pytest.approx(res.rms)


@pytest.mark.parametrize("kind", ["shift", "affine"])
def test_crowded_field(kind):
    """Thousands of sources per list (a bulge-like density of ~3500 per 1024² image)."""
    rng = np.random.default_rng(3)
    truth = _matrix(-150.2, 64.7) if kind == "shift" else _matrix(-150.2, 64.7, 2.0, 1.01)
    (s, sf, sid), (t, tf, tid) = _catalogs(rng, truth, n=3000, noise=0.05)
    assert len(s) > 3000 and len(t) > 3000
    res = find_transform(s, t, science_flux=sf, template_flux=tf, kind=kind)
    assert _max_error(res.matrix, truth, s) < 0.05
    _check_matches(res, sid, tid)


@pytest.mark.parametrize("kind", ["shift", "affine"])
def test_without_fluxes(kind):
    """No fluxes and arbitrary order: the first entries stand in for the brightest."""
    rng = np.random.default_rng(12)
    truth = _matrix(-61.0, 33.3) if kind == "shift" else _matrix(-61.0, 33.3, -6.0, 1.03)
    (s, _, sid), (t, _, tid) = _catalogs(rng, truth, n=150)
    res = find_transform(s, t, kind=kind)
    assert _max_error(res.matrix, truth, s) < 0.05
    _check_matches(res, sid, tid)


@pytest.mark.parametrize("kind", ["shift", "affine"])
def test_sparse_six_stars(kind):
    rng = np.random.default_rng(6)
    truth = _matrix(87.3, -41.9) if kind == "shift" else _matrix(87.3, -41.9, 3.0, 1.01)
    s = rng.uniform(100, 900, (6, 2))
    t = apply_transform(truth, s) + rng.normal(0, 0.02, (6, 2))
    perm = rng.permutation(6)
    res = find_transform(s, t[perm], science_flux=rng.uniform(1, 2, 6),
                         template_flux=rng.uniform(1, 2, 6), kind=kind)
    assert res.n_matches == 6
    np.testing.assert_array_equal(perm[res.matches[:, 1]], res.matches[:, 0])
    err = np.hypot(*(res.apply(s) - apply_transform(truth, s)).T)
    assert err.max() < 0.1


def test_sparse_five_of_six_common():
    """Five shared stars plus one unrelated source in each list."""
    rng = np.random.default_rng(7)
    truth = _matrix(-33.0, 12.5, -4.0, 0.98)
    s = rng.uniform(100, 900, (6, 2))
    t = apply_transform(truth, s) + rng.normal(0, 0.02, (6, 2))
    s[5] = [50.0, 950.0]
    t[5] = [970.0, 30.0]
    res = find_transform(s, t, kind="affine")
    assert res.n_matches == 5
    np.testing.assert_array_equal(res.matches[:, 0], res.matches[:, 1])
    assert 5 not in res.matches
    assert np.hypot(*(res.apply(s[:5]) - apply_transform(truth, s[:5])).T).max() < 0.1


@pytest.mark.parametrize("kind", ["shift", "affine"])
@pytest.mark.parametrize("n", [6, 40, 300, 2000])
def test_unrelated_catalogs_raise(kind, n):
    rng = np.random.default_rng(100 + n)
    for _ in range(3 if n < 300 else 1):
        a = rng.uniform(0, 1024, (n, 2))
        b = rng.uniform(0, 1024, (n + n // 5, 2))
        with pytest.raises(RegistrationError, match="science and .* template sources"):
            find_transform(a, b, science_flux=rng.uniform(1, 10, len(a)),
                           template_flux=rng.uniform(1, 10, len(b)), kind=kind)


def test_too_few_sources():
    with pytest.raises(RegistrationError, match="2 science and 5 template"):
        find_transform(np.zeros((2, 2)), np.arange(10.0).reshape(5, 2))


def test_large_rms_raises():
    rng = np.random.default_rng(9)
    truth = _matrix(20.0, 10.0)
    (s, sf, _), (t, tf, _) = _catalogs(rng, truth, n=400, noise=0.4)
    with pytest.raises(RegistrationError, match="max_rms"):
        find_transform(s, t, science_flux=sf, template_flux=tf, kind="shift", max_rms=0.2)
    res = find_transform(s, t, science_flux=sf, template_flux=tf, kind="shift")
    assert 0.4 < res.rms < 1.0


def test_max_shift():
    rng = np.random.default_rng(4)
    truth = _matrix(60.0, -30.0)
    (s, sf, _), (t, tf, _) = _catalogs(rng, truth, n=400)
    res = find_transform(s, t, science_flux=sf, template_flux=tf, kind="shift", max_shift=80)
    assert res.shift == pytest.approx((60.0, -30.0), abs=0.02)
    with pytest.raises(RegistrationError):
        find_transform(s, t, kind="affine", max_shift=20)
    with pytest.raises(NoOverlapError, match="max_shift"):
        find_transform(s[:3], s[:3] + 500.0, kind="shift", max_shift=10)


def test_non_finite_rows_ignored_and_indices_refer_to_input():
    rng = np.random.default_rng(5)
    truth = _matrix(5.5, -3.25)
    (s, sf, sid), (t, tf, tid) = _catalogs(rng, truth, n=200)
    s[0] = np.nan
    t[3] = [np.inf, 1.0]
    res = find_transform(s, t, science_flux=sf, template_flux=tf, kind="shift")
    assert 0 not in res.matches[:, 0] and 3 not in res.matches[:, 1]
    _check_matches(res, sid, tid)
    assert res.shift == pytest.approx((5.5, -3.25), abs=0.02)


def test_result_helpers():
    m = _matrix(10.0, -4.0, 30.0, 2.0)
    res = RegistrationResult(matrix=m, n_matches=3, rms=0.0, kind="affine",
                             matches=np.zeros((3, 2), int))
    assert res.scale == pytest.approx(2.0)
    assert res.rotation_deg == pytest.approx(30.0)
    p = np.array([[1.0, 2.0], [300.0, -7.0]])
    np.testing.assert_allclose(apply_transform(res.inverse(), res.apply(p)), p, atol=1e-10)
    np.testing.assert_allclose(res.apply(p[0]), apply_transform(m, p)[0])


def test_bad_arguments():
    xy = np.arange(20.0).reshape(10, 2)
    with pytest.raises(ConfigError, match="kind"):
        find_transform(xy, xy, kind="projective")
    with pytest.raises(ConfigError, match=r"\(n, 2\)"):
        find_transform(np.zeros((5, 3)), xy)
    with pytest.raises(ConfigError, match="science_flux"):
        find_transform(xy, xy, science_flux=np.ones(3))
    with pytest.raises(ConfigError, match="max_shift"):
        find_transform(xy, xy, max_shift=-1)


def _star_image(xy, flux, shape=(256, 256), sigma=1.8, sky=100.0, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    img = np.full(shape, sky)
    for (x, y), f in zip(xy, flux):
        img += f / (2 * np.pi * sigma**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2)
                                                   / (2 * sigma**2))
    var = img.copy()
    img = img + rng.normal(0.0, np.sqrt(var))
    return img, var


def test_register_images_parent_coordinates():
    """register_images detects sources itself and works in parent (xy0) coordinates."""
    rng = np.random.default_rng(8)
    truth = _matrix(12.3, -7.6)
    stars = rng.uniform(-20, 280, (80, 2))        # template pixel frame
    flux = rng.uniform(3e3, 4e4, len(stars))
    t_img, t_var = _star_image(stars, flux, seed=1)
    s_img, s_var = _star_image(stars - truth[:, 2], flux, seed=2)
    template = MaskedImage(t_img, variance=t_var)
    science = MaskedImage(s_img, variance=s_var, xy0=(1000, 500))
    res = register_images(science, template, kind="shift", threshold=10.0)
    # parent science coordinates are array coordinates + (1000, 500)
    assert res.shift == pytest.approx((12.3 - 1000.0, -7.6 - 500.0), abs=0.05)
    res = register_images(science, template, kind="affine", threshold=10.0)
    assert res.apply([1128.0, 628.0]) == pytest.approx([140.3, 120.4], abs=0.05)


def test_register_images_blank_image_raises():
    template = MaskedImage(np.zeros((64, 64)), variance=np.ones((64, 64)))
    with pytest.raises(RegistrationError, match="sources detected"):
        register_images(template, template)


# ---------------------------------------------------------------------------------------------
# real data: SAAO 1.0 m bulge frames drifting by up to ~50 px against AKB13475I0100
# ---------------------------------------------------------------------------------------------
#
# Sign convention of frames.tsv: (shift_dx, shift_dy) = position in the frame − position in
# AKB13475I0100, i.e. x_frame = x_0100 + dx. Our matrix maps science (the frame) to template
# (0100) pixels, so for a pure shift matrix[:, 2] == (−dx, −dy).

def _saao_frames(shared_data):
    folder = shared_data / "saao_kb13475"
    table = folder / "frames.tsv"
    if not table.is_file():
        pytest.skip(f"SAAO data not found at {folder}")
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return folder, rows


@pytest.fixture(scope="module")
def saao(shared_data):
    """Reference exposure, frames and their detections (each image detected once)."""
    from diffim.detect import detect_sources
    from diffim.image import read_fits

    folder, rows = _saao_frames(shared_data)
    reference = read_fits(folder / "AKB13475I0100.fits")
    catalogs = {}
    frames = []
    for r in rows:
        exposure = read_fits(folder / r["file"])
        catalogs[r["file"]] = detect_sources(exposure, threshold=10.0)
        frames.append((r["file"], exposure,
                       (float(r["shift_dx_vs_0100_px"]), float(r["shift_dy_vs_0100_px"]))))
    if "AKB13475I0100.fits" not in catalogs:
        catalogs["AKB13475I0100.fits"] = detect_sources(reference, threshold=10.0)
    return reference, frames, catalogs


def _xyf(cat):
    return np.column_stack([cat["x"], cat["y"]]), np.asarray(cat["flux"], float)


@pytest.mark.parametrize("kind", ["shift", "affine"])
def test_saao_frames_recover_listed_shifts(saao, kind):
    """Every frame against AKB13475I0100 recovers the listed drift within 0.3 px."""
    _, frames, catalogs = saao
    t_xy, t_flux = _xyf(catalogs["AKB13475I0100.fits"])
    errors = []
    for name, _, (dx, dy) in frames:
        s_xy, s_flux = _xyf(catalogs[name])
        res = find_transform(s_xy, t_xy, science_flux=s_flux, template_flux=t_flux, kind=kind)
        # displacement at the frame centre (the translation part for a pure shift)
        centre = np.array([256.0, 256.0])
        moved = res.apply(centre) - centre
        err = math.hypot(moved[0] + dx, moved[1] + dy)
        errors.append((err, name))
        assert res.n_matches >= 50, name
        assert res.rms < 0.5, name
        if kind == "shift":
            assert math.hypot(res.shift[0] + dx, res.shift[1] + dy) == pytest.approx(err)
        else:
            assert res.scale == pytest.approx(1.0, abs=1e-3), name
            assert abs(res.rotation_deg) < 0.05, name
    worst = max(errors)
    assert worst[0] < 0.3, f"{worst[1]} off by {worst[0]:.3f} px"


def test_saao_register_images(saao):
    """The convenience entry point on the frame with the largest drift."""
    reference, frames, _ = saao
    name, exposure, (dx, dy) = max(frames, key=lambda f: math.hypot(*f[2]))
    res = register_images(exposure, reference, kind="affine")
    moved = res.apply([256.0, 256.0]) - np.array([256.0, 256.0])
    assert math.hypot(moved[0] + dx, moved[1] + dy) < 0.3, name
