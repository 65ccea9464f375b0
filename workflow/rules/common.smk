# Helpers shared by the rules: the pairs sheet, input functions, the Python that runs jobs.

import csv
import os
import re
import sys

import yaml
from snakemake.settings.types import DeploymentMethod


def read_pairs(path):
    """Read config["pairs"] (TSV with columns pair, template, science) into {pair: row}.

    Lines starting with '#' and blank lines are ignored.  Every row is checked against
    workflow/schemas/pairs.schema.yaml; pair names must be unique.
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
        validate(row, "../schemas/pairs.schema.yaml")
        if row["pair"] in pairs:
            raise ValueError(f"pairs sheet {path!r}: pair name {row['pair']!r} is repeated")
        pairs[row["pair"]] = row
    if not pairs:
        raise ValueError(f"pairs sheet {path!r} has no pairs")
    return pairs


PAIRS = read_pairs(config["pairs"])

# The per-run kernel configuration handed to `diffim subtract --config`.
DIFFIM_CONFIG = "results/diffim_config.yaml"


wildcard_constraints:
    pair="|".join(re.escape(p) for p in PAIRS),


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


def get_template(wildcards):
    return PAIRS[wildcards.pair]["template"]


def get_science(wildcards):
    return PAIRS[wildcards.pair]["science"]


def demo_seed(wildcards):
    """Seed of a simulated demo pair: demo.seed plus the pair's row index in the sheet."""
    return config["demo"]["seed"] + list(PAIRS).index(wildcards.pair)


def output_dir(wildcards, output):
    return os.path.dirname(output[0]) or "."


def convolve_option(wildcards):
    mode = config["subtract"]["convolve"]
    return f"--convolve {mode}" if mode else ""


def subtract_mem_mb(wildcards, input, attempt):
    # Measured peak RSS is a small multiple of the input FITS size; scale up on retries.
    return max(1000, int(config["subtract"]["mem_mb_per_input_mb"] * input.size_mb)) * attempt


def write_yaml(data, path):
    with open(path, "w") as fh:
        yaml.safe_dump(data or {}, fh, sort_keys=False)
