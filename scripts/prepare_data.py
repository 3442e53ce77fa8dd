"""Rule prepare_data: format, tokenize and split the data set once."""

from lora_study.core.jobs import job

with job(snakemake, work="load") as log:
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from lora_study.core.io import atomic_path, read_json, write_json
    from lora_study.prepare.data import prepare_data

    manifest = read_json(snakemake.input.manifest)
    tokenizer = AutoTokenizer.from_pretrained(manifest["path"])
    with atomic_path(snakemake.output.splits) as tmp:
        summary = prepare_data(json.loads(snakemake.params.dataset), tokenizer, Path(tmp))
    write_json(snakemake.output.summary, summary)
    log.info("data: %s", summary)
