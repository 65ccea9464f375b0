# Helpers shared by the rules: the pairs sheet, input functions, per-step options.

import csv
import json
import os
import re
import shlex
import sys

import yaml
from snakemake.settings.types import DeploymentMethod


# Inputs the simulate_demo rule can make; every other input must exist before the run.
DEMO_INPUT = re.compile(r"^resources/demo/(?P<pair>[A-Za-z0-9][A-Za-z0-9_.-]*)_(template|science)\.fits$")


def read_pairs(path):
    """Read config["pairs"] (TSV with columns pair, template, science[, mjd]) into {pair: row}.

    Lines starting with '#' and blank lines are ignored.  Every row is checked against
    workflow/schemas/pairs.schema.yaml; pair names must be unique and input files must
    exist (unless the simulate_demo rule makes them), so a bad sheet fails before any job.
    """
    if not os.path.isfile(path):
        raise ValueError(f"pairs sheet {path!r} (config key 'pairs') does not exist")
    with open(path, newline="") as fh:
        lines = [ln for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(lines, delimiter="\t")
    missing = {"pair", "template", "science"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(
            f"pairs sheet {path!r} lacks the column(s) {sorted(missing)}; the header line "
            "must be tab-separated: pair, template, science"
        )
    pairs = {}
    for row in reader:
        row = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if not row.get("mjd"):
            row.pop("mjd", None)
        validate(row, "../schemas/pairs.schema.yaml")
        if row["pair"] in pairs:
            raise ValueError(f"pairs sheet {path!r}: pair name {row['pair']!r} is repeated")
        for key in ("template", "science"):
            demo = DEMO_INPUT.match(row[key])
            if not os.path.isfile(row[key]) and not (demo and demo["pair"] == row["pair"]):
                raise ValueError(
                    f"pairs sheet {path!r}, pair {row['pair']!r}: {key} file {row[key]!r} "
                    "does not exist"
                )
        pairs[row["pair"]] = row
    if not pairs:
        raise ValueError(f"pairs sheet {path!r} has no pairs")
    return pairs


PAIRS = read_pairs(config["pairs"])

if config["diffim_config_file"] and not os.path.isfile(config["diffim_config_file"]):
    raise ValueError(
        f"diffim_config_file {config['diffim_config_file']!r} does not exist"
    )

LIGHT_CURVE_OBJECTS = {o["name"]: o for o in config["light_curve"]["objects"]}
if LIGHT_CURVE_OBJECTS and any("mjd" not in row for row in PAIRS.values()):
    raise ValueError(
        f"light_curve.objects is set, but pairs sheet {config['pairs']!r} lacks an mjd for "
        f"{[p for p, row in PAIRS.items() if 'mjd' not in row]}; add an 'mjd' column"
    )


wildcard_constraints:
    pair="|".join(re.escape(p) for p in PAIRS),
    which="template|science",


def python_exe():
    """The Python interpreter that runs `-m diffim` in jobs.

    Plain `python` from PATH would be the system one when snakemake is started from a venv
    that is not activated, so by default jobs use the interpreter running snakemake.  With
    --sdm conda the job's own environment provides `python`.
    """
    if config.get("python"):
        return config["python"]
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        return "python"
    return sys.executable


# The checkout holding the `diffim` package; put first on PYTHONPATH in jobs so they run the
# package next to this workflow even when it is not installed (e.g. in a conda env).
PACKAGE_ROOT = workflow.basedir



def diffim_command():
    """`python -m diffim` with the checkout first on PYTHONPATH: every step's command."""
    return (f"PYTHONPATH={shlex.quote(PACKAGE_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}} "
            f"{shlex.quote(python_exe())} -m diffim")


def diffim_config_file():
    """The ImagePsfMatchConfig YAML every step reads: diffim_config_file or the diffim section."""
    return config["diffim_config_file"] or "results/diffim_config.yaml"


def detect_image(wildcards):
    """The image a detect job reads: the warped template or the science image."""
    if wildcards.which == "template":
        return f"results/{wildcards.pair}/warp/template.fits"
    return get_science(wildcards)


def object_position(wildcards):
    obj = LIGHT_CURVE_OBJECTS[wildcards.object]
    return f"{obj['x']} {obj['y']}"


def get_template(wildcards):
    return PAIRS[wildcards.pair]["template"]


def get_science(wildcards):
    return PAIRS[wildcards.pair]["science"]


def demo_seed(wildcards):
    """Seed of a simulated demo pair: demo.seed plus the pair's row index in the sheet."""
    return config["demo"]["seed"] + list(PAIRS).index(wildcards.pair)


def output_dir(wildcards, output):
    return os.path.dirname(output[0]) or "."


def intermediate(path):
    """An intermediate product: removed once used unless keep_intermediates is true."""
    return path if config["keep_intermediates"] else temp(path)


def step_options(step):
    """A step's options as JSON: a params entry, so changing them re-runs that step."""
    return json.dumps(config[step], sort_keys=True)


def step_threads(step):
    return config[step]["threads"]


def step_mem_mb(step):
    """Memory request: a multiple of the input FITS size (at least 1000 MB), more on retries."""

    def mem_mb(wildcards, input, attempt):
        return max(1000, int(config[step]["mem_mb_per_input_mb"] * input.size_mb)) * attempt

    return mem_mb


def step_runtime(step):
    return config[step]["runtime"]


def convolve_option(wildcards):
    mode = config["select"]["convolve"]
    return f"--convolve {mode}" if mode else ""


def qa_products():
    """The QA files of every pair: plots (if switched on) live in a directory per pair."""
    return expand("results/{pair}/qa/{product}", pair=PAIRS, product=("metrics.json", "plots"))


def light_curve_products():
    names = [o["name"] for o in config["light_curve"]["objects"]]
    return expand("results/light_curves/{object}.{ext}", object=names, ext=("ecsv", "png"))


def final_products():
    products = expand("results/{pair}/subtract/diff.fits", pair=PAIRS)
    if config["qa"]["enabled"]:
        products += qa_products()
    products += light_curve_products()
    return products


def write_yaml(data, path):
    with open(path, "w") as fh:
        yaml.safe_dump(data or {}, fh, sort_keys=False)
