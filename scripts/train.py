"""Rule train: one LoRA/QLoRA adapter for one configuration (and, where it can, its evaluation)."""

from lora_study.core.jobs import job, job_gpus

# Claims its GPUs (training.gpus of them) before anything can start CUDA.
with job(snakemake, gpu=True, devices=job_gpus(snakemake)):
    import json
    from pathlib import Path

    from lora_study.core import paths
    from lora_study.core.io import read_json
    from lora_study.measure.evaluate import InTrainingEvaluation
    from lora_study.measure.handoff import evaluates_in_training
    from lora_study.study.settings import compute_settings, evaluation_settings
    from lora_study.study.sweep import RunSpec
    from lora_study.training.loop import train_arguments, train_run

    config = snakemake.config
    run = RunSpec.from_params(json.loads(snakemake.params.run))
    manifest = read_json(snakemake.input.manifest)
    splits = Path(snakemake.input.splits)
    # Read from the config, not params: the evaluation settings must not rerun training (lora_study.measure.handoff).
    evaluation = None
    if evaluates_in_training(run, config):
        evaluation = InTrainingEvaluation(
            evaluation_settings(config),
            compute_settings(run.quantization, run.training.to_dict(), config),
            config["execution"]["device"],
            manifest,
            splits,
            Path(paths.for_run(paths.HANDOFF, run.run_id)),
            snakemake.threads,
        )
    arguments = dict(
        run=run.as_params(),
        manifest=manifest,
        splits_dir=str(splits),
        outputs=[snakemake.output.adapter, snakemake.output.metrics, snakemake.output.loss_curve],
        checkpoint_dir=paths.for_run(paths.CHECKPOINT, run.run_id),
        # Read here, not from params: how often to checkpoint must not trigger reruns.
        checkpoint_every=config["execution"]["checkpoint_every"],
        plan_settings=config["plan"],
        measurement=json.loads(snakemake.params.measurement),
    )
    gpus = job_gpus(snakemake)  # training.gpus, or what `auto` chose
    if gpus > 1:  # one run on N devices: N processes (lora_study.training.sharded)
        from lora_study.training.sharded import launch

        launch(arguments, gpus, snakemake.threads, snakemake.log[0] if snakemake.log else None)
    else:
        train_run(**train_arguments(arguments), threads=snakemake.threads, after_training=evaluation)
