"""The ``diffim`` command line: help, error reporting, simulate and subtract."""

import subprocess
import sys

import numpy as np
import pytest

from diffim.cli import main


def _error_lines(err):
    return [line for line in err.splitlines() if line.startswith("diffim: error:")]


def _touch(path):
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("argv", [["--help"], ["simulate", "--help"], ["subtract", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: diffim" in out


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "diffim", "subtract", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--kernel-out" in proc.stdout and "--convolve" in proc.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("diffim ")


@pytest.mark.parametrize("argv", [
    [],                                            # no subcommand
    ["subtract"],                                  # -o is required
    ["subtract", "only_one.fits", "-o", "x.fits"],  # TEMPLATE without SCIENCE
    ["subtract", "-o", "x.fits", "--convolve", "sideways"],
    ["subtract", "-o", "x.fits", "--threads", "0"],
])
def test_usage_errors_exit_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err
    assert not (tmp_path / "x.fits").exists()


def test_missing_template(tmp_path, capsys):
    science = _touch(tmp_path / "science.fits")
    missing = tmp_path / "no_such_template.fits"
    out = tmp_path / "diff.fits"
    rc = main(["subtract", str(missing), str(science), "-o", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert str(missing) in lines[0] and "template" in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_missing_science(tmp_path, capsys):
    template = _touch(tmp_path / "template.fits")
    missing = tmp_path / "nope" / "science.fits"
    out = tmp_path / "diff.fits"
    assert main(["subtract", str(template), str(missing), "-o", str(out)]) == 1
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(missing) in lines[0]
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    template = _touch(tmp_path / "template.fits")
    science = _touch(tmp_path / "science.fits")
    cfg = tmp_path / "absent.yaml"
    out = tmp_path / "diff.fits"
    rc = main(["subtract", str(template), str(science), "-o", str(out), "--config", str(cfg)])
    assert rc == 1
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(cfg) in lines[0]
    assert not out.exists()


def test_bad_config_key(tmp_path, capsys):
    pytest.importorskip("diffim.config", reason="diffim.config is not written yet")
    template = _touch(tmp_path / "template.fits")
    science = _touch(tmp_path / "science.fits")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("no_such_option_xyz: 3\n")
    out = tmp_path / "diff.fits"
    rc = main(["subtract", str(template), str(science), "-o", str(out), "--config", str(cfg)])
    assert rc == 1
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert "no_such_option_xyz" in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_traceback_only_with_double_verbose(tmp_path, capsys):
    science = _touch(tmp_path / "science.fits")
    argv = ["subtract", str(tmp_path / "missing.fits"), str(science), "-o",
            str(tmp_path / "d.fits")]
    assert main([*argv, "-v", "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and len(_error_lines(err)) == 1


def test_unreadable_fits_is_one_line(tmp_path, capsys):
    pytest.importorskip("diffim.image", reason="diffim.image is not written yet")
    pytest.importorskip("diffim.config", reason="diffim.config is not written yet")
    pytest.importorskip("diffim.task", reason="diffim.task is not importable yet")
    template = tmp_path / "template.fits"
    template.write_text("this is not a FITS file\n")
    science = _touch(tmp_path / "science.fits")
    out = tmp_path / "diff.fits"
    assert main(["subtract", str(template), str(science), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.fixture(scope="module")
def simulated_pair(tmp_path_factory):
    """A seeded 256x256 pair written by ``diffim simulate``."""
    pytest.importorskip("diffim.simulate", reason="diffim.simulate is not written yet")
    out_dir = tmp_path_factory.mktemp("sim")
    rc = main(["simulate", "--out-dir", str(out_dir), "--size", "256", "--seed", "7",
               "--prefix", "p_", "--n-transients", "2", "-q"])
    assert rc == 0
    files = sorted(out_dir.glob("p_*.fits"))
    assert len(files) == 2
    template = next(f for f in files if "template" in f.name)
    science = next(f for f in files if "science" in f.name)
    return template, science


def test_simulate_writes_files(tmp_path, capsys):
    pytest.importorskip("diffim.simulate", reason="diffim.simulate is not written yet")
    from astropy.io import fits

    argv = ["simulate", "--out-dir", str(tmp_path / "a"), "--size", "128", "--seed", "3",
            "--prefix", "x_", "-q"]
    assert main(argv) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 2
    for p in paths:
        with fits.open(p) as hdul:
            data = [h.data for h in hdul if h.data is not None]
            assert data and data[0].shape == (128, 128)

    # same seed, same pixels
    argv[2] = str(tmp_path / "b")
    assert main(argv) == 0
    paths_b = capsys.readouterr().out.split()
    for pa, pb in zip(paths, paths_b):
        with fits.open(pa) as a, fits.open(pb) as b:
            da = next(h.data for h in a if h.data is not None)
            db = next(h.data for h in b if h.data is not None)
            np.testing.assert_array_equal(da, db)


def test_subtract_simulated_pair(simulated_pair, tmp_path):
    pytest.importorskip("diffim.task", reason="diffim.task is not importable yet")
    from astropy.io import fits

    template, science = simulated_pair
    out = tmp_path / "out" / "diff.fits"
    kernel = tmp_path / "kernel.fits"
    rc = main(["subtract", str(template), str(science), "-o", str(out), "--kernel-out",
               str(kernel), "--threads", "1", "-q"])
    assert rc == 0
    assert out.is_file() and kernel.is_file()
    with fits.open(out) as hdul:
        names = {h.name for h in hdul}
        assert {"IMAGE", "MASK", "VARIANCE"} <= names
        diff = hdul["IMAGE"].data
        var = hdul["VARIANCE"].data
        assert diff.shape == (256, 256) and var.shape == (256, 256)
        assert hdul["IMAGE"].header.get("DIFFPROD", hdul[0].header.get("DIFFPROD")) \
            == "difference"
    with fits.open(science) as hdul:
        sci = next(h.data for h in hdul if h.data is not None)
    # The stars are gone: the difference's robust scatter is far below the science image's.
    core = np.s_[32:-32, 32:-32]
    d = diff[core][np.isfinite(diff[core])]
    mad = np.median(np.abs(d - np.median(d)))
    assert mad < 0.2 * np.std(sci[core])


def test_match_mode_writes_matched_image(simulated_pair, tmp_path):
    pytest.importorskip("diffim.task", reason="diffim.task is not importable yet")
    from astropy.io import fits

    template, science = simulated_pair
    out = tmp_path / "matched.fits"
    rc = main(["subtract", str(template), str(science), "-o", str(out), "--mode", "match",
               "--convolve", "template", "-q"])
    assert rc == 0
    with fits.open(out) as hdul:
        assert {"IMAGE", "MASK", "VARIANCE"} <= {h.name for h in hdul}


@pytest.mark.slow
def test_subtract_builtin_demo(tmp_path):
    pytest.importorskip("diffim.task", reason="diffim.task is not importable yet")
    pytest.importorskip("diffim.simulate", reason="diffim.simulate is not written yet")
    out = tmp_path / "demo_diff.fits"
    assert main(["subtract", "-o", str(out), "-q"]) == 0
    assert out.is_file()
