# Downstream tasks (lm-evaluation-harness) and deployment (merge check, serving cost), per run.


localrules:
    lm_eval_tasks,


rule lm_eval_tasks:
    input:
        manifest=paths.MODEL_MANIFEST,
        splits=paths.DATA_SPLITS,
    output:
        tasks=directory(paths.LM_EVAL_TASKS),
        check=paths.LM_EVAL_CHECK,
    log:
        f"{paths.LOGS}/lm_eval_tasks.log",
    # A task that cannot be loaded should stop the study before training starts.
    priority: 100
    conda:
        "../envs/study.yaml"
    params:
        # Standard tasks' data is fetched here, where the network is, before any job is submitted.
        tasks=canonical_json(config["evaluation"]["lm_eval"]["tasks"]),
        exact_match_examples=config["evaluation"]["exact_match_examples"],
        max_new_tokens=config["evaluation"]["max_new_tokens"],
    script:
        "../scripts/lm_eval_tasks.py"


rule downstream:
    input:
        unpack(downstream_inputs),
    output:
        scores=paths.DOWNSTREAM,
        samples=paths.DOWNSTREAM_SAMPLES,
    log:
        paths.DOWNSTREAM_LOG,
    benchmark:
        paths.benchmark("downstream", per_run=True)
    conda:
        "../envs/study.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wildcards, attempt: 8000 * attempt,
        runtime=lambda wildcards, attempt: 120 * attempt,
    params:
        run=run_params,
        compute=compute_params,
        lm_eval=canonical_json(config["evaluation"]["lm_eval"]),
        template=config["dataset"]["template"],
    script:
        "../scripts/downstream.py"


rule deploy:
    input:
        unpack(deploy_inputs),
    output:
        **deploy_outputs(),
    log:
        paths.DEPLOY_LOG,
    benchmark:
        paths.benchmark("deploy", per_run=True)
    conda:
        "../envs/study.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wildcards, attempt: 12000 * attempt,
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        run=run_params,
        compute=compute_params,
        deploy=deploy_params,
    script:
        "../scripts/deploy.py"
