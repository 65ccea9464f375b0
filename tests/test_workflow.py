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


def test_dry_run(workdir):
    proc = _snakemake(workdir, "--dry-run", "--cores", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    for rule in ("simulate_demo", "diffim_config", "subtract", "all"):
        assert rule in out
    for pair in ("demo1", "demo2"):
        assert f"results/{pair}/diff.fits" in out


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


def test_pairs_sheet_duplicate_name(workdir):
    sheet = workdir / "config" / "dup.tsv"
    sheet.write_text("pair\ttemplate\tscience\na\tt.fits\ts.fits\na\tt2.fits\ts2.fits\n")
    cfg = _write_config(workdir, pairs=str(sheet))
    proc = _snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", str(cfg))
    assert proc.returncode != 0
    assert "repeated" in proc.stderr + proc.stdout


def test_pairs_sheet_bad_name(workdir):
    sheet = workdir / "config" / "bad.tsv"
    sheet.write_text("pair\ttemplate\tscience\nbad/name\tt.fits\ts.fits\n")
    cfg = _write_config(workdir, pairs=str(sheet))
    proc = _snakemake(workdir, "--dry-run", "--cores", "1", "--configfile", str(cfg))
    assert proc.returncode != 0


@pytest.mark.slow
def test_demo_run(workdir):
    """Run the whole demo on two small pairs (needs the core: diffim.task)."""
    pytest.importorskip("diffim.task", reason="diffim.task is not importable yet")
    pytest.importorskip("diffim.simulate", reason="diffim.simulate is not written yet")
    from astropy.io import fits

    cfg = _write_config(workdir, demo={"size": 256, "n_stars": 100})
    proc = _snakemake(workdir, "--cores", "2", "--configfile", str(cfg), "--show-failed-logs")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for pair in ("demo1", "demo2"):
        diff = workdir / "results" / pair / "diff.fits"
        with fits.open(diff) as hdul:
            assert {"IMAGE", "MASK", "VARIANCE"} <= {h.name for h in hdul}
            assert hdul["IMAGE"].data.shape == (256, 256)
        assert (workdir / "results" / pair / "kernel.fits").is_file()
        assert (workdir / "logs" / "subtract" / f"{pair}.log").is_file()
        assert (workdir / "results" / "benchmarks" / "subtract" / f"{pair}.tsv").is_file()
