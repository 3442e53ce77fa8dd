"""Rule findings: derived tables, charts and the findings report."""

from lora_study.core.jobs import job

with job(snakemake) as log:
    import json
    from pathlib import Path

    import pandas as pd

    from lora_study.core.io import read_json
    from lora_study.questions import QUESTIONS
    from lora_study.report.page import StudyContext, build_report
    from lora_study.report.question import Deployment, FindingSettings

    settings = json.loads(snakemake.params.report)
    examples = pd.read_csv(snakemake.input.examples)
    findings = build_report(
        questions=QUESTIONS,
        table=pd.read_csv(snakemake.input.configs),
        curves=pd.read_csv(snakemake.input.loss_curves),
        context=StudyContext(
            manifest=read_json(snakemake.input.manifest),
            data_summary=read_json(snakemake.input.data_summary),
            training=json.loads(snakemake.params.training),
            evaluation=json.loads(snakemake.params.evaluation),
            measurement=json.loads(snakemake.params.measurement),
        ),
        settings=FindingSettings(
            sweet_spot_tolerance=settings["sweet_spot_tolerance"],
            min_relative_gain=settings["min_relative_gain"],
            memory_budgets_gb=tuple(settings["memory_budgets_gb"]),
        ),
        tables_dir=Path(snakemake.output.tables),
        charts_dir=Path(snakemake.output.charts),
        markdown_path=Path(snakemake.output.markdown),
        html_path=Path(snakemake.output.html),
        examples=examples,
        general=pd.read_csv(snakemake.input.general),
        anatomy=pd.read_csv(snakemake.input.anatomy),
        deployment=Deployment(
            downstream=pd.read_csv(snakemake.input.downstream),
            samples=pd.read_csv(snakemake.input.downstream_samples),
            deploy=pd.read_csv(snakemake.input.deploy),
            examples=examples,
            evaluation=json.loads(snakemake.params.evaluation),
        ),
    )
    for sentence in findings:
        log.info("finding: %s", sentence)
