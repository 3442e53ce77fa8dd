# Model and data are prepared once, where the network is (local rules).


localrules:
    prepare_model,
    prepare_data,
    check_run,


rule prepare_model:
    output:
        manifest=paths.MODEL_MANIFEST,
    log:
        f"{paths.LOGS}/prepare_model.log",
    benchmark:
        paths.benchmark("prepare_model")
    conda:
        "../envs/study.yaml"
    threads: 2
    resources:
        mem_mb=4000,
    params:
        model=canonical_json(config["model"]),
        converted_dir=f"{paths.MODEL_DIR}/hf",
    script:
        "../scripts/prepare_model.py"


rule prepare_data:
    input:
        manifest=paths.MODEL_MANIFEST,
    output:
        splits=directory(paths.DATA_SPLITS),
        summary=paths.DATA_SUMMARY,
    log:
        f"{paths.LOGS}/prepare_data.log",
    benchmark:
        paths.benchmark("prepare_data")
    conda:
        "../envs/study.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        dataset=canonical_json(config["dataset"]),
    script:
        "../scripts/prepare_data.py"


rule check_run:
    input:
        manifest=paths.MODEL_MANIFEST,
    output:
        check=paths.RUN_CHECK,
    log:
        f"{paths.LOGS}/check/{{run}}.log",
    # All checks are ready as soon as the model is: run them before any training.
    priority: 100
    conda:
        "../envs/study.yaml"
    params:
        # The run's own settings: a check reruns only with its run, which retrains anyway.
        run=run_params,
    script:
        "../scripts/check_run.py"
