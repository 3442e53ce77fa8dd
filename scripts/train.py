"""Rule train: one LoRA/QLoRA adapter for one configuration."""

from lora_study.jobs import job

with job(snakemake, gpu=True):  # claims its GPU before anything can start CUDA
    import json
    from pathlib import Path

    from lora_study import paths
    from lora_study.io import read_json
    from lora_study.settings import MeasurementSettings
    from lora_study.sweep import RunSpec
    from lora_study.train import TrainOutputs, train_run

    run = RunSpec.from_params(json.loads(snakemake.params.run))
    train_run(
        run=run,
        manifest=read_json(snakemake.input.manifest),
        splits_dir=Path(snakemake.input.splits),
        outputs=TrainOutputs(
            Path(snakemake.output.adapter), Path(snakemake.output.metrics), Path(snakemake.output.loss_curve)
        ),
        threads=snakemake.threads,
        checkpoint_dir=Path(paths.for_run(paths.CHECKPOINT, run.run_id)),
        # Read here, not from params: how often to checkpoint must not trigger reruns.
        checkpoint_every=snakemake.config["execution"]["checkpoint_every"],
        plan_settings=snakemake.config["plan"],
        measurement=MeasurementSettings.from_dict(json.loads(snakemake.params.measurement)),
    )
