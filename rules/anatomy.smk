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
        mem_mb=lambda wildcards, attempt: 8000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        method=lambda wildcards: RUNS[wildcards.run].method,
    script:
        "../scripts/anatomy.py"
