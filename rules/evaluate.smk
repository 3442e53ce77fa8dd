# Every run, and the base model, scored on the same held-out split.


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        metrics=paths.EVAL_METRICS,
        predictions=paths.PREDICTIONS,
    log:
        paths.EVAL_LOG,
    benchmark:
        paths.benchmark("evaluate", per_run=True)
    conda:
        "../envs/study.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    params:
        run=run_params,
        compute=compute_params,
        evaluation=canonical_json(config["evaluation"]),
    script:
        "../scripts/evaluate.py"
