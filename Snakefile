# diffim workflow: PSF-matched difference images for every pair in the pairs sheet.
# Run from the repository root:  snakemake --cores 2        (the built-in demo)
#                                snakemake --cores N --configfile my_survey.yaml
# Configuration keys: config/README.md.  Steps, files and clusters: README.md.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/warp.smk"
include: "workflow/rules/detect.smk"
include: "workflow/rules/kernel.smk"
include: "workflow/rules/subtract.smk"
include: "workflow/rules/qa.smk"
include: "workflow/rules/lightcurve.smk"


rule all:
    input:
        final_products(),
    default_target: True
    localrule: True
