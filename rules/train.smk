# One training job per configuration.


rule train:
    input:
        manifest=paths.MODEL_MANIFEST,
        splits=paths.DATA_SPLITS,
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
        gpu=1,
        mem_mb=8000,
        runtime=120,
    params:
        run=run_params,
    script:
        "../scripts/train.py"
