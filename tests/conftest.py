"""Shared pytest set-up: a numba cache outside the source tree and the real-data folder."""

import os
import tempfile
from pathlib import Path

import pytest

# Must happen before numba is first imported by a test module.  A per-user directory in the
# system temp dir is reused between runs (compiled kernels are cached) and never pollutes the
# checkout; numba invalidates entries itself when the source changes.
if not os.environ.get("NUMBA_CACHE_DIR"):
    _user = getattr(os, "getuid", lambda: 0)()
    _cache = Path(tempfile.gettempdir()) / f"diffim-numba-cache-{_user}"
    _cache.mkdir(parents=True, exist_ok=True)
    os.environ["NUMBA_CACHE_DIR"] = str(_cache)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root():
    """The repository root (the folder holding ``pyproject.toml`` and ``Snakefile``)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` relative to the repository root, or skip if it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real telescope data not found at {SHARED_DATA} (expected ../shared/data "
                    "next to the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fitted():
    """A simulated template and the kernel fitted to a field whose PSF width changes by 30 %.

    Shared by the convolution tests that compare fast paths with exact per-pixel sums.
    """
    from diffim.config import ImagePsfMatchConfig
    from diffim.simulate import simulate_pair
    from diffim.task import ImagePsfMatchTask

    pair = simulate_pair(shape=(256, 256), n_stars=200, template_fwhm=2.5, science_fwhm=3.8,
                         fwhm_gradient=0.3, seed=5)
    cfg = ImagePsfMatchConfig()
    cfg.kernel.active.fit_for_background = True
    cfg.kernel.active.size_cell_x = cfg.kernel.active.size_cell_y = 64
    res = ImagePsfMatchTask(cfg).subtract_exposures(pair.template, pair.science)
    kernel = res.psf_matching_kernel
    assert kernel.function.order == 2 and not kernel.is_spatially_constant
    return pair.template.masked_image, kernel
