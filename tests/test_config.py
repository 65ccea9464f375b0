"""Tests of diffim.config: defaults against the reference tables, YAML/dict I/O, validation."""

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from diffim.config import (
    DetectionConfig,
    ImagePsfMatchConfig,
    KernelChoice,
    PsfMatchConfig,
    PsfMatchConfigAL,
    PsfMatchConfigDF,
    RegistrationConfig,
    SourceSelectionConfig,
    WarpingConfig,
    camel_to_snake,
)
from diffim.exceptions import ConfigError

# Reference §2.2 (PsfMatchConfig) defaults, with the HEAD n_star_per_cell.
PSF_MATCH_DEFAULTS = {
    "use_afw_background": False,
    "fit_for_background": False,
    "kernel_size": 21,
    "scale_by_fwhm": True,
    "kernel_size_fwhm_scaling": 6.0,
    "kernel_size_min": 21,
    "kernel_size_max": 35,
    "spatial_model_type": "chebyshev1",
    "spatial_kernel_order": 2,
    "spatial_bg_order": 1,
    "size_cell_x": 128,
    "size_cell_y": 128,
    "n_star_per_cell": 5,
    "max_spatial_iterations": 3,
    "num_principal_components": 5,
    "single_kernel_clipping": True,
    "kernel_sum_clipping": True,
    "spatial_kernel_clipping": True,
    "check_condition_number": False,
    "bad_mask_planes": ("NO_DATA", "EDGE", "SAT"),
    "candidate_residual_mean_max": 0.25,
    "candidate_residual_std_max": 1.50,
    "use_core_stats": False,
    "candidate_core_radius": 3,
    "max_ksum_sigma": 3.0,
    "condition_number_type": "EIGENVALUE",
    "max_spatial_condition_number": 1e10,
    "iterate_single_kernel": False,
    "constant_variance_weighting": True,
    "calculate_kernel_uncertainty": False,
    "use_bic_for_kernel_basis": False,
}

# §2.2 fields whose default the AL/DF setDefaults change.
BASE_ONLY_DEFAULTS = {
    "kernel_basis_set": "alard-lupton",
    "max_condition_number": 5e7,
    "use_pca_for_spatial_kernel": False,
    "subtract_mean_for_pca": True,
}

AL_DEFAULTS = {
    "kernel_basis_set": "alard-lupton",
    "max_condition_number": 5e7,
    "use_pca_for_spatial_kernel": False,
    "subtract_mean_for_pca": True,
    "alard_n_gauss": 3,
    "alard_deg_gauss": (4, 2, 2),
    "alard_sig_gauss": (0.7, 1.5, 3.0),
    "alard_gauss_beta": 2.0,
    "alard_min_sig": 0.7,
    "alard_deg_gauss_deconv": 3,
    "alard_min_sig_deconv": 0.4,
    "alard_n_gauss_deconv": 3,
}

DF_DEFAULTS = {
    "kernel_basis_set": "delta-function",
    "max_condition_number": 5e6,
    "use_pca_for_spatial_kernel": True,
    "subtract_mean_for_pca": True,
    "use_bic_for_kernel_basis": False,
    "use_regularization": True,
    "regularization_type": "centralDifference",
    "central_regularization_stencil": 9,
    "forward_regularization_orders": (1, 2),
    "regularization_border_penalty": 3.0,
    "lambda_type": "absolute",
    "lambda_value": 0.2,
    "lambda_scaling": 1e-4,
    "lambda_step_type": "log",
    "lambda_min": -1.0,
    "lambda_max": 2.0,
    "lambda_step": 0.1,
}

DETECTION_DEFAULTS = {
    "det_threshold": 10.0,
    "det_threshold_type": "pixel_stdev",
    "det_on_template": True,
    "bad_mask_planes": ("NO_DATA", "EDGE", "SAT"),
    "fp_npix_min": 5,
    "fp_npix_max": 500,
    "fp_grow_kernel_scaling": 1.0,
    "fp_grow_pix": 30,
    "scale_by_fwhm": True,
}

WARPING_DEFAULTS = {
    "warping_kernel_name": "lanczos3",
    "mask_warping_kernel_name": "bilinear",
    "interp_length": 10,
    "cache_size": 1000000,
    "grow_full_mask": ("EDGE",),
}

SELECT_DEFAULTS = {
    "detection_threshold": 10.0,
    "detect_on": "science",
    "min_snr": 10.0,
    "max_snr": 500.0,
    "max_kernel_sources": 1000,
    "min_kernel_sources": 3,
    "isolation_radius": None,
    "max_ellipticity": 0.5,
    "reject_blended": True,
    "neighbour_flux_fraction": 0.1,
    "target_kernel_sources": 10,
    "background_box": 64,
    "exclude_mask_planes": ("NO_DATA", "BAD", "SAT", "EDGE"),
}

# Every ip_diffim field name of reference §2.1-2.4 (and the WarperConfig fields of §2.2).
LSST_NAMES = {
    WarpingConfig: ["warpingKernelName", "maskWarpingKernelName", "interpLength", "cacheSize",
                    "growFullMask"],
    DetectionConfig: ["detThreshold", "detThresholdType", "detOnTemplate", "badMaskPlanes",
                      "fpNpixMin", "fpNpixMax", "fpGrowKernelScaling", "fpGrowPix",
                      "scaleByFwhm"],
    PsfMatchConfig: [
        "warpingConfig", "detectionConfig", "afwBackgroundConfig", "useAfwBackground",
        "fitForBackground", "kernelBasisSet", "kernelSize", "scaleByFwhm",
        "kernelSizeFwhmScaling", "kernelSizeMin", "kernelSizeMax", "spatialModelType",
        "spatialKernelOrder", "spatialBgOrder", "sizeCellX", "sizeCellY", "nStarPerCell",
        "maxSpatialIterations", "usePcaForSpatialKernel", "subtractMeanForPca",
        "numPrincipalComponents", "singleKernelClipping", "kernelSumClipping",
        "spatialKernelClipping", "checkConditionNumber", "badMaskPlanes",
        "candidateResidualMeanMax", "candidateResidualStdMax", "useCoreStats",
        "candidateCoreRadius", "maxKsumSigma", "maxConditionNumber", "conditionNumberType",
        "maxSpatialConditionNumber", "iterateSingleKernel", "constantVarianceWeighting",
        "calculateKernelUncertainty", "useBicForKernelBasis"],
    PsfMatchConfigAL: ["alardNGauss", "alardDegGauss", "alardSigGauss", "alardGaussBeta",
                       "alardMinSig", "alardDegGaussDeconv", "alardMinSigDeconv",
                       "alardNGaussDeconv"],
    PsfMatchConfigDF: ["useRegularization", "regularizationType",
                       "centralRegularizationStencil", "forwardRegularizationOrders",
                       "regularizationBorderPenalty", "lambdaType", "lambdaValue",
                       "lambdaScaling", "lambdaStepType", "lambdaMin", "lambdaMax",
                       "lambdaStep"],
}


def _assert_defaults(obj, expected):
    for name, value in expected.items():
        got = getattr(obj, name)
        assert got == value, f"{type(obj).__name__}.{name} = {got!r}, reference {value!r}"
        assert type(got) is type(value), f"{name}: {type(got)} vs {type(value)}"


# ---------------------------------------------------------------------------------------------
# defaults and field names
# ---------------------------------------------------------------------------------------------

def test_psf_match_defaults_match_reference():
    base = PsfMatchConfig()
    _assert_defaults(base, PSF_MATCH_DEFAULTS)
    _assert_defaults(base, BASE_ONLY_DEFAULTS)
    for cls in (PsfMatchConfig, PsfMatchConfigAL, PsfMatchConfigDF):
        cfg = cls()
        _assert_defaults(cfg, PSF_MATCH_DEFAULTS)
        _assert_defaults(cfg.detection_config, DETECTION_DEFAULTS)
        _assert_defaults(cfg.warping_config, WARPING_DEFAULTS)
        assert cfg.afw_background_config.bin_size == 128


def test_al_and_df_defaults_match_reference():
    _assert_defaults(PsfMatchConfigAL(), AL_DEFAULTS)
    _assert_defaults(PsfMatchConfigDF(), DF_DEFAULTS)


def test_top_level_defaults():
    cfg = ImagePsfMatchConfig()
    assert cfg.kernel.name == "AL"
    assert cfg.kernel.active is cfg.kernel.al
    assert isinstance(cfg.kernel.al, PsfMatchConfigAL)
    assert isinstance(cfg.kernel.df, PsfMatchConfigDF)
    assert cfg.auto_reduce_spatial_order is True
    assert cfg.mode == "convolveTemplate"
    _assert_defaults(cfg.select, SELECT_DEFAULTS)
    assert [f.name for f in dataclasses.fields(SourceSelectionConfig)] == list(SELECT_DEFAULTS)
    cfg.validate()
    cfg.kernel.name = "DF"
    assert cfg.kernel.active is cfg.kernel.df
    cfg.validate()


def test_instances_do_not_share_nested_configs():
    a, b = ImagePsfMatchConfig(), ImagePsfMatchConfig()
    a.kernel.al.detection_config.fp_grow_pix = 40
    assert b.kernel.al.detection_config.fp_grow_pix == 30
    assert a.kernel.df.detection_config.fp_grow_pix == 30


@pytest.mark.parametrize("cls", list(LSST_NAMES))
def test_every_lsst_field_exists_in_snake_case(cls):
    names = {f.name for f in dataclasses.fields(cls)}
    for camel in LSST_NAMES[cls]:
        assert camel_to_snake(camel) in names, camel
    if cls is PsfMatchConfig:
        assert len(names) == len(LSST_NAMES[cls])


def test_camel_to_snake():
    assert camel_to_snake("sizeCellX") == "size_cell_x"
    assert camel_to_snake("nStarPerCell") == "n_star_per_cell"
    assert camel_to_snake("alardNGauss") == "alard_n_gauss"
    assert camel_to_snake("useBicForKernelBasis") == "use_bic_for_kernel_basis"
    assert camel_to_snake("size_cell_x") == "size_cell_x"


def test_field_docs_cover_every_field():
    docs = ImagePsfMatchConfig.field_docs()
    flat = _flatten(ImagePsfMatchConfig().to_dict())
    assert set(flat) <= set(docs)
    for key in ("kernel.name", "kernel.AL.alard_n_gauss", "kernel.DF.lambda_type",
                "kernel.AL.detection_config.fp_grow_pix", "select.min_snr", "mode"):
        assert key in docs
    for key, doc in docs.items():
        assert isinstance(doc, str) and doc.strip() and "\n" not in doc, key


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ---------------------------------------------------------------------------------------------
# dict / YAML I/O
# ---------------------------------------------------------------------------------------------

def _assert_builtin(value):
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str
            _assert_builtin(v)
    elif isinstance(value, list):
        for v in value:
            _assert_builtin(v)
    else:
        assert value is None or type(value) in (bool, int, float, str), repr(value)


@pytest.mark.parametrize("name", ["AL", "DF"])
def test_yaml_round_trip_is_exact(name):
    cfg = ImagePsfMatchConfig()
    cfg.kernel.name = name
    cfg.kernel.active.fit_for_background = True
    cfg.kernel.active.max_ksum_sigma = 4          # an int in a float field
    cfg.kernel.active.bad_mask_planes = ["BAD"]   # a list in a tuple field
    cfg.select.isolation_radius = 12.5
    cfg.mode = "auto"
    text = cfg.to_yaml()
    again = ImagePsfMatchConfig.from_yaml(text)
    assert again.to_yaml() == text
    assert again.to_dict() == cfg.to_dict()
    assert again.kernel.name == name
    assert again.kernel.active.max_ksum_sigma == 4.0
    assert type(again.kernel.active.max_ksum_sigma) is float
    assert again.kernel.active.bad_mask_planes == ("BAD",)
    default = ImagePsfMatchConfig()
    default.kernel.name = name
    assert ImagePsfMatchConfig.from_yaml(default.to_yaml()) == default


def test_to_dict_layout_is_plain_builtins():
    d = ImagePsfMatchConfig().to_dict()
    # other sections may follow; these keep their relative order
    core = ["kernel", "select", "registration", "auto_reduce_spatial_order", "mode"]
    assert [k for k in d if k in core] == core
    assert list(d["kernel"]) == ["name", "AL", "DF"]
    assert d["kernel"]["AL"]["alard_deg_gauss"] == [4, 2, 2]
    assert d["kernel"]["DF"]["max_condition_number"] == 5e6
    _assert_builtin(d)
    assert ImagePsfMatchConfig.from_dict(d) == ImagePsfMatchConfig()


def test_camel_case_aliases_load():
    cfg = ImagePsfMatchConfig.from_yaml(
        "kernel: {name: AL, active: {sizeCellX: 64, fitForBackground: true, "
        "alardDegGauss: [4, 2, 2], detectionConfig: {fpGrowPix: 20}}}")
    al = cfg.kernel.active
    assert al.size_cell_x == 64 and al.size_cell_y == 128
    assert al.fit_for_background is True
    assert al.alard_deg_gauss == (4, 2, 2)
    assert al.detection_config.fp_grow_pix == 20
    assert cfg.kernel.df.fit_for_background is False


def test_active_applies_to_the_chosen_kernel():
    cfg = ImagePsfMatchConfig.from_dict({"kernel": {"name": "DF",
                                                    "active": {"lambdaType": "relative"}}})
    assert cfg.kernel.active is cfg.kernel.df
    assert cfg.kernel.df.lambda_type == "relative"


def test_both_kernel_sections_load():
    cfg = ImagePsfMatchConfig.from_yaml(
        "kernel:\n  name: DF\n  AL: {kernelSize: 19}\n  DF: {kernel_size: 11}\n"
        "select: {min_snr: 20}\n")
    assert cfg.kernel.name == "DF"
    assert cfg.kernel.al.kernel_size == 19
    assert cfg.kernel.df.kernel_size == 11
    assert cfg.select.min_snr == 20.0 and type(cfg.select.min_snr) is float


def test_lowercase_kernel_sections_load():
    # the layout of the workflow's config/config.yaml
    cfg = ImagePsfMatchConfig.from_dict(
        {"kernel": {"name": "AL", "al": {"spatial_kernel_order": 1, "spatial_bg_order": 0}}})
    assert cfg.kernel.al.spatial_kernel_order == 1
    assert cfg.kernel.al.spatial_bg_order == 0


def test_dotted_override_keys():
    cfg = ImagePsfMatchConfig.from_dict({
        "kernel.name": "DF",
        "kernel.active.fitForBackground": True,
        "kernel.active.detectionConfig.fpGrowPix": 25,
        "kernel": {"DF": {"kernel_size": 15}},
        "select.maxSnr": 800,
    })
    df = cfg.kernel.df
    assert cfg.kernel.name == "DF"
    assert df.fit_for_background is True
    assert df.detection_config.fp_grow_pix == 25
    assert df.kernel_size == 15
    assert cfg.select.max_snr == 800.0


def test_from_dict_leaves_input_untouched():
    data = {"kernel": {"name": "AL", "active": {"alardSigGauss": [1, 2, 4]}}}
    before = copy.deepcopy(data)
    cfg = ImagePsfMatchConfig.from_dict(data)
    assert data == before
    assert cfg.kernel.al.alard_sig_gauss == (1.0, 2.0, 4.0)


def test_yaml_exponent_floats_and_empty_sections():
    cfg = ImagePsfMatchConfig.from_yaml(
        "kernel:\n  active:\n    maxConditionNumber: 5e7\n    max_spatial_condition_number: "
        "1.0e9\nselect:\n")
    assert cfg.kernel.al.max_condition_number == 5e7
    assert cfg.kernel.al.max_spatial_condition_number == 1e9
    assert ImagePsfMatchConfig.from_yaml("") == ImagePsfMatchConfig()
    assert ImagePsfMatchConfig.from_dict(None) == ImagePsfMatchConfig()


def test_yaml_file_io(tmp_path):
    cfg = ImagePsfMatchConfig()
    cfg.kernel.name = "DF"
    path = tmp_path / "cfg.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text() == text
    assert os.listdir(tmp_path) == ["cfg.yaml"]  # no temporary file left behind
    assert ImagePsfMatchConfig.from_yaml(path) == cfg
    assert ImagePsfMatchConfig.from_yaml(str(path)) == cfg
    cfg.mode = "auto"
    cfg.to_yaml(str(path))  # overwrite
    assert ImagePsfMatchConfig.from_yaml(path).mode == "auto"


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ImagePsfMatchConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        ImagePsfMatchConfig.from_yaml(str(tmp_path / "missing.yml"))
    with pytest.raises(ConfigError, match="cannot parse"):
        ImagePsfMatchConfig.from_yaml("kernel: [unclosed")
    with pytest.raises(ConfigError, match="mapping"):
        ImagePsfMatchConfig.from_yaml("- a\n- b\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kernel:\n  active:\n    kernelSize: 20\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*kernel\.active\.kernel_size"):
        ImagePsfMatchConfig.from_yaml(Path(bad))


def test_to_yaml_refuses_invalid_config(tmp_path):
    cfg = ImagePsfMatchConfig()
    cfg.kernel.active.kernel_size = 20
    path = tmp_path / "x.yaml"
    with pytest.raises(ConfigError, match="kernel_size"):
        cfg.to_yaml(path)
    assert not path.exists()


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

BAD_YAML = [
    # (yaml text, substrings the message must contain)
    ("kernel: {active: {kernelSize: 20}}", ["kernel.active.kernel_size", "20", "odd"]),
    ("kernel: {active: {kernel_size_min: 22}}", ["kernel.active.kernel_size_min", "odd"]),
    ("kernel: {active: {kernel_size_min: 41}}", ["kernel_size_min", "kernel_size_max"]),
    ("kernel: {active: {alardDegGauss: [4, 2]}}",
     ["kernel.active.alard_deg_gauss", "alard_n_gauss", "3"]),
    ("kernel: {active: {alard_n_gauss: 2}}", ["alard_deg_gauss", "alard_n_gauss = 2"]),
    ("kernel: {active: {alard_sig_gauss: [0.7, 0, 3]}}", ["alard_sig_gauss[1]", "> 0"]),
    ("kernel: {active: {alard_deg_gauss: [4, -1, 2]}}", ["alard_deg_gauss[1]", ">= 0"]),
    ("kernel: {active: {sizeCelX: 64}}", ["kernel.active.sizeCelX", "size_cell_x"]),
    ("select: {min_snrr: 5}", ["select.min_snrr", "min_snr"]),
    ("kernel: {nmae: AL}", ["kernel.nmae", "name"]),
    ("moed: auto", ["moed", "mode"]),
    ("kernel: {name: AL, active: {lambda_type: relative}}", ["lambda_type", "DF"]),
    ("kernel: {active: {spatialKernelOrder: two}}",
     ["kernel.active.spatial_kernel_order", "'two'", "integer", "str"]),
    ("kernel: {active: {kernel_size: 21.0}}", ["kernel.active.kernel_size", "integer", "float"]),
    ("kernel: {active: {nStarPerCell: true}}", ["kernel.active.n_star_per_cell", "bool"]),
    ("kernel: {active: {fit_for_background: 1}}", ["fit_for_background", "boolean"]),
    ("kernel: {active: {max_ksum_sigma: high}}", ["max_ksum_sigma", "number"]),
    ("kernel: {active: {bad_mask_planes: EDGE}}", ["bad_mask_planes", "list of strings"]),
    ("kernel: {active: {bad_mask_planes: [EDGE, 3]}}", ["bad_mask_planes[1]", "string"]),
    ("kernel: {active: {sizeCellX: 16}}", ["kernel.active.size_cell_x", "16", ">= 32"]),
    ("kernel: {active: {max_spatial_iterations: 6}}", ["max_spatial_iterations", "<= 5"]),
    ("kernel: {active: {max_spatial_iterations: 0}}", ["max_spatial_iterations", ">= 1"]),
    ("kernel: {active: {n_star_per_cell: 0}}", ["n_star_per_cell", "-1"]),
    ("kernel: {active: {num_principal_components: 2}}", ["num_principal_components", ">= 3"]),
    ("kernel: {active: {candidate_residual_std_max: -1}}", ["candidate_residual_std_max"]),
    ("kernel: {active: {detection_config: {fp_grow_pix: 5}}}",
     ["kernel.active.detection_config.fp_grow_pix", ">= 10"]),
    ("kernel: {active: {detection_config: {det_threshold: 2}}}", ["det_threshold", ">= 3"]),
    ("kernel: {active: {detection_config: {fp_npix_max: 501}}}", ["fp_npix_max", "<= 500"]),
    ("kernel: {active: {spatial_model_type: legendre}}",
     ["spatial_model_type", "'chebyshev1'", "'polynomial'"]),
    ("kernel: {active: {condition_number_type: svd}}", ["condition_number_type", "'SVD'"]),
    ("kernel: {active: {warping_config: {warping_kernel_name: lanczos6}}}",
     ["kernel.active.warping_config.warping_kernel_name", "lanczos3"]),
    ("kernel: {active: {kernel_basis_set: delta-function}}", ["kernel_basis_set", "kernel.name"]),
    ("kernel: {name: XX}", ["kernel.name", "'XX'", "'AL'"]),
    ("mode: convolveBoth", ["mode", "convolveTemplate", "auto"]),
    ("kernel: {name: DF, active: {lambdaType: minimizeBiasedRisk}}",
     ["kernel.active.lambda_type", "minimizeBiasedRisk", "broken", "absolute", "relative"]),
    ("kernel: {name: DF, active: {lambda_type: minimizeUnbiasedRisk}}", ["broken"]),
    ("kernel: {name: DF, active: {regularization_type: spline}}", ["regularization_type"]),
    ("kernel: {name: DF, active: {central_regularization_stencil: 7}}",
     ["central_regularization_stencil", "5", "9"]),
    ("kernel: {name: DF, active: {forward_regularization_orders: [1, 4]}}",
     ["forward_regularization_orders[1]", "<= 3"]),
    ("kernel: {name: DF, active: {forward_regularization_orders: []}}",
     ["forward_regularization_orders", "at least one"]),
    ("kernel: {name: DF, active: {lambda_step_type: cubic}}", ["lambda_step_type"]),
    ("kernel: {name: DF, active: {alardNGauss: 2}}", ["alardNGauss", "AL"]),
    ("kernel: {active: {calculateKernelUncertainty: true}}",
     ["kernel.active.calculate_kernel_uncertainty", "not supported"]),
    ("select: {detect_on: both}", ["select.detect_on", "'science'"]),
    ("select: {min_snr: 600}", ["select.min_snr", "max_snr"]),
    ("select: {max_ellipticity: 1.5}", ["select.max_ellipticity", "<= 1"]),
    ("select: {min_kernel_sources: 0}", ["select.min_kernel_sources", ">= 1"]),
    ("select: {isolation_radius: -2}", ["select.isolation_radius", ">= 0"]),
    ("auto_reduce_spatial_order: 1", ["auto_reduce_spatial_order", "boolean"]),
    ("kernel: {active: 5}", ["kernel.active", "section"]),
    ("kernel: {active: {sizeCellX: 64, size_cell_x: 64}}", ["sizeCellX", "size_cell_x", "same"]),
    ("kernel: {active: {kernel_size_fwhm_scaling: .nan}}", ["kernel_size_fwhm_scaling", "NaN"]),
]


@pytest.mark.parametrize("text,needles", BAD_YAML, ids=[t for t, _ in BAD_YAML])
def test_bad_config_raises_with_key(text, needles):
    with pytest.raises(ConfigError) as info:
        ImagePsfMatchConfig.from_yaml(text)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_unknown_key_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean 'size_cell_x'"):
        ImagePsfMatchConfig.from_dict({"kernel": {"active": {"sizeCelX": 64}}})
    with pytest.raises(ConfigError, match="valid keys here"):
        ImagePsfMatchConfig.from_dict({"select": {"zzz": 1}})


def test_validate_after_attribute_assignment():
    cfg = ImagePsfMatchConfig()
    cfg.kernel.active.alard_sig_gauss = [1.0, 2, 4.0]  # lists and ints are fine
    cfg.kernel.active.max_ksum_sigma = 2
    cfg.kernel.active.n_star_per_cell = -1
    cfg.kernel.active.use_afw_background = True  # accepted, no effect
    cfg.select.isolation_radius = 10
    cfg.validate()
    cfg.kernel.active.spatial_kernel_order = True
    with pytest.raises(ConfigError, match=r"^kernel\.active\.spatial_kernel_order = True"):
        cfg.validate()


def test_inactive_kernel_is_named_by_its_label():
    cfg = ImagePsfMatchConfig()
    cfg.kernel.df.kernel_size = 8
    with pytest.raises(ConfigError, match=r"kernel\.DF\.kernel_size = 8"):
        cfg.validate()
    cfg.kernel.name = "DF"
    with pytest.raises(ConfigError, match=r"kernel\.active\.kernel_size = 8"):
        cfg.validate()


def test_sub_config_validate_and_from_dict():
    al = PsfMatchConfigAL.from_dict({"kernelSize": 25})
    assert al.kernel_size == 25
    al.kernel_size = 4
    with pytest.raises(ConfigError, match=r"^kernel_size = 4"):
        al.validate()
    with pytest.raises(ConfigError, match="kernel_basis_set"):
        PsfMatchConfigDF.from_dict({"kernel_basis_set": "alard-lupton"})
    assert PsfMatchConfig.from_dict({"kernel_basis_set": "delta-function"}).kernel_size == 21


def test_bad_kernel_name_in_active():
    choice = KernelChoice()
    choice.name = "ZZ"
    with pytest.raises(ConfigError, match="kernel.name"):
        _ = choice.active


def test_dumped_yaml_is_safe_yaml():
    data = yaml.safe_load(ImagePsfMatchConfig().to_yaml())
    assert data["kernel"]["AL"]["max_condition_number"] == 5e7


# ---------------------------------------------------------------------------------------------
# registration section
# ---------------------------------------------------------------------------------------------

def test_registration_defaults():
    reg = ImagePsfMatchConfig().registration
    assert isinstance(reg, RegistrationConfig)
    _assert_defaults(reg, {"method": "auto", "transform": "affine", "min_overlap_fraction": 0.1,
                           "detection_threshold": 10.0})
    assert reg.max_shift is None
    docs = ImagePsfMatchConfig.field_docs()
    for name in ("method", "transform", "min_overlap_fraction", "detection_threshold",
                 "max_shift"):
        assert f"registration.{name}" in docs


def test_registration_loads_from_yaml_and_round_trips():
    cfg = ImagePsfMatchConfig.from_yaml(
        "registration: {method: catalog, transform: shift, minOverlapFraction: 1, "
        "max_shift: 25, detection_threshold: 7}")
    reg = cfg.registration
    assert (reg.method, reg.transform) == ("catalog", "shift")
    assert reg.min_overlap_fraction == 1.0 and type(reg.min_overlap_fraction) is float
    assert reg.max_shift == 25.0 and type(reg.max_shift) is float
    assert reg.detection_threshold == 7.0
    again = ImagePsfMatchConfig.from_yaml(cfg.to_yaml())
    assert again.registration == reg
    assert ImagePsfMatchConfig.from_dict({"registration.method": "wcs"}).registration.method \
        == "wcs"
    assert ImagePsfMatchConfig.from_yaml("registration:").registration == RegistrationConfig()


@pytest.mark.parametrize("text,needles", [
    ("registration: {method: sky}", ["registration.method", "'auto'", "'catalog'"]),
    ("registration: {transform: rigid}", ["registration.transform", "'shift'", "'affine'"]),
    ("registration: {min_overlap_fraction: 0}", ["registration.min_overlap_fraction", "> 0"]),
    ("registration: {min_overlap_fraction: 1.2}", ["min_overlap_fraction", "<= 1"]),
    ("registration: {detection_threshold: -1}", ["registration.detection_threshold", "> 0"]),
    ("registration: {max_shift: 0}", ["registration.max_shift", "> 0"]),
    ("registration: {max_shift: far}", ["registration.max_shift", "number"]),
    ("registration: {maxShfit: 3}", ["registration.maxShfit", "max_shift"]),
    ("registration: 3", ["registration", "section"]),
])
def test_bad_registration_config(text, needles):
    with pytest.raises(ConfigError) as info:
        ImagePsfMatchConfig.from_yaml(text)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"


def test_registration_validate_after_assignment():
    cfg = ImagePsfMatchConfig()
    cfg.registration.max_shift = 10  # an int is a number
    cfg.validate()
    cfg.registration.max_shift = float("nan")
    with pytest.raises(ConfigError, match=r"^registration\.max_shift = nan"):
        cfg.validate()


# ---------------------------------------------------------------------------------------------
# qa section
# ---------------------------------------------------------------------------------------------

QA_SWITCHES = ("display_candidates", "display_kernel_basis", "display_kernel_mosaic",
               "plot_kernel_spatial_model", "display_spatial_cells", "display_diff_im",
               "show_bad_candidates")


def test_qa_defaults():
    from diffim.config import QAConfig

    qa = ImagePsfMatchConfig().qa
    assert isinstance(qa, QAConfig)
    _assert_defaults(qa, {name: True for name in QA_SWITCHES})
    assert (qa.max_candidates, qa.kernel_mosaic_grid) == (30, 7)
    docs = ImagePsfMatchConfig.field_docs()
    for name in QA_SWITCHES:
        assert f"qa.{name}" in docs
    assert list(ImagePsfMatchConfig().to_dict())[-1] == "qa"


def test_qa_loads_ip_diffim_debug_names_and_round_trips():
    cfg = ImagePsfMatchConfig.from_yaml(
        "qa: {displayCandidates: false, displayKernelBasis: false, displayKernelMosaic: false,\n"
        "     plotKernelSpatialModel: false, displaySpatialCells: false, displayDiffIm: false,\n"
        "     showBadCandidates: false, maxCandidates: 12}")
    for name in QA_SWITCHES:
        assert getattr(cfg.qa, name) is False, name
    assert cfg.qa.max_candidates == 12
    assert ImagePsfMatchConfig.from_yaml(cfg.to_yaml()).qa == cfg.qa
    assert ImagePsfMatchConfig.from_dict({"qa.display_diff_im": False}).qa.display_diff_im \
        is False
    assert ImagePsfMatchConfig.from_yaml("qa:").qa == ImagePsfMatchConfig().qa


@pytest.mark.parametrize("text,needles", [
    ("qa: {display_diff_im: 1}", ["qa.display_diff_im", "boolean"]),
    ("qa: {displayCandidates: 'no'}", ["qa.display_candidates", "boolean"]),
    ("qa: {max_candidates: 0}", ["qa.max_candidates", ">= 1"]),
    ("qa: {kernel_mosaic_grid: 1}", ["qa.kernel_mosaic_grid", ">= 2"]),
    ("qa: {displayDifIm: true}", ["qa.displayDifIm", "display_diff_im"]),
    ("qa: true", ["qa", "section"]),
])
def test_bad_qa_config(text, needles):
    with pytest.raises(ConfigError) as info:
        ImagePsfMatchConfig.from_yaml(text)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"


def test_qa_validate_after_assignment():
    cfg = ImagePsfMatchConfig()
    cfg.qa.display_candidates = "yes"
    with pytest.raises(ConfigError, match=r"^qa\.display_candidates = 'yes'"):
        cfg.validate()
