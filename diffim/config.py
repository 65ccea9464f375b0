"""Configuration of PSF matching: ip_diffim's config tree as validated Python dataclasses.

The tree mirrors ``lsst.ip.diffim`` (reference §2), with every ip_diffim field renamed from
camelCase to snake_case (``sizeCellX`` → ``size_cell_x``, ``nStarPerCell`` →
``n_star_per_cell``)::

    ImagePsfMatchConfig
    ├── kernel: KernelChoice            name "AL" | "DF"; .al, .df, .active
    │   ├── al: PsfMatchConfigAL        PsfMatchConfig + Alard–Lupton basis fields
    │   └── df: PsfMatchConfigDF        PsfMatchConfig + delta-function regularization
    │       (each with warping_config, detection_config, afw_background_config)
    ├── select: SourceSelectionConfig   sep-based kernel-source selection (beyond ip_diffim)
    ├── registration: RegistrationConfig  WCS or catalog registration (beyond ip_diffim)
    ├── auto_reduce_spatial_order
    ├── mode                            convolveTemplate | convolveScience | auto
    └── qa: QAConfig                    which diagnostic plots diffim.qa writes

The classes are plain mutable dataclasses: set attributes freely, then call
:meth:`~ImagePsfMatchConfig.validate`, which checks the whole tree and raises
:class:`~diffim.exceptions.ConfigError` naming the dotted key (``kernel.active.kernel_size``),
the bad value and what is allowed.

YAML and dict I/O (:meth:`~ImagePsfMatchConfig.from_yaml`, ``from_dict``, ``to_dict``,
``to_yaml``) use the nested layout below.  On load, ``kernel.active`` applies to the chosen
kernel, ``kernel.AL`` / ``kernel.DF`` (or ``al`` / ``df``) to a specific one, ip_diffim
camelCase names are accepted anywhere, and dotted keys (``kernel.active.fitForBackground``)
work at any level as overrides.  Dumping writes both kernel configs, so dump → load → dump is
exact::

    kernel:
      name: AL
      active:
        sizeCellX: 64
        fit_for_background: true
    select:
      min_snr: 20.0
    mode: auto

One-line meanings of every field are in the dataclass field metadata and collected by
:meth:`ImagePsfMatchConfig.field_docs`.
"""

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from numbers import Integral, Real
from pathlib import Path

import yaml

from ._atomic import atomic_open
from .exceptions import ConfigError

__all__ = [
    "WarpingConfig",
    "DetectionConfig",
    "AfwBackgroundConfig",
    "PsfMatchConfig",
    "PsfMatchConfigAL",
    "PsfMatchConfigDF",
    "SourceSelectionConfig",
    "RegistrationConfig",
    "QAConfig",
    "KernelChoice",
    "ImagePsfMatchConfig",
    "camel_to_snake",
]

_KIND_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number",
               str: "a string"}
_PLURAL_NAMES = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def camel_to_snake(name):
    """Convert an ip_diffim camelCase field name to diffim's snake_case.

    Parameters
    ----------
    name : str
        For example ``"sizeCellX"``, ``"alardNGauss"``, ``"useBicForKernelBasis"``.

    Returns
    -------
    str
        ``"size_cell_x"``, ``"alard_n_gauss"``, ``"use_bic_for_kernel_basis"``.
        snake_case input is returned unchanged.
    """
    # Break before an upper-case letter that follows a lower-case letter or digit, and
    # before the last capital of a run followed by lower case ("alardNGauss" -> N_Gauss).
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _f(default, doc, **checks):
    """A dataclass field with a one-line ``doc`` and optional checks.

    ``checks`` may hold ``ge``, ``gt``, ``le`` (bounds) and ``choices``; for list fields they
    apply to every item.
    """
    return dataclasses.field(default=default, metadata={"doc": doc, **checks})


def _sub(cls, doc):
    """A nested config field (a fresh ``cls()`` per instance)."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc})


def _override(base, name, default):
    """Redeclare field ``name`` of ``base`` with a new default, keeping its doc and checks."""
    return dataclasses.field(default=default, metadata=base.__dataclass_fields__[name].metadata)


def _fail(where, value, what):
    return ConfigError(f"{where} = {value!r} is invalid: {what}")


def _check_scalar(value, kind, meta, where):
    """Type, NaN, bound and choice checks of one scalar against annotation ``kind``."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        # bool is an int subclass in Python, but true/false for a count is a mistake
        ok = isinstance(value, Integral) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, Real) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise _fail(where, value, f"expected {_KIND_NAMES[kind]}, got {type(value).__name__}")
    if kind is float and math.isnan(value):
        raise _fail(where, value, "NaN is not allowed")
    if kind is str and not value:
        raise _fail(where, value, "expected a non-empty string")
    for key, test, text in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                            ("le", lambda v, b: v <= b, "<=")):
        if key in meta and not test(value, meta[key]):
            raise _fail(where, value, f"must be {text} {meta[key]!r}")
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise _fail(where, value, f"must be one of {allowed}")


def _check_field(value, field, where):
    """Check ``value`` against a field's annotation (scalar, list or optional) and checks."""
    kind = field.type
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        if value is None:
            return
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is tuple:
        item_kind = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            raise _fail(where, value, f"expected a list of {_PLURAL_NAMES[item_kind]}")
        for i, item in enumerate(value):
            _check_scalar(item, item_kind, field.metadata, f"{where}[{i}]")
        return
    _check_scalar(value, kind, field.metadata, where)


def _coerce(value, kind):
    """Normalize a loaded value: lists → tuples, ints → floats where a float is expected."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, typing.get_args(kind)[0]) for v in value)
        return value
    if kind is float and isinstance(value, Integral) and not isinstance(value, bool):
        return float(value)
    return value


def _plain(value, kind):
    """Builtin (YAML-safe) form of a field value: lists, floats for float fields, no numpy."""
    if isinstance(value, _Config):
        return value.to_dict()
    if value is None:
        return None
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is tuple:
        if isinstance(value, (list, tuple)):
            return [_plain(v, typing.get_args(kind)[0]) for v in value]
        return value
    if kind is float and isinstance(value, Real) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _expand_dotted(data, where):
    """Copy of mapping ``data`` with dotted keys ``"a.b": v`` folded into ``{"a": {"b": v}}``.

    A dotted key overrides the same key given in nested form.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'the config'} must be a mapping of keys to values, "
                          f"got {type(data).__name__} {data!r}")
    out = {}
    dotted = []
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} under {where or 'the top level'} must be "
                              "a string")
        if "." in key:
            dotted.append((key, value))
        else:
            out[key] = value
    for key, value in dotted:
        head, _, rest = key.partition(".")
        if not head or not rest:
            raise ConfigError(f"config key '{where}{key}' is malformed: empty part in a "
                              "dotted key")
        inner = out.get(head)
        if inner is None:
            inner = {}
        elif not isinstance(inner, Mapping):
            raise ConfigError(f"config key {where}{key} conflicts with {where}{head} = "
                              f"{inner!r}, which is not a section")
        out[head] = {**inner, rest: value}
    return out


def _unknown_key(key, valid, where, hint=""):
    """ConfigError for an unknown key: ``hint`` if given, else the closest valid names."""
    close = difflib.get_close_matches(camel_to_snake(key), valid, n=3, cutoff=0.6)
    if hint:
        advice = hint
    elif close:
        advice = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        advice = "valid keys here: " + ", ".join(valid)
    return ConfigError(f"unknown config key '{where}{key}': {advice}")


def _section(value, where):
    """A nested section's mapping; an empty YAML section (None) counts as empty."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where.rstrip('.')} must be a section (a mapping of keys to "
                          f"values), got {type(value).__name__} {value!r}")
    return value


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``5e7`` and ``1.0e6`` as floats (YAML 1.2), not strings."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class _Config:
    """Behaviour shared by every config dataclass: validation, dict/YAML I/O, field docs."""

    # -- validation -------------------------------------------------------------------------

    def validate(self):
        """Check every field of this config and of its nested configs.

        Raises
        ------
        ConfigError
            Naming the dotted key, the bad value and what is allowed.
        """
        self._validate("")

    def _validate(self, prefix):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            where = prefix + field.name
            if isinstance(field.type, type) and issubclass(field.type, _Config):
                if not isinstance(value, field.type):
                    raise _fail(where, value, f"expected a {field.type.__name__}")
                value._validate(where + ".")
            else:
                _check_field(value, field, where)
        self._check(prefix)

    def _check(self, prefix):
        """Cross-field and special-case checks beyond the per-field metadata."""

    # -- dict and YAML I/O ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data):
        """Build a validated config from a (nested) mapping.

        Parameters
        ----------
        data : Mapping or None
            Keys are field names in snake_case or ip_diffim camelCase; dotted keys such as
            ``"kernel.active.fitForBackground"`` are allowed.  Missing keys keep their
            defaults; None gives the default config.

        Returns
        -------
        config
            A new instance of this class.

        Raises
        ------
        ConfigError
            For unknown keys (with suggestions), wrong types or invalid values.
        """
        config = cls()
        if data is not None:
            config._update(data, "")
        config.validate()
        return config

    def _update(self, data, prefix):
        """Apply the mapping ``data`` onto this config in place (no validation)."""
        by_name = {f.name: f for f in dataclasses.fields(self)}
        seen = {}
        for key, value in _expand_dotted(data, prefix).items():
            name = key if key in by_name else camel_to_snake(key)
            if name not in by_name:
                raise _unknown_key(key, list(by_name), prefix, self._unknown_hint(name))
            if name in seen:
                raise ConfigError(f"config keys '{prefix}{seen[name]}' and '{prefix}{key}' "
                                  "both set the same field; keep one")
            seen[name] = key
            field = by_name[name]
            current = getattr(self, name)
            if isinstance(current, _Config):
                current._update(_section(value, prefix + name), f"{prefix}{name}.")
            else:
                setattr(self, name, _coerce(value, field.type))

    def _unknown_hint(self, name):
        """Advice for an unknown key that is valid elsewhere ("" if none)."""
        return ""

    def to_dict(self):
        """Plain nested dict of builtins (lists, not tuples) that :meth:`from_dict` reads back.

        Returns
        -------
        dict
        """
        return {f.name: _plain(getattr(self, f.name), f.type) for f in dataclasses.fields(self)}

    @classmethod
    def from_yaml(cls, source):
        """Build a validated config from a YAML file or YAML text.

        Parameters
        ----------
        source : str or os.PathLike
            A path to an existing file, or YAML text.  A one-line string ending in
            ``.yaml``/``.yml`` is taken as a path and must exist.  Empty YAML gives the
            default config.

        Returns
        -------
        config
            A new instance of this class.

        Raises
        ------
        ConfigError
            If the file is missing or unreadable, the YAML does not parse, or the content is
            invalid (see :meth:`from_dict`).
        """
        origin = "YAML text"
        if isinstance(source, os.PathLike) or (isinstance(source, str)
                                                and _looks_like_path(source)):
            path = Path(source)
            origin = f"config file {str(path)!r}"
            if not path.is_file():
                raise ConfigError(f"{origin} does not exist; check the path")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read {origin}: {exc}") from exc
        elif isinstance(source, str):
            text = source
        else:
            raise ConfigError(f"from_yaml needs a path or YAML text, got "
                              f"{type(source).__name__}")
        try:
            data = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse {origin} as YAML: {exc}") from exc
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"{origin} must hold a mapping of config keys, got "
                              f"{type(data).__name__} {data!r} (if this was meant as a file "
                              "path, the file does not exist)")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            if origin == "YAML text":
                raise
            raise ConfigError(f"in {origin}: {exc}") from exc

    def to_yaml(self, path=None):
        """Validate and dump as YAML; optionally write it to ``path`` atomically.

        Parameters
        ----------
        path : str or os.PathLike, optional
            Output file.  Written to a temporary file in the same directory and moved into
            place with :func:`os.replace`, so readers never see a partial file.

        Returns
        -------
        str
            The YAML text.
        """
        self.validate()
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            _write_atomic(Path(path), text)
        return text

    # -- documentation ----------------------------------------------------------------------

    @classmethod
    def field_docs(cls, prefix=""):
        """One-line meaning of every field, keyed by dotted path (nested configs included).

        Parameters
        ----------
        prefix : str
            Prepended to every key.

        Returns
        -------
        dict[str, str]
        """
        docs = {}
        for field in dataclasses.fields(cls):
            docs[prefix + field.name] = field.metadata["doc"]
            if isinstance(field.type, type) and issubclass(field.type, _Config):
                docs.update(field.type.field_docs(f"{prefix}{field.name}."))
        return docs


def _looks_like_path(text):
    """True if the string names an existing file, or is one line ending in .yaml/.yml."""
    if "\n" in text:
        return False
    try:
        if Path(text).is_file():
            return True
    except (OSError, ValueError):  # too long or NUL byte: not a usable path, so YAML text
        return False
    return text.strip().lower().endswith((".yaml", ".yml"))


def _write_atomic(path, text):
    with atomic_open(path, "w") as fh:
        fh.write(text)


# ---------------------------------------------------------------------------------------------
# nested configs of PsfMatchConfig
# ---------------------------------------------------------------------------------------------

_LANCZOS = ("lanczos2", "lanczos3", "lanczos4", "lanczos5")


@dataclasses.dataclass
class WarpingConfig(_Config):
    """Template warping (afw ``WarperConfig``; reference §2.2 and §3.14)."""

    warping_kernel_name: str = _f(
        "lanczos3", "Image and variance warping kernel: lanczos2..lanczos5.", choices=_LANCZOS)
    mask_warping_kernel_name: str = _f(
        "bilinear", "Mask warping kernel: bilinear, nearest or lanczos2..lanczos5.",
        choices=("bilinear", "nearest", *_LANCZOS))
    interp_length: int = _f(
        10, "Pixels between exactly computed WCS positions (linear in between; 0 = every "
        "pixel).", ge=0)
    cache_size: int = _f(
        1000000, "Size of the tabulated warping-kernel cache (0 = compute exactly).", ge=0)
    grow_full_mask: tuple[str, ...] = _f(
        ("EDGE",), "Mask planes spread over the full warping-kernel footprint, not bilinearly.")


@dataclasses.dataclass
class DetectionConfig(_Config):
    """Kernel-candidate stamp rules (ip_diffim ``DetectionConfig``, reference §2.1).

    Only ``bad_mask_planes``, ``fp_grow_kernel_scaling``, ``fp_grow_pix`` and
    ``scale_by_fwhm`` have an effect, as in ip_diffim's Python path; the others are kept
    (and checked) so ip_diffim configs load unchanged.  Detection itself is configured by
    :class:`SourceSelectionConfig`.
    """

    det_threshold: float = _f(
        10.0, "Footprint detection threshold (unused, as in ip_diffim).", ge=3.0)
    det_threshold_type: str = _f(
        "pixel_stdev", "Threshold type: value, stdev, variance, pixel_stdev (unused).",
        choices=("value", "stdev", "variance", "pixel_stdev"))
    det_on_template: bool = _f(
        True, "Detect on the template (unused; see select.detect_on).")
    bad_mask_planes: tuple[str, ...] = _f(
        ("NO_DATA", "EDGE", "SAT"),
        "A candidate stamp with any of these mask bits in either image is rejected.")
    fp_npix_min: int = _f(5, "Minimum footprint area in pixels (unused).", ge=5)
    fp_npix_max: int = _f(500, "Maximum footprint area in pixels (unused).", le=500)
    fp_grow_kernel_scaling: float = _f(
        1.0, "Stamp half-width = int(fp_grow_kernel_scaling * kernel_size + 0.5) when "
        "scale_by_fwhm.", ge=1.0)
    fp_grow_pix: int = _f(30, "Stamp half-width in pixels when scale_by_fwhm is false.", ge=10)
    scale_by_fwhm: bool = _f(
        True, "Size stamps from the kernel size (true) or use fp_grow_pix (false).")


@dataclasses.dataclass
class AfwBackgroundConfig(_Config):
    """Background model before detection (meas_algorithms ``SubtractBackgroundConfig``).

    Kept so ip_diffim configs load; diffim's sep-based selection uses
    ``select.background_box`` instead, so these settings have no effect.
    """

    bin_size: int = _f(128, "Background superpixel size in pixels (no effect).", ge=1)
    algorithm: str = _f(
        "AKIMA_SPLINE", "Interpolation between superpixels (no effect).",
        choices=("CONSTANT", "LINEAR", "NATURAL_SPLINE", "CUBIC_SPLINE",
                 "CUBIC_SPLINE_PERIODIC", "AKIMA_SPLINE", "AKIMA_SPLINE_PERIODIC"))
    statistic: str = _f("MEANCLIP", "Per-superpixel statistic (no effect).",
                        choices=("MEANCLIP", "MEAN", "MEDIAN"))
    ignored_pixel_mask: tuple[str, ...] = _f(
        ("BAD", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA"),
        "Mask planes left out of the background (no effect).")
    use_approx: bool = _f(True, "Fit a Chebyshev approximation to the superpixels (no effect).")
    approx_order_x: int = _f(6, "Order of that approximation (no effect).", ge=0)


# ---------------------------------------------------------------------------------------------
# kernel configs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PsfMatchConfig(_Config):
    """Settings shared by both kernel bases (ip_diffim ``PsfMatchConfig``, reference §2.2).

    Defaults follow ip_diffim; ``n_star_per_cell`` uses the current ip_diffim default 5
    (the 2023 ImagePsfMatchTask had 3), with -1 meaning every candidate in the cell.
    ``use_afw_background`` is accepted but has no effect (it was never read in ip_diffim);
    ``calculate_kernel_uncertainty`` must stay false (unsupported, as in ip_diffim).
    """

    warping_config: WarpingConfig = _sub(WarpingConfig, "Template warping settings.")
    detection_config: DetectionConfig = _sub(
        DetectionConfig, "Kernel-candidate stamp size and mask rejection.")
    afw_background_config: AfwBackgroundConfig = _sub(
        AfwBackgroundConfig, "ip_diffim's pre-detection background settings (no effect).")
    use_afw_background: bool = _f(
        False, "Accepted for ip_diffim compatibility; has no effect (never read in ip_diffim).")
    fit_for_background: bool = _f(
        False, "Fit a differential background: a constant per stamp and a spatial polynomial.")
    kernel_basis_set: str = _f(
        "alard-lupton", "Basis: alard-lupton (AL) or delta-function (DF); fixed by the class.",
        choices=("alard-lupton", "delta-function"))
    kernel_size: int = _f(
        21, "Kernel width and height in pixels (odd); AL derives it from the FWHMs when "
        "scale_by_fwhm.", ge=1)
    scale_by_fwhm: bool = _f(
        True, "Derive the AL Gaussian sigmas and the kernel size from the PSF FWHMs.")
    kernel_size_fwhm_scaling: float = _f(
        6.0, "FWHM-derived kernel size = int(scaling * largest AL sigma), forced odd.", ge=1.0)
    kernel_size_min: int = _f(21, "Smallest FWHM-derived kernel size (odd).", ge=1)
    kernel_size_max: int = _f(35, "Largest FWHM-derived kernel size (odd).", ge=1)
    spatial_model_type: str = _f(
        "chebyshev1", "Spatial functions: chebyshev1 (on the image bbox) or polynomial "
        "(in parent pixel coordinates).", choices=("chebyshev1", "polynomial"))
    spatial_kernel_order: int = _f(
        2, "Polynomial order of the spatial variation of each kernel coefficient.", ge=0)
    spatial_bg_order: int = _f(
        1, "Polynomial order of the spatial differential background (if fit_for_background).",
        ge=0)
    size_cell_x: int = _f(128, "Width in pixels of the cells that spread candidates.", ge=32)
    size_cell_y: int = _f(128, "Height in pixels of the cells that spread candidates.", ge=32)
    n_star_per_cell: int = _f(
        5, "Candidates used per cell (best first, BAD skipped); -1 = all (ip_diffim HEAD "
        "default 5; it was 3 in 2023).")
    max_spatial_iterations: int = _f(
        3, "Maximum spatial fit-and-reject iterations.", ge=1, le=5)
    use_pca_for_spatial_kernel: bool = _f(
        False, "Replace the basis by a PCA of the single-stamp kernels before the spatial fit.")
    subtract_mean_for_pca: bool = _f(
        True, "Subtract the mean kernel before the PCA; the mean becomes basis 0.")
    num_principal_components: int = _f(
        5, "PCA basis kernels kept, including the mean.", ge=3)
    single_kernel_clipping: bool = _f(
        True, "Reject candidates whose single-kernel residuals fail the mean/std cuts.")
    kernel_sum_clipping: bool = _f(True, "Reject candidates with outlying kernel sums.")
    spatial_kernel_clipping: bool = _f(
        True, "Reject candidates whose spatial-model residuals fail the mean/std cuts.")
    check_condition_number: bool = _f(
        False, "Reject a candidate whose normal matrix exceeds max_condition_number.")
    bad_mask_planes: tuple[str, ...] = _f(
        ("NO_DATA", "EDGE", "SAT"), "Mask planes left out of the residual statistics.")
    candidate_residual_mean_max: float = _f(
        0.25, "Largest allowed |mean| of a stamp's difference / sigma.", ge=0.0)
    candidate_residual_std_max: float = _f(
        1.50, "Largest allowed std of a stamp's difference / sigma.", ge=0.0)
    use_core_stats: bool = _f(
        False, "Compute the residual cuts on the (2r+1)^2 core only, not the whole stamp.")
    candidate_core_radius: int = _f(
        3, "Core radius r for use_core_stats and for the candidate rating.", ge=1)
    max_ksum_sigma: float = _f(
        3.0, "Reject kernel sums more than this many clipped std from the clipped mean.",
        ge=0.0)
    max_condition_number: float = _f(
        5e7, "Condition-number limit for check_condition_number (AL 5e7, DF 5e6).", gt=0.0)
    condition_number_type: str = _f(
        "EIGENVALUE", "Condition number as SVD (smax/smin) or EIGENVALUE (lmax/lmin).",
        choices=("SVD", "EIGENVALUE"))
    max_spatial_condition_number: float = _f(
        1e10, "Spatial-fit condition number above which a warning is logged.", gt=0.0)
    iterate_single_kernel: bool = _f(
        False, "Refit each stamp once with the first-pass difference variance (needs "
        "constant_variance_weighting false).")
    constant_variance_weighting: bool = _f(
        True, "Weight each stamp by its median variance instead of per pixel.")
    calculate_kernel_uncertainty: bool = _f(
        False, "Must be false: kernel uncertainties are not supported (dead in ip_diffim).")
    use_bic_for_kernel_basis: bool = _f(
        False, "Choose the AL polynomial degrees by a BIC scan.")

    def _check(self, prefix):
        for name in ("kernel_size", "kernel_size_min", "kernel_size_max"):
            value = getattr(self, name)
            if value % 2 == 0:
                raise _fail(prefix + name, value, "must be odd (the kernel has a centre pixel)")
        if self.kernel_size_min > self.kernel_size_max:
            raise ConfigError(
                f"{prefix}kernel_size_min = {self.kernel_size_min} is greater than "
                f"{prefix}kernel_size_max = {self.kernel_size_max}; make min <= max")
        if self.n_star_per_cell < 1 and self.n_star_per_cell != -1:
            raise _fail(prefix + "n_star_per_cell", self.n_star_per_cell,
                        "must be >= 1, or -1 for all candidates in a cell")
        if self.calculate_kernel_uncertainty:
            raise _fail(prefix + "calculate_kernel_uncertainty", True,
                        "kernel uncertainties are not supported (the option is dead in "
                        "ip_diffim, whose code throws 'not supported'); set it to false")
        expected = self._basis_set()
        if expected is not None and self.kernel_basis_set != expected:
            raise _fail(prefix + "kernel_basis_set", self.kernel_basis_set,
                        f"must be {expected!r} in a {type(self).__name__}; choose the basis "
                        "with kernel.name (AL or DF)")

    @classmethod
    def _basis_set(cls):
        """The only ``kernel_basis_set`` this class allows (None: either)."""
        return None


@dataclasses.dataclass
class PsfMatchConfigAL(PsfMatchConfig):
    """Alard–Lupton basis: Gaussians times polynomials (ip_diffim ``PsfMatchConfigAL``, §2.3).

    ``alard_deg_gauss_deconv`` and ``alard_n_gauss_deconv`` are accepted but unused, as in
    current ip_diffim (deconvolution uses ``alard_n_gauss``/``alard_deg_gauss`` with sigmas
    from ``alard_min_sig_deconv``).
    """

    kernel_basis_set: str = _override(PsfMatchConfig, "kernel_basis_set", "alard-lupton")
    max_condition_number: float = _override(PsfMatchConfig, "max_condition_number", 5e7)
    alard_n_gauss: int = _f(3, "Number of Gaussians in the basis.", ge=1)
    alard_deg_gauss: tuple[int, ...] = _f(
        (4, 2, 2), "Polynomial degree of each Gaussian (alard_n_gauss entries).", ge=0)
    alard_sig_gauss: tuple[float, ...] = _f(
        (0.7, 1.5, 3.0), "Gaussian sigmas in pixels, used without FWHMs or scale_by_fwhm "
        "(alard_n_gauss entries).", gt=0.0)
    alard_gauss_beta: float = _f(
        2.0, "Ratio between successive FWHM-derived sigmas.", gt=0.0)
    alard_min_sig: float = _f(
        0.7, "Smallest FWHM-derived sigma when convolving the narrower PSF.", ge=0.25)
    alard_deg_gauss_deconv: int = _f(
        3, "Deprecated and unused (ip_diffim HEAD).", ge=1)
    alard_min_sig_deconv: float = _f(
        0.4, "Smallest FWHM-derived sigma when the kernel must deconvolve.", ge=0.25)
    alard_n_gauss_deconv: int = _f(
        3, "Deprecated and unused (ip_diffim HEAD).", ge=1)

    def _check(self, prefix):
        super()._check(prefix)
        n = self.alard_n_gauss
        for name in ("alard_deg_gauss", "alard_sig_gauss"):
            value = getattr(self, name)
            if len(value) != n:
                raise _fail(prefix + name, list(value),
                            f"needs alard_n_gauss = {n} entries, has {len(value)}; make "
                            f"{prefix}alard_deg_gauss, {prefix}alard_sig_gauss and "
                            f"{prefix}alard_n_gauss agree")

    @classmethod
    def _basis_set(cls):
        return "alard-lupton"

    def _unknown_hint(self, name):
        if name in PsfMatchConfigDF.__dataclass_fields__:
            return f"{name!r} is a delta-function setting; use it with kernel.name DF"
        return ""


_RISK_MODES = ("minimizeBiasedRisk", "minimizeUnbiasedRisk")


@dataclasses.dataclass
class PsfMatchConfigDF(PsfMatchConfig):
    """Delta-function basis with regularization (ip_diffim ``PsfMatchConfigDF``, §2.4).

    The λ-scan settings (``lambda_step_type``, ``lambda_min``, ``lambda_max``,
    ``lambda_step``) are accepted but unused: the scan modes of ``lambda_type`` are broken
    in ip_diffim and rejected here.
    """

    kernel_basis_set: str = _override(PsfMatchConfig, "kernel_basis_set", "delta-function")
    max_condition_number: float = _override(PsfMatchConfig, "max_condition_number", 5e6)
    use_pca_for_spatial_kernel: bool = _override(
        PsfMatchConfig, "use_pca_for_spatial_kernel", True)
    subtract_mean_for_pca: bool = _override(PsfMatchConfig, "subtract_mean_for_pca", True)
    use_regularization: bool = _f(True, "Add lambda * H to each stamp's normal matrix.")
    regularization_type: str = _f(
        "centralDifference", "Regularization: centralDifference (Laplacian stencil) or "
        "forwardDifference.", choices=("centralDifference", "forwardDifference"))
    central_regularization_stencil: int = _f(
        9, "Laplacian stencil for centralDifference: 5 or 9 points.", choices=(5, 9))
    forward_regularization_orders: tuple[int, ...] = _f(
        (1, 2), "Derivative orders penalized by forwardDifference (each 1..3).", ge=1, le=3)
    regularization_border_penalty: float = _f(
        3.0, "Extra diagonal penalty on the kernel's border pixels.", ge=0.0)
    lambda_type: str = _f(
        "absolute", "lambda = lambda_value (absolute) or tr(M)/tr(H) * lambda_scaling "
        "(relative).", choices=("absolute", "relative"))
    lambda_value: float = _f(0.2, "Regularization strength for lambda_type absolute.", ge=0.0)
    lambda_scaling: float = _f(1e-4, "Scale factor for lambda_type relative.", ge=0.0)
    lambda_step_type: str = _f(
        "log", "Spacing of the lambda scan: log or linear (unused).", choices=("log", "linear"))
    lambda_min: float = _f(-1.0, "Start of the lambda scan (unused).")
    lambda_max: float = _f(2.0, "End of the lambda scan (unused).")
    lambda_step: float = _f(0.1, "Step of the lambda scan (unused).")

    def _validate(self, prefix):
        # before the generic choice check, so the message says why these modes are refused
        if self.lambda_type in _RISK_MODES:
            raise _fail(prefix + "lambda_type", self.lambda_type,
                        "the risk-minimizing lambda scans are broken in ip_diffim (their code "
                        "reads settings the config never defines) and are not supported; use "
                        "'absolute' or 'relative'")
        super()._validate(prefix)

    def _check(self, prefix):
        super()._check(prefix)
        if not self.forward_regularization_orders:
            raise _fail(prefix + "forward_regularization_orders", [],
                        "needs at least one derivative order in 1..3")

    @classmethod
    def _basis_set(cls):
        return "delta-function"

    def _unknown_hint(self, name):
        if name in PsfMatchConfigAL.__dataclass_fields__:
            return f"{name!r} is an Alard-Lupton setting; use it with kernel.name AL"
        return ""


# ---------------------------------------------------------------------------------------------
# top level
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SourceSelectionConfig(_Config):
    """sep-based selection of kernel sources (diffim's replacement of ip_diffim's selector).

    See :func:`diffim.detect.select_kernel_sources` for how each cut is applied.
    """

    detection_threshold: float = _f(
        10.0, "Detection threshold in units of the per-pixel noise (sigma).", gt=0.0)
    detect_on: str = _f("science", "Image to detect on: science or template.",
                        choices=("science", "template"))
    min_snr: float = _f(10.0, "Smallest S/N of a kernel source.", ge=0.0)
    max_snr: float = _f(500.0, "Largest S/N of a kernel source (brighter may be saturated).",
                        gt=0.0)
    max_kernel_sources: int = _f(1000, "Keep at most this many sources, highest S/N first.",
                                 ge=1)
    min_kernel_sources: int = _f(
        3, "Fewer surviving sources raise InsufficientCandidatesError.", ge=1)
    isolation_radius: float | None = _f(
        None, "Radius in pixels within which a bright neighbour rejects a source (null = the "
        "stamp half-width).", ge=0.0)
    max_ellipticity: float = _f(0.5, "Largest ellipticity 1 - b/a of a kernel source.",
                                ge=0.0, le=1.0)
    reject_blended: bool = _f(
        True, "Reject every source sep deblended from a neighbour; false (crowded fields) "
        "keeps them and relies on the isolation rules.")
    neighbour_flux_fraction: float = _f(
        0.1, "A neighbour within the isolation radius rejects a source only if brighter than "
        "this fraction of its flux.", ge=0.0)
    target_kernel_sources: int = _f(
        10, "With isolation_radius null, shrink the isolation radius while fewer sources "
        "than this survive.", ge=1)
    background_box: int = _f(64, "Background mesh size in pixels for detection.", ge=1)
    exclude_mask_planes: tuple[str, ...] = _f(
        ("NO_DATA", "BAD", "SAT", "EDGE"),
        "Reject a source whose stamp has any of these mask bits in either image.")

    def _check(self, prefix):
        if self.min_snr > self.max_snr:
            raise ConfigError(f"{prefix}min_snr = {self.min_snr!r} is greater than "
                              f"{prefix}max_snr = {self.max_snr!r}; make min_snr <= max_snr")
        if self.min_kernel_sources > self.max_kernel_sources:
            raise ConfigError(
                f"{prefix}min_kernel_sources = {self.min_kernel_sources} is greater than "
                f"{prefix}max_kernel_sources = {self.max_kernel_sources}; make min <= max")


@dataclasses.dataclass
class RegistrationConfig(_Config):
    """How the template is brought onto the science pixel grid (beyond ip_diffim).

    With ``method`` "auto", two different WCSs are used directly (the template is warped
    with the WCS pair); when either image has no WCS and the pixel grids differ, stars
    detected in both images are matched to fit a ``transform`` (catalog registration).
    "wcs" never uses catalogs; "catalog" always does, ignoring the WCSs.
    """

    method: str = _f(
        "auto", "Registration: auto (WCS when both images have one, else catalogs), wcs or "
        "catalog.", choices=("auto", "wcs", "catalog"))
    transform: str = _f(
        "affine", "Catalog-registration transform: shift or affine.",
        choices=("shift", "affine"))
    min_overlap_fraction: float = _f(
        0.1, "Smallest fraction of the science image the warped template must cover.",
        gt=0.0, le=1.0)
    detection_threshold: float = _f(
        10.0, "Detection threshold (sigma) of the stars used for catalog registration.",
        gt=0.0)
    max_shift: float | None = _f(
        None, "Largest offset in pixels allowed for catalog registration (null = any).",
        gt=0.0)


@dataclasses.dataclass
class QAConfig(_Config):
    """Diagnostic plots of :func:`diffim.qa.make_qa_plots` (ip_diffim's lsstDebug displays).

    The switches carry the snake_case names of ip_diffim's debug keys (``displayCandidates``
    → ``display_candidates``), so those load as aliases; the plots are PNG files, not
    display windows.
    """

    display_candidates: bool = _f(
        True, "Stamps and residuals of the kernel candidates (candidates.png).")
    display_kernel_basis: bool = _f(True, "Mosaic of the kernel basis images (kernel_basis.png).")
    display_kernel_mosaic: bool = _f(
        True, "Spatial kernel realised on a grid across the image (kernel_mosaic.png).")
    plot_kernel_spatial_model: bool = _f(
        True, "Spatial model of each kernel coefficient vs the single-kernel fits "
        "(spatial_model.png).")
    display_spatial_cells: bool = _f(
        True, "Spatial cells and candidate status on the science image (spatial_cells.png).")
    display_diff_im: bool = _f(
        True, "Template, matched image, science, difference and D/sigma histogram "
        "(difference.png).")
    show_bad_candidates: bool = _f(
        True, "Include BAD candidates in the candidate and spatial-model plots.")
    max_candidates: int = _f(
        30, "Most candidates shown in candidates.png (the best by rating).", ge=1)
    kernel_mosaic_grid: int = _f(
        7, "Kernels per side of the kernel_mosaic.png grid.", ge=2, le=20)


_KERNEL_KEYS = {"name": "name", "active": "active", "AL": "AL", "al": "AL", "DF": "DF",
                "df": "DF"}


@dataclasses.dataclass
class KernelChoice(_Config):
    """Choice between the AL and DF kernel configs (like an LSST ``ConfigChoiceField``).

    Both sub-configs always exist; ``name`` picks the one used, available as
    :attr:`active`.  In YAML the section is ``{name, AL, DF}``; ``active`` is also accepted
    on load and applies to the chosen one.
    """

    name: str = _f("AL", "Kernel basis in use: AL (Alard-Lupton) or DF (delta function).",
                   choices=("AL", "DF"))
    al: PsfMatchConfigAL = _sub(PsfMatchConfigAL, "Alard-Lupton kernel settings.")
    df: PsfMatchConfigDF = _sub(PsfMatchConfigDF, "Delta-function kernel settings.")

    @property
    def active(self):
        """The chosen kernel config: :attr:`al` for ``"AL"``, :attr:`df` for ``"DF"``."""
        if self.name == "AL":
            return self.al
        if self.name == "DF":
            return self.df
        raise _fail("kernel.name", self.name, "must be 'AL' or 'DF'")

    def _validate(self, prefix):
        _check_field(self.name, self.__dataclass_fields__["name"], prefix + "name")
        for label, cls in (("AL", PsfMatchConfigAL), ("DF", PsfMatchConfigDF)):
            sub = getattr(self, label.lower())
            where = f"{prefix}active" if label == self.name else f"{prefix}{label}"
            if not isinstance(sub, cls):
                raise _fail(where, sub, f"expected a {cls.__name__}")
            sub._validate(where + ".")

    def _update(self, data, prefix):
        sections = {}
        for key, value in _expand_dotted(data, prefix).items():
            canon = _KERNEL_KEYS.get(key)
            if canon is None:
                raise _unknown_key(key, ["name", "active", "AL", "DF"], prefix)
            if canon in sections:
                raise ConfigError(f"config key '{prefix}{key}' repeats {prefix}{canon}; keep "
                                  "one")
            sections[canon] = value
        if "name" in sections:
            _check_field(sections["name"], self.__dataclass_fields__["name"], prefix + "name")
            self.name = sections["name"]
        for label in ("AL", "DF"):
            if label in sections:
                getattr(self, label.lower())._update(
                    _section(sections[label], prefix + label), f"{prefix}{label}.")
        if "active" in sections:
            self.active._update(_section(sections["active"], prefix + "active"),
                                f"{prefix}active.")

    def to_dict(self):
        """``{"name": ..., "AL": {...}, "DF": {...}}`` with both kernel configs."""
        return {"name": self.name, "AL": self.al.to_dict(), "DF": self.df.to_dict()}

    @classmethod
    def field_docs(cls, prefix=""):
        """Field docs keyed as dumped: ``name``, ``AL.<field>``, ``DF.<field>``."""
        return {prefix + "name": cls.__dataclass_fields__["name"].metadata["doc"],
                **PsfMatchConfigAL.field_docs(prefix + "AL."),
                **PsfMatchConfigDF.field_docs(prefix + "DF.")}


@dataclasses.dataclass
class ImagePsfMatchConfig(_Config):
    """Complete configuration of :class:`diffim.task.ImagePsfMatchTask` (reference §2.5).

    Examples
    --------
    >>> cfg = ImagePsfMatchConfig.from_yaml("kernel: {name: AL, active: {sizeCellX: 64}}")
    >>> cfg.kernel.active.size_cell_x
    64
    >>> cfg.kernel.active.size_cell_x = 16
    >>> cfg.validate()
    Traceback (most recent call last):
    ...
    diffim.exceptions.ConfigError: kernel.active.size_cell_x = 16 is invalid: must be >= 32
    """

    kernel: KernelChoice = _sub(KernelChoice, "AL/DF kernel choice and both kernel configs.")
    select: SourceSelectionConfig = _sub(
        SourceSelectionConfig, "Kernel-source detection and selection.")
    registration: RegistrationConfig = _sub(
        RegistrationConfig, "Registration of the template onto the science grid.")
    auto_reduce_spatial_order: bool = _f(
        True, "Lower the spatial kernel/background orders when too few candidates survive "
        "(logged).")
    mode: str = _f(
        "convolveTemplate", "Image to convolve: convolveTemplate, convolveScience or auto "
        "(the one with the narrower PSF).",
        choices=("convolveTemplate", "convolveScience", "auto"))
    qa: QAConfig = _sub(QAConfig, "Diagnostic plots written by 'diffim qa' / diffim.qa.")
