"""Rule anatomy: the spectrum of each layer's learned update for one trained run."""

from lora_study.jobs import job

with job(snakemake):
    from pathlib import Path

    from lora_study.anatomy import run_anatomy
    from lora_study.io import read_json
    from lora_study.methods import FULL

    run_anatomy(
        manifest=read_json(snakemake.input.manifest),
        weights_dir=Path(snakemake.input.adapter),
        is_full=snakemake.params.method == FULL,
        out_path=Path(snakemake.output.layers),
        threads=snakemake.threads,
    )
