"""Rule downstream: lm-evaluation-harness on one run (or base model) as the study loaded it."""

import os

from lora_study.core.jobs import job, trained_run

# Standard tasks' data was fetched by rule lm_eval_tasks; compute nodes may have no network.
# Set before job() imports datasets, which reads them once.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

with job(snakemake, gpu=True):  # claims its GPU before anything can start CUDA
    import json
    from pathlib import Path

    from lora_study.core.io import read_json
    from lora_study.measure.downstream import LmEvalSettings, run_downstream
    from lora_study.study.sweep import RunSpec

    adapter_dir, train_status = trained_run(snakemake)
    run_downstream(
        run=RunSpec.from_params(json.loads(snakemake.params.run)),
        settings=LmEvalSettings.from_config(json.loads(snakemake.params.lm_eval)),
        compute_settings=json.loads(snakemake.params.compute),
        manifest=read_json(snakemake.input.manifest),
        template=snakemake.params.template,
        adapter_dir=adapter_dir,
        task_dir=Path(snakemake.input.tasks),
        scores_path=Path(snakemake.output.scores),
        samples_path=Path(snakemake.output.samples),
        threads=snakemake.threads,
        train_status=train_status,
    )
