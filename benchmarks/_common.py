"""What the benchmark scripts share: the simulated scene, the config and machine facts."""

import os
import platform
import resource
import sys

# The simulated scene (see diffim.simulate.simulate_pair): LSST-like Moffat PSFs whose FWHM
# varies across the field, 6000 stars at 4096² and the same density at other sizes.
SCENE = dict(psf="moffat", moffat_beta=3.0, template_fwhm=3.5, science_fwhm=4.6,
             fwhm_gradient=0.2, flux_scale=1.3, n_transients=20)
STARS_AT_4096 = 6000
WARMUP = dict(shape=(256, 256), n_stars=80, seed=123)


def n_stars(size):
    """Stars in a size² scene: ``STARS_AT_4096`` scaled by area (at least 50)."""
    return max(50, round(STARS_AT_4096 * (size / 4096) ** 2))


def config():
    """Default configuration plus a fitted differential background.

    The simulated science image has a sky offset and gradient against the template; without
    a background term the kernel sum would absorb the sky and the benchmark would time a
    wrong subtraction (ip_diffim's ImageDifferenceTask turned it on for the same reason).
    """
    from diffim.config import ImagePsfMatchConfig

    cfg = ImagePsfMatchConfig()
    cfg.kernel.active.fit_for_background = True
    return cfg


def peak_rss_mb():
    """The process's peak resident memory in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024**2 if sys.platform == "darwin" else rss / 1024  # macOS: bytes


def residual_sigma(masked_image):
    """Robust scatter of D/sqrt(var) over valid pixels (≈ 1 for a noise-limited difference)."""
    import numpy as np

    good = (np.isfinite(masked_image.image) & (masked_image.variance > 0)
            & (masked_image.mask == 0))
    if not good.any():
        return float("nan")
    z = masked_image.image[good] / np.sqrt(masked_image.variance[good])
    return float(1.4826 * np.median(np.abs(z - np.median(z))))


def load_average():
    """The 1-minute load average (NaN where the OS does not report it): other processes on the
    machine take CPU from the timed run, which shows as CPU/wall well below the thread count."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def machine_info():
    """Platform, CPU count and library versions for the results header."""
    import astropy
    import numba
    import numpy
    import scipy

    import diffim

    return {"platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "numba_threads": numba.config.NUMBA_NUM_THREADS,
            "python": platform.python_version(), "numpy": numpy.__version__,
            "scipy": scipy.__version__, "numba": numba.__version__,
            "astropy": astropy.__version__, "diffim": diffim.__version__}
