# One training job per configuration.


rule train:
    input:
        unpack(train_inputs),
    output:
        adapter=directory(paths.ADAPTER),
        metrics=paths.TRAIN_METRICS,
        loss_curve=paths.LOSS_CURVE,
    log:
        paths.TRAIN_LOG,
    benchmark:
        paths.benchmark("train", per_run=True)
    conda:
        "../envs/study.yaml"
    threads: 2
    resources:
        gpu=train_gpus,
        # A retry (attempt 2, see profiles/slurm) asks for more memory and time.
        mem_mb=lambda wildcards, attempt: 8000 * attempt,
        runtime=lambda wildcards, attempt: 120 * attempt,
    params:
        run=run_params,
        memory_plan=memory_plan,
        measurement=canonical_json(config["measurement"]),
    script:
        "../scripts/train.py"
