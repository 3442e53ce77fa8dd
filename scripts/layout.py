"""Rule layout: a `training.gpus: auto` run's predicted peak per device on 1, 2, 4 and 8 devices."""

from lora_study.core.jobs import job

with job(snakemake, work="checks"):
    import json
    from pathlib import Path

    from lora_study.core.io import read_json
    from lora_study.study.sweep import RunSpec
    from lora_study.training.planner import write_layout

    write_layout(
        RunSpec.from_params(json.loads(snakemake.params.run)),
        read_json(snakemake.input.manifest),
        Path(snakemake.input.splits),
        Path(snakemake.output.layout),
    )
