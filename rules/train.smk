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
    params:
        run=run_params,
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/study.yaml"
    script:
        "../scripts/train.py"
