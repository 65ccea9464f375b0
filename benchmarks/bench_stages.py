"""Time each stage of one subtraction on a simulated pair.

Usage::

    python benchmarks/bench_stages.py                  # 4096², print a Markdown table
    python benchmarks/bench_stages.py --size 2048
    python benchmarks/bench_stages.py --write          # also append it to benchmarks/RESULTS.md

The parent process simulates a pair (Moffat PSFs, FWHM 3.5 px in the template and 4.6 px in
the science image at the centre, varying across the field, 6000 stars at 4096² and the same
density at other sizes) and writes it to a temporary directory.  A fresh child process then
warms numba up on a tiny pair (so compilation is not timed) and runs the steps of
``ImagePsfMatchTask.subtract_exposures`` one at a time, in the order the task runs them:

==============  ==============================================================================
load            ``read_fits`` of template and science
prepare         registration check (``register_and_warp``), PSF FWHMs, mode, kernel basis
detect/select   ``task.make_candidate_list`` (``diffim.detect.select_kernel_sources``)
stamps          ``diffim.candidates.make_candidates`` and the spatial cell set
solve           ``task._solve``: per-candidate fits, kernel-sum clip, spatial fit, assessment
convolve        ``convolve_masked_image`` with the fitted spatial kernel
subtract        ``S − K⋆T − bg`` (``task._difference``)
decorrelate     ``diffim.decorrelate.decorrelate_result``
write           ``diffim.image.write_fits`` of the decorrelated difference
==============  ==============================================================================

load … subtract together are exactly one ``subtract_exposures`` call (the same private
methods, in the same order).  For each stage: wall time, CPU time (``time.process_time``, all
threads) and the process's peak RSS (``ru_maxrss``, a high-water mark: it only grows, so a
stage's figure is the peak reached by the end of it) and its current RSS.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SCENE = dict(psf="moffat", moffat_beta=3.0, template_fwhm=3.5, science_fwhm=4.6,
             fwhm_gradient=0.2, flux_scale=1.3, n_transients=20)
STARS_AT_4096 = 6000
WARMUP = dict(shape=(256, 256), n_stars=80, seed=123)


def _config():
    from diffim.config import ImagePsfMatchConfig

    config = ImagePsfMatchConfig()
    config.kernel.active.fit_for_background = True
    return config


def default_stars(size):
    return max(50, round(STARS_AT_4096 * (size / 4096) ** 2))


def _peak_rss_mb():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024**2 if sys.platform == "darwin" else rss / 1024


def _current_rss_mb():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**2
    except OSError:
        return float("nan")


class _Stages:
    def __init__(self):
        self.rows = []

    def run(self, name, func, *args, **kwargs):
        w0, c0 = time.perf_counter(), time.process_time()
        out = func(*args, **kwargs)
        self.rows.append({"stage": name, "wall": time.perf_counter() - w0,
                          "cpu": time.process_time() - c0, "peak_rss_mb": _peak_rss_mb(),
                          "rss_mb": _current_rss_mb()})
        print(f"  {name}: {self.rows[-1]['wall']:.2f} s", file=sys.stderr, flush=True)
        return out


def _residual_sigma(mi):
    import numpy as np

    good = np.isfinite(mi.image) & (mi.variance > 0) & (mi.mask == 0)
    if not good.any():
        return float("nan")
    z = mi.image[good] / np.sqrt(mi.variance[good])
    return float(1.4826 * np.median(np.abs(z - np.median(z))))


def _child(spec):
    """Run in a fresh process; print one JSON line with the per-stage measurements."""
    if spec.get("threads"):
        import numba

        numba.set_num_threads(spec["threads"])
    from diffim.candidates import SpatialCellSet, make_candidates
    from diffim.convolve import convolve_masked_image
    from diffim.decorrelate import decorrelate_result
    from diffim.image import Exposure, read_fits, write_fits
    from diffim.simulate import simulate_pair
    from diffim.task import ImagePsfMatchTask, PsfMatchResult, _product_metadata
    from diffim.warp import register_and_warp

    # numba warm-up: compile (or load from the cache) every kernel the run uses
    tiny = simulate_pair(**WARMUP, **{k: v for k, v in SCENE.items() if k != "n_transients"})
    w_res = ImagePsfMatchTask(_config()).subtract_exposures(tiny.template, tiny.science)
    decorrelate_result(w_res, tiny.template, tiny.science)
    del tiny, w_res

    st = _Stages()
    w0, c0 = time.perf_counter(), time.process_time()
    task = ImagePsfMatchTask(_config())
    cfg = task.kconfig

    template, science = st.run("load", lambda: (read_fits(spec["template"]),
                                                read_fits(spec["science"])))

    def prepare():
        task.metadata = {}
        warped, registration = register_and_warp(template, science, task.config, True)
        task.metadata.update(registration)
        fwhm_t = task._fwhm(warped, None, "template")
        fwhm_s = task._fwhm(science, None, "science")
        mode = task._resolve_mode(None, True, fwhm_t, fwhm_s)
        if mode == "convolveTemplate":
            conv, ref, f_conv, f_ref = warped, science, fwhm_t, fwhm_s
        else:
            conv, ref, f_conv, f_ref = science, warped, fwhm_s, fwhm_t
        basis = task.make_kernel_basis(f_conv, f_ref)
        return warped, mode, conv, ref, basis

    warped, mode, conv, ref, basis = st.run("prepare", prepare)
    positions = st.run("detect/select", task.make_candidate_list, warped.masked_image,
                       science.masked_image, basis.size)

    def stamps():
        cands = make_candidates(conv.masked_image, ref.masked_image, positions, cfg, basis.size)
        cell_set = SpatialCellSet(conv.masked_image.bbox, cfg.size_cell_x, cfg.size_cell_y)
        for cand in cands:
            cell_set.insert(cand)
        return cell_set, len(cands)

    cell_set, n_cand = st.run("stamps", stamps)
    bad_bits = (ref.masked_image.get_plane_bitmask(*cfg.bad_mask_planes)
                | conv.masked_image.get_plane_bitmask(*cfg.bad_mask_planes))
    kernel, bg, _ = st.run("solve", task._solve, cell_set, basis, cfg.fit_for_background,
                           bad_bits)
    matched = st.run("convolve", convolve_masked_image, conv.masked_image, kernel)

    def subtract():
        result = PsfMatchResult(matched_image=matched, psf_matching_kernel=kernel,
                                background_model=bg, kernel_cell_set=cell_set,
                                metadata=dict(task.metadata))
        result.metadata["mode"] = mode
        result.warped_exposure = warped
        if mode == "convolveTemplate":
            diff = task._difference(science.masked_image, matched, bg)
            fwhm, phot = science.psf_fwhm, science.phot_scale
        else:
            x0, y0, x1, y1 = science.bbox
            ksum = kernel.kernel_sum(0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1))
            diff = task._difference(warped.masked_image, matched, bg, scale=ksum, invert=True)
            fwhm, phot = warped.psf_fwhm, warped.phot_scale
        result.subtracted_masked_image = diff
        result.subtracted_exposure = Exposure(diff, wcs=science.wcs, psf_fwhm=fwhm,
                                              phot_scale=phot,
                                              metadata=_product_metadata(science))
        return result

    result = st.run("subtract", subtract)
    decorrelated = st.run("decorrelate", decorrelate_result, result, warped, science)
    st.run("write", write_fits, decorrelated, spec["output"])
    total = {"stage": "total", "wall": time.perf_counter() - w0,
             "cpu": time.process_time() - c0, "peak_rss_mb": _peak_rss_mb(),
             "rss_mb": _current_rss_mb()}

    ny, nx = science.shape
    out = {"rows": st.rows + [total], "mode": mode, "n_positions": len(positions),
           "n_candidates": n_cand, "kernel_size": int(basis.size),
           "kernel_sum": float(kernel.kernel_sum(nx / 2, ny / 2)),
           "residual_sigma": _residual_sigma(result.subtracted_masked_image),
           "residual_sigma_decorrelated": _residual_sigma(decorrelated.masked_image),
           "n_good": task.metadata.get("nGoodCandidates")}
    print(json.dumps(out))


def machine_info():
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


def render(info, size, n_stars, res, command, threads):
    scene = ", ".join(f"{k}={v}" for k, v in SCENE.items())
    lines = [
        f"## Stage timings: {size}² ({info['date']}, {info['platform']}, "
        f"{info['cpu_count']} CPUs)",
        "",
        f"Command: `{command}`",
        "",
        f"- Machine: {info['platform']}, {info['processor']}, {info['cpu_count']} CPUs "
        f"(numba threads: {threads or info['numba_threads']})",
        f"- Software: Python {info['python']}, diffim {info['diffim']}, numpy {info['numpy']}, "
        f"scipy {info['scipy']}, numba {info['numba']}, astropy {info['astropy']}",
        f"- Scene: `simulate_pair(shape=({size}, {size}), n_stars={n_stars}, {scene}, "
        f"seed={size})`; `ImagePsfMatchConfig()` with `fit_for_background=True`",
        f"- Result: mode {res['mode']}, {res['n_positions']} selected sources, "
        f"{res['n_candidates']} stamps, {res['n_good']} good candidates, kernel "
        f"{res['kernel_size']}², kernel sum {res['kernel_sum']:.4f} (truth "
        f"{SCENE['flux_scale']}), residual σ {res['residual_sigma']:.2f} "
        f"(decorrelated {res['residual_sigma_decorrelated']:.2f})",
        "",
        "| stage | wall [s] | CPU [s] | CPU/wall | share of wall | peak RSS [MB] "
        "| RSS after [MB] |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    total_wall = res["rows"][-1]["wall"]
    for r in res["rows"]:
        name = f"**{r['stage']}**" if r["stage"] == "total" else r["stage"]
        ratio = r["cpu"] / r["wall"] if r["wall"] > 0 else float("nan")
        lines.append(f"| {name} | {r['wall']:.2f} | {r['cpu']:.2f} | {ratio:.2f} | "
                     f"{100 * r['wall'] / total_wall:.0f}% | {r['peak_rss_mb']:.0f} | "
                     f"{r['rss_mb']:.0f} |")
    lines += [
        "",
        "numba kernels compiled beforehand (warm-up on a 256² pair, not timed). Peak RSS is the "
        "process high-water mark at the end of each stage (it includes the warm-up and "
        "everything still held from earlier stages); load … subtract is one "
        "`subtract_exposures` call.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="image side (default 4096)")
    parser.add_argument("--stars", type=int, default=None,
                        help=f"number of stars (default {STARS_AT_4096} at 4096², same density "
                             "at other sizes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="numba threads in the timed process (default: all)")
    parser.add_argument("--write", action="store_true",
                        help=f"append the table to {HERE / 'RESULTS.md'}")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        _child(json.loads(args._child))
        return 0

    sys.path.insert(0, str(ROOT))
    from diffim.simulate import simulate_pair, write_pair

    size = args.size
    n_stars = args.stars if args.stars is not None else default_stars(size)
    info = machine_info()
    info["date"] = datetime.date.today().isoformat()
    command = "python benchmarks/bench_stages.py " + shlex.join(argv if argv is not None
                                                                else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="diffim-stages-") as tmp:
        print(f"simulating {size}² with {n_stars} stars ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        pair = simulate_pair(shape=(size, size), n_stars=n_stars, seed=size, **SCENE)
        tpath, spath = write_pair(pair, tmp, prefix=f"s{size}_")
        del pair
        print(f"  simulated in {time.perf_counter() - t0:.1f} s; timing stages ...",
              file=sys.stderr, flush=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        spec = {"template": str(tpath), "science": str(spath), "threads": args.threads,
                "output": str(Path(tmp) / "difference.fits")}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child",
                               json.dumps(spec)], capture_output=True, text=True, env=env)
        sys.stderr.write(proc.stderr if proc.returncode else "")
        if proc.returncode != 0:
            raise SystemExit("benchmark child failed")
        res = json.loads(proc.stdout.strip().splitlines()[-1])

    text = render(info, size, n_stars, res, command.strip(), args.threads)
    print(text)
    if args.write:
        path = HERE / "RESULTS.md"
        prefix = "\n" if path.exists() and path.read_text() and not \
            path.read_text().endswith("\n\n") else ""
        with open(path, "a") as f:
            f.write(prefix + text)
        print(f"appended to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
