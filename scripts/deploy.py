"""Rule deploy: the merge check and serving cost of one run (or base model)."""

from lora_study.core.jobs import job, trained_run

with job(snakemake, gpu=True):  # claims its GPU before anything can start CUDA
    import json
    from pathlib import Path

    from lora_study.core.io import read_json, write_json
    from lora_study.measure.deploy import DeploySettings, run_deploy
    from lora_study.study.sweep import RunSpec

    adapter_dir, train_status = trained_run(snakemake)
    merged_dir = Path(snakemake.output.merged) if hasattr(snakemake.output, "merged") else None
    record = run_deploy(
        run=RunSpec.from_params(json.loads(snakemake.params.run)),
        settings=DeploySettings.from_config(json.loads(snakemake.params.deploy)),
        compute_settings=json.loads(snakemake.params.compute),
        manifest=read_json(snakemake.input.manifest),
        splits_dir=Path(snakemake.input.splits),
        adapter_dir=adapter_dir,
        examples_path=Path(snakemake.input.examples),
        threads=snakemake.threads,
        train_status=train_status,
        merged_dir=merged_dir,
    )
    if merged_dir is not None and not any(merged_dir.iterdir() if merged_dir.exists() else []):
        # Base models and fully fine-tuned runs have nothing to merge; say so where the weights would be.
        merged_dir.mkdir(parents=True, exist_ok=True)
        (merged_dir / "NOT_MERGED.txt").write_text(f"{record['run_id']}: no adapter to merge\n")
    write_json(snakemake.output.record, record)
