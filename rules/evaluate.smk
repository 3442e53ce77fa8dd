# Every run, and the base model, scored on the same held-out split.


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        **evaluation_outputs(),
    log:
        paths.EVAL_LOG,
    benchmark:
        paths.benchmark("evaluate", per_run=True)
    conda:
        "../envs/study.yaml"
    threads: 2
    resources:
        gpu=1,
        # A retry (attempt 2, see profiles/slurm) asks for more memory and time.
        mem_mb=lambda wildcards, attempt: 8000 * attempt,
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        run=run_params,
        compute=compute_params,
        evaluation=evaluate_params(),
    script:
        "../scripts/evaluate.py"
