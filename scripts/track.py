"""Rule track: log every run of the study to MLflow (a failure is a warning, never a failed study)."""

from lora_study.core.jobs import job

with job(snakemake) as log:
    import json
    from pathlib import Path

    import pandas as pd

    from lora_study.report.tracking import TrackingSettings, track_study, write_record

    settings = TrackingSettings.from_config({"mlflow": json.loads(snakemake.params.mlflow)})
    record = track_study(
        settings,
        runs=pd.read_csv(snakemake.input.runs),
        run_configs=json.loads(snakemake.params.runs),
        curves=pd.read_csv(snakemake.input.loss_curves),
        report_files=[Path(snakemake.input.html), Path(snakemake.input.markdown)],
        workdir=Path.cwd(),
    )
    write_record(record, Path(snakemake.output[0]))
    log.info("tracking %s: %d runs in MLflow experiment %r at %s", record.status, len(record.runs),
             record.experiment, record.uri)  # fmt: skip
