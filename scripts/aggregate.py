"""Rule aggregate: every run's settings and metrics in results/tables/runs.csv."""

from lora_study.core.jobs import job

with job(snakemake) as log:
    import json
    from pathlib import Path

    import pandas as pd

    from lora_study.analysis.aggregate import (
        CONFIG_SUMMARY_COLUMNS,
        SUMMARY_COLUMNS,
        combine_examples,
        combine_loss_curves,
        combine_per_run,
        deployment_frames,
        runs_table,
        with_deployment_columns,
    )
    from lora_study.core.io import atomic_path, read_csv_rows, read_json, write_table
    from lora_study.stats.replicates import config_table

    table = runs_table(
        runs=json.loads(snakemake.params.runs),
        evaluations=[read_json(p) for p in snakemake.input.evaluations],
        trainings=[read_json(p) for p in snakemake.input.trainings],
        plans=read_csv_rows(snakemake.input.plan, "run_id"),
    )
    downstream, samples, deploy = deployment_frames(
        [read_json(p) for p in snakemake.input.downstream],
        [pd.read_csv(p).assign(run_id=Path(p).parent.name) for p in snakemake.input.downstream_samples],
        [read_json(p) for p in snakemake.input.deploy],
        table,
    )
    table = with_deployment_columns(table, downstream, deploy)
    write_table(table, snakemake.output.csv, snakemake.output.markdown, SUMMARY_COLUMNS)
    for frame, path in ((downstream, snakemake.output.downstream), (samples, snakemake.output.downstream_samples),
                        (deploy, snakemake.output.deploy)):  # fmt: skip
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    configs = config_table(table)
    write_table(configs, snakemake.output.configs, snakemake.output.configs_markdown, CONFIG_SUMMARY_COLUMNS)
    combine_loss_curves(
        snakemake.input.loss_curves,
        list(json.loads(snakemake.params.runs_trained)),
        snakemake.output.loss_curves,
    )
    combine_examples(snakemake.input.examples, table, snakemake.output.examples)
    combine_examples(snakemake.input.general, table, snakemake.output.general)
    trained = list(json.loads(snakemake.params.runs_trained))
    combine_per_run(
        snakemake.input.anatomy, trained, snakemake.output.anatomy, ["layer", "group", "effective_rank"], table
    )
    log.info("%d runs in %s", len(table), snakemake.output.csv)
