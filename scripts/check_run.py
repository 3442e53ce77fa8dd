"""Rule check_run: one run's modules, quantization and attention checked on the prepared model (no torch)."""

from lora_study.core.jobs import job

with job(snakemake, work="checks") as log:
    import json

    from lora_study.core.io import read_json, write_json
    from lora_study.study.preflight import check_with_manifest
    from lora_study.study.sweep import RunSpec, expand_study

    run = RunSpec.from_params(json.loads(snakemake.params.run))
    # bitsandbytes is looked up, not imported (that imports torch); the train job imports it. The study's other
    # runs come from the config, not params: adding a run must not rerun every check (and so every training).
    study = expand_study(snakemake.config).values()
    targets = check_with_manifest(read_json(snakemake.input.manifest), [run], import_it=False, study=study)[run.run_id]
    log.info("%s: %s", run.run_id, targets.describe())
    write_json(snakemake.output.check, targets.lora_kwargs())
