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
    Subtract as ``diffim subtract`` does (or, with ``--kernel --solutions --candidates
    --metadata --difference --matched``, read the workflow's products) and write diagnostic
    plots and ``metrics.json`` (:mod:`diffim.qa`).

The workflow's steps, one subcommand each, every one reading and writing files:

``diffim warp TEMPLATE SCIENCE -o warped.fits``
    The template resampled onto the science grid.
``diffim detect IMAGE -o sources.ecsv``
    sep catalog and PSF FWHM of one image.
``diffim select WARPED SCIENCE --template-sources --science-sources -o candidates.ecsv``
    Kernel candidates with their cells, ratings and statuses.
``diffim solve WARPED SCIENCE --candidates -o solutions.fits``
    Per-candidate kernel fits after single-kernel and kernel-sum clipping.
``diffim spatial WARPED SCIENCE --candidates --solutions -o kernel.fits ...``
    The spatial kernel and background model.
``diffim subtract WARPED SCIENCE --kernel kernel.fits -o diff.fits``
    Apply the model: the difference (and ``--matched-out``) image.

Running them in order gives exactly what ``ImagePsfMatchTask.subtract_exposures`` gives
in one call.  Every output records the diffim version, the step and its options.

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


def _number_type(kind, ok, wanted):
    """An argparse type: ``kind(text)`` that must satisfy ``ok``, else "expected <wanted>"."""

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return convert


_positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number_type(float, lambda v: v > 0, "a positive number")


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
    p.add_argument("--kernel", type=Path, metavar="K.fits",
                   help="apply this kernel model ('diffim spatial' or --kernel-out output) "
                        "instead of fitting one; TEMPLATE must be on the science grid "
                        "('diffim warp' output).  The workflow's subtract step")
    p.add_argument("--matched-out", type=Path, metavar="M.fits",
                   help="also write the PSF-matched image (IMAGE, MASK, VARIANCE)")
    p.add_argument("--decorrelated-out", type=Path, metavar="D.fits",
                   help="also write the decorrelated difference (DMTN-021 afterburner: white "
                        "noise, variance plane that predicts it); use it for photometry")
    p.add_argument("--psf-out", type=Path, metavar="PSF.fits",
                   help="with --decorrelated-out: also write the decorrelated difference's "
                        "PSF image (unit sum), for 'diffim lightcurve --psfs'")
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
    p.add_argument("--metrics-out", type=Path, metavar="JSON",
                   help="where to write the metrics (default: DIR/metrics.json)")
    products = p.add_argument_group(
        "workflow products", "give all of these to plot the products of the workflow's steps "
        "instead of subtracting again (TEMPLATE is then the warped template)")
    products.add_argument("--kernel", type=Path, metavar="FITS", help="'diffim spatial' model")
    products.add_argument("--solutions", type=Path, metavar="FITS",
                          help="'diffim spatial' --solutions-out")
    products.add_argument("--candidates", type=Path, metavar="ECSV",
                          help="'diffim select' output")
    products.add_argument("--metadata", type=Path, metavar="JSON",
                          help="'diffim spatial' --metadata-out")
    products.add_argument("--difference", type=Path, metavar="FITS",
                          help="'diffim subtract' output")
    products.add_argument("--matched", type=Path, metavar="FITS",
                          help="'diffim subtract' --matched-out")
    p.set_defaults(func=_cmd_qa, _parser=p)

    # -- the workflow's steps ---------------------------------------------------------------
    def step_parser(name, help_text, description, images=2):
        q = sub.add_parser(name, parents=[common], help=help_text, description=description)
        if images == 2:
            q.add_argument("template", metavar="TEMPLATE",
                           help="template FITS image (on the science grid after 'warp')")
            q.add_argument("science", metavar="SCIENCE", help="science FITS image")
        q.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                       help="output file")
        q.add_argument("--config", type=Path, metavar="YAML",
                       help="ImagePsfMatchConfig YAML file (default: the ip_diffim example "
                            "settings, as for 'diffim subtract')")
        q.add_argument("--threads", type=_positive_int, metavar="N",
                       help="number of threads for numba (and BLAS/OpenMP); default: all cores")
        return q

    p = step_parser(
        "warp", "resample the template onto the science image's pixel grid",
        "Step 1 of the workflow.  Register TEMPLATE to SCIENCE (by their WCSs, or by matching "
        "star catalogs when either lacks one) and resample it with a Lanczos kernel onto the "
        "science grid; write the warped template (IMAGE, MASK, VARIANCE) with the "
        "registration recorded in its header.  A template already on the science grid is "
        "copied unchanged.")
    p.add_argument("--no-warping", action="store_true",
                   help="do not resample: fail with ImagesNotRegisteredError if the grids differ")
    p.set_defaults(func=_cmd_warp, _parser=p)

    p = step_parser(
        "detect", "detect sources with sep and measure the PSF FWHM",
        "Step 2.  Detect sources on IMAGE (sep; threshold and background mesh from the "
        "config's select section) and measure its PSF FWHM from isolated stars; write the "
        "catalog as ECSV with the FWHM in its metadata ('fwhm').", images=0)
    p.add_argument("image", metavar="IMAGE", help="FITS image (the science image or the "
                                                 "warped template)")
    p.add_argument("--which", choices=("science", "template"), default="science",
                   help="which image this is (for the logs and the catalog metadata)")
    p.add_argument("--fwhm", type=_positive_float, metavar="PIX",
                   help="known PSF FWHM in pixels (default: header or measured)")
    p.set_defaults(func=_cmd_detect, _parser=p)

    p = step_parser(
        "select", "choose kernel candidates and file them in spatial cells",
        "Step 3.  Decide which image is convolved, choose the kernel sources (cuts of "
        "select_kernel_sources on the detect_on catalog, or a given catalog), cut and vet "
        "their stamps and write the candidates (id, x, y, cell, rating, status) as ECSV.")
    p.add_argument("--template-sources", type=Path, required=True, metavar="ECSV",
                   help="'diffim detect' catalog of the warped template")
    p.add_argument("--science-sources", type=Path, required=True, metavar="ECSV",
                   help="'diffim detect' catalog of the science image")
    p.add_argument("--convolve", choices=tuple(CONVOLVE_MODES),
                   help="image to convolve: template, science or auto; default: the config's "
                        "mode")
    p.add_argument("--candidate-list", type=Path, metavar="TABLE",
                   help="ECSV or FITS table with x, y columns (parent pixels) to use instead "
                        "of the detections")
    p.set_defaults(func=_cmd_select, _parser=p)

    p = step_parser(
        "solve", "fit a kernel to each candidate and clip outliers",
        "Step 4.  Fit the kernel basis to the best candidates of every cell, reject bad fits "
        "and kernel-sum outliers (promoting the next candidate of the cell), and write every "
        "candidate's status and solution (coefficients, kernel, normal equations, residual "
        "statistics) as FITS.")
    p.add_argument("--candidates", type=Path, required=True, metavar="ECSV",
                   help="'diffim select' output")
    p.set_defaults(func=_cmd_solve, _parser=p)

    p = step_parser(
        "spatial", "fit the spatially varying kernel and background",
        "Step 5.  Fit the spatial kernel and background models to the candidate solutions, "
        "with the ip_diffim rejection iterations; write the model (basis images, spatial "
        "coefficients, background; reusable with 'diffim subtract --kernel'), the final "
        "candidate solutions and the run's metadata (JSON).")
    p.add_argument("--candidates", type=Path, required=True, metavar="ECSV",
                   help="'diffim select' output")
    p.add_argument("--solutions", type=Path, required=True, metavar="FITS",
                   help="'diffim solve' output")
    p.add_argument("--solutions-out", type=Path, required=True, metavar="FITS",
                   help="final candidate statuses and solutions")
    p.add_argument("--metadata-out", type=Path, required=True, metavar="JSON",
                   help="the run's metadata (basis, counts, condition number, orders used)")
    p.set_defaults(func=_cmd_spatial, _parser=p)

    p = sub.add_parser(
        "lightcurve", parents=[common],
        help="forced PSF photometry of one object through a series of differences",
        description="Measure the PSF flux at one position on every difference image "
                    "('diffim subtract' outputs of pairs that share one template) and write "
                    "the light curve (time, x, y, flux, flux_err, snr, flags) as ECSV, and "
                    "optionally a plot.  Fluxes are divided by the matching kernel's sum at "
                    "the position in convolveTemplate mode, which puts every epoch on the "
                    "template's photometric scale.")
    p.add_argument("--differences", nargs="+", type=Path, required=True, metavar="FITS",
                   help="difference images, one per epoch")
    p.add_argument("--warped", nargs="+", type=Path, required=True, metavar="FITS",
                   help="the 'diffim warp' output of each epoch (registration record)")
    p.add_argument("--kernels", nargs="+", type=Path, required=True, metavar="FITS",
                   help="the 'diffim spatial' kernel of each epoch")
    p.add_argument("--times", nargs="+", type=float, required=True, metavar="MJD",
                   help="time of each epoch")
    p.add_argument("--psfs", nargs="+", type=Path, metavar="FITS",
                   help="PSF image of each difference ('diffim subtract --psf-out'); needed "
                        "for decorrelated differences (default: a Gaussian of the "
                        "difference's PSF FWHM)")
    p.add_argument("--position", nargs=2, type=float, required=True, metavar=("X", "Y"),
                   help="position of the object in parent pixels of the template (or, with "
                        "--frame science, of every science image)")
    p.add_argument("--frame", choices=("template", "science"), default="template",
                   help="pixel frame of --position (default: template)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="ECSV",
                   help="light-curve table")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also plot the light curve")
    p.add_argument("--title", default=None, help="plot title")
    p.set_defaults(func=_cmd_lightcurve, _parser=p)
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
    if args.kernel is not None and not args.images:
        args._parser.error("--kernel needs TEMPLATE and SCIENCE")
    if args.kernel is not None and args.kernel_out is not None:
        args._parser.error("--kernel applies a saved kernel; --kernel-out cannot be given too")
    _check_inputs(args)
    _require_files(kernel=args.kernel)
    if args.psf_out is not None and args.decorrelated_out is None:
        args._parser.error("--psf-out needs --decorrelated-out")
    if args.decorrelated_out is not None and args.mode == "match":
        args._parser.error("--decorrelated-out needs --mode subtract")
    _prepare_outputs(args.output, args.kernel_out, args.matched_out, args.decorrelated_out,
                     args.psf_out)
    _set_threads(args.threads)

    demo = not args.images
    config = _load_config(args.config, demo)

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

    task = ImagePsfMatchTask(config)
    t0 = time.perf_counter()
    if args.kernel is not None:
        result = _apply_saved_kernel(task, template, science, args)
    else:
        mode = CONVOLVE_MODES[args.convolve] if args.convolve else None
        kwargs = dict(template_fwhm_pix=args.template_fwhm,
                      science_fwhm_pix=args.science_fwhm, mode=mode)
        if args.mode == "match":
            result = task.match_exposures(template, science, **kwargs)
        else:
            result = task.subtract_exposures(template, science, **kwargs)
    product = (result.matched_exposure if args.mode == "match"
               else result.subtracted_exposure)
    log.info("PSF matching (%s) done in %.2f s", result.metadata.get("mode", "?"),
             time.perf_counter() - t0)
    log.debug("result metadata: %s", result.metadata)

    header = _provenance(args, "subtract", config)
    header["DIFFPROD"] = ("difference" if args.mode == "subtract" else "matched",
                          "diffim product")
    header["PSFMMODE"] = (str(result.metadata.get("mode", "")), "image that was convolved")
    header["TEMPLATE"] = (names[0], "template input")
    header["SCIENCE"] = (names[1], "science input")
    write_fits(product, args.output, extra_header=header)
    log.info("wrote %s", args.output)
    if args.matched_out is not None:
        header["DIFFPROD"] = ("matched", "diffim product")
        write_fits(result.matched_exposure, args.matched_out, extra_header=header)
        log.info("wrote %s", args.matched_out)
    if args.decorrelated_out is not None:
        _write_decorrelated(result, template, science, args, header)
    if args.kernel_out is not None:
        _kernel_provenance(result.psf_matching_kernel, args, "subtract", config)
        result.psf_matching_kernel.write_fits(args.kernel_out, background=result.background_model)
        log.info("wrote kernel %s", args.kernel_out)
    return 0


def _write_decorrelated(result, template, science, args, header):
    """The DMTN-021 decorrelated difference (and its PSF) of a subtraction."""
    from astropy.io import fits

    from ._atomic import atomic_open
    from .decorrelate import decorrelate_result
    from .image import write_fits
    from .photometry import decorrelated_psf

    warped = result.warped_exposure if result.warped_exposure is not None else template
    header["DIFFPROD"] = ("decorrelated difference", "diffim product")
    write_fits(decorrelate_result(result, warped, science), args.decorrelated_out,
               extra_header=header)
    log.info("wrote %s", args.decorrelated_out)
    if args.psf_out is not None:
        hdu = fits.PrimaryHDU(decorrelated_psf(result, warped, science), header=header)
        hdu.header["DIFFPROD"] = ("PSF of the decorrelated difference", "diffim product")
        with atomic_open(args.psf_out) as fh:
            hdu.writeto(fh)
        log.info("wrote %s", args.psf_out)


def _apply_saved_kernel(task, template, science, args):
    """The workflow's subtract step: convolve and subtract with a 'diffim spatial' model."""
    from astropy.io import fits

    from .exceptions import DiffimError
    from .spatial import BackgroundModel, SpatialKernel

    kernel = SpatialKernel.read_fits(args.kernel)
    try:
        background = BackgroundModel.read_fits(args.kernel)
        header = fits.getheader(args.kernel)
    except (OSError, KeyError) as exc:
        raise DiffimError(f"{args.kernel}: no background model in the kernel file ({exc}); "
                          "write it with 'diffim spatial'") from exc
    mode = header.get("PSFMMODE", "convolveTemplate")
    result = task.apply(template, science, kernel, background, mode=mode,
                        template_fwhm=header.get("TFWHM"), science_fwhm=header.get("SFWHM"),
                        subtract=args.mode == "subtract", timings=task.metadata)
    result.metadata = {**task.metadata, "mode": mode}
    return result


def _qa_result_from_products(args, config, template, science):
    """Rebuild the PsfMatchResult of a workflow run from its step products."""
    import json

    from astropy.io import fits

    from .candidates import read_solutions
    from .image import read_fits
    from .spatial import BackgroundModel, SpatialKernel
    from .task import PsfMatchResult

    names = ("kernel", "solutions", "candidates", "metadata", "difference", "matched")
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        args._parser.error(f"the workflow products need {' '.join(missing)} as well")
    _require_files(**{n: getattr(args, n) for n in names})
    with open(args.metadata, encoding="utf-8") as fh:
        metadata = json.load(fh)
    selection, _ = _selection_from_table(config, template, science, args.candidates,
                                         _digests(template, science))
    read_solutions(args.solutions, selection.cell_set)
    kernel = SpatialKernel.read_fits(args.kernel)
    background = BackgroundModel.read_fits(args.kernel)
    metadata.setdefault("mode", fits.getheader(args.kernel).get("PSFMMODE"))
    difference = read_fits(args.difference)
    matched = read_fits(args.matched)
    return PsfMatchResult(matched_image=matched.masked_image, psf_matching_kernel=kernel,
                          background_model=background, kernel_cell_set=selection.cell_set,
                          matched_exposure=matched,
                          subtracted_masked_image=difference.masked_image,
                          subtracted_exposure=difference, warped_exposure=template,
                          metadata=metadata)


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
    if args.kernel is not None:
        result = _qa_result_from_products(args, config, template, science)
    else:
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
    metrics_path = args.metrics_out or args.out_dir / "metrics.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    paths.append(write_metrics(metrics, metrics_path))

    def _fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    log.info("kernel sum %s, X2NRM %s, noise ratio %s, %d positive / %d negative 5-sigma "
             "detections", _fmt(metrics["kernel_sum_center"], ".4f"),
             _fmt(metrics["x2nrm"], ".3f"), _fmt(metrics["noise_ratio"], ".3f"),
             metrics["n_positive_5sigma"], metrics["n_negative_5sigma"])
    for path in paths:
        print(path)
    return 0


# -- the workflow's steps --------------------------------------------------------------------

def _require_files(**paths):
    """Fail early, naming the file, before any expensive work."""
    for name, path in paths.items():
        if path is not None and not os.path.isfile(path):
            raise ImageReadError(f"{name} file '{path}' does not exist or is not a file")


def _prepare_outputs(*paths):
    for path in paths:
        if path is None:
            continue
        if Path(path).is_dir():
            raise ImageReadError(f"output path '{path}' is a directory; give a file name")
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _options(args):
    """The step's command-line options (as given) for provenance records."""
    skip = {"func", "verbose", "quiet", "command"}

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return {k: plain(v) for k, v in sorted(vars(args).items())
            if not k.startswith("_") and k not in skip}


def _provenance(args, step, config):
    """Primary-header cards recording the step, its options and the configuration.

    ``diffim.image.write_fits`` adds the diffim version (DIFFIMV) itself.
    """
    import json

    from astropy.io import fits

    header = fits.Header()
    header["DIFFSTEP"] = (step, "diffim step that wrote this file")
    header["DIFFOPTS"] = (json.dumps(_options(args), sort_keys=True), "step options (JSON)")
    header["DIFFCONF"] = (json.dumps(config.to_dict(), sort_keys=True),
                          "ImagePsfMatchConfig (JSON)")
    return header


def _kernel_provenance(kernel, args, step, config):
    for card in _provenance(args, step, config).cards:
        kernel.info[card.keyword] = card.value


def _table_meta(args, step, config):
    from . import __version__

    return {"diffim_version": __version__, "step": step, "options": _options(args),
            "config": config.to_dict()}


def _read_images(args):
    from .image import read_fits

    _require_files(template=args.template, science=args.science, config=args.config)
    log.info("reading template %s", args.template)
    template = read_fits(args.template)
    log.info("reading science %s", args.science)
    science = read_fits(args.science)
    return template, science


def _write_table(table, path):
    from ._atomic import atomic_open

    with atomic_open(path, "w") as fh:
        table.write(fh, format="ascii.ecsv")


def _read_table(path, what):
    from astropy.table import Table

    from .exceptions import DiffimError

    _require_files(**{what: path})
    try:
        return Table.read(path)
    except (OSError, ValueError) as exc:
        raise DiffimError(f"{what} '{path}': cannot read the table ({exc})") from exc


def _digests(template, science):
    """Short checksums of the two images, so later steps can refuse products of other inputs."""
    import hashlib

    out = {}
    for name, exposure in (("template_digest", template), ("science_digest", science)):
        h = hashlib.blake2b(digest_size=8)
        mi = exposure.masked_image
        for plane in (mi.image, mi.mask, mi.variance):
            h.update(plane.tobytes())
        out[name] = h.hexdigest()
    return out


def _check_digests(recorded, digests, path):
    """Refuse a product whose recorded image checksums are not ``digests``."""
    from .exceptions import DiffimError

    for key, value in digests.items():
        if recorded.get(key) not in (None, value):
            which = key.split("_")[0]
            raise DiffimError(f"{path}: was made from another {which} image than the one "
                              "given; the products belong to other inputs")


def _selection_from_table(config, template, science, path, digests):
    """Rebuild the selection of 'diffim select' from its table (same candidates, same ids)."""
    import numpy as np

    from .candidates import read_candidate_table
    from .exceptions import DiffimError
    from .task import ImagePsfMatchTask

    table = read_candidate_table(path)
    meta = table.meta
    _check_digests(meta, digests, path)
    positions = np.column_stack([np.asarray(table["x"], float), np.asarray(table["y"], float)])
    task = ImagePsfMatchTask(config)
    selection = task.make_selection(template.masked_image, science.masked_image, positions,
                                    mode=meta.get("mode", "convolveTemplate"),
                                    template_fwhm=meta.get("template_fwhm"),
                                    science_fwhm=meta.get("science_fwhm"))
    n = len(selection.cell_set.candidates())
    if n != len(table):
        raise DiffimError(f"{path}: lists {len(table)} candidates but the images give {n}; "
                          "the table belongs to other inputs")
    return selection, task


def _header_digests(digests):
    """``_digests`` as FITS cards (TDIGEST, SDIGEST) for the solutions files."""
    return {k[:1].upper() + "DIGEST": v for k, v in digests.items()}


def _check_solution_digests(path, digests):
    from astropy.io import fits

    header = fits.getheader(path)
    _check_digests({"template_digest": header.get("TDIGEST"),
                    "science_digest": header.get("SDIGEST")}, digests, path)


def _cmd_warp(args):
    template, science = _read_images(args)
    _prepare_outputs(args.output)
    _set_threads(args.threads)
    config = _load_config(args.config, demo=False)
    import json

    from .image import write_fits
    from .task import ImagePsfMatchTask

    warped, registration = ImagePsfMatchTask(config).warp(template, science,
                                                          do_warping=not args.no_warping)
    header = _provenance(args, "warp", config)
    header["REGISTR"] = (json.dumps(registration, sort_keys=True, default=str),
                         "registration and overlap (JSON)")
    write_fits(warped, args.output, extra_header=header)
    log.info("wrote %s (%s)", args.output, registration.get("registrationMethod", "?"))
    return 0


def _cmd_detect(args):
    from .image import read_fits
    from .task import ImagePsfMatchTask

    _require_files(image=args.image, config=args.config)
    _prepare_outputs(args.output)
    _set_threads(args.threads)
    config = _load_config(args.config, demo=False)
    log.info("reading %s image %s", args.which, args.image)
    image = read_fits(args.image)
    sources, fwhm = ImagePsfMatchTask(config).detect(image, args.which, args.fwhm)
    sources.meta.update({**_table_meta(args, "detect", config), "which": args.which,
                         "image": os.path.basename(args.image), "fwhm": fwhm})
    _write_table(sources, args.output)
    log.info("wrote %s: %d sources, FWHM %s px", args.output, len(sources),
             "n/a" if fwhm is None else f"{fwhm:.3f}")
    return 0


def _cmd_select(args):
    template, science = _read_images(args)
    _prepare_outputs(args.output)
    _set_threads(args.threads)
    config = _load_config(args.config, demo=False)

    from .candidates import write_candidate_table
    from .task import ImagePsfMatchTask

    t_src = _read_table(args.template_sources, "template sources")
    s_src = _read_table(args.science_sources, "science sources")
    candidate_list = (_read_table(args.candidate_list, "candidate list")
                      if args.candidate_list is not None else None)
    fwhm_t, fwhm_s = t_src.meta.get("fwhm"), s_src.meta.get("fwhm")
    task = ImagePsfMatchTask(config)
    mode = task.resolve_mode(CONVOLVE_MODES[args.convolve] if args.convolve else None,
                             True, fwhm_t, fwhm_s)
    detect_on = str(config.select.detect_on).lower()
    selection = task.select(template.masked_image, science.masked_image, mode=mode,
                            template_fwhm=fwhm_t, science_fwhm=fwhm_s,
                            candidate_list=candidate_list,
                            sources=s_src if detect_on == "science" else t_src)
    write_candidate_table(selection.cell_set, args.output, meta={
        **_table_meta(args, "select", config), **_digests(template, science),
        "mode": mode, "template_fwhm": fwhm_t,
        "science_fwhm": fwhm_s, "kernel_size": int(selection.basis.size)})
    log.info("wrote %s: %d kernel candidates (%s)", args.output,
             len(selection.cell_set.candidates()), mode)
    return 0


def _cmd_solve(args):
    template, science = _read_images(args)
    _require_files(candidates=args.candidates)
    _prepare_outputs(args.output)
    _set_threads(args.threads)
    config = _load_config(args.config, demo=False)

    from .candidates import GOOD, write_solutions

    digests = _digests(template, science)
    selection, task = _selection_from_table(config, template, science, args.candidates,
                                            digests)
    task.solve(selection)
    write_solutions(selection.cell_set, args.output,
                    provenance={**_provenance(args, "solve", config),
                                **_header_digests(digests)})
    fitted = [c for c in selection.cell_set.candidates() if c.orig is not None]
    log.info("wrote %s: %d candidates fitted, %d good so far", args.output, len(fitted),
             sum(c.status == GOOD for c in fitted))
    return 0


def _cmd_spatial(args):
    template, science = _read_images(args)
    _require_files(candidates=args.candidates, solutions=args.solutions)
    _prepare_outputs(args.output, args.solutions_out, args.metadata_out)
    _set_threads(args.threads)
    config = _load_config(args.config, demo=False)
    import json

    from ._atomic import atomic_open
    from .candidates import read_solutions, write_solutions

    digests = _digests(template, science)
    selection, task = _selection_from_table(config, template, science, args.candidates,
                                            digests)
    _check_solution_digests(args.solutions, digests)
    read_solutions(args.solutions, selection.cell_set)
    kernel, background, _ = task.fit_spatial(selection)
    _kernel_provenance(kernel, args, "spatial", config)
    kernel.write_fits(args.output, background=background)
    write_solutions(selection.cell_set, args.solutions_out,
                    provenance={**_provenance(args, "spatial", config),
                                **_header_digests(digests)})
    metadata = {**task.metadata, "mode": selection.mode,
                "templateFwhmPix": selection.template_fwhm,
                "scienceFwhmPix": selection.science_fwhm}
    with atomic_open(args.metadata_out, "w") as fh:
        json.dump(metadata, fh, indent=1, sort_keys=True, default=str)
    log.info("wrote %s: kernel sum %.4f at the centre, %s good candidates", args.output,
             metadata.get("spatialKernelSum", float("nan")), metadata.get("nGoodCandidates"))
    return 0


def _science_position(warped_path, x, y):
    """Template pixel (x, y) → science pixel, through the registration of 'diffim warp'."""
    import json

    import numpy as np
    from astropy.io import fits

    from .exceptions import DiffimError

    record = json.loads(fits.getheader(warped_path).get("REGISTR", "{}"))
    method = record.get("registrationMethod", "none")
    if method in ("none", "catalog-identity"):
        return x, y
    if method == "catalog":
        m = np.asarray(record["registrationTransform"], float)   # science -> template
        return tuple(np.linalg.solve(m[:, :2], np.array([x, y]) - m[:, 2]))
    raise DiffimError(f"{warped_path}: the template was warped by its WCS; give the object's "
                      "position on the science grid with --frame science")


def _cmd_lightcurve(args):
    n = len(args.differences)
    for name in ("warped", "kernels", "times", "psfs"):
        if getattr(args, name) is not None and len(getattr(args, name)) != n:
            args._parser.error(f"--{name} needs one value per difference image ({n})")
    _require_files(**{f"difference {i}": p for i, p in enumerate(args.differences)},
                   **{f"warped {i}": p for i, p in enumerate(args.warped)},
                   **{f"kernel {i}": p for i, p in enumerate(args.kernels)},
                   **{f"PSF {i}": p for i, p in enumerate(args.psfs or ())})
    _prepare_outputs(args.output, args.plot)
    from astropy.io import fits

    from .image import read_fits
    from .photometry import light_curve, plot_light_curve
    from .spatial import SpatialKernel

    diffs, positions, scales = [], [], []
    for diff_path, warped_path, kernel_path in zip(args.differences, args.warped, args.kernels):
        x, y = args.position
        if args.frame == "template":
            x, y = _science_position(warped_path, x, y)
        kernel = SpatialKernel.read_fits(kernel_path)
        mode = fits.getheader(kernel_path).get("PSFMMODE", "convolveTemplate")
        scales.append(kernel.kernel_sum(x, y) if mode == "convolveTemplate" else 1.0)
        positions.append((x, y))
        diffs.append(read_fits(diff_path))
    psfs = None if args.psfs is None else [fits.getdata(p).astype(float) for p in args.psfs]
    table = light_curve(args.times, diffs, positions, psf=psfs, flux_scale=scales)
    table.meta.update({"diffim_version": __version__, "step": "lightcurve",
                       "options": _options(args)})
    _write_table(table, args.output)
    log.info("wrote %s: %d epochs", args.output, len(table))
    if args.plot is not None:
        plot_light_curve(table, args.plot, title=args.title)
        log.info("wrote %s", args.plot)
    return 0


def _one_line(exc, args=None):
    """The error as one line; names the input images when the message does not.

    Errors raised deep in the task (no stars, no overlap, a failed fit) describe the
    problem but not which files it came from; on the command line that is what the user
    needs to know.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    if args is None or not isinstance(exc, DiffimError):
        return text
    images = list(getattr(args, "images", None) or [])
    if not images:
        images = [p for p in (getattr(args, "template", None), getattr(args, "science", None))
                  if p is not None]
    images = [str(p) for p in images]
    if images and not any(p in text or os.path.basename(p) in text for p in images):
        names = ", ".join(f"{role} '{p}'" for role, p in zip(("template", "science"), images))
        text = f"{text} [{names}]"
    return text


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
        print(f"diffim: error: {_one_line(exc, args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("diffim: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line (and no partial output, see _atomic)
        if args.verbose >= 2:
            log.error("traceback:", exc_info=exc)
        print(f"diffim: error: internal error ({type(exc).__name__}: {_one_line(exc, args)}); "
              "please report it with the output of -v -v", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
