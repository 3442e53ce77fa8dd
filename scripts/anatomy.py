"""Rule anatomy: the spectrum of each layer's learned update for one trained run."""

from lora_study.core.jobs import job

with job(snakemake):
    import json
    from pathlib import Path

    from lora_study.core.io import read_json
    from lora_study.measure.anatomy import run_anatomy
    from lora_study.study.sweep import RunSpec

    run_anatomy(
        manifest=read_json(snakemake.input.manifest),
        weights_dir=Path(snakemake.input.adapter),
        run=RunSpec.from_params(json.loads(snakemake.params.run)),
        out_path=Path(snakemake.output.layers),
        threads=snakemake.threads,
        memory_limit_gb=snakemake.params.memory_limit_gb,
    )
