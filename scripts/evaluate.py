"""Rule evaluate: perplexity and exact-match accuracy of one run or the base model, or the evaluation its
training job left when nothing it depends on changed since (lora_study.measure.handoff)."""

from lora_study.core.jobs import job

with job(snakemake, gpu=True):  # claims its GPU before anything can start CUDA
    import json
    import logging
    from pathlib import Path

    from lora_study.core import paths, phases
    from lora_study.core.io import read_json
    from lora_study.measure import handoff
    from lora_study.study.sweep import RunSpec

    run_params = json.loads(snakemake.params.run)
    evaluation = json.loads(snakemake.params.evaluation)
    compute = json.loads(snakemake.params.compute)
    manifest = read_json(snakemake.input.manifest)
    is_trained_run = hasattr(snakemake.input, "train_metrics")
    trained = read_json(snakemake.input.train_metrics) if is_trained_run else {"status": "ok"}
    run = RunSpec.from_params(run_params)
    general = Path(snakemake.output.general) if hasattr(snakemake.output, "general") else None
    outputs = paths.EvalOutputs(*map(Path, (snakemake.output.metrics, snakemake.output.predictions,
                                            snakemake.output.examples)), general=general)  # fmt: skip
    handoff_dir = Path(paths.for_run(paths.HANDOFF, run.run_id))
    taken = False
    if handoff_dir.exists():
        if is_trained_run and handoff.evaluates_in_training(run, snakemake.config):
            key = handoff.handoff_key(run_params, evaluation, compute, snakemake.config["execution"]["device"],
                                      manifest, Path(snakemake.input.adapter), Path(snakemake.input.splits),
                                      snakemake.threads)  # fmt: skip
            taken = handoff.take(handoff_dir, key, outputs.by_name())
        else:  # left before evaluation.in_training_job was turned off (or a cap set): evaluate here
            handoff.discard(handoff_dir)
    if taken:
        logging.getLogger("lora_study").info("evaluated by the training job (nothing it depends on changed since)")
        phases.end("write")
    else:
        from lora_study.measure.evaluate import evaluate_run

        evaluate_run(
            run=run,
            evaluation=evaluation,
            compute_settings=compute,
            manifest=manifest,
            splits_dir=Path(snakemake.input.splits),
            adapter_dir=Path(snakemake.input.adapter) if is_trained_run else None,
            outputs=outputs,
            threads=snakemake.threads,
            train_status=trained["status"],
            loss_path=trained.get("loss_path"),
        )
