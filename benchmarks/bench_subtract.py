"""Time ``ImagePsfMatchTask().subtract_exposures`` on large simulated pairs.

Usage::

    python benchmarks/bench_subtract.py                    # 2048² and 4096², print a table
    python benchmarks/bench_subtract.py --sizes 1024 --write

For each size the parent process simulates a pair (Moffat PSFs whose FWHM varies across the
field, template 3.5 px -> science 4.6 px at the centre, 6000 stars at 4096² and the same
density at other sizes), writes it to a temporary
directory, and starts a fresh Python process that reads the pair, warms numba up on a tiny
pair, and times one ``subtract_exposures`` call with the default configuration.  Running each
size in its own process makes the peak RSS (``ru_maxrss``) a per-size figure.

numba's compile time is measured apart: a first child, started with an empty numba cache,
runs a tiny 256² pair twice; the difference between the first and the second call is the
compile (and cache-write) time.  The size runs then load the compiled kernels from that cache.

``--write`` also writes ``benchmarks/RESULTS.md``.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (SCENE, STARS_AT_4096, WARMUP, config, load_average, machine_info, n_stars,
                     peak_rss_mb, residual_sigma)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

def _timed_subtract(task, template, science):
    w0, c0 = time.perf_counter(), time.process_time()
    result = task.subtract_exposures(template, science)
    return result, time.perf_counter() - w0, time.process_time() - c0


def _child(spec):
    """Run in a fresh process; print one JSON line with the measurements."""
    if spec.get("threads"):
        import numba

        numba.set_num_threads(spec["threads"])
    from diffim.simulate import simulate_pair
    from diffim.task import ImagePsfMatchTask

    out = {}
    tiny = simulate_pair(**WARMUP, **{k: v for k, v in SCENE.items() if k != "n_transients"})
    task = ImagePsfMatchTask(config())
    _, out["warm1_wall"], _ = _timed_subtract(task, tiny.template, tiny.science)
    if spec["kind"] == "warmup":
        _, out["warm2_wall"], _ = _timed_subtract(task, tiny.template, tiny.science)
    else:
        from diffim.image import read_fits

        t0 = time.perf_counter()
        template, science = read_fits(spec["template"]), read_fits(spec["science"])
        out["read_wall"] = time.perf_counter() - t0
        out["load"] = load_average()
        result, out["wall"], out["cpu"] = _timed_subtract(ImagePsfMatchTask(config()),
                                                          template, science)
        ny, nx = science.shape
        out["kernel_sum"] = result.psf_matching_kernel.kernel_sum(nx / 2, ny / 2)
        out["mode"] = str(result.metadata.get("mode", ""))
        out["residual_sigma"] = residual_sigma(result.subtracted_masked_image)
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def _run_child(spec, env):
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child",
                           json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark child failed ({spec['kind']} {spec.get('size', '')})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(info, compile_s, rows, threads):
    scene = ", ".join(f"{k}={v}" for k, v in SCENE.items())
    lines = [
        "# diffim benchmark: `ImagePsfMatchTask().subtract_exposures`",
        "",
        f"Run {info['date']} with `python benchmarks/bench_subtract.py "
        f"--sizes {' '.join(str(r['size']) for r in rows)}`.",
        "",
        f"- Machine: {info['platform']}, {info['processor']}, {info['cpu_count']} CPUs "
        f"(numba threads: {threads or info['numba_threads']})",
        f"- Software: Python {info['python']}, diffim {info['diffim']}, numpy {info['numpy']}, "
        f"scipy {info['scipy']}, numba {info['numba']}, astropy {info['astropy']}",
        f"- Scene: `simulate_pair({scene}, n_stars={STARS_AT_4096} at 4096² scaled by area, "
        "seed=size)`; "
        "default `ImagePsfMatchConfig()` with `fit_for_background=True`",
        f"- numba compile time (first call with an empty cache minus the warm call, "
        f"{WARMUP['shape'][0]}² pair): **{compile_s:.1f} s** — not included below",
        "",
        "| size | stars | wall [s] | CPU [s] | CPU/wall | peak RSS [MB] | read FITS [s] "
        "| residual σ | kernel sum (truth " + str(SCENE["flux_scale"]) + ") | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']}² | {r['n_stars']} | {r['wall']:.2f} | {r['cpu']:.2f} | "
            f"{r['cpu'] / r['wall']:.2f} | {r['peak_rss_mb']:.0f} | {r['read_wall']:.2f} | "
            f"{r['residual_sigma']:.2f} | {r['kernel_sum']:.4f} | {r['load']:.1f} |"
        )
    lines += [
        "",
        "wall/CPU: one `subtract_exposures` call (detection, kernel fit, spatial model, "
        "convolution, subtraction), numba kernels already compiled (loaded from the cache). "
        "Peak RSS: the whole child process (reading the pair, a warm-up on the tiny pair, the "
        "subtraction). Residual σ: robust scatter of difference/√variance on unmasked pixels "
        "(1 = noise-limited). Load: the machine's 1-minute load average just before the timed "
        "call; above the CPU count, other processes were taking CPU from it.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096],
                        help="image sides in pixels (default: 2048 4096)")
    parser.add_argument("--write", action="store_true",
                        help=f"also write {HERE / 'RESULTS.md'}")
    parser.add_argument("--threads", type=int, default=None,
                        help="numba threads in the timed processes (default: all)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        _child(json.loads(args._child))
        return 0

    sys.path.insert(0, str(ROOT))
    from diffim.simulate import simulate_pair, write_pair

    info = machine_info()
    info["date"] = datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory(prefix="diffim-bench-") as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=str(Path(tmp) / "numba-cache"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        print("numba warm-up (empty cache) ...", file=sys.stderr, flush=True)
        warm = _run_child({"kind": "warmup", "threads": args.threads}, env)
        compile_s = max(warm["warm1_wall"] - warm["warm2_wall"], 0.0)
        rows = []
        for size in args.sizes:
            print(f"simulating {size}² ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            pair = simulate_pair(shape=(size, size), n_stars=n_stars(size), seed=size, **SCENE)
            tpath, spath = write_pair(pair, tmp, prefix=f"s{size}_")
            del pair
            print(f"  simulated in {time.perf_counter() - t0:.1f} s; timing ...",
                  file=sys.stderr, flush=True)
            res = _run_child({"kind": "size", "size": size, "template": str(tpath),
                              "science": str(spath), "threads": args.threads}, env)
            res.update(size=size, n_stars=n_stars(size))
            rows.append(res)
            print(f"  {size}²: wall {res['wall']:.2f} s, CPU {res['cpu']:.2f} s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)

    text = render(info, compile_s, rows, args.threads)
    print(text)
    if args.write:
        (HERE / "RESULTS.md").write_text(text)
        print(f"wrote {HERE / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
