# Model and data are prepared once, where the network is (local rules).


localrules:
    prepare_model,
    prepare_data,
    check_runs,


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


rule check_runs:
    input:
        manifest=paths.MODEL_MANIFEST,
    output:
        checks=paths.RUN_CHECKS,
    log:
        f"{paths.LOGS}/check_runs.log",
    conda:
        "../envs/study.yaml"
    params:
        runs=canonical_json([spec.as_params() for spec in RUNS.values()]),
    script:
        "../scripts/check_runs.py"
