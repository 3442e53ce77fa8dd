"""Rule aggregate: every run's settings and metrics in results/tables/runs.csv."""

from lora_study.jobs import job

with job(snakemake) as log:
    import json

    from lora_study.aggregate import combine_loss_curves, runs_table, write_table
    from lora_study.io import read_json

    table = runs_table(
        runs=json.loads(snakemake.params.runs),
        evaluations=[read_json(p) for p in snakemake.input.evaluations],
        trainings=[read_json(p) for p in snakemake.input.trainings],
    )
    write_table(table, snakemake.output.csv, snakemake.output.markdown)
    combine_loss_curves(
        snakemake.input.loss_curves,
        list(json.loads(snakemake.params.runs_trained)),
        snakemake.output.loss_curves,
    )
    log.info("%d runs in %s", len(table), snakemake.output.csv)
