"""Rule check_runs: every run's modules, quantization and attention checked on the prepared model."""

from lora_study.jobs import job

with job(snakemake) as log:
    import json

    from lora_study.io import read_json, write_json
    from lora_study.preflight import check_with_manifest
    from lora_study.sweep import RunSpec

    runs = [RunSpec.from_params(run) for run in json.loads(snakemake.params.runs)]
    targets = check_with_manifest(read_json(snakemake.input.manifest), runs)
    for run_id, run_targets in targets.items():
        log.info("%s: %s", run_id, run_targets.describe())
    write_json(snakemake.output.checks, {run_id: t.lora_kwargs() for run_id, t in targets.items()})
