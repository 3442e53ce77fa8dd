"""Rule evaluate: perplexity and exact-match accuracy of one run or the base model."""

from lora_study.jobs import job

with job(snakemake, gpu=True):  # claims its GPU before anything can start CUDA
    import json
    from pathlib import Path

    from lora_study.evaluate import evaluate_run
    from lora_study.io import read_json
    from lora_study.sweep import RunSpec

    is_trained_run = hasattr(snakemake.input, "train_metrics")
    trained = read_json(snakemake.input.train_metrics) if is_trained_run else {"status": "ok"}
    evaluate_run(
        run=RunSpec.from_params(json.loads(snakemake.params.run)),
        evaluation=json.loads(snakemake.params.evaluation),
        compute_settings=json.loads(snakemake.params.compute),
        manifest=read_json(snakemake.input.manifest),
        splits_dir=Path(snakemake.input.splits),
        adapter_dir=Path(snakemake.input.adapter) if is_trained_run else None,
        metrics_path=Path(snakemake.output.metrics),
        predictions_path=Path(snakemake.output.predictions),
        examples_path=Path(snakemake.output.examples),
        threads=snakemake.threads,
        train_status=trained["status"],
        loss_path=trained.get("loss_path"),
    )
