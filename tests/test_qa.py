"""diffim.qa: diagnostic plots, metrics, the QA switches and ``diffim qa``."""

import json
import math
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from diffim import qa
from diffim.cli import main
from diffim.config import ImagePsfMatchConfig, QAConfig
from diffim.image import read_fits
from diffim.simulate import simulate_pair, write_pair
from diffim.task import ImagePsfMatchTask

SEED = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = (
    "kernel_sum_center", "kernel_sum_min", "kernel_sum_max", "kernel_sum_std",
    "spatial_condition_number", "n_good_candidates", "n_bad_candidates",
    "n_unknown_candidates", "kernel_constraint", "background_constraint", "candidates",
    "x2nrm", "x2nrm_median_per_stamp", "footprint_ratio_mean", "footprint_ratio_std",
    "footprint_n_stars", "sky_footprint_ratio", "noise_ratio", "noise_ratio_robust",
    "noise_n_pixels", "n_positive_5sigma", "n_negative_5sigma", "positive_detections",
    "negative_detections", "metadata",
)


def _config():
    cfg = ImagePsfMatchConfig()
    cfg.kernel.active.fit_for_background = True
    cfg.kernel.active.spatial_kernel_order = 1
    return cfg


@pytest.fixture(scope="module")
def run():
    pair = simulate_pair(shape=(384, 384), n_stars=250, n_transients=3, seed=SEED)
    result = ImagePsfMatchTask(_config()).subtract_exposures(pair.template, pair.science)
    return pair, result


@pytest.fixture(scope="module")
def plots(run, tmp_path_factory):
    pair, result = run
    outdir = tmp_path_factory.mktemp("qa")
    pyplot_before = "matplotlib.pyplot" in sys.modules
    paths = qa.make_qa_plots(result, pair.template, pair.science, outdir, _config())
    return outdir, paths, pyplot_before


@pytest.fixture(scope="module")
def metrics(run):
    pair, result = run
    return qa.compute_metrics(result, pair.template, pair.science)


def _check_png(path, min_bytes=20_000, min_px=600):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > min_bytes, f"{path.name} is only {len(data)} bytes"
    rgb = imread(path)[..., :3]
    ny, nx = rgb.shape[:2]
    assert ny >= min_px and nx >= min_px, f"{path.name} is {nx}x{ny} px"
    gray = rgb.mean(axis=2)
    assert gray.std() > 0.05, f"{path.name} looks blank"
    # the panels differ: left and right halves, top and bottom halves are not alike
    half_x, half_y = nx // 2, ny // 2
    assert np.abs(gray[:, :half_x] - gray[:, nx - half_x:]).mean() > 0.01
    assert np.abs(gray[:half_y] - gray[ny - half_y:]).mean() > 0.01
    return rgb


# -- plots -------------------------------------------------------------------------------------

def test_every_plot_is_written(plots):
    outdir, paths, pyplot_before = plots
    assert [p.name for p in paths] == list(qa.PLOT_FILES.values())
    assert all(p.parent == outdir and p.is_file() for p in paths)
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in outdir.iterdir()) == sorted(qa.PLOT_FILES.values())
    if not pyplot_before:
        assert "matplotlib.pyplot" not in sys.modules, "qa must not use pyplot"


@pytest.mark.parametrize("name", list(qa.PLOT_FILES.values()))
def test_plot_is_a_real_png(plots, name):
    outdir, _, _ = plots
    _check_png(outdir / name)


def test_candidate_frames_show_status(plots):
    outdir, _, _ = plots
    rgb = imread(outdir / "candidates.png")[..., :3]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    green = (g > 0.5) & (r < 0.3) & (b < 0.3)
    red = (r > 0.7) & (g < 0.3) & (b < 0.3)
    assert green.sum() > 1000  # GOOD frames
    # this run has BAD candidates among the 30 best; their frames are red
    assert red.sum() > 200


def test_show_bad_and_cap(run, tmp_path):
    _, result = run
    path = qa.plot_candidates(result, tmp_path / "c.png", show_bad=False, max_candidates=4)
    rgb = imread(path)[..., :3]
    red_frame = (rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    # only the ±5σ residual colour map can contribute saturated red pixels now
    assert red_frame.sum() < 200
    assert rgb.shape[0] < 600  # four candidates: two rows, not ten


def test_qa_switches_turn_plots_off(run, tmp_path):
    pair, result = run
    off = QAConfig(**{name: False for name in qa.PLOT_FILES})
    assert qa.make_qa_plots(result, pair.template, pair.science, tmp_path / "none", off) == []
    assert not any((tmp_path / "none").iterdir())
    cfg = ImagePsfMatchConfig.from_yaml(
        "qa: {displayCandidates: false, displayKernelMosaic: false, "
        "plotKernelSpatialModel: false, displaySpatialCells: false, displayDiffIm: false}")
    paths = qa.make_qa_plots(result, pair.template, pair.science, tmp_path / "one", cfg)
    assert [p.name for p in paths] == ["kernel_basis.png"]


# -- metrics -----------------------------------------------------------------------------------

def test_metrics_keys_and_values(run, metrics):
    pair, result = run
    for key in METRIC_KEYS:
        assert key in metrics, key
    assert metrics["kernel_sum_center"] == pytest.approx(1.3, rel=0.01)
    assert metrics["kernel_sum_min"] <= metrics["kernel_sum_center"] <= metrics["kernel_sum_max"]
    assert metrics["noise_ratio"] == pytest.approx(1.0, abs=0.1)
    assert metrics["noise_ratio_robust"] == pytest.approx(1.0, abs=0.1)
    assert metrics["noise_n_pixels"] > 20_000
    counts = result.kernel_cell_set.counts()
    assert (metrics["n_good_candidates"], metrics["n_bad_candidates"],
            metrics["n_unknown_candidates"]) == (counts["GOOD"], counts["BAD"], counts["UNKNOWN"])
    assert metrics["kernel_constraint"] == result.metadata["kernelConstraint"]
    assert metrics["spatial_condition_number"] == pytest.approx(
        result.metadata["spatialConditionNum"])
    assert len(metrics["candidates"]) == sum(counts.values())
    assert metrics["x2nrm"] == pytest.approx(1.0, abs=0.15)
    assert metrics["footprint_n_stars"] > 30
    assert abs(metrics["footprint_ratio_median"]) < 0.1
    assert metrics["sky_footprint_ratio"] == pytest.approx(1.0, abs=0.3)


def test_transients_are_the_positive_detections(run, metrics):
    pair, _ = run
    assert metrics["n_positive_5sigma"] >= 3
    found = [(d["x"], d["y"]) for d in metrics["positive_detections"]]
    for row in pair.transients:
        dist = min(math.hypot(x - row["x"], y - row["y"]) for x, y in found)
        assert dist < 3.0, f"transient at ({row['x']:.1f}, {row['y']:.1f}) not detected"
    # no injected negative sources: at most a stray residual
    assert metrics["n_negative_5sigma"] <= 2


def test_candidate_residuals_match_the_engine(metrics):
    # X2NRM = mean r² = var·(n−1)/n + mean²; the engine's std is unbiased
    for row in metrics["candidates"]:
        if row["resid_std"] is None or row["x2nrm_own"] is None:
            continue
        assert row["x2nrm_own"] == pytest.approx(row["resid_std"] ** 2 + row["resid_mean"] ** 2,
                                                 rel=0.01)


def test_write_metrics_is_strict_json(metrics, tmp_path):
    path = qa.write_metrics({**metrics, "extra": [np.float32(np.nan), np.int64(3)]},
                            tmp_path / "sub" / "metrics.json")
    text = path.read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded["extra"] == [None, 3]
    assert loaded["kernel_sum_center"] == pytest.approx(metrics["kernel_sum_center"])
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


# -- command line ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    pair = simulate_pair(shape=(256, 256), n_stars=120, n_transients=2, seed=SEED)
    return write_pair(pair, tmp_path_factory.mktemp("pair"))


def test_cli_qa_writes_plots_and_metrics(pair_files, tmp_path, capsys):
    template, science = pair_files
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text("kernel: {active: {fitForBackground: true, spatialKernelOrder: 1, "
                    "sizeCellX: 64, sizeCellY: 64}}\nqa: {displaySpatialCells: false}\n")
    outdir = tmp_path / "out"
    code = main(["qa", str(template), str(science), "--out-dir", str(outdir), "--config",
                 str(yaml), "-q"])
    assert code == 0
    printed = capsys.readouterr().out.split()
    names = {p.name for p in outdir.iterdir()}
    expected = set(qa.PLOT_FILES.values()) - {"spatial_cells.png"} | {"metrics.json"}
    assert names == expected
    assert {p.rsplit("/", 1)[-1] for p in printed} == expected
    data = json.loads((outdir / "metrics.json").read_text())
    assert data["kernel_sum_center"] == pytest.approx(1.3, rel=0.02)
    assert data["science"] == science.name
    _check_png(outdir / "difference.png")


def test_cli_qa_errors_are_one_line(pair_files, tmp_path, capsys):
    template, _ = pair_files
    code = main(["qa", str(template), str(tmp_path / "missing.fits"), "--out-dir",
                 str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert [line for line in err.splitlines() if line.startswith("diffim: error:")] == [
        f"diffim: error: science image '{tmp_path / 'missing.fits'}' does not exist or is not "
        "a file"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["qa", str(template), str(template), "--out-dir", str(blocker)]) == 1
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["qa", str(template)])
    assert exc.value.code == 2


# -- real data ---------------------------------------------------------------------------------

def test_decam_pair_plots(shared_data, tmp_path):
    folder = shared_data / "decam_sfft" / "input"
    if not folder.is_dir():
        pytest.skip(f"DECam cutouts not found in {folder}")
    template = read_fits(folder / "DEC-OBS18a.mini.fits")
    science = read_fits(folder / "DEC-OBS04a.mini.fits")
    cfg = ImagePsfMatchConfig()
    cfg.kernel.active.fit_for_background = True
    result = ImagePsfMatchTask(cfg).subtract_exposures(template, science)
    paths = qa.make_qa_plots(result, template, science, tmp_path, cfg)
    assert [p.name for p in paths] == list(qa.PLOT_FILES.values())
    for name in ("difference.png", "spatial_cells.png", "kernel_mosaic.png"):
        _check_png(tmp_path / name)
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    m = qa.compute_metrics(result, template, science)
    assert m["kernel_sum_center"] == pytest.approx(result.metadata["spatialKernelSum"])
    assert 0.8 < m["noise_ratio_robust"] < 1.3
    # the known transient of this pair (tests/test_realdata.py)
    assert any(math.hypot(d["x"] - 128.9, d["y"] - 127.7) < 4 for d in m["positive_detections"])
