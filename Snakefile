# diffim demo / production workflow: PSF-matched difference images for every pair in
# config/pairs.tsv.  Run from the repository root:  snakemake --cores 2
# Configuration keys are documented in config/README.md.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/subtract.smk"


rule all:
    input:
        expand("results/{pair}/diff.fits", pair=PAIRS),
        expand("results/{pair}/kernel.fits", pair=PAIRS),
    default_target: True
    localrule: True
