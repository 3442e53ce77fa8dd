"""Rule lm_eval_tasks: the study's exact-answer prompts as local lm-eval tasks; every configured task checked."""

from lora_study.core.jobs import job

with job(snakemake) as log:
    import json
    from pathlib import Path

    from lora_study.core.io import read_json, write_json
    from lora_study.measure.downstream import LmEvalSettings, check_tasks, write_local_tasks
    from lora_study.measure.evaluate import exact_answer_indices
    from lora_study.prepare.data import load_split
    from lora_study.training.loading import load_tokenizer

    settings = LmEvalSettings(tuple(json.loads(snakemake.params.tasks)), num_fewshot=0, limit=None, batch_size=1)
    rows = list(load_split(snakemake.input.splits, "validation"))
    tokenizer, _ = load_tokenizer(read_json(snakemake.input.manifest))
    scored = exact_answer_indices(rows, snakemake.params.exact_match_examples)
    task_dir = Path(snakemake.output.tasks)
    manifest = write_local_tasks(rows, scored, tokenizer, snakemake.params.max_new_tokens, task_dir)
    documents = check_tasks(settings, manifest, task_dir) if settings.tasks else {}
    for task, count in documents.items():
        log.info("lm-eval task %s: %d documents", task, count)
    write_json(snakemake.output.check, {"tasks": list(settings.tasks), "documents": documents, **manifest})
