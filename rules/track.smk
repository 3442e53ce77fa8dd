# Optional experiment tracking: every run logged to MLflow from the result files.


localrules:
    track,


rule track:
    input:
        runs=paths.RUNS_CSV,
        loss_curves=paths.LOSS_CURVES_CSV,
        html=paths.FINDINGS_HTML,
        markdown=paths.FINDINGS_MD,
    output:
        paths.TRACKING_RECORD,
    log:
        paths.TRACK_LOG,
    benchmark:
        paths.benchmark("track")
    conda:
        "../envs/tracking.yaml"
    params:
        mlflow=canonical_json(config["tracking"]["mlflow"]),
        runs=tracking_params(),
    script:
        "../scripts/track.py"
