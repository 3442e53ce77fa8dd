"""Rule prepare_model: the configured model as a local directory + manifest."""

from lora_study.core.jobs import job

with job(snakemake, work="load") as log:
    import json
    from pathlib import Path

    from lora_study.core.io import write_json
    from lora_study.prepare.model_source import prepare_model

    manifest = prepare_model(json.loads(snakemake.params.model), Path(snakemake.params.converted_dir))
    write_json(snakemake.output.manifest, manifest)
    log.info("model %s (%s, %d parameters)", manifest["path"], manifest["model_type"], manifest["num_parameters"])
