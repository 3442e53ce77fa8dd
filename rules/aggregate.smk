# All runs in one table.


localrules:
    aggregate,


rule aggregate:
    input:
        evaluations=expand(paths.EVAL_METRICS, run=EVALUATED),
        trainings=expand(paths.TRAIN_METRICS, run=RUNS),
        loss_curves=expand(paths.LOSS_CURVE, run=RUNS),
        examples=expand(paths.EXAMPLES, run=EVALUATED),
        general=(expand(paths.GENERAL_EXAMPLES, run=EVALUATED) if forgetting_enabled(config) else []),
        anatomy=expand(paths.ANATOMY, run=RUNS),
        downstream=expand(paths.DOWNSTREAM, run=EVALUATED) if lm_eval_enabled() else [],
        downstream_samples=(expand(paths.DOWNSTREAM_SAMPLES, run=EVALUATED) if lm_eval_enabled() else []),
        deploy=expand(paths.DEPLOY, run=EVALUATED) if deploy_enabled() else [],
        data_summary=paths.DATA_SUMMARY,
        manifest=paths.MODEL_MANIFEST,
        plan=paths.PLAN_CSV,
    output:
        csv=report(paths.RUNS_CSV, caption="../report/runs.rst", category="Tables"),
        markdown=paths.RUNS_MD,
        configs=report(paths.CONFIGS_CSV, caption="../report/configs.rst", category="Tables"),
        configs_markdown=paths.CONFIGS_MD,
        loss_curves=paths.LOSS_CURVES_CSV,
        examples=paths.EXAMPLES_CSV,
        general=paths.GENERAL_EXAMPLES_CSV,
        anatomy=paths.ANATOMY_CSV,
        downstream=paths.DOWNSTREAM_CSV,
        downstream_samples=paths.DOWNSTREAM_SAMPLES_CSV,
        deploy=paths.DEPLOY_CSV,
    log:
        f"{paths.LOGS}/aggregate.log",
    benchmark:
        paths.benchmark("aggregate")
    conda:
        "../envs/study.yaml"
    params:
        runs=canonical_json([spec_params(run_id) for run_id in EVALUATED]),
        runs_trained=canonical_json(list(RUNS)),
    script:
        "../scripts/aggregate.py"
