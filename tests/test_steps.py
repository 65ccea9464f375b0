"""The workflow's steps as CLI subcommands: the chain equals the one-call result."""

import json

import numpy as np
import pytest
from astropy.io import fits

from diffim.cli import main
from diffim.config import ImagePsfMatchConfig
from diffim.image import read_fits
from diffim.simulate import simulate_pair, write_pair
from diffim.task import ImagePsfMatchTask

CONFIG = """\
kernel:
  name: AL
  AL:
    fit_for_background: true
    spatial_kernel_order: 1
    spatial_bg_order: 1
    size_cell_x: 96
    size_cell_y: 96
"""


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("steps")
    pair = simulate_pair(shape=(288, 288), n_stars=120, template_fwhm=3.5, science_fwhm=2.6,
                         fwhm_gradient=0.1, seed=11)
    template, science = write_pair(pair, d, prefix="p_")[:2]
    cfg = d / "config.yaml"
    cfg.write_text(CONFIG)
    return d, template, science, cfg


def _run(argv, capsys):
    code = main([*argv, "-q"])
    err = capsys.readouterr().err
    return code, err


def _chain(d, template, science, cfg, capsys, convolve):
    out = d / convolve
    c = ["--config", str(cfg)]
    steps = [
        ["warp", template, science, "-o", out / "warp.fits"],
        ["detect", out / "warp.fits", "--which", "template", "-o", out / "t.ecsv"],
        ["detect", science, "-o", out / "s.ecsv"],
        ["select", out / "warp.fits", science, "--template-sources", out / "t.ecsv",
         "--science-sources", out / "s.ecsv", "-o", out / "cand.ecsv",
         "--convolve", convolve],
        ["solve", out / "warp.fits", science, "--candidates", out / "cand.ecsv",
         "-o", out / "sol.fits"],
        ["spatial", out / "warp.fits", science, "--candidates", out / "cand.ecsv",
         "--solutions", out / "sol.fits", "-o", out / "kernel.fits",
         "--solutions-out", out / "final.fits", "--metadata-out", out / "meta.json"],
        ["subtract", out / "warp.fits", science, "--kernel", out / "kernel.fits",
         "-o", out / "diff.fits", "--matched-out", out / "matched.fits"],
    ]
    for argv in steps:
        code, err = _run([str(a) for a in argv] + c, capsys)
        assert code == 0, (argv[0], err)
    return out


@pytest.mark.parametrize("convolve", ["template", "science"])
def test_step_chain_equals_one_call(pair_files, capsys, convolve):
    d, template, science, cfg = pair_files
    out = _chain(d, template, science, cfg, capsys, convolve)
    mode = {"template": "convolveTemplate", "science": "convolveScience"}[convolve]
    lib = ImagePsfMatchTask(ImagePsfMatchConfig.from_yaml(cfg)).subtract_exposures(
        read_fits(template), read_fits(science), mode=mode)
    wf = read_fits(out / "diff.fits")
    a, b = wf.masked_image, lib.subtracted_masked_image
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.variance, b.variance)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert wf.psf_fwhm == lib.subtracted_exposure.psf_fwhm
    meta = json.loads((out / "meta.json").read_text())
    assert meta["mode"] == mode
    assert meta["nGoodCandidates"] == lib.metadata["nGoodCandidates"]
    with fits.open(out / "kernel.fits") as hdul:
        h = hdul[0].header
        assert h["DIFFSTEP"] == "spatial" and h["PSFMMODE"] == mode
        assert json.loads(h["DIFFCONF"])["kernel"]["name"] == "AL"
        np.testing.assert_array_equal(hdul["COEFFS"].data,
                                      lib.psf_matching_kernel.coefficients)


def test_step_errors_name_the_file(pair_files, capsys, tmp_path):
    d, template, science, cfg = pair_files
    out = _chain(d, template, science, cfg, capsys, "template")
    # a missing input is one line naming it
    code, err = _run(["solve", str(out / "warp.fits"), str(science), "--candidates",
                      str(tmp_path / "none.ecsv"), "-o", str(tmp_path / "s.fits")], capsys)
    assert code == 1 and "none.ecsv" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.fits").exists()
    # solutions of other inputs are refused, not silently mixed in
    other = tmp_path / "other.fits"
    pair = simulate_pair(shape=(288, 288), n_stars=60, seed=12)
    write_pair(pair, tmp_path, prefix="o_")
    code, err = _run(["spatial", str(tmp_path / "o_template.fits"),
                      str(tmp_path / "o_science.fits"), "--candidates", str(out / "cand.ecsv"),
                      "--solutions", str(out / "sol.fits"), "-o", str(other),
                      "--solutions-out", str(tmp_path / "f.fits"),
                      "--metadata-out", str(tmp_path / "m.json"), "--config", str(cfg)],
                     capsys)
    assert code == 1 and "other inputs" in err
    assert not other.exists()
    # a kernel file without a background model
    bare = tmp_path / "bare.fits"
    with fits.open(out / "kernel.fits") as hdul:
        fits.HDUList([h for h in hdul if h.name != "BACKGROUND"]).writeto(bare)
    code, err = _run(["subtract", str(out / "warp.fits"), str(science), "--kernel", str(bare),
                      "-o", str(tmp_path / "d.fits")], capsys)
    assert code == 1 and "bare.fits" in err
    assert not (tmp_path / "d.fits").exists()


def test_qa_from_products(pair_files, capsys):
    d, template, science, cfg = pair_files
    out = _chain(d, template, science, cfg, capsys, "template")
    code, err = _run(["qa", str(out / "warp.fits"), str(science), "--out-dir",
                      str(out / "qa"), "--metrics-out", str(out / "metrics.json"),
                      "--kernel", str(out / "kernel.fits"), "--solutions",
                      str(out / "final.fits"), "--candidates", str(out / "cand.ecsv"),
                      "--metadata", str(out / "meta.json"), "--difference",
                      str(out / "diff.fits"), "--matched", str(out / "matched.fits"),
                      "--config", str(cfg)], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "convolveTemplate"
    assert metrics["n_good_candidates"] > 5
    assert 0.9 < metrics["noise_ratio"] < 1.1
    pngs = sorted(p.name for p in (out / "qa").glob("*.png"))
    assert pngs == ["candidates.png", "difference.png", "kernel_basis.png", "kernel_mosaic.png",
                    "spatial_cells.png", "spatial_model.png"]
