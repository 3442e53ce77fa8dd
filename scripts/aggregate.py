"""Rule aggregate: every run's settings and metrics in results/tables/runs.csv."""

from lora_study.jobs import job

with job(snakemake) as log:
    import json

    from lora_study.aggregate import (
        CONFIG_SUMMARY_COLUMNS,
        combine_examples,
        combine_loss_curves,
        combine_per_run,
        runs_table,
        write_table,
    )
    from lora_study.io import read_csv_rows, read_json
    from lora_study.replicates import config_table

    table = runs_table(
        runs=json.loads(snakemake.params.runs),
        evaluations=[read_json(p) for p in snakemake.input.evaluations],
        trainings=[read_json(p) for p in snakemake.input.trainings],
        plans=read_csv_rows(snakemake.input.plan, "run_id"),
    )
    write_table(table, snakemake.output.csv, snakemake.output.markdown)
    configs = config_table(table)
    write_table(configs, snakemake.output.configs, snakemake.output.configs_markdown, CONFIG_SUMMARY_COLUMNS)
    combine_loss_curves(
        snakemake.input.loss_curves,
        list(json.loads(snakemake.params.runs_trained)),
        snakemake.output.loss_curves,
    )
    combine_examples(snakemake.input.examples, table, snakemake.output.examples)
    trained = list(json.loads(snakemake.params.runs_trained))
    combine_per_run(
        snakemake.input.anatomy, trained, snakemake.output.anatomy, ["layer", "group", "effective_rank"], table
    )
    log.info("%d runs in %s", len(table), snakemake.output.csv)
