"""The ``diffim`` command line.

Subcommands
-----------
``diffim simulate``
    Write a seeded simulated template/science pair (two multi-extension FITS files).
``diffim subtract [TEMPLATE SCIENCE] -o OUT``
    PSF-match the template to the science image and subtract it, as the ip_diffim
    ``ImagePsfMatchTask`` example script does.  Without images, a simulated 512x512 pair
    is used.
``diffim qa TEMPLATE SCIENCE --out-dir DIR``
    Subtract as ``diffim subtract`` does and write diagnostic plots and ``metrics.json``
    (:mod:`diffim.qa`).

Every error diffim knows about (:class:`~diffim.exceptions.DiffimError`, ``OSError``)
ends the program with one line ``diffim: error: <message>`` on stderr and exit code 1;
usage errors exit with 2 (argparse).  ``-v -v`` adds the traceback.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .exceptions import ConfigError, DiffimError, ImageReadError

__all__ = ["main", "build_parser"]

log = logging.getLogger("diffim.cli")

# User-facing names of the convolution direction -> ImagePsfMatchConfig.mode values.
CONVOLVE_MODES = {"template": "convolveTemplate", "science": "convolveScience", "auto": "auto"}

# The built-in demo of ``diffim subtract`` without images (mirrors the ip_diffim example script,
# which makes fake images and uses 128-pixel spatial cells).
DEMO_SIZE = 512
DEMO_SEED = 1
DEMO_CELL_SIZE = 128

# Stars per pixel of the library default (800 stars on 1024x1024); used when --n-stars is omitted
# so small and large simulated images have the same crowding.
_STAR_DENSITY = 800 / 1024**2

_LOG_HANDLER_TAG = "_diffim_cli_handler"


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _default_n_stars(size):
    return max(20, round(_STAR_DENSITY * size * size))


def build_parser():
    """Return the argument parser of the ``diffim`` command.

    Returns
    -------
    argparse.ArgumentParser
    """
    common = argparse.ArgumentParser(add_help=False)
    verbosity = common.add_argument_group("output control")
    verbosity.add_argument("-v", "--verbose", action="count", default=0,
                           help="more log output (-v: debug messages; -v -v: also tracebacks "
                                "on errors)")
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="log warnings and errors only")

    parser = argparse.ArgumentParser(
        prog="diffim",
        description="Alard-Lupton PSF-matched difference imaging.",
        epilog="Run 'diffim COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # -- simulate ---------------------------------------------------------------------------
    p = sub.add_parser(
        "simulate", parents=[common],
        help="write a seeded simulated template/science pair",
        description="Simulate a template and a science image of the same star field with "
                    "different PSFs (diffim.simulate.simulate_pair) and write them as FITS "
                    "files (diffim.simulate.write_pair).  The written paths are printed on "
                    "stdout, template first.",
    )
    p.add_argument("--out-dir", type=Path, default=Path("."),
                   help="directory to write into (created if missing; default: .)")
    p.add_argument("--prefix", default="", help="file name prefix, e.g. 'pair1_'")
    p.add_argument("--size", type=_positive_int, default=DEMO_SIZE,
                   help=f"image side in pixels (default: {DEMO_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--template-fwhm", type=_positive_float, default=2.5,
                   help="template PSF FWHM in pixels (default: 2.5)")
    p.add_argument("--science-fwhm", type=_positive_float, default=3.5,
                   help="science PSF FWHM in pixels (default: 3.5)")
    p.add_argument("--fwhm-gradient", type=float, default=0.0,
                   help="variation of the PSF FWHM across the field, as simulate_pair's "
                        "fwhm_gradient (default: 0, constant PSF)")
    p.add_argument("--psf", choices=("gaussian", "moffat"), default="gaussian",
                   help="PSF profile (default: gaussian)")
    p.add_argument("--n-stars", type=_positive_int, default=None,
                   help="number of stars (default: 800 per 1024x1024 pixels)")
    p.add_argument("--n-transients", type=_non_negative_int, default=3,
                   help="number of transients added to the science image (default: 3)")
    p.set_defaults(func=_cmd_simulate, _parser=p)

    # -- subtract ---------------------------------------------------------------------------
    p = sub.add_parser(
        "subtract", parents=[common],
        help="PSF-match the template to the science image and subtract it",
        description="PSF-match TEMPLATE to SCIENCE with ImagePsfMatchTask and write the "
                    "difference (or, with --mode match, the PSF-matched image) as a "
                    "multi-extension FITS file (IMAGE, MASK, VARIANCE).  Without --config the "
                    "ip_diffim example script's settings are used: Alard-Lupton basis, "
                    "differential background fitted, spatial kernel order 1, spatial background "
                    f"order 0.  Without images, a simulated {DEMO_SIZE}x{DEMO_SIZE} pair "
                    f"(seed {DEMO_SEED}) with {DEMO_CELL_SIZE}-pixel cells is used.",
    )
    p.add_argument("images", nargs="*", metavar="TEMPLATE SCIENCE",
                   help="template and science FITS images (give both or neither)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="output FITS file")
    p.add_argument("--mode", choices=("subtract", "match"), default="subtract",
                   help="write the difference image (subtract, default) or the PSF-matched "
                        "image (match)")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="ImagePsfMatchConfig YAML file (snake_case or camelCase ip_diffim names)")
    p.add_argument("--convolve", choices=tuple(CONVOLVE_MODES),
                   help="image to convolve: template, science, or auto (the one with the "
                        "narrower PSF); default: the config's mode (convolveTemplate)")
    p.add_argument("--template-fwhm", type=_positive_float, metavar="PIX",
                   help="template PSF FWHM in pixels (default: header or measured)")
    p.add_argument("--science-fwhm", type=_positive_float, metavar="PIX",
                   help="science PSF FWHM in pixels (default: header or measured)")
    p.add_argument("--kernel-out", type=Path, metavar="K.fits",
                   help="also write the spatially varying matching kernel to this FITS file")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="number of threads for numba (and BLAS/OpenMP); default: all cores")
    p.set_defaults(func=_cmd_subtract, _parser=p)

    # -- qa ---------------------------------------------------------------------------------
    p = sub.add_parser(
        "qa", parents=[common],
        help="subtract and write diagnostic plots and quality metrics",
        description="PSF-match TEMPLATE to SCIENCE and subtract as 'diffim subtract' does, then "
                    "write the diagnostic plots switched on in the config's qa section "
                    "(candidates, kernel basis, kernel mosaic, spatial model, spatial cells, "
                    "difference; PNG) and metrics.json (kernel sum, candidate counts, X2NRM, "
                    "footprint ratio, noise ratio, +/-5 sigma detections) into DIR.  The "
                    "written paths are printed on stdout.",
    )
    # two positionals, not nargs=2: argparse cannot report a missing one with a tuple metavar
    p.add_argument("template", metavar="TEMPLATE", help="template FITS image")
    p.add_argument("science", metavar="SCIENCE", help="science FITS image")
    p.add_argument("--out-dir", required=True, type=Path, metavar="DIR",
                   help="directory for the plots and metrics.json (created if missing)")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="ImagePsfMatchConfig YAML file; its qa section chooses the plots")
    p.add_argument("--convolve", choices=tuple(CONVOLVE_MODES),
                   help="image to convolve: template, science or auto; default: the config's "
                        "mode")
    p.add_argument("--template-fwhm", type=_positive_float, metavar="PIX",
                   help="template PSF FWHM in pixels (default: header or measured)")
    p.add_argument("--science-fwhm", type=_positive_float, metavar="PIX",
                   help="science PSF FWHM in pixels (default: header or measured)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="number of threads for numba (and BLAS/OpenMP); default: all cores")
    p.set_defaults(func=_cmd_qa, _parser=p)
    return parser


def _setup_logging(verbose, quiet):
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logger = logging.getLogger("diffim")
    # main() may run several times in one process (tests): replace our handler, keep others.
    for handler in list(logger.handlers):
        if getattr(handler, _LOG_HANDLER_TAG, False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    setattr(handler, _LOG_HANDLER_TAG, True)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def _set_threads(n):
    """Limit numba and BLAS/OpenMP to ``n`` threads (numba is imported only here)."""
    if n is None:
        return
    # BLAS/OpenMP read these when numpy/scipy load, which has not happened yet in this process.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    import numba

    available = numba.config.NUMBA_NUM_THREADS
    if n > available:
        log.warning("--threads %d is more than numba's %d threads; using %d", n, available,
                    available)
        n = available
    numba.set_num_threads(n)
    log.debug("numba threads: %d", n)


def _check_inputs(args):
    """Fail early, naming the file, before any expensive work."""
    for name, path in zip(("template", "science"), args.images):
        if not os.path.isfile(path):
            raise ImageReadError(f"{name} image {path!r} does not exist or is not a file")
    if args.config is not None and not args.config.is_file():
        raise ConfigError(f"config file '{args.config}' does not exist or is not a file")
    for path in (args.output, args.kernel_out):
        if path is not None and path.is_dir():
            raise ImageReadError(f"output path '{path}' is a directory; give a file name")


def _load_config(path, demo):
    from .config import ImagePsfMatchConfig

    if path is not None:
        log.info("config: %s", path)
        config = ImagePsfMatchConfig.from_yaml(Path(path))
    else:
        # The ip_diffim example script's configuration.
        config = ImagePsfMatchConfig()
        config.kernel.name = "AL"
        active = config.kernel.active
        active.fit_for_background = True
        active.spatial_kernel_order = 1
        active.spatial_bg_order = 0
        if demo:
            active.size_cell_x = DEMO_CELL_SIZE
            active.size_cell_y = DEMO_CELL_SIZE
        log.info("config: AL basis, fit_for_background, spatial_kernel_order 1, "
                 "spatial_bg_order 0 (the ip_diffim example settings)")
    config.validate()
    return config


def _cmd_simulate(args):
    from .simulate import simulate_pair, write_pair

    n_stars = args.n_stars if args.n_stars is not None else _default_n_stars(args.size)
    log.info("simulating a %dx%d %s pair: %d stars, %d transients, FWHM %.2f -> %.2f px, seed %d",
             args.size, args.size, args.psf, n_stars, args.n_transients, args.template_fwhm,
             args.science_fwhm, args.seed)
    pair = simulate_pair(shape=(args.size, args.size), n_stars=n_stars,
                         template_fwhm=args.template_fwhm, science_fwhm=args.science_fwhm,
                         psf=args.psf, fwhm_gradient=args.fwhm_gradient,
                         n_transients=args.n_transients, seed=args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_pair(pair, args.out_dir, prefix=args.prefix)
    for path in paths:
        log.info("wrote %s", path)
        print(path)
    return 0


def _cmd_subtract(args):
    if len(args.images) not in (0, 2):
        args._parser.error("give both TEMPLATE and SCIENCE, or neither (built-in demo)")
    _check_inputs(args)
    _set_threads(args.threads)

    demo = not args.images
    config = _load_config(args.config, demo)

    from astropy.io import fits

    from .image import read_fits, write_fits
    from .task import ImagePsfMatchTask

    if demo:
        from .simulate import simulate_pair

        log.info("no images given: simulating a %dx%d pair (seed %d)", DEMO_SIZE, DEMO_SIZE,
                 DEMO_SEED)
        pair = simulate_pair(shape=(DEMO_SIZE, DEMO_SIZE), n_stars=_default_n_stars(DEMO_SIZE),
                             seed=DEMO_SEED)
        template, science = pair.template, pair.science
        names = ("simulated", "simulated")
    else:
        template_path, science_path = args.images
        log.info("reading template %s", template_path)
        template = read_fits(template_path)
        log.info("reading science %s", science_path)
        science = read_fits(science_path)
        names = (os.path.basename(template_path), os.path.basename(science_path))

    mode = CONVOLVE_MODES[args.convolve] if args.convolve else None
    task = ImagePsfMatchTask(config)
    kwargs = dict(template_fwhm_pix=args.template_fwhm, science_fwhm_pix=args.science_fwhm,
                  mode=mode)
    t0 = time.perf_counter()
    if args.mode == "match":
        result = task.match_exposures(template, science, **kwargs)
        product = result.matched_exposure
    else:
        result = task.subtract_exposures(template, science, **kwargs)
        product = result.subtracted_exposure
    log.info("PSF matching (%s) done in %.2f s", result.metadata.get("mode", "?"),
             time.perf_counter() - t0)
    log.debug("result metadata: %s", result.metadata)

    # diffim.image.write_fits adds the diffim version (DIFFIMV) itself.
    header = fits.Header()
    header["DIFFPROD"] = ("difference" if args.mode == "subtract" else "matched",
                          "diffim product")
    header["PSFMMODE"] = (str(result.metadata.get("mode", "")), "image that was convolved")
    header["TEMPLATE"] = (names[0], "template input")
    header["SCIENCE"] = (names[1], "science input")

    for path in (args.output, args.kernel_out):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    write_fits(product, args.output, extra_header=header)
    log.info("wrote %s", args.output)
    if args.kernel_out is not None:
        result.psf_matching_kernel.write_fits(args.kernel_out, background=result.background_model)
        log.info("wrote kernel %s", args.kernel_out)
    return 0


def _cmd_qa(args):
    for name, path in (("template", args.template), ("science", args.science)):
        if not os.path.isfile(path):
            raise ImageReadError(f"{name} image {path!r} does not exist or is not a file")
    if args.config is not None and not args.config.is_file():
        raise ConfigError(f"config file '{args.config}' does not exist or is not a file")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ImageReadError(f"--out-dir '{args.out_dir}' exists and is not a directory")
    _set_threads(args.threads)
    config = _load_config(args.config, demo=False)

    from .image import read_fits
    from .qa import compute_metrics, make_qa_plots, write_metrics
    from .task import ImagePsfMatchTask

    template_path, science_path = args.template, args.science
    log.info("reading template %s", template_path)
    template = read_fits(template_path)
    log.info("reading science %s", science_path)
    science = read_fits(science_path)
    mode = CONVOLVE_MODES[args.convolve] if args.convolve else None
    t0 = time.perf_counter()
    result = ImagePsfMatchTask(config).subtract_exposures(
        template, science, template_fwhm_pix=args.template_fwhm,
        science_fwhm_pix=args.science_fwhm, mode=mode)
    log.info("PSF matching (%s) done in %.2f s", result.metadata.get("mode", "?"),
             time.perf_counter() - t0)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    # with a warped template, the plots and metrics use it on the science grid
    template_used = result.warped_exposure if result.warped_exposure is not None else template
    paths = make_qa_plots(result, template_used, science, args.out_dir, config)
    metrics = compute_metrics(result, template_used, science)
    metrics["template"] = os.path.basename(template_path)
    metrics["science"] = os.path.basename(science_path)
    paths.append(write_metrics(metrics, args.out_dir / "metrics.json"))

    def _fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    log.info("kernel sum %s, X2NRM %s, noise ratio %s, %d positive / %d negative 5-sigma "
             "detections", _fmt(metrics["kernel_sum_center"], ".4f"),
             _fmt(metrics["x2nrm"], ".3f"), _fmt(metrics["noise_ratio"], ".3f"),
             metrics["n_positive_5sigma"], metrics["n_negative_5sigma"])
    for path in paths:
        print(path)
    return 0


def _one_line(exc):
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv=None):
    """Run the ``diffim`` command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 1 on a diffim or I/O error (argparse exits with 2 on
        usage errors).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except (DiffimError, OSError) as exc:
        if args.verbose >= 2:
            log.error("traceback:", exc_info=exc)
        print(f"diffim: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("diffim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
