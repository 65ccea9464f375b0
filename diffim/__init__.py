"""diffim: Alard–Lupton PSF-matched difference imaging on numpy, numba, astropy and sep.

The main entry point is :class:`diffim.task.ImagePsfMatchTask` with its four methods
``match_masked_images``, ``subtract_masked_images``, ``match_exposures`` and
``subtract_exposures``.  Public names are imported lazily so that ``import diffim``
stays cheap (numba compiles nothing until a kernel is first used).
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ImagePsfMatchTask": "diffim.task",
    "PsfMatchResult": "diffim.task",
    "ImagePsfMatchConfig": "diffim.config",
    "MaskedImage": "diffim.image",
    "Exposure": "diffim.image",
    "read_fits": "diffim.image",
    "write_fits": "diffim.image",
    "simulate_pair": "diffim.simulate",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffim' has no attribute {name!r}")
