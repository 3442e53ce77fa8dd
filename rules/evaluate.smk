# Every run, and the base model, scored on the same held-out split.


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        metrics=paths.EVAL_METRICS,
        predictions=paths.PREDICTIONS,
    log:
        paths.EVAL_LOG,
    params:
        run=run_params,
        compute=compute_params,
        evaluation=canonical_json(config["evaluation"]),
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    conda:
        "../envs/study.yaml"
    script:
        "../scripts/evaluate.py"
