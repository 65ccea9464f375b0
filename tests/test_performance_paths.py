"""The fast paths give the answers of the slow ones.

* numba parallelism and the convolution's thread pool of tiles: a whole subtraction with 1
  and with 2 numba threads, and the parallel and serial mask OR-filters.
* overlap-save tiles: many small tiles against one whole-image float64 correlation.
* float32 convolution: the float32 FFT path against the same computation in float64 and a
  float64 brute-force reference, judged against the image noise; the float32 tiled
  decorrelation against the float64 whole-image formula.
* the numba on-disk cache: several processes compiling into one empty cache at once.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.signal

from diffim import _kernels
from diffim.convolve import _correlate_tiles, convolve_masked_image, correlate_fft
from diffim.decorrelate import decorrelate_difference, decorrelation_kernel
from diffim.image import MaskedImage
from tests import reference as ref

ROOT = Path(__file__).resolve().parents[1]

# A child process: simulate a pair, subtract it, save the difference image to argv[1].
_SUBTRACT = textwrap.dedent("""
    import sys
    import numpy as np
    from diffim.config import ImagePsfMatchConfig
    from diffim.simulate import simulate_pair
    from diffim.task import ImagePsfMatchTask

    size, n_stars, seed = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    pair = simulate_pair(shape=(size, size), n_stars=n_stars, seed=seed)
    config = ImagePsfMatchConfig()
    config.kernel.active.fit_for_background = True
    result = ImagePsfMatchTask(config).subtract_exposures(pair.template, pair.science)
    np.save(sys.argv[1], result.subtracted_exposure.image)
""")


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _argv(out, size, n_stars, seed):
    return [sys.executable, "-c", _SUBTRACT, str(out), str(size), str(n_stars), str(seed)]


# ---------------------------------------------------------------------------------------------
# parallel vs serial
# ---------------------------------------------------------------------------------------------

def test_subtraction_independent_of_numba_threads(tmp_path):
    outs = {}
    for threads in (1, 2):
        out = tmp_path / f"diff_{threads}.npy"
        proc = subprocess.run(_argv(out, 384, 250, 11), env=_env(NUMBA_NUM_THREADS=threads),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[threads] = np.load(out)
    a, b = outs[1], outs[2]
    assert a.shape == b.shape == (384, 384)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    ok = np.isfinite(a)
    assert ok.mean() > 0.8
    scale = np.abs(a[ok]).max()
    # measured (2026-11-23, 2 CPUs): the two differences are bit-identical (max |Δ| = 0 on a
    # scale of 274 ADU); the tolerance leaves room for summation-order changes
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale, equal_nan=True)


@pytest.mark.parametrize("shape, half_x, half_y, density", [
    ((1, 1), 0, 0, 0.5),
    ((37, 53), 3, 3, 0.01),
    ((64, 41), 0, 5, 0.05),
    ((129, 200), 7, 2, 0.002),
    ((50, 50), 30, 30, 0.001),  # window wider than the image
    ((301, 257), 10, 10, 0.0005),
])
def test_or_filter_parallel_equals_serial(shape, half_x, half_y, density):
    rng = np.random.default_rng(sum(shape) + half_x + 7 * half_y)
    bits = rng.integers(0, 31, size=shape)
    mask = np.where(rng.random(shape) < density, np.left_shift(1, bits), 0).astype(np.int32)
    mask[rng.random(shape) < density] |= np.int32(1 << 30)  # a bit in the top plane
    par = _kernels.or_filter_box(mask, half_x, half_y)
    ser = _kernels.or_filter_box_serial(mask, half_x, half_y)
    assert par.dtype == ser.dtype == np.int32
    np.testing.assert_array_equal(par, ser)
    np.testing.assert_array_equal(par, ref.or_filter_box(mask, half_x, half_y))


# ---------------------------------------------------------------------------------------------
# overlap-save tiles
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, k, tile", [
    ((300, 280), 21, 64),    # 7 × 7 tiles of 43 + a 20-pixel overlap
    ((97, 203), 11, 48),     # uneven spans in both directions
    ((40, 41), 9, 512),      # one tile
    ((64, 64), 21, 21),      # a tile no larger than the kernel: 1-pixel spans
])
def test_tiles_match_whole_image_correlation(shape, k, tile):
    rng = np.random.default_rng(k + tile)
    img = rng.normal(100.0, 10.0, size=shape)
    kernels = rng.normal(size=(3, k, k))
    fy = rng.uniform(0.5, 1.5, size=(3, 2, shape[0]))
    fx = rng.uniform(0.5, 1.5, size=(3, 2, shape[1]))
    bad = rng.random(shape) < 0.01
    out = _correlate_tiles(img, kernels, np.empty(shape), weights=(fy, fx), bad=bad,
                           real=np.float64, tile=tile)
    zeroed = np.where(bad, 0.0, img)
    truth = sum((fy[n].T @ fx[n]) * scipy.signal.correlate(zeroed, kernels[n], mode="same")
                for n in range(3))
    np.testing.assert_allclose(out, truth, rtol=0, atol=1e-9 * np.abs(truth).max())


# ---------------------------------------------------------------------------------------------
# float32 vs float64
# ---------------------------------------------------------------------------------------------

def _noise_sigma(mi):
    return float(np.sqrt(np.median(mi.variance)))


def test_float32_fft_matches_float64(fitted):
    mi, kernel = fitted
    func = kernel.function
    terms = kernel.term_kernels()
    ny, nx = mi.shape
    x0, y0 = mi.xy0
    fx, fy = func.axis_factors(np.arange(x0, x0 + nx), np.arange(y0, y0 + ny))
    weights = [(fy[q], fx[p]) for p, q in func.powers]
    assert mi.image.dtype == np.float32
    out32 = correlate_fft(mi.image, terms, weights)
    out64 = correlate_fft(mi.image.astype(np.float64), terms, weights)
    assert out32.dtype == np.float32 and out64.dtype == np.float64
    c = kernel.size // 2
    inner = (slice(c, ny - c), slice(c, nx - c))
    err = np.abs(out32[inner] - out64[inner]).max()
    sigma = _noise_sigma(mi)
    # measured (2026-11-23): max |f32 − f64| = 4.0e-3 ADU against σ = 15.0 ADU, i.e.
    # 2.7e-4 σ (image peak 3.7e4 ADU, 21×21 kernel, 6 spatial terms)
    assert err <= 1e-3 * sigma, (err, sigma, err / sigma)


def test_convolve_masked_image_float32_matches_brute_force_float64(fitted):
    mi, kernel = fitted
    sub = mi.subimage(60, 80, 150, 160)  # a small piece keeps the per-pixel reference quick
    out = convolve_masked_image(sub, kernel)
    assert out.image.dtype == np.float32
    truth = ref.convolve_brute_force(sub.image.astype(np.float64), kernel, sub.xy0)
    ok = np.isfinite(truth)
    np.testing.assert_array_equal(np.isfinite(out.image), ok)
    err = np.abs(out.image[ok] - truth[ok]).max()
    sigma = _noise_sigma(sub)
    # measured (2026-11-23): max |out − truth| = 2.0e-3 ADU against σ = 15.0 ADU, i.e.
    # 1.4e-4 σ (sub-image peak 2.2e4 ADU)
    assert err <= 1e-3 * sigma, (err, sigma, err / sigma)


def test_float32_input_gives_float32_planes():
    rng = np.random.default_rng(1)
    img = rng.normal(100, 10, size=(40, 45)).astype(np.float32)
    mi = MaskedImage(img, variance=np.full(img.shape, 100, np.float32))
    kern = np.zeros((1, 5, 5))
    kern[0, 2, 2] = 1.0
    assert correlate_fft(img, kern).dtype == np.float32
    assert correlate_fft(img.astype(np.float64), kern).dtype == np.float64
    from diffim.spatial import SpatialFunction, SpatialKernel

    k = SpatialKernel(kern, SpatialFunction("chebyshev1", 0, mi.bbox), np.ones((1, 1)))
    out = convolve_masked_image(mi, k)
    assert out.image.dtype == np.float32 and out.variance.dtype == np.float32
    np.testing.assert_allclose(out.image[2:-2, 2:-2], img[2:-2, 2:-2], atol=1e-4)


def test_float32_decorrelation_matches_float64_formula():
    # the decorrelation runs through the float32 tiles; the float64 whole-image formula it
    # replaced: c⋆(D − fill) + fill with zero padding, and c²⋆V_U + (c∗κ)²⋆V_C
    rng = np.random.default_rng(8)
    shape = (300, 260)
    yy, xx = np.mgrid[-10:11, -10:11]
    kern = 1.3 * np.exp(-(xx**2 + yy**2) / (2 * 1.8**2))
    kern /= kern.sum() / 1.3
    v_s = rng.uniform(80.0, 120.0, size=shape)
    v_t = rng.uniform(40.0, 60.0, size=shape)
    v_s[100:110, 50:60] = 5000.0  # a bright source
    img = rng.normal(0.0, np.sqrt(v_s + 1.3**2 * v_t)) + 3.0
    diff = MaskedImage(img.astype(np.float32), variance=(v_s + 1.3**2 * v_t).astype(np.float32))
    out = decorrelate_difference(diff, kern, 100.0, 50.0, variance_planes=(v_s, v_t))
    corr = decorrelation_kernel(kern, 100.0, 50.0)
    d = diff.image.astype(np.float64)
    fill = float(np.median(d))
    img64 = scipy.signal.oaconvolve(d - fill, corr, mode="same") + fill
    g = scipy.signal.fftconvolve(corr, kern, mode="full")
    var64 = (scipy.signal.oaconvolve(v_s, corr**2, mode="same")
             + scipy.signal.oaconvolve(v_t, g[::-1, ::-1] ** 2, mode="same"))
    sigma = np.sqrt(np.median(var64))
    # measured (2026-11-23): max |Δ| = 3e-6 σ in the image and 1e-5 relative in the variance
    # (float32 rounding scales with the brightest pixel of a tile: the 5000 source)
    assert np.abs(out.image - img64).max() <= 1e-4 * sigma
    np.testing.assert_allclose(out.variance, var64, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# numba cache under concurrency
# ---------------------------------------------------------------------------------------------

def test_numba_cache_concurrent_cold_start(tmp_path):
    # ~26 s on 2 CPUs (four cold numba compilations at once), so not marked slow
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    env = _env(NUMBA_CACHE_DIR=cache)
    procs = []
    for i in range(4):
        out = tmp_path / f"cold_{i}.npy"
        procs.append((out, subprocess.Popen(_argv(out, 128, 60, 3), env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)))
    results = []
    for out, proc in procs:
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        assert proc.returncode == 0, err[-3000:]
        results.append(np.load(out))
    assert any(cache.rglob("*.nbi")), "nothing was written to the numba cache"
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])

    warm = tmp_path / "warm.npy"
    proc = subprocess.run(_argv(warm, 128, 60, 3), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(warm), results[0])
