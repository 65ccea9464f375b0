"""Time each stage of one subtraction on a simulated pair.

Usage::

    python benchmarks/bench_stages.py                  # 4096², print a Markdown table
    python benchmarks/bench_stages.py --size 2048
    python benchmarks/bench_stages.py --write          # also append it to benchmarks/RESULTS.md

The parent process simulates a pair (Moffat PSFs, FWHM 3.5 px in the template and 4.6 px in
the science image at the centre, varying across the field, 6000 stars at 4096² and the same
density at other sizes) and writes it to a temporary directory.  A fresh child process then
warms numba up on a tiny pair (so compilation is not timed), reads the pair, runs one
``ImagePsfMatchTask.subtract_exposures`` call and reports the stage timings the task records
itself in ``result.metadata["timings"]`` (warp, detect, select, solve, spatial, convolve,
subtract) and the call as a whole, then times ``decorrelate_result`` and ``write_fits``.
For each stage:
wall time, CPU time (``time.process_time``, all threads) and the process's peak RSS
(``ru_maxrss``, a high-water mark: a stage's figure is the peak reached by its end).
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (SCENE, STARS_AT_4096, WARMUP, config, load_average, machine_info, n_stars,
                     peak_rss_mb, residual_sigma)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_CALL = "subtract_exposures"  # the row of the whole call, after the stages it is made of


def _timed(rows, name, func, *args):
    w0, c0 = time.perf_counter(), time.process_time()
    out = func(*args)
    rows.append({"stage": name, "wall": time.perf_counter() - w0,
                 "cpu": time.process_time() - c0, "peak_rss_mb": peak_rss_mb()})
    return out


def _child(spec):
    """Run in a fresh process; print one JSON line with the per-stage measurements."""
    if spec.get("threads"):
        import numba

        numba.set_num_threads(spec["threads"])
    from diffim.decorrelate import decorrelate_result
    from diffim.image import read_fits, write_fits
    from diffim.simulate import simulate_pair
    from diffim.task import ImagePsfMatchTask

    # numba warm-up: compile (or load from the cache) every kernel the run uses
    tiny = simulate_pair(**WARMUP, **{k: v for k, v in SCENE.items() if k != "n_transients"})
    w_res = ImagePsfMatchTask(config()).subtract_exposures(tiny.template, tiny.science)
    decorrelate_result(w_res, tiny.template, tiny.science)
    del tiny, w_res

    rows = []
    load = load_average()
    w0, c0 = time.perf_counter(), time.process_time()
    template, science = _timed(rows, "load", lambda: (read_fits(spec["template"]),
                                                      read_fits(spec["science"])))
    call = []
    result = _timed(call, _CALL, ImagePsfMatchTask(config()).subtract_exposures, template,
                    science)
    rows += [{"stage": name, **entry} for name, entry in result.metadata["timings"].items()]
    rows += call
    decorrelated = _timed(rows, "decorrelate", decorrelate_result, result,
                          result.warped_exposure, science)
    _timed(rows, "write", write_fits, decorrelated, spec["output"])
    rows.append({"stage": "total", "wall": time.perf_counter() - w0,
                 "cpu": time.process_time() - c0, "peak_rss_mb": peak_rss_mb()})
    ny, nx = science.shape
    meta = result.metadata
    print(json.dumps({
        "rows": rows, "mode": meta["mode"], "load": load, "load_after": load_average(),
        "n_candidates": len(result.kernel_cell_set.candidates()),
        "kernel_size": int(result.psf_matching_kernel.size),
        "kernel_sum": float(result.psf_matching_kernel.kernel_sum(nx / 2, ny / 2)),
        "residual_sigma": residual_sigma(result.subtracted_masked_image),
        "residual_sigma_decorrelated": residual_sigma(decorrelated.masked_image),
        "n_good": meta.get("nGoodCandidates")}))


def render(info, size, stars, res, command, threads):
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
        f"- Scene: `simulate_pair(shape=({size}, {size}), n_stars={stars}, {scene}, "
        f"seed={size})`; `ImagePsfMatchConfig()` with `fit_for_background=True`",
        f"- Result: mode {res['mode']}, "
        f"{res['n_candidates']} kernel candidates, {res['n_good']} good, kernel "
        f"{res['kernel_size']}², kernel sum {res['kernel_sum']:.4f} (truth "
        f"{SCENE['flux_scale']}), residual σ {res['residual_sigma']:.2f} "
        f"(decorrelated {res['residual_sigma_decorrelated']:.2f})",
        f"- 1-minute load average before / after the timed run: {res['load']:.1f} / "
        f"{res['load_after']:.1f} (the run itself adds up to {threads or info['numba_threads']}; "
        f"above {info['cpu_count']}, other processes were taking CPU from it)",
        "",
        "| stage | wall [s] | CPU [s] | CPU/wall | share of wall | peak RSS [MB] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total_wall = res["rows"][-1]["wall"]
    for r in res["rows"]:
        name = {"total": "**total**", _CALL: f"*= `{_CALL}` call*"}.get(r["stage"], r["stage"])
        ratio = r["cpu"] / r["wall"] if r["wall"] > 0 else float("nan")
        lines.append(f"| {name} | {r['wall']:.2f} | {r['cpu']:.2f} | {ratio:.2f} | "
                     f"{100 * r['wall'] / total_wall:.0f}% | {r['peak_rss_mb']:.0f} |")
    lines += [
        "",
        "numba kernels compiled beforehand (warm-up on a 256² pair, not timed). Peak RSS is the "
        "process high-water mark at the end of each stage (it includes the warm-up and "
        "everything still held from earlier stages); the stages from warp to subtract are one "
        f"`{_CALL}` call, timed by the task itself (the italic row times the whole call).",
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
    stars = args.stars if args.stars is not None else n_stars(size)
    info = machine_info()
    info["date"] = datetime.date.today().isoformat()
    command = "python benchmarks/bench_stages.py " + shlex.join(argv if argv is not None
                                                                else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="diffim-stages-") as tmp:
        print(f"simulating {size}² with {stars} stars ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        pair = simulate_pair(shape=(size, size), n_stars=stars, seed=size, **SCENE)
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

    text = render(info, size, stars, res, command.strip(), args.threads)
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
