# All runs in one table.


localrules:
    aggregate,


rule aggregate:
    input:
        evaluations=expand(paths.EVAL_METRICS, run=EVALUATED),
        trainings=expand(paths.TRAIN_METRICS, run=RUNS),
        data_summary=paths.DATA_SUMMARY,
        manifest=paths.MODEL_MANIFEST,
    output:
        csv=report(paths.RUNS_CSV, caption="../report/runs.rst", category="Tables"),
        markdown=paths.RUNS_MD,
    log:
        f"{paths.LOGS}/aggregate.log",
    params:
        runs=canonical_json([spec.as_params() for spec in EVALUATED.values()]),
    conda:
        "../envs/study.yaml"
    script:
        "../scripts/aggregate.py"
