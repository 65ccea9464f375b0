"""The Snakemake workflow: lint, dry run, config validation and (when the core exists) a run."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("snakemake", reason="snakemake is not installed (pip install -e '.[workflow]')")

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"


def _snakemake(workdir, *args, timeout=600):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE),
           "--directory", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path):
    """A working directory holding a copy of config/ (the demo configuration)."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    return tmp_path


def _write_config(workdir, **overrides):
    cfg = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    for section, values in overrides.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = workdir / "config" / "test.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_no_top_level_default_dir():
    # A folder named `default` in the working directory is taken as a workflow profile.
    assert not (ROOT / "default").exists()


def test_lint(workdir):
    proc = _snakemake(workdir, "--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr


STEPS = ("warp", "detect", "select", "solve", "spatial", "subtract", "qa")

# Every file the demo documents (README "Workflow outputs"), per pair.
PAIR_PRODUCTS = (
    "warp/template.fits", "detect/template_sources.ecsv", "detect/science_sources.ecsv",
    "select/candidates.ecsv", "solve/solutions.fits", "spatial/kernel.fits",
    "spatial/solutions.fits", "spatial/metadata.json", "subtract/diff.fits",
    "subtract/matched.fits", "subtract/diff_decorrelated.fits",
    "subtract/psf_decorrelated.fits", "qa/metrics.json", "qa/plots/candidates.png",
    "qa/plots/kernel_basis.png", "qa/plots/kernel_mosaic.png", "qa/plots/spatial_model.png",
    "qa/plots/spatial_cells.png", "qa/plots/difference.png",
)


def _job_counts(output):
    """{rule: count} from the 'Job stats' table snakemake prints."""
    counts, in_table = {}, False
    for line in output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
            continue
        if in_table:
            if len(parts) == 2 and parts[1].isdigit():
                if parts[0] != "total":
                    counts[parts[0]] = int(parts[1])
            elif parts and not set(parts[0]) <= {"-"}:
                in_table = False
    return counts


def test_dry_run(workdir):
    proc = _snakemake(workdir, "--dry-run", "--cores", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    counts = _job_counts(out)
    assert counts == {"simulate_demo": 2, "diffim_config": 1, "warp": 2, "detect": 4,
                      "select": 2, "solve": 2, "spatial": 2, "subtract": 2, "qa": 2, "all": 1}
    for pair in ("demo1", "demo2"):
        assert f"results/{pair}/subtract/diff.fits" in out


def test_dry_run_from_repo_root():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--dry-run", "--cores", "2",
                           "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_rejects_bad_value(workdir):
    cfg = _write_config(workdir, demo={"size": "big"})
    proc = _snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", str(cfg))
    assert proc.returncode != 0
    assert "size" in proc.stderr or "size" in proc.stdout


def test_schema_rejects_unknown_key(workdir):
    cfg = _write_config(workdir, subtract={"thread": 2})
    proc = _snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", str(cfg))
    assert proc.returncode != 0
    assert "thread" in proc.stderr + proc.stdout


@pytest.mark.parametrize("sheet, words", [
    ("pair\ttemplate\tscience\na\tt.fits\ts.fits\na\tt.fits\ts.fits\n", ["'a'", "repeated"]),
    ("pair\ttemplate\na\tt.fits\n", ["lacks the column", "science"]),
    ("pair\ttemplate\tscience\nA\tnowhere/t.fits\ts.fits\n", ["'A'", "nowhere/t.fits"]),
    ("pair\ttemplate\tscience\nbad/name\tt.fits\ts.fits\n", ["bad/name"]),
    ("pair\ttemplate\tscience\tmjd\nA\tt.fits\ts.fits\tyesterday\n", ["yesterday"]),
], ids=["duplicate-id", "missing-column", "missing-file", "bad-name", "bad-mjd"])
def test_pairs_sheet_errors_name_the_problem(workdir, sheet, words):
    """A bad pairs sheet stops the run before any job, naming the sheet and the problem."""
    for name in ("t.fits", "s.fits"):
        (workdir / name).write_bytes(b"")
    (workdir / "config" / "bad.tsv").write_text(sheet)
    cfg = _write_config(workdir, pairs="config/bad.tsv")
    proc = _snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", str(cfg))
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "bad.tsv" in text or "bad/name" in text or "yesterday" in text
    for w in words:
        assert w in text, text
    assert not (workdir / "results").exists()


def test_light_curve_needs_mjd(workdir):
    cfg = _write_config(workdir, light_curve={"objects": [{"name": "v", "x": 1.0, "y": 2.0}]})
    proc = _snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", str(cfg))
    assert proc.returncode != 0
    assert "mjd" in proc.stderr + proc.stdout


def test_wrong_type_in_step_section(workdir):
    cfg = _write_config(workdir, solve={"threads": "many"})
    proc = _snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", str(cfg))
    assert proc.returncode != 0
    assert "threads" in proc.stderr + proc.stdout


def _copy_repo(dest):
    """A runnable copy of the repository: workflow, config and package."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow", "config", "envs", "diffim"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _run_in(repo, *args, timeout=900):
    cmd = [sys.executable, "-m", "snakemake", *args]
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)


def _small_demo(repo):
    cfg = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    cfg["demo"].update(size=256, n_stars=100)
    path = repo / "config" / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo (two 256² pairs) run once, end to end, in a copy of the repository."""
    repo = _copy_repo(tmp_path_factory.mktemp("repo"))
    cfg = _small_demo(repo)
    proc = _run_in(repo, "--cores", "2", "--configfile", str(cfg), "--show-failed-logs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return repo, cfg


@pytest.mark.slow
def test_demo_run_products(demo_run):
    from astropy.io import fits

    repo, _ = demo_run
    for pair in ("demo1", "demo2"):
        for product in PAIR_PRODUCTS:
            path = repo / "results" / pair / product
            assert path.is_file() and path.stat().st_size > 0, path
        with fits.open(repo / "results" / pair / "subtract" / "diff.fits") as hdul:
            assert {"IMAGE", "MASK", "VARIANCE"} <= {h.name for h in hdul}
            assert hdul["IMAGE"].data.shape == (256, 256)
            # provenance: version, step and its options
            assert hdul[0].header["DIFFIMV"]
            assert hdul[0].header["DIFFSTEP"] == "subtract"
            assert "kernel" in hdul[0].header["DIFFOPTS"]
        for step in STEPS:
            stem = f"{pair}_science" if step == "detect" else pair
            assert (repo / "logs" / step / f"{stem}.log").is_file()
            assert (repo / "results" / "benchmarks" / step / f"{stem}.tsv").is_file()


@pytest.mark.slow
def test_demo_second_run_does_nothing(demo_run):
    repo, cfg = demo_run
    proc = _run_in(repo, "--cores", "2", "--configfile", str(cfg), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_changing_one_step_option_reruns_that_step_and_later(demo_run):
    repo, cfg = demo_run
    changed = yaml.safe_load(cfg.read_text())
    changed["select"]["convolve"] = "template"
    path = repo / "config" / "changed.yaml"
    path.write_text(yaml.safe_dump(changed))
    proc = _run_in(repo, "--cores", "2", "--configfile", str(path), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = _job_counts(proc.stdout + proc.stderr)
    assert counts == {"select": 2, "solve": 2, "spatial": 2, "subtract": 2, "qa": 2, "all": 1}


@pytest.mark.slow
def test_report_holds_the_qa_plots(demo_run):
    repo, cfg = demo_run
    proc = _run_in(repo, "--configfile", str(cfg), "--report", "report.html")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    html = (repo / "report.html").read_text(errors="replace")
    for name in ("candidates.png", "kernel_mosaic.png", "difference.png"):
        assert name in html


@pytest.mark.slow
def test_workflow_difference_equals_library(demo_run):
    """The chain of step rules gives what one subtract_exposures call gives."""
    import numpy as np

    from diffim.config import ImagePsfMatchConfig
    from diffim.image import read_fits
    from diffim.task import ImagePsfMatchTask

    repo, _ = demo_run
    config = ImagePsfMatchConfig.from_yaml(repo / "results" / "diffim_config.yaml")
    template = read_fits(repo / "resources" / "demo" / "demo1_template.fits")
    science = read_fits(repo / "resources" / "demo" / "demo1_science.fits")
    lib = ImagePsfMatchTask(config).subtract_exposures(template, science)
    wf = read_fits(repo / "results" / "demo1" / "subtract" / "diff.fits")
    a, b = wf.masked_image, lib.subtracted_masked_image
    np.testing.assert_array_equal(np.isfinite(a.image), np.isfinite(b.image))
    ok = np.isfinite(b.image)
    scale = np.abs(b.image[ok]).max()
    assert np.abs(a.image[ok] - b.image[ok]).max() <= 1e-6 * scale
    okv = np.isfinite(b.variance)
    assert np.abs(a.variance[okv] - b.variance[okv]).max() <= 1e-6 * b.variance[okv].max()
    np.testing.assert_array_equal(a.mask, b.mask)
    assert wf.psf_fwhm == pytest.approx(lib.subtracted_exposure.psf_fwhm, rel=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_products(demo_run, tmp_path):
    """SIGKILL snakemake mid-way, restart with --rerun-incomplete: same products."""
    import os
    import random
    import signal
    import time

    import numpy as np
    from astropy.io import fits

    ref_repo, _ = demo_run
    repo = _copy_repo(tmp_path / "repo")
    cfg = _small_demo(repo)
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "2",
                             "--configfile", str(cfg)], cwd=repo, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    # kill when a randomly chosen step's product appears, i.e. at a random job
    seed = random.randrange(10**6)
    step_product = random.Random(seed).choice(PAIR_PRODUCTS[:6])
    marker = repo / "results" / "demo1" / step_product
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed (seed {seed})"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    unlock = _run_in(repo, "--configfile", str(cfg), "--unlock")
    assert unlock.returncode == 0, unlock.stderr
    rerun = _run_in(repo, "--cores", "2", "--configfile", str(cfg), "--rerun-incomplete")
    assert rerun.returncode == 0, f"seed {seed}: " + rerun.stdout + rerun.stderr
    for pair in ("demo1", "demo2"):
        for product in ("subtract/diff.fits", "subtract/matched.fits", "spatial/kernel.fits"):
            with fits.open(repo / "results" / pair / product) as a, \
                    fits.open(ref_repo / "results" / pair / product) as b:
                for ha, hb in zip(a, b):
                    if ha.data is not None:
                        np.testing.assert_array_equal(ha.data, hb.data)


def test_saao_example_config_dry_run(shared_data):
    """The survey example plans every epoch and the light curve (needs ../shared/data)."""
    if not (shared_data / "saao_kb13475" / "AKB13475I0100.fits").is_file():
        pytest.skip("SAAO KB13475 frames not found")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--dry-run", "--cores", "2",
                           "--configfile", "config/examples/saao.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = _job_counts(proc.stdout + proc.stderr)
    assert counts["subtract"] == 23 and counts["light_curve"] == 1   # every epoch but 0100
    assert "results/light_curves/KB13475.ecsv" in proc.stdout


@pytest.mark.slow
def test_lightcurve_command_measures_a_transient(demo_run):
    """`diffim lightcurve` on a decorrelated demo difference recovers a transient's flux."""
    import numpy as np
    from astropy.table import Table

    repo, _ = demo_run
    truth = Table.read(repo / "resources" / "demo" / "demo1_transients.ecsv")
    k = int(np.argmax(truth["flux"]))
    x, y = float(truth["x"][k]), float(truth["y"][k])
    res = repo / "results"
    out = repo / "lc.ecsv"
    proc = subprocess.run(
        [sys.executable, "-m", "diffim", "lightcurve",
         "--differences", str(res / "demo1/subtract/diff_decorrelated.fits"),
         "--psfs", str(res / "demo1/subtract/psf_decorrelated.fits"),
         "--warped", str(res / "demo1/warp/template.fits"),
         "--kernels", str(res / "demo1/spatial/kernel.fits"),
         "--times", "1.0", "--position", str(x), str(y), "--frame", "science",
         "-o", str(out), "--plot", str(repo / "lc.png")],
        cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lc = Table.read(out)
    assert len(lc) == 1 and lc["flags"][0] == 0
    from diffim.spatial import SpatialKernel

    # the truth is in science units; the light curve divides by the kernel sum there
    ksum = SpatialKernel.read_fits(res / "demo1/spatial/kernel.fits").kernel_sum(x, y)
    pull = (lc["flux"][0] - truth["flux"][k] / ksum) / lc["flux_err"][0]
    assert lc["snr"][0] > 5 and abs(pull) < 5
    assert (repo / "lc.png").stat().st_size > 1000
