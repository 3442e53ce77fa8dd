# Predicted peak memory of every run, before training; a memory budget skips
# the runs predicted not to fit.


localrules:
    plan,
    layout,


rule plan:
    input:
        manifest=paths.MODEL_MANIFEST,
        splits=paths.DATA_SPLITS,
        checks=expand(paths.RUN_CHECK, run=RUNS),
    output:
        table=report(paths.PLAN_CSV, caption="../report/plan.rst", category="Tables"),
        markdown=paths.PLAN_MD,
    log:
        f"{paths.LOGS}/plan.log",
    benchmark:
        paths.benchmark("plan")
    conda:
        "../envs/study.yaml"
    params:
        runs=canonical_json([spec_params(run_id) for run_id in RUNS]),
        plan=canonical_json(config["plan"]),
    script:
        "../scripts/plan.py"


# A `training.gpus: auto` run's predictions per device count, from which the Snakefile
# chooses its devices under plan.memory_budget_gb (rules/common.smk: train_gpus).
rule layout:
    input:
        manifest=paths.MODEL_MANIFEST,
        splits=paths.DATA_SPLITS,
        check=paths.RUN_CHECK,
    output:
        layout=paths.RUN_LAYOUT,
    log:
        f"{paths.LOGS}/layout/{{run}}.log",
    conda:
        "../envs/study.yaml"
    params:
        run=run_params,
    script:
        "../scripts/layout.py"
