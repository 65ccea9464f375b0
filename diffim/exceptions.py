"""Typed errors and warnings raised by diffim.

Every error derives from :class:`DiffimError`, so callers (and the command
line) can catch one class.  Messages name the file, value or setting at
fault and say what to change.  ``docs/errors.md`` lists every error a user can
meet, its typical causes and what to do about it.
"""

__all__ = [
    "DiffimError",
    "ConfigError",
    "ImageReadError",
    "ImageShapeMismatchError",
    "ImagesNotRegisteredError",
    "NoOverlapError",
    "NoKernelCandidatesError",
    "InsufficientCandidatesError",
    "KernelSolutionError",
    "RegistrationError",
    "DiffimWarning",
]


class DiffimError(Exception):
    """Base class of every error raised by diffim."""


class ConfigError(DiffimError, ValueError):
    """A configuration value, key or combination is invalid."""


class ImageReadError(DiffimError, OSError):
    """An input image is missing, unreadable, truncated or has no usable data."""


class ImageShapeMismatchError(DiffimError, ValueError):
    """Two images that must share a pixel grid have different shapes or origins."""


class ImagesNotRegisteredError(DiffimError):
    """The images have different WCSs and warping was turned off."""


class NoOverlapError(DiffimError):
    """The template and science images do not overlap (enough) on the sky."""


class NoKernelCandidatesError(DiffimError):
    """No usable kernel candidate remains (none found, or all rejected)."""


class InsufficientCandidatesError(NoKernelCandidatesError):
    """Fewer kernel candidates than the configured minimum were found."""


class KernelSolutionError(DiffimError):
    """The kernel or spatial least-squares system could not be solved."""


class RegistrationError(DiffimError):
    """No reliable geometric transform between the two images could be found."""


class DiffimWarning(UserWarning):
    """Warnings about degraded but usable results."""
