"""Rule plan: predicted peak training memory of every run, before any training."""

from lora_study.core.jobs import job

with job(snakemake, work="checks"):
    import json
    from pathlib import Path

    from lora_study.core.io import read_json
    from lora_study.study.sweep import RunSpec
    from lora_study.training.planner import write_plan

    write_plan(
        runs=[RunSpec.from_params(run) for run in json.loads(snakemake.params.runs)],
        settings=json.loads(snakemake.params.plan),
        manifest=read_json(snakemake.input.manifest),
        splits_dir=Path(snakemake.input.splits),
        csv_path=Path(snakemake.output.table),
        markdown_path=Path(snakemake.output.markdown),
    )
