# Singular values of every trained run's update (merged minus base weight), on CPU.


rule anatomy:
    input:
        manifest=paths.MODEL_MANIFEST,
        adapter=paths.ADAPTER,
    output:
        layers=paths.ANATOMY,
    log:
        paths.ANATOMY_LOG,
    benchmark:
        paths.benchmark("anatomy", per_run=True)
    conda:
        "../envs/study.yaml"
    threads: 2
    resources:
        mem_mb=anatomy_mem_mb,
        runtime=anatomy_runtime,
    params:
        run=run_params,
        memory_limit_gb=config["evaluation"]["memory_limit_gb"],
    script:
        "../scripts/anatomy.py"
