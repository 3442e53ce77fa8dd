"""Rule aggregate: every run's settings and metrics in results/tables/runs.csv."""

import json

from lora_study.aggregate import runs_table, write_table
from lora_study.io import read_json
from lora_study.jobs import job

with job(snakemake) as log:  # noqa: F821 (injected by Snakemake)
    table = runs_table(
        runs=json.loads(snakemake.params.runs),
        evaluations=[read_json(p) for p in snakemake.input.evaluations],
        trainings=[read_json(p) for p in snakemake.input.trainings],
    )
    write_table(table, snakemake.output.csv, snakemake.output.markdown)
    log.info("%d runs in %s", len(table), snakemake.output.csv)
