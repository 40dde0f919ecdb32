# zoomldm-bench: the ZoomLDM replication workflow. `rule all` builds every table and figure of the active config.
# Default config: the offline CPU demo. Paper scale: --configfile workflow/configs/brca.yaml (or naip.yaml).
from snakemake.utils import min_version

min_version("9.0")


# The demo config is the default only when no --configfile is given: Snakemake merges --configfile into a
# `configfile:` key by key, which would leak demo settings into a paper run.
if not workflow.overwrite_configfiles:

    configfile: "workflow/configs/demo.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/release.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.dataset.input,
        rules.training.input,
        rules.sampling.input,
        rules.evaluation.input,
        rules.report.input,
