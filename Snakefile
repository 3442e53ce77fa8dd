# LoRA/QLoRA efficiency study: one adapter per configuration, then tables.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/prepare.smk"
include: "rules/plan.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/anatomy.smk"
include: "rules/downstream.smk"
include: "rules/aggregate.smk"
include: "rules/report.smk"
include: "rules/track.smk"


onstart:
    start_preload()


onsuccess:
    stop_preload()


onerror:
    stop_preload()


rule all:
    default_target: True
    input:
        final_outputs(),
