# Derived tables, charts and the findings report, computed from the runs table.


localrules:
    findings,


rule findings:
    input:
        configs=paths.CONFIGS_CSV,
        loss_curves=paths.LOSS_CURVES_CSV,
        examples=paths.EXAMPLES_CSV,
        general=paths.GENERAL_EXAMPLES_CSV,
        anatomy=paths.ANATOMY_CSV,
        downstream=paths.DOWNSTREAM_CSV,
        downstream_samples=paths.DOWNSTREAM_SAMPLES_CSV,
        deploy=paths.DEPLOY_CSV,
        manifest=paths.MODEL_MANIFEST,
        data_summary=paths.DATA_SUMMARY,
    output:
        tables=directory(paths.DERIVED_TABLES),
        charts=report(
            directory(paths.CHARTS),
            patterns=["{name}.svg"],
            caption="../report/charts.rst",
            category="Charts",
        ),
        markdown=paths.FINDINGS_MD,
        html=report(paths.FINDINGS_HTML, caption="../report/findings.rst", category="Findings"),
    log:
        f"{paths.LOGS}/findings.log",
    benchmark:
        paths.benchmark("findings")
    conda:
        "../envs/study.yaml"
    params:
        report=canonical_json(config["report"]),
        training=canonical_json(config["training"]),
        evaluation=canonical_json(config["evaluation"]),
        measurement=canonical_json(config["measurement"]),
        # Read by report/charts.rst: each chart's caption in the Snakemake report.
        chart_captions=chart_captions(QUESTIONS),
    script:
        "../scripts/findings.py"
